"""Tiny Hugging Face models built from configs (random init, no downloads) and their example inputs.

The text builders used outside the model matrix (``bert``, ``gpt2``, ``llama``) take config overrides as
keyword arguments, so a test that needs a variant (more layers, another MLP width) states only how it
differs. From a test outside ``tests/graph``: ``sys.path.insert(0, <tests/graph>)``, then
``from hf_models import ...``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _img(n=2, c=3, s=32):
    return torch.randn(n, c, s, s)


def _ids(vocab=99, n=2, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, s), generator=g)


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        layer_type="bottleneck",
        num_labels=5,
    )
    return ResNetForImageClassification(cfg), _img(s=64)


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5)
    return ConvNextForImageClassification(cfg), _img(s=64)


def mobilenet_v2():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    cfg = MobileNetV2Config(depth_multiplier=0.25, image_size=32, num_labels=5)
    return MobileNetV2ForImageClassification(cfg), _img(s=32)


def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    cfg = EfficientNetConfig(
        width_coefficient=0.2, depth_coefficient=0.2, image_size=32, num_labels=5, hidden_dim=256
    )
    return EfficientNetForImageClassification(cfg), _img(s=32)


def regnet():
    from transformers import RegNetConfig, RegNetForImageClassification

    cfg = RegNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], groups_width=8, num_labels=5
    )
    return RegNetForImageClassification(cfg), _img(s=64)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return ViTForImageClassification(cfg), _img()


def deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return DeiTForImageClassificationWithTeacher(cfg), _img()


def swin():
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 4],
        window_size=4,
        num_labels=5,
    )
    return SwinForImageClassification(cfg), _img()


def beit():
    from transformers import BeitConfig, BeitForImageClassification

    cfg = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
        use_relative_position_bias=True,
    )
    return BeitForImageClassification(cfg), _img()


def _text(cls_name, cfg_name, overrides=None, **kw):
    import transformers

    cfg = getattr(transformers, cfg_name)(**{**kw, **(overrides or {})})
    return getattr(transformers, cls_name)(cfg)


def bert(**overrides):
    m = _text(
        "BertForSequenceClassification",
        "BertConfig",
        overrides,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return m, {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def distilbert():
    m = _text(
        "DistilBertForSequenceClassification",
        "DistilBertConfig",
        vocab_size=99,
        dim=32,
        n_layers=2,
        n_heads=4,
        hidden_dim=64,
        num_labels=3,
    )
    return m, {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def roberta():
    m = _text(
        "RobertaForSequenceClassification",
        "RobertaConfig",
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return m, {"input_ids": _ids(vocab=90) + 3}


def albert():
    m = _text(
        "AlbertForSequenceClassification",
        "AlbertConfig",
        vocab_size=99,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    return m, {"input_ids": _ids()}


def gpt2(**overrides):
    m = _text(
        "GPT2LMHeadModel",
        "GPT2Config",
        overrides,
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=16,
    )
    return m, {"input_ids": _ids(), "use_cache": False}


def llama(**overrides):
    m = _text(
        "LlamaForCausalLM",
        "LlamaConfig",
        overrides,
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return m, {"input_ids": _ids(), "use_cache": False}


def mistral():
    m = _text(
        "MistralForCausalLM",
        "MistralConfig",
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return m, {"input_ids": _ids(), "use_cache": False}


def qwen2():
    m = _text(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        vocab_size=99,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return m, {"input_ids": _ids(), "use_cache": False}


def t5():
    m = _text(
        "T5ForConditionalGeneration",
        "T5Config",
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(s=5), "use_cache": False}


def wav2vec2():
    m = _text(
        "Wav2Vec2ForSequenceClassification",
        "Wav2Vec2Config",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_labels=3,
        classifier_proj_size=16,
        feat_extract_norm="group",
    )
    return m, {"input_values": torch.randn(2, 400)}


def whisper():
    m = _text(
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        vocab_size=99,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=10,
        max_target_positions=16,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return m, {"input_features": torch.randn(2, 8, 20), "decoder_input_ids": _ids(s=5), "use_cache": False}


def clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    return CLIPModel(cfg), {"input_ids": _ids(), "pixel_values": _img()}


HF_MODELS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        resnet,
        convnext,
        mobilenet_v2,
        efficientnet,
        regnet,
        vit,
        deit,
        swin,
        beit,
        bert,
        distilbert,
        roberta,
        albert,
        gpt2,
        llama,
        mistral,
        qwen2,
        t5,
        wav2vec2,
        whisper,
        clip,
    )
}
