"""Recovery by distillation of pruned encoders (llm.distill, target="embedding") on tiny random BERTs.

What is checked: a BertModel (no LM head) distils its sentence embeddings (mean-pooled, L2-normalised last
hidden states): after one-shot, depth and width pruning the held-out embedding cosine to the teacher rises
and the training loss falls; one-shot zeros (masks and plain zeros, 2:4 too) stay exactly where they were;
the teacher is never changed; the loss equals ``1 − mean cos`` computed independently in float64 (padding
and an all-padding row excluded, micro-batches weighted by sentences); a run stopped after k steps and
resumed from its checkpoint ends bit-exact with an uninterrupted one (dropout on: the RNG state resumes
too); embedding tables are frozen; bad input is refused by name before anything changes.
"""

import copy

import pytest
import torch

from secateur.errors import ConfigError
from secateur.llm import (
    distill,
    distillation_loss,
    embedding_cosine,
    mean_pooled,
    parameter_counts,
    prune_decoder,
    prune_depth,
    prune_oneshot,
)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def tiny_bert(dropout: float = 0.0, hidden: int = 32, vocab: int = VOCAB, layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=0.1,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def token_batches(n: int, seed: int, rows: int = 8, seq: int = 12, pad: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:  # right padding of various lengths, as a tokenizer pads a batch
            lengths = torch.randint(3, seq + 1, (rows,), generator=g)
            mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective weight of every Linear inside the encoder blocks (masks applied)."""
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layer." in n
    }


def independent_cosine_loss(student, teacher, batches) -> float:
    """``1 − mean cos`` over the rows with a real token, written out in float64 without secateur."""
    cos = []
    with torch.no_grad():
        for b in batches:
            m = b["attention_mask"].double().unsqueeze(-1)
            keep = b["attention_mask"].sum(1) > 0
            e = []
            for model in (student, teacher):
                h = model(**b).last_hidden_state.double()
                pooled = (h * m).sum(1)[keep] / m.sum(1)[keep]
                e.append(pooled / pooled.norm(dim=-1, keepdim=True))
            cos.append((e[0] * e[1]).sum(-1))
    return float(1 - torch.cat(cos).mean())


# ----------------------------------------------------------------------------------------------------
def test_distillation_brings_a_one_shot_pruned_bert_embedding_back_towards_its_teacher():
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    cal, held = token_batches(12, 1), token_batches(4, 2)
    prune_oneshot(student, cal, "magnitude", 0.6)  # reversible masks
    zeros = {n: w == 0 for n, w in linear_weights(student).items()}
    before = embedding_cosine(student, teacher, held)
    teacher_state = weights(teacher)
    rep = distill(student, teacher, cal, steps=40, lr=3e-3, progress=False)
    after = embedding_cosine(student, teacher, held)
    assert rep.target == "embedding" and rep.peak_chunk_bytes == 0  # auto: neither model has an LM head
    assert 1 - before > 0.02
    assert 1 - after < 0.5 * (1 - before)  # measured: cosine 0.900 -> 0.983
    assert sum(rep.losses[-8:]) < 0.5 * sum(rep.losses[:8])
    assert_same(weights(teacher), teacher_state)
    for name, w in linear_weights(student).items():
        assert torch.equal(w == 0, zeros[name]), name
    # embedding tables (word, position, token type) are frozen: what trains is the non-embedding part
    assert rep.trainable_params == parameter_counts(student)["nonembedding_params"]


@pytest.mark.parametrize("as_masks", [False, True])
def test_one_shot_2_4_zeros_are_exactly_preserved(as_masks):
    teacher = tiny_bert()
    student = copy.deepcopy(teacher)
    cal = token_batches(4, 3)
    prune_oneshot(student, cal, "wanda", None, "2:4", as_masks=as_masks)
    before = linear_weights(student)
    rep = distill(student, teacher, cal, steps=6, lr=1e-2, progress=False)
    after = linear_weights(student)
    assert rep.kept_zeros >= sum(int((w == 0).sum()) for w in before.values()) > 0
    for name, w in before.items():
        z = w == 0
        assert torch.equal(after[name] == 0, z), name
        assert not torch.equal(after[name][~z], w[~z]), name  # the survivors trained
        out_f, in_f = w.shape
        assert ((after[name] == 0).view(out_f, in_f // 4, 4).sum(-1) == 2).all(), name


@pytest.mark.parametrize("kind", ["depth", "width"])
def test_structurally_pruned_bert_recovers_with_the_hidden_state_loss(kind):
    teacher = tiny_bert(layers=4)
    student = copy.deepcopy(teacher)
    cal, held = token_batches(10, 4), token_batches(4, 5)
    if kind == "depth":
        assert len(prune_depth(student, cal, n_blocks=1).kept) == 3
        layers = {2: 3}  # the student's last block -> the teacher's last block
    else:  # heads and FFN channels of every block (BertConfig cannot express fewer heads: plan-saved)
        prune_decoder(student, cal, sparsity=0.3, layers=range(4), criterion="wanda_sp")
        layers = {i: i for i in range(4)}
    before = embedding_cosine(student, teacher, held)
    rep = distill(
        student, teacher, cal, steps=30, lr=3e-3, hidden_weight=0.5, hidden_layers=layers, progress=False
    )
    after = embedding_cosine(student, teacher, held)
    assert 1 - after < 0.3 * (1 - before)  # measured: depth 0.919 -> 0.993, width 0.959 -> 0.995
    assert all(h["hidden"] > 0 for h in rep.history)
    assert rep.history[-1]["hidden"] < rep.history[0]["hidden"]


def test_loss_is_one_minus_the_mean_cosine_in_float64():
    teacher = tiny_bert().double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(
                0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype)
            )
    batches = token_batches(2, 6, rows=5)
    batches[1]["attention_mask"][2] = 0  # an all-padding row: no sentence, excluded
    batches[1]["attention_mask"][4, 1:] = 0  # a one-token sentence
    want = independent_cosine_loss(student, teacher, batches)
    kd, hidden = distillation_loss(student, teacher, batches)
    assert kd == pytest.approx(want, rel=1e-12, abs=1e-15) and hidden == 0.0
    assert embedding_cosine(student, teacher, batches) == pytest.approx(1 - want, rel=1e-12)
    # the gradient is the gradient of that loss (autograd through the independent formula)
    student.zero_grad(set_to_none=True)
    distillation_loss(student, teacher, batches, backward=True, target="embedding")
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = [mean_pooled(teacher(**b).last_hidden_state, b["attention_mask"]) for b in batches]
    s = [mean_pooled(student(**b).last_hidden_state, b["attention_mask"]) for b in batches]
    (1 - (torch.cat(s) * torch.cat(t)).sum(-1).mean()).backward()
    for n, g in ours.items():
        assert torch.allclose(g, student.get_parameter(n).grad, rtol=1e-10, atol=1e-14), n


def test_resume_after_a_stop_is_bit_exact(tmp_path):
    teacher = tiny_bert(dropout=0.1)  # the student trains with dropout: the RNG state must resume too
    pruned = copy.deepcopy(teacher)
    cal = token_batches(5, 7)
    prune_oneshot(pruned, cal, "wanda", 0.5, as_masks=False)
    kwargs = dict(
        steps=6, lr=5e-3, grad_accum=2, warmup_steps=2, hidden_weight=0.3, hidden_layers=[1], progress=False
    )
    whole = copy.deepcopy(pruned)
    torch.manual_seed(1)  # the dropout masks come from the global RNG: each fresh run starts from one state
    rep_whole = distill(whole, teacher, cal, **kwargs)

    class Stop(Exception):
        pass

    def stop_at_4(step, _record):
        if step == 4:
            torch.rand(7)  # the caller's own use of the RNG after the checkpoint does not leak into resume
            raise Stop

    first = copy.deepcopy(pruned)
    torch.manual_seed(1)
    with pytest.raises(Stop):
        distill(
            first,
            teacher,
            cal,
            checkpoint_dir=tmp_path / "ck",
            checkpoint_every=2,
            on_step=stop_at_4,
            **kwargs,
        )
    resumed = copy.deepcopy(pruned)
    rep = distill(
        resumed, teacher, cal, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, resume=True, **kwargs
    )
    assert rep.start_step == 4 and rep.steps == 6 and rep.target == "embedding"
    assert_same(weights(resumed), weights(whole))
    assert rep.history == rep_whole.history
    # a resume with another setting (here dropout) is refused by name
    with pytest.raises(ConfigError, match="saved with dropout=True, this call has dropout=False"):
        distill(
            copy.deepcopy(pruned),
            teacher,
            cal,
            checkpoint_dir=tmp_path / "ck",
            resume=True,
            dropout=False,
            **kwargs,
        )


def test_dropout_false_trains_the_student_in_eval_mode():
    teacher = tiny_bert(dropout=0.3)
    cal = token_batches(3, 11)
    a = copy.deepcopy(teacher)
    a.encoder.layer[0].train()  # one module in train mode: restored afterwards
    modes = [m.training for m in a.modules()]
    rep_a = distill(a, teacher, cal, steps=4, lr=1e-2, dropout=False, progress=False)
    assert [m.training for m in a.modules()] == modes
    b = copy.deepcopy(teacher)  # the same model with every dropout probability at 0, trained in train mode
    for m in b.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rep_b = distill(b, teacher, cal, steps=4, lr=1e-2, progress=False)
    for x, y in zip(rep_a.losses, rep_b.losses):
        assert x == pytest.approx(y, rel=1e-5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), n
    c = copy.deepcopy(teacher)  # dropout on: another trajectory
    rep_c = distill(c, teacher, cal, steps=4, lr=1e-2, progress=False)
    assert rep_c.losses[1:] != rep_a.losses[1:]


def test_bad_input_is_named_and_changes_nothing():
    teacher, cal = tiny_bert(), token_batches(2, 10)
    student = copy.deepcopy(teacher)
    prune_oneshot(student, cal, "magnitude", 0.5, as_masks=False)
    state = weights(student)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    cases = [
        (dict(student=tiny_bert(vocab=80)), "vocabulary mismatch: the student's input embedding has 80 rows"),
        (
            dict(student=tiny_bert(hidden=48)),
            "embedding width mismatch: the student's last hidden states have 48",
        ),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(target="hidden"), "unknown target 'hidden'"),
        (dict(teacher=llama), r"teacher \(LlamaForCausalLM\) has one"),
        (dict(target="logits"), r"student \(BertModel\) has no LM head"),
        (
            dict(student=llama, target="embedding"),
            "student: LlamaForCausalLM: its output .* has no last_hidden_state",
        ),
        (dict(hidden_weight=1.0, hidden_layers=[3]), r"pair \(student 3, teacher 3\) is out of range"),
        (dict(data=[{"input_ids": torch.full((1, 4), VOCAB)}]), "data batch 0: token ids span"),
    ]
    llama_state = weights(llama)
    for override, message in cases:
        args = dict(student=student, teacher=teacher, data=cal, steps=2, progress=False) | override
        with pytest.raises(ConfigError, match=message):
            distill(**args)
    assert_same(weights(student), state)
    assert_same(weights(llama), llama_state)
