"""Recovery by distillation of pruned language models (secateur.llm.distill) on tiny random decoders.

What is checked: the distilled student's KL to the teacher on held-out tokens falls well below the
undistilled student's (one-shot pruned Gemma 3, depth-pruned Llama with the hidden-state loss); one-shot
zeros (plain zeros, N:M, reversible masks) stay exactly where they were while the survivors train; the
chunked loss and its gradients equal the unchunked ones and the loss of the full logits in float64 (Gemma 3
with final-logit soft-capping); a run stopped after k steps and resumed from its checkpoint ends bit-exact
with an uninterrupted one; perplexity equals the model's own next-token loss; bad input is refused by name
before anything changes; checkpoints saved before the ``target`` / ``dropout`` settings existed resume as
logits runs with dropout. (Encoders, ``target="embedding"``: tests/test_llm_encoder_distill.py.)
"""

import copy
import math

import pytest
import torch

from secateur.errors import ConfigError
from secateur.llm import (
    distill,
    distillation_kl,
    distillation_loss,
    perplexity,
    prune_depth,
    prune_oneshot,
)
from secateur.train import kd_loss

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SLIDING, FULL = "sliding_attention", "full_attention"
VOCAB = 64


def tiny_gemma(softcap: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=64,
        layer_types=[SLIDING, SLIDING, FULL],
        initializer_range=0.1,
        final_logit_softcapping=softcap,
    )
    return transformers.Gemma3ForCausalLM(cfg).eval()


def tiny_llama(vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(n: int, seed: int, rows: int = 4, seq: int = 16, pad: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq - 5 :] = 0  # right padding in one row: excluded from the loss
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective weight of every Linear inside the blocks (masks applied)."""
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in n
    }


# ----------------------------------------------------------------------------------------------------
def test_distillation_brings_a_one_shot_pruned_gemma_back_towards_its_teacher():
    teacher = tiny_gemma()
    student = copy.deepcopy(teacher)
    cal, held = token_batches(16, 1), token_batches(4, 2)
    prune_oneshot(student, cal, "magnitude", 0.6)
    before = distillation_kl(student, teacher, held)
    teacher_state = weights(teacher)
    rep = distill(student, teacher, cal, steps=60, lr=1e-2, progress=False)
    after = distillation_kl(student, teacher, held)
    assert before > 0.05
    assert after < 0.6 * before  # measured: 0.125 -> 0.064
    assert rep.steps == 60 and rep.start_step == 0 and len(rep.history) == 60
    assert sum(rep.losses[-10:]) < 0.6 * sum(rep.losses[:10])  # the training loss fell too
    assert_same(weights(teacher), teacher_state)  # the teacher is never changed
    assert rep.trainable_params == sum(p.numel() for n, p in student.named_parameters() if "embed" not in n)


def test_depth_pruned_llama_with_hidden_state_loss_recovers():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    cal, held = token_batches(12, 3, pad=True), token_batches(4, 4)
    prune_depth(student, cal, n_blocks=1)
    before = distillation_kl(student, teacher, held)
    rep = distill(
        student,
        teacher,
        cal,
        steps=40,
        lr=3e-3,
        hidden_weight=0.1,
        hidden_layers={2: 3},
        grad_accum=2,
        progress=False,
    )
    after = distillation_kl(student, teacher, held)
    assert after < 0.6 * before  # measured: 0.080 -> 0.041
    assert all(h["hidden"] > 0 for h in rep.history)
    assert rep.history[-1]["hidden"] < rep.history[0]["hidden"]
    # the loss is normalised by the step's real tokens: 2 micro-batches of 64 tokens, 5 of them padding
    assert set(rep.tokens_per_step) <= {128, 123, 118}


@pytest.mark.parametrize("as_masks", [False, True])
@pytest.mark.parametrize(
    ("method", "sparsity", "pattern"), [("wanda", 0.5, "row"), ("sparsegpt", None, "2:4")]
)
def test_one_shot_zeros_and_n_m_patterns_are_exactly_preserved(as_masks, method, sparsity, pattern):
    teacher = tiny_gemma()
    student = copy.deepcopy(teacher)
    cal = token_batches(6, 5)
    prune_oneshot(student, cal, method, sparsity, pattern, as_masks=as_masks)
    before = linear_weights(student)
    rep = distill(student, teacher, cal, steps=8, lr=1e-2, progress=False)
    after = linear_weights(student)
    assert rep.kept_zeros >= sum(int((w == 0).sum()) for w in before.values()) > 0
    for name, w in before.items():
        zeros = w == 0
        assert torch.equal(after[name] == 0, zeros), name  # the same zeros, no new ones
        assert not torch.equal(after[name][~zeros], w[~zeros]), name  # the survivors trained
        if pattern == "2:4":
            out_f, in_f = w.shape
            assert ((after[name] == 0).view(out_f, in_f // 4, 4).sum(-1) == 2).all(), name
        else:
            assert ((after[name] == 0).sum(1) == w.shape[1] // 2).all(), name


@pytest.mark.parametrize("hidden_weight", [0.0, 0.5])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones_in_float64(hidden_weight):
    teacher = tiny_gemma(softcap=3.0).double()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(
                0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype)
            )
    batch = token_batches(1, 6, rows=3, seq=11, pad=True)[0]
    temp = 2.0

    def run(chunk):
        student.zero_grad(set_to_none=True)
        kd, hid = distillation_loss(
            student,
            teacher,
            batch,
            temperature=temp,
            chunk_size=chunk,
            hidden_weight=hidden_weight,
            hidden_layers=[0, 2],
            backward=True,
        )
        return kd, hid, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    kd_all, hid_all, g_all = run(None)
    for chunk in (1, 4, 7):
        kd, hid, g = run(chunk)
        assert kd == pytest.approx(kd_all, rel=1e-12, abs=0) and hid == pytest.approx(
            hid_all, rel=1e-12, abs=0
        )
        assert g.keys() == g_all.keys()
        for n in g:
            assert torch.allclose(g[n], g_all[n], rtol=1e-10, atol=1e-14), n
    # the same value as kd_loss on the full (soft-capped) logits of the real positions
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        want = kd_loss(student(**batch).logits[mask], teacher(**batch).logits[mask], temp)
    assert kd_all == pytest.approx(float(want), rel=1e-12, abs=0)
    assert (hid_all > 0) == (hidden_weight > 0)


def test_resume_after_a_stop_is_bit_exact(tmp_path):
    teacher = tiny_gemma()
    pruned = copy.deepcopy(teacher)
    cal = token_batches(5, 7, pad=True)
    prune_oneshot(pruned, cal, "wanda", 0.5, as_masks=False)
    kwargs = dict(steps=6, lr=5e-3, grad_accum=2, warmup_steps=2, progress=False, weight_decay=0.01)

    whole = copy.deepcopy(pruned)
    rep_whole = distill(whole, teacher, cal, **kwargs)

    class Stop(Exception):
        pass

    def stop_at_4(step, _record):
        if step == 4:
            raise Stop

    first = copy.deepcopy(pruned)
    with pytest.raises(Stop):  # resume=True on an empty folder: a fresh start
        distill(
            first,
            teacher,
            cal,
            checkpoint_dir=tmp_path / "ck",
            checkpoint_every=2,
            resume=True,
            on_step=stop_at_4,
            **kwargs,
        )
    resumed = copy.deepcopy(pruned)  # a fresh process would rebuild the pruned model the same way
    rep = distill(
        resumed, teacher, cal, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, resume=True, **kwargs
    )
    assert rep.start_step == 4 and rep.steps == 6 and rep.resumed_from.endswith("step-4")
    assert_same(weights(resumed), weights(whole))
    assert rep.history == rep_whole.history  # losses and learning rates of every step, bit for bit
    assert not torch.equal(
        weights(resumed)["model.layers.0.mlp.up_proj.weight"],
        weights(pruned)["model.layers.0.mlp.up_proj.weight"],
    )


def test_perplexity_is_the_exponential_of_the_mean_next_token_loss():
    model = tiny_llama().double()
    for batch in (token_batches(1, 8, rows=2, seq=12)[0], token_batches(1, 8, rows=2, seq=12, pad=True)[0]):
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        with torch.no_grad():
            logits = model(**batch).logits
            labels = ids.masked_fill(~mask, -100)
            hf_loss = model(**batch, labels=labels).loss  # transformers upcasts logits to float32 only
        pick = mask[:, :-1] & mask[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1][pick], ids[:, 1:][pick])  # float64
        got = perplexity(model, [batch], chunk_size=5)
        assert got == pytest.approx(math.exp(float(nll)), rel=1e-12)
        assert got == pytest.approx(math.exp(float(hf_loss)), rel=1e-5)


def test_modes_and_flags_are_restored():
    teacher, cal = tiny_gemma(), token_batches(2, 9)
    student = copy.deepcopy(teacher)
    student.model.layers[0].train()  # one module in train mode inside an eval model
    student.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    modes = [m.training for m in student.modules()]
    distill(student, teacher, cal, steps=1, progress=False)
    assert [m.training for m in student.modules()] == modes and not teacher.training
    assert not student.model.layers[1].mlp.up_proj.weight.requires_grad
    assert all(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())


def test_bad_input_is_named_and_changes_nothing(tmp_path):
    teacher, cal = tiny_gemma(), token_batches(2, 10)
    student = copy.deepcopy(teacher)
    prune_oneshot(student, cal, "magnitude", 0.5, as_masks=False)
    state = weights(student)
    cases = [
        (dict(student=tiny_llama(vocab=80)), "vocabulary mismatch: the student's LM head has 80 outputs"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(steps=True), "steps must be an int >= 1"),
        (dict(lr=-1.0), "lr must be"),
        (dict(temperature=0), "temperature must be"),
        (dict(grad_accum=0), "grad_accum must be"),
        (dict(chunk_size=0), "chunk_size must be"),
        (dict(optimizer="lion"), "unknown optimizer 'lion'"),
        (dict(schedule="step"), "unknown schedule"),
        (dict(hidden_weight=1.0, hidden_layers=[5]), r"pair \(student 5, teacher 5\) is out of range"),
        (dict(student=teacher), "same object"),
        (dict(data=[{"input_ids": torch.full((1, 4), VOCAB)}]), "data batch 0: token ids span"),
        (dict(data=[]), "no calibration batch"),
        (dict(resume=True), "resume=True needs checkpoint_dir"),
    ]
    for override, message in cases:
        args = dict(student=student, teacher=teacher, data=cal, steps=2, progress=False) | override
        with pytest.raises(ConfigError, match=message):
            distill(**args)
    assert_same(weights(student), state)

    class Scaled(torch.nn.Module):  # logits that are not its LM head applied to the hidden states
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.lm_head

        def forward(self, **kw):
            return self.inner(**kw).logits * 2

    with pytest.raises(ConfigError, match="not its LM head applied"):
        distill(Scaled(copy.deepcopy(teacher)), teacher, cal, steps=1, progress=False)
    with pytest.raises(ConfigError, match="no LM head"):
        distill(teacher.model, teacher, cal, steps=1, progress=False)

    # a folder holding checkpoints needs resume=True; resuming with other settings is refused by name
    distill(student, teacher, cal, steps=1, progress=False, checkpoint_dir=tmp_path / "ck")
    state = weights(student)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        distill(student, teacher, cal, steps=1, progress=False, checkpoint_dir=tmp_path / "ck")
    with pytest.raises(ConfigError, match="saved with lr=0.0001, this call has lr=0.001"):
        distill(
            student,
            teacher,
            cal,
            steps=1,
            lr=1e-3,
            progress=False,
            checkpoint_dir=tmp_path / "ck",
            resume=True,
        )
    assert_same(weights(student), state)


def test_checkpoints_written_before_target_and_dropout_existed_still_resume(tmp_path):
    from secateur.llm.recovery import _Run

    teacher, cal = tiny_gemma(), token_batches(2, 12)
    student = copy.deepcopy(teacher)
    distill(student, teacher, cal, steps=1, progress=False, checkpoint_dir=tmp_path / "ck")
    run = _Run(student, torch.optim.SGD(student.parameters(), lr=0.1), {"steps": 1, "target": "logits"})
    old = {"kind": "secateur.llm.distill", "global_step": 1, "settings": {"steps": 1}, "history": []}
    run.check_json_state(old)  # no "target" saved: a logits run, as every run before the setting
    run.settings = {"steps": 1, "target": "embedding", "dropout": True}
    with pytest.raises(ConfigError, match="saved with target='logits', this call has target='embedding'"):
        run.check_json_state(old)
    run.settings = {"steps": 1, "dropout": False}
    with pytest.raises(ConfigError, match="saved with dropout=True, this call has dropout=False"):
        run.check_json_state(old)
    # and a real checkpoint resumes under the same settings (target resolved to logits by "auto")
    rep = distill(student, teacher, cal, steps=1, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)
    assert rep.start_step == 1 and rep.target == "logits"
