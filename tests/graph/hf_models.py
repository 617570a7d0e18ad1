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


# ---- the issue-17 additions: decoder LMs (MQA, GQA, ALiBi), encoder-decoders, encoders, vision, FFT ----
# Every builder below is a tiny config (2 layers, widths <= 64); HF_MODELS re-initialises all of them (see
# reinitialise) so that their outputs are O(1).


def _lm(cls_name, cfg_name, **kw):
    """A causal LM of 2 layers on a 99-token vocabulary and its inputs (no KV cache)."""
    m = _text(cls_name, cfg_name, None, vocab_size=99, **kw)
    return m, {"input_ids": _ids(), "use_cache": False}


def falcon():
    """Multi-query attention (one KV head), parallel attention + MLP; ffn_hidden_size explicit."""
    return _lm(
        "FalconForCausalLM",
        "FalconConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        alibi=False,
        ffn_hidden_size=64,
        bias=False,
    )


def falcon_gqa():
    """Falcon's new decoder architecture: grouped-query attention (2 KV heads), two layer norms."""
    return _lm(
        "FalconForCausalLM",
        "FalconConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        ffn_hidden_size=64,
    )


def bloom():
    """ALiBi attention, fused query_key_value, MLP of 4 x hidden (not a config field)."""
    return _lm("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4)


def mpt():
    """ALiBi attention with a fused Wqkv; the MLP is 4 x d_model in transformers' code (expansion_ratio is
    not read)."""
    return _lm(
        "MptForCausalLM",
        "MptConfig",
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=16,
    )


def opt():
    """OPT: learned positions, head size derived from hidden_size / num_attention_heads."""
    return _lm(
        "OPTForCausalLM",
        "OPTConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        max_position_embeddings=16,
    )


def gpt_neox():
    """GPT-NeoX / Pythia: fused query_key_value, partial rotary, parallel residual."""
    return _lm(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )


def gptj():
    """GPT-J: rotary on part of each head, parallel attention + MLP."""
    return _lm(
        "GPTJForCausalLM",
        "GPTJConfig",
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        rotary_dim=4,
        n_positions=16,
    )


def stablelm():
    """StableLM: GQA with partial rotary and LayerNorm."""
    return _lm(
        "StableLmForCausalLM",
        "StableLmConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )


def gemma3():
    """Gemma 3 text: GQA, explicit head_dim, q/k RMSNorm, sliding + global layers."""
    return _lm(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=32,
        sliding_window=4,
    )


def phi3():
    """Phi-3: fused qkv_proj and gate_up_proj, GQA."""
    return _lm(
        "Phi3ForCausalLM",
        "Phi3Config",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=0,
    )


def qwen3():
    """Qwen3: GQA with q/k RMSNorm and explicit head_dim."""
    return _lm(
        "Qwen3ForCausalLM",
        "Qwen3Config",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def olmo2():
    """OLMo-2: post-norm blocks, q/k RMSNorm over the whole projection."""
    return _lm(
        "Olmo2ForCausalLM",
        "Olmo2Config",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def _seq2seq(cls_name, cfg_name, **kw):
    m = _text(
        cls_name,
        cfg_name,
        None,
        vocab_size=99,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=16,
        pad_token_id=1,
        decoder_start_token_id=2,
        **kw,
    )
    return m, {
        "input_ids": _ids(vocab=90) + 3,
        "decoder_input_ids": _ids(vocab=90, s=5) + 3,
        "use_cache": False,
    }


def bart():
    """BART encoder-decoder."""
    return _seq2seq("BartForConditionalGeneration", "BartConfig")


def mbart():
    """mBART: pre-norm BART with final layer norms."""
    return _seq2seq("MBartForConditionalGeneration", "MBartConfig")


def marian():
    """Marian (MT): sinusoidal positions, final logits bias."""
    return _seq2seq("MarianMTModel", "MarianConfig")


def pegasus():
    """Pegasus: sinusoidal positions, pre-norm."""
    return _seq2seq("PegasusForConditionalGeneration", "PegasusConfig")


def _encoder(cls_name, cfg_name, **kw):
    m = _text(
        cls_name,
        cfg_name,
        None,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=32,
        **kw,
    )
    return m, {"input_ids": _ids(vocab=90) + 3, "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def deberta_v2():
    """DeBERTa-v2: disentangled relative attention (c2p, p2c)."""
    return _encoder(
        "DebertaV2ForSequenceClassification",
        "DebertaV2Config",
        relative_attention=True,
        pos_att_type=["c2p", "p2c"],
        max_relative_positions=16,
        position_buckets=8,
        pooler_hidden_size=32,
    )


def electra():
    """ELECTRA discriminator: an embedding size smaller than the hidden size (projection)."""
    return _encoder("ElectraForSequenceClassification", "ElectraConfig", embedding_size=16)


def xlm_roberta():
    """XLM-RoBERTa."""
    return _encoder("XLMRobertaForSequenceClassification", "XLMRobertaConfig")


def fnet():
    """FNet: token mixing by a 2-d FFT instead of attention."""
    m = _text(
        "FNetForSequenceClassification",
        "FNetConfig",
        None,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=16,
        use_tpu_fourier_optimizations=False,
    )
    return m, {"input_ids": _ids()}


def convnextv2():
    """ConvNeXt-V2: global response normalisation (GRN, a vector norm over space)."""
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    cfg = ConvNextV2Config(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5)
    return ConvNextV2ForImageClassification(cfg), _img(s=64)


def poolformer():
    """PoolFormer: average pooling as the token mixer, group norm."""
    from transformers import PoolFormerConfig, PoolFormerForImageClassification

    cfg = PoolFormerConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=5)
    return PoolFormerForImageClassification(cfg), _img(s=64)


def levit():
    """LeViT: conv stem, attention with learned biases and downsampling attention (hybrid)."""
    from transformers import LevitConfig, LevitForImageClassification

    cfg = LevitConfig(
        image_size=64,
        hidden_sizes=[32, 48, 64],
        num_attention_heads=[2, 3, 4],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        num_labels=5,
    )
    return LevitForImageClassification(cfg), _img(s=64)


def mobilevit():
    """MobileViT: inverted residuals with transformer blocks over unfolded patches (hybrid)."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    cfg = MobileViTConfig(
        image_size=64,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2,
        num_labels=5,
    )
    return MobileViTForImageClassification(cfg), _img(s=64)


def segformer():
    """SegFormer: hierarchical transformer with spatial-reduction attention, segmentation head."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(
        hidden_sizes=[16, 32],
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        num_attention_heads=[1, 2],
        strides=[4, 2],
        patch_sizes=[7, 3],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        num_labels=5,
    )
    return SegformerForSemanticSegmentation(cfg), _img(s=32)


def dinov2():
    """DINOv2: ViT with layer scale and interpolated position embeddings."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    return Dinov2ForImageClassification(cfg), _img()


def reinitialise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every parameter of ``model`` in place so that its outputs are O(1) (transformers' tiny
    configs with std-0.02 init give logits of 1e-3..1e-10, where a relative oracle tells little).

    Matrices and kernels (ndim >= 2): normal with std ``0.5 / sqrt(fan_in)``, ``fan_in`` the product of all
    dims but the first (GPT-2's transposed Conv1D gets ``out`` instead: the same order of magnitude). 1-d
    ``...weight`` (norm scales) ``1 + 0.1 N(0, 1)``; other 1-d parameters (biases, layer scales, GRN gamma /
    beta) ``0.1 N(0, 1)``. Deterministic for a given ``seed``; buffers (BatchNorm statistics) are untouched.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * (0.5 / max(1, p[0].numel()) ** 0.5))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def _reinitialised(build: Callable) -> Callable:
    """``build`` whose model :func:`reinitialise` re-initialises (same name, for the matrix ids)."""

    def wrapped():
        model, x = build()
        return reinitialise(model), x

    wrapped.__name__ = build.__name__
    wrapped.__doc__ = build.__doc__
    return wrapped


#: The in-CI Hugging Face matrix: builder name -> () -> (re-initialised model, example inputs).
HF_MODELS: dict[str, Callable] = {
    f.__name__: _reinitialised(f)
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
        falcon,
        falcon_gqa,
        bloom,
        mpt,
        opt,
        gpt_neox,
        gptj,
        stablelm,
        gemma3,
        phi3,
        qwen3,
        olmo2,
        bart,
        mbart,
        marian,
        pegasus,
        deberta_v2,
        electra,
        xlm_roberta,
        poolformer,
        fnet,
        convnextv2,
        levit,
        mobilevit,
        segformer,
        dinov2,
    )
}
#: Architectures whose structure the dependency graph refuses today, with the op it names: builder name ->
#: (builder, op). tests/graph/test_hf_reload.py asserts the named refusal while no rule is registered for the
#: op, and the full matrix check once one is. Empty since issue 17: FNet (``fft_fftn``) and ConvNeXt-V2
#: (``linalg_vector_norm``) moved to HF_MODELS (secateur.graph.rules_ops).
HF_PENDING_RULES: dict[str, tuple[Callable, str]] = {}
#: Decoder LMs and text encoders of the matrix (the save_pretrained -> plain transformers reload tests).
DECODER_LMS = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "falcon",
    "falcon_gqa",
    "bloom",
    "mpt",
    "opt",
    "gpt_neox",
    "gptj",
    "stablelm",
    "gemma3",
    "phi3",
    "qwen3",
    "olmo2",
)
ENCODERS = ("bert", "distilbert", "roberta", "albert", "deberta_v2", "electra", "xlm_roberta")
#: Models whose hidden size (normalised by LayerNorm) the graph leaves whole with prune_normalized=True, and
#: the reason it names (asserted in test_hf_reload.py; excluded from test_matrix's "a norm was narrowed").
HIDDEN_LEFT_WHOLE: dict[str, str] = {
    **dict.fromkeys(("bart", "mbart"), "integer index into a channel dim [op 'getitem' in module"),
    **dict.fromkeys(("marian", "pegasus"), "reaches a model output"),  # encoder_last_hidden_state
}
