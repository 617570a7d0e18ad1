"""Recovery of a pruned language model by knowledge distillation from its dense original.

After one-shot, width or depth pruning, a short training run in which the pruned *student* matches the
dense *teacher* recovers much of the lost quality. What is matched depends on the model (``target=``):

* **logits** (causal LMs, ``*ForCausalLM``): the teacher's next-token distributions. NVIDIA's Minitron
  (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation", sec. 3.3)
  prunes, then retrains with the KL divergence of the teacher's and the student's logits, optionally plus a
  loss on intermediate hidden states; logit-only distillation was their best single choice. The loss is
  Hinton et al.'s (2015) ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` (:func:`secateur.train.distill.kd_loss`),
  averaged over the real (unpadded) tokens of the calibration text.
* **embedding** (encoders without an LM head, e.g. ``BertModel`` such as all-MiniLM-L6-v2, whose product is
  a sentence embedding): the teacher's sentence embeddings, the mean of the last hidden states over the real
  tokens, L2-normalised (Sentence-BERT's MEAN pooling, Reimers & Gurevych 2019). The loss is ``1 − cos(e_s,
  e_t)`` averaged over the sentences: the embedding-level distillation of Reimers & Gurevych (2020, "Making
  Monolingual Sentence Embeddings Multilingual using Knowledge Distillation", who take the MSE of the
  embeddings; on unit vectors ``‖e_s − e_t‖² = 2 (1 − cos)``, so both have the same minimiser and the
  cosine is the measure reported). TinyBERT (Jiao et al. 2020) and MiniLM (Wang et al. 2020) add losses on
  intermediate layers: the optional hidden-state term below is the same for both targets.

The training loop, the masks, the checkpoints and the hidden-state term are one code path; only the object
that computes "the model's product" and "the loss between two products" differs (``_Logits`` /
``_Embedding``).

Memory on CPU (logits). A causal LM's output layer is the largest term: Gemma 3 has a 262,144-token
vocabulary, so the logits of a 16 × 128-token batch would take 2 GiB per copy in float32, and a plain
implementation holds four such tensors (teacher and student logits, the student's log-softmax and its
gradient). Here neither model's full-vocabulary logits are ever built for the whole batch:

1. the teacher's *body* runs (a forward pre-hook on its LM head stores the head's input, the final hidden
   states ``(B, S, H)``, and stops the pass), without gradients;
2. the student's body runs the same way, with gradients; its final hidden states of the real tokens are
   detached into a leaf ``h`` of shape ``(N, H)``;
3. over chunks of ``chunk_size`` positions: both heads map their chunk to logits ``(chunk, V)``, the KL of
   that chunk is computed and back-propagated at once into ``h`` (and into the head if it is trained), and
   the chunk's temporaries are freed;
4. ``h``'s accumulated gradient is back-propagated through the student's body once (together with the
   optional hidden-state loss).

Peak memory is therefore the two models, the optimizer state (AdamW: two floats per trained parameter),
the student's activations of one micro-batch, both models' final hidden states ``(B·S·H)`` and the
temporaries of *one chunk*: about five ``chunk_size × V`` tensors (teacher and student logits, their
log-softmaxes, the student logits' gradient): 5 × 128 × 262,144 × 4 B = 640 MiB for Gemma 3 at the default
chunk of 128 positions, whatever the batch size. The loss is the same sum as the unchunked one (tested in
float64); only the peak changes. The embedding target has no such term (its product is ``(B, H)``).

Masks stay fixed. Weights pruned by :func:`~secateur.llm.oneshot.prune_oneshot` (reversible masks by
default, ``weight = original * mask``) stay zero through the chain rule; weights pruned into plain zeros
(``as_masks=False``, :func:`~secateur.llm.offload.prune_checkpoint`,
:func:`~secateur.llm.oneshot.prune_linears` after baking) would not, so every trained weight matrix
(parameters with two or more dimensions) has its zeros recorded at the start; their gradient is zeroed
before every optimizer step and the entries are set to zero again after it, so unstructured sparsity and
N:M patterns are exactly preserved. Vectors (norm scales, biases) are not held: Gemma stores its RMSNorm
scales as ``1 + w`` with ``w`` often exactly 0.

Checkpoints: every ``checkpoint_every`` steps the student, the optimizer, the step, the per-step history and
the RNG states are saved through :mod:`secateur.train.checkpoint` (crash-safe folders published by an
atomic rename, no pickle). A run resumed with ``resume=True`` continues bit for bit on CPU: the batch of each
step and the learning rate are pure functions of the step number.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from secateur.errors import ConfigError
from secateur.llm.calibration import Batch, calibration_batches
from secateur.llm.oneshot import block_output, find_blocks
from secateur.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from secateur.train.distill import kd_loss
from secateur.train.seed import get_rng_state, set_rng_state
from secateur.train.trainer import SCHEDULES, lr_at_step

__all__ = [
    "OPTIMIZERS",
    "TARGETS",
    "DistillReport",
    "distill",
    "distillation_kl",
    "distillation_loss",
    "embedding_cosine",
    "mean_pooled",
    "perplexity",
]

#: Optimizers :func:`distill` builds: AdamW (Loshchilov & Hutter 2019; default) or SGD with momentum 0.9.
OPTIMIZERS = ("adamw", "sgd")
#: What :func:`distill` matches: ``"logits"`` (next-token distributions through the LM heads),
#: ``"embedding"`` (mean-pooled, L2-normalised last hidden states: sentence embeddings), or ``"auto"``
#: (``"logits"`` when both models have an LM head, ``"embedding"`` when neither has one).
TARGETS = ("auto", "logits", "embedding")
DEFAULT_CHUNK = 128
#: Settings of checkpoints written before the setting existed (they resume as these values).
_LEGACY_SETTINGS: dict[str, Any] = {"target": "logits", "dropout": True}


@dataclass
class DistillReport:
    """Outcome of :func:`distill`.

    ``steps``: optimizer steps done in all (resumed ones included); ``start_step``: the step this call
    started from (0, or the resumed checkpoint's); ``history``: one dict per step run in this call and in
    the resumed run (``step``, ``loss``, ``kd`` (the distillation term: the KL for logits, ``1 − cos`` for
    embeddings), ``hidden``, ``lr``, ``tokens``); ``trainable_params``: parameters trained; ``kept_zeros``:
    weight entries held at zero (pruned weights); ``peak_chunk_bytes``: bytes of one chunk's
    full-vocabulary temporaries (five ``chunk × V`` tensors, the estimate of the module docstring; 0 for
    embeddings); ``seconds``: wall time of this call; ``checkpoint``: the last checkpoint folder written (or
    None); ``resumed_from``: the folder resumed from (or None); ``target``: ``"logits"`` or ``"embedding"``.
    """

    steps: int
    start_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    trainable_params: int = 0
    kept_zeros: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    peak_chunk_bytes: int = 0
    seconds: float = 0.0
    checkpoint: str | None = None
    resumed_from: str | None = None
    target: str = "logits"

    @property
    def losses(self) -> list[float]:
        """The total loss of every step in :attr:`history`, in order."""
        return [h["loss"] for h in self.history]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# the model's head, and its body run up to the head (or to its last hidden states)
# ----------------------------------------------------------------------------------------------------
def _output_embeddings(model: nn.Module) -> Any:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _has_lm_head(model: nn.Module) -> bool:
    head = _output_embeddings(model)
    return isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), torch.Tensor)


class _Head:
    """The map from final hidden states to logits that the model applies: its output embeddings (LM head),
    then Gemma 2/3's ``final_logit_softcapping`` (``cap · tanh(logits / cap)``) when the config sets it."""

    def __init__(self, model: nn.Module, role: str) -> None:
        head = _output_embeddings(model)
        if not _has_lm_head(model):
            raise ConfigError(
                f"{role} ({type(model).__name__}) has no LM head (get_output_embeddings() returned "
                f"{type(head).__name__}): logit distillation needs a causal language model such as "
                "*ForCausalLM (an encoder's base model distils with target='embedding')"
            )
        self.module = head
        cfg = getattr(model, "config", None)
        text = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
        cap = getattr(text, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.vocab = int(head.weight.shape[0])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _StopAtHead(Exception):
    """Raised by the LM head's pre-hook: the body's output is stored, the head is not run."""


def _call_kwargs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    device = next(model.parameters()).device
    call: dict[str, Any] = {k: v.to(device) for k, v in batch.items()}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        call["use_cache"] = False
    return call


def _last_hidden(model: nn.Module, out: Any) -> torch.Tensor:
    """The ``last_hidden_state`` of a model's output (an encoder's or a base decoder's ``(B, S, H)``).

    Raises:
        ConfigError: the output has none (e.g. a ``*ForCausalLM`` or ``*ForMaskedLM`` head model).
    """
    h = getattr(out, "last_hidden_state", None)
    if not isinstance(h, torch.Tensor):
        raise ConfigError(
            f"{type(model).__name__}: its output ({type(out).__name__}) has no last_hidden_state; embedding "
            "distillation needs the base model (transformers.AutoModel, e.g. BertModel), not a model with a "
            "task head"
        )
    return h


def _body(
    model: nn.Module, head: _Head | None, batch: Batch, blocks: Sequence[nn.Module] = ()
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``model`` on ``batch`` up to its LM head ``head``: ``(head input (B, S, H), outputs of blocks)``;
    with ``head=None`` the whole model: ``(its last_hidden_state (B, S, H), outputs of blocks)``.

    Raises:
        ConfigError: the pass ended without calling the head, the output has no last hidden states, or a
            hooked block output no hidden states.
    """
    store: dict[str, torch.Tensor] = {}
    hidden: list[torch.Tensor | None] = [None] * len(blocks)

    def at_head(_m: nn.Module, args: tuple) -> None:
        store["h"] = args[0]
        raise _StopAtHead

    def at_block(k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            hidden[k] = block_output(out)

        return hook

    handles = [head.module.register_forward_pre_hook(at_head)] if head is not None else []
    handles += [b.register_forward_hook(at_block(k)) for k, b in enumerate(blocks)]
    try:
        out = model(**_call_kwargs(model, batch))
    except _StopAtHead:
        pass
    else:
        if head is not None:
            raise ConfigError(f"{type(model).__name__}: the forward pass never called its LM head")
        store["h"] = _last_hidden(model, out)
    finally:
        for h in handles:
            h.remove()
    missing = [k for k, t in enumerate(hidden) if t is None]
    if missing:
        raise ConfigError(f"{type(model).__name__}: the forward pass never reached hooked block {missing[0]}")
    return store["h"], [t for t in hidden if t is not None]


def _check_head(model: nn.Module, head: _Head, batch: Batch, role: str) -> None:
    """Refuse a model whose logits are not ``head(body output)`` (checked on a few tokens, eval mode)."""
    probe = {k: v[:1, :8] for k, v in batch.items()}
    with _modes(model, train=False), torch.no_grad():
        out = model(**_call_kwargs(model, probe))
        want = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
        h, _ = _body(model, head, probe)
        got = head(h)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        raise ConfigError(
            f"{role} ({type(model).__name__}): its output has no logits of shape {tuple(got.shape)}"
        )
    scale = float(want.abs().max()) + 1.0
    if float((want.float() - got.float()).abs().max()) > 1e-4 * scale:
        raise ConfigError(
            f"{role} ({type(model).__name__}): its logits are not its LM head applied to the final hidden "
            "states (an output transform this module does not know); chunked distillation would be wrong"
        )


def _real_tokens(batch: Batch) -> int:
    return int(batch["attention_mask"].bool().sum())


def _input_vocab(model: nn.Module) -> int | None:
    """Rows of the input (token) embedding table, or None when the model does not say."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``(R, H)``: the mean of ``hidden`` ``(B, S, H)`` over the positions where ``mask``
    ``(B, S)`` is nonzero, L2-normalised, for the ``R`` rows with at least one real token (all-MiniLM-L6-v2's
    recipe: Sentence-BERT MEAN pooling, Reimers & Gurevych 2019, then normalisation;
    :func:`secateur.data.text.sentence_embeddings` computes the same from texts). The dtype of ``hidden``.
    """
    m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    rows = mask.to(hidden.device).bool().any(dim=1)
    pooled = (hidden * m).sum(1)[rows] / m.sum(1)[rows]
    return torch.nn.functional.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------------------------
# what is matched: a model's product on a batch, and the loss between the student's and the teacher's
# ----------------------------------------------------------------------------------------------------
class _Match(Protocol):
    name: str
    vocab: int | None

    def units(self, batch: Batch) -> int:
        """How many items of ``batch`` the loss averages over (tokens or sentences)."""

    def product(
        self, model: nn.Module, batch: Batch, blocks: Sequence[nn.Module], student: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The model's product on ``batch`` and the outputs of ``blocks``."""

    def loss(
        self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, n_total: int, backward: bool
    ) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """``(value, tensors, grads)``: the batch's loss (already weighted by ``units / n_total``) and what to
        back-propagate into the student (``torch.autograd.backward(tensors, grads)``)."""

    def check(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> None:
        """Refuse a pair of models this target cannot compare (probed on a few tokens)."""

    def peak_bytes(self, batches: list[Batch]) -> int:
        """Bytes of one chunk's temporaries (the module docstring's estimate)."""


class _Logits:
    """Next-token distributions: ``T² · KL`` of both LM heads' logits, run over chunks of positions."""

    name = "logits"

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, chunk: int | None) -> None:
        self.s_head, self.t_head = _Head(student, "student"), _Head(teacher, "teacher")
        if self.s_head.vocab != self.t_head.vocab:
            raise ConfigError(
                f"vocabulary mismatch: the student's LM head has {self.s_head.vocab} outputs, the teacher's "
                f"{self.t_head.vocab}; distillation compares distributions over one vocabulary"
            )
        self.vocab: int | None = self.s_head.vocab
        self.temperature, self.chunk_size = float(temperature), chunk

    def units(self, batch: Batch) -> int:
        return _real_tokens(batch)

    def product(
        self, model: nn.Module, batch: Batch, blocks: Sequence[nn.Module], student: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _body(model, self.s_head if student else self.t_head, batch, blocks)

    def loss(
        self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, n_total: int, backward: bool
    ) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        with torch.set_grad_enabled(backward):
            h_real = s[mask.to(s.device)]
        h_t = t[mask.to(t.device)].to(h_real.device)
        leaf = h_real.detach().requires_grad_(backward)
        n = leaf.shape[0]
        step = max(n if self.chunk_size is None else self.chunk_size, 1)
        kd = 0.0
        for i in range(0, n, step):
            with torch.set_grad_enabled(backward):
                s_logits = self.s_head(leaf[i : i + step])
            with torch.no_grad():
                t_logits = self.t_head(h_t[i : i + step]).to(s_logits.dtype)
            with torch.set_grad_enabled(backward):
                part = kd_loss(s_logits, t_logits, self.temperature) * (s_logits.shape[0] / n_total)
            if backward:
                part.backward()
            kd += float(part.detach())
            del s_logits, t_logits, part
        if backward and leaf.grad is not None:
            return kd, [h_real], [leaf.grad]
        return kd, [], []

    def check(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> None:
        _check_head(student, self.s_head, batch, "student")
        _check_head(teacher, self.t_head, batch, "teacher")

    def peak_bytes(self, batches: list[Batch]) -> int:
        chunk = self.chunk_size or max(_real_tokens(b) for b in batches)
        return 5 * chunk * self.s_head.vocab * self.s_head.module.weight.element_size()


class _Embedding:
    """Sentence embeddings: ``1 − cos`` of the mean-pooled, L2-normalised last hidden states, averaged over
    the sentences (rows with at least one real token)."""

    name = "embedding"

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        s, t = _input_vocab(student), _input_vocab(teacher)
        if s is not None and t is not None and s != t:
            raise ConfigError(
                f"vocabulary mismatch: the student's input embedding has {s} rows, the teacher's {t}; both "
                "must read the same token ids (one tokenizer)"
            )
        self.vocab = s if s is not None else t

    def units(self, batch: Batch) -> int:
        return int(batch["attention_mask"].bool().any(dim=1).sum())

    def product(
        self, model: nn.Module, batch: Batch, blocks: Sequence[nn.Module], student: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, hidden = _body(model, None, batch, blocks)
        return mean_pooled(h, batch["attention_mask"]), hidden

    def loss(
        self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, n_total: int, backward: bool
    ) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        with torch.set_grad_enabled(backward):
            value = (1 - (s * t.to(s.device, s.dtype)).sum(-1)).sum() / n_total
        if backward and value.requires_grad:
            return float(value.detach()), [value], [torch.ones_like(value)]
        return float(value.detach()), [], []

    def check(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> None:
        probe = {k: v[:1, :8] for k, v in batch.items()}
        widths = []
        for role, model in (("student", student), ("teacher", teacher)):
            with _modes(model, train=False), torch.no_grad():
                try:
                    h, _ = _body(model, None, probe)
                except ConfigError as exc:
                    raise ConfigError(f"{role}: {exc}") from None
            widths.append(int(h.shape[-1]))
        if widths[0] != widths[1]:
            raise ConfigError(
                f"embedding width mismatch: the student's last hidden states have {widths[0]} features, the "
                f"teacher's {widths[1]}; embedding distillation compares vectors of one width"
            )

    def peak_bytes(self, batches: list[Batch]) -> int:
        return 0


# ----------------------------------------------------------------------------------------------------
# the loss of one batch
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    teacher: nn.Module
    student: nn.Module
    match: _Match
    hidden_weight: float
    pairs: list[tuple[int, int]]
    t_blocks: list[nn.Module]
    s_blocks: list[nn.Module]


def _hidden_pairs(
    student: nn.Module, teacher: nn.Module, hidden_layers: Sequence[int] | Mapping[int, int] | None
) -> tuple[list[tuple[int, int]], list[nn.Module], list[nn.Module]]:
    """``[(student block, teacher block)]`` and the blocks themselves (default: the last block of each)."""
    _, s_list = find_blocks(student)
    _, t_list = find_blocks(teacher)
    if hidden_layers is None:
        pairs = [(len(s_list) - 1, len(t_list) - 1)]
    elif isinstance(hidden_layers, Mapping):
        pairs = [(int(k), int(v)) for k, v in hidden_layers.items()]
    else:
        pairs = [(int(i), int(i)) for i in hidden_layers]
    if not pairs:
        raise ConfigError("hidden_layers is empty; give block indices or leave it None (the last blocks)")
    for s, t in pairs:
        if not (-len(s_list) <= s < len(s_list)) or not (-len(t_list) <= t < len(t_list)):
            raise ConfigError(
                f"hidden_layers pair (student {s}, teacher {t}) is out of range: the student has "
                f"{len(s_list)} blocks, the teacher {len(t_list)}"
            )
    return pairs, [s_list[s] for s, _ in pairs], [t_list[t] for _, t in pairs]


def _relative_mse(
    hs: list[torch.Tensor], ht: list[torch.Tensor], mask: torch.Tensor, pairs: list[tuple[int, int]]
) -> torch.Tensor:
    """Mean over layer pairs of ``Σ (h_s - h_t)² / Σ h_t²`` over the real tokens (scale-free MSE)."""
    terms = []
    for (s, t), a, b in zip(pairs, hs, ht):
        if a.shape[-1] != b.shape[-1]:
            raise ConfigError(
                f"hidden_layers: student block {s} outputs width {a.shape[-1]}, teacher block {t} "
                f"width {b.shape[-1]}; hidden-state distillation needs equal widths"
            )
        a, b = a[mask.to(a.device)], b[mask.to(b.device)].to(a.device, a.dtype)
        terms.append(((a - b) ** 2).sum() / (b**2).sum().clamp_min(torch.finfo(b.dtype).tiny))
    return torch.stack(terms).mean()


def _batch_loss(setup: _Setup, batch: Batch, n_total: int, backward: bool) -> tuple[float, float]:
    """Distillation (and hidden) loss of one micro-batch, each weighted by its share ``units / n_total`` of
    the step's units (real tokens for logits, sentences for embeddings); with ``backward`` the gradients are
    accumulated into the student.

    Returns ``(kd, hidden)``.
    """
    mask = batch["attention_mask"].bool()
    match, hw = setup.match, setup.hidden_weight
    with torch.no_grad():
        t_out, hid_t = match.product(setup.teacher, batch, setup.t_blocks if hw else (), False)
    with torch.set_grad_enabled(backward):
        s_out, hid_s = match.product(setup.student, batch, setup.s_blocks if hw else (), True)
    kd, tensors, grads = match.loss(s_out, t_out, mask, n_total, backward)
    hidden_value = 0.0
    if hw:
        with torch.set_grad_enabled(backward):
            hid = _relative_mse(hid_s, hid_t, mask, setup.pairs) * (match.units(batch) / n_total)
        hidden_value = float(hid.detach())
        if backward:
            tensors.append(hid * hw)
            grads.append(torch.ones((), dtype=hid.dtype, device=hid.device))
    if backward and tensors:
        torch.autograd.backward(tensors, grads)
    return kd, hidden_value


def _resolve_target(target: object, student: nn.Module, teacher: nn.Module) -> str:
    """``"logits"`` or ``"embedding"``: ``target`` itself, or for ``"auto"`` what both models allow."""
    if not isinstance(target, str) or target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; available: {list(TARGETS)}")
    if target != "auto":
        return target
    has = {"student": _has_lm_head(student), "teacher": _has_lm_head(teacher)}
    if all(has.values()):
        return "logits"
    if not any(has.values()):
        return "embedding"
    without = "student" if not has["student"] else "teacher"
    other = "teacher" if without == "student" else "student"
    models = {"student": student, "teacher": teacher}
    raise ConfigError(
        f"{without} ({type(models[without]).__name__}) has no LM head (get_output_embeddings() returned "
        f"{type(_output_embeddings(models[without])).__name__}) but the {other} "
        f"({type(models[other]).__name__}) has one: target='auto' needs two causal LMs (logits) or two "
        "models without an LM head (embedding); pass the same kind of model for both, or "
        "target='embedding' with base models (AutoModel)"
    )


def _setup(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[Batch],
    temperature: float,
    chunk_size: int | None,
    hidden_weight: float,
    hidden_layers: Sequence[int] | Mapping[int, int] | None,
    target: str = "auto",
) -> _Setup:
    """Validate the pair of models and the loss settings (nothing is changed)."""
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise ConfigError(
            "student and teacher must be nn.Modules, got "
            f"{type(student).__name__} and {type(teacher).__name__}"
        )
    if student is teacher:
        raise ConfigError("student and teacher are the same object; distil into a pruned copy of the teacher")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if (
        isinstance(hidden_weight, bool)
        or not isinstance(hidden_weight, (int, float))
        or not hidden_weight >= 0
    ):
        raise ConfigError(f"hidden_weight must be a number >= 0, got {hidden_weight!r}")
    kind = _resolve_target(target, student, teacher)
    match: _Match
    if kind == "logits":
        match = _Logits(student, teacher, temperature, chunk_size)
    else:
        match = _Embedding(student, teacher)
    for i, b in enumerate(batches):
        ids = b["input_ids"]
        if ids.numel() and match.vocab is not None and (int(ids.max()) >= match.vocab or int(ids.min()) < 0):
            raise ConfigError(
                f"data batch {i}: token ids span [{int(ids.min())}, {int(ids.max())}], outside the "
                f"vocabulary of {match.vocab}"
            )
    pairs: list[tuple[int, int]] = []
    s_blocks: list[nn.Module] = []
    t_blocks: list[nn.Module] = []
    if hidden_weight:
        pairs, s_blocks, t_blocks = _hidden_pairs(student, teacher, hidden_layers)
    match.check(student, teacher, batches[0])
    return _Setup(teacher, student, match, float(hidden_weight), pairs, t_blocks, s_blocks)


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: Any,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK,
    hidden_weight: float = 0.0,
    hidden_layers: Sequence[int] | Mapping[int, int] | None = None,
    backward: bool = False,
    target: str = "auto",
) -> tuple[float, float]:
    """The distillation loss of one batch, computed as :func:`distill` does.

    ``target="logits"``: ``kd = T² · mean over real tokens of KL(softmax(t/T) ‖ softmax(s/T))``
    (:func:`~secateur.train.distill.kd_loss` of the logits of the ``attention_mask == 1`` positions, chunked
    over positions); ``target="embedding"``: ``kd = mean over sentences of 1 − cos(e_s, e_t)`` of the
    :func:`mean_pooled` last hidden states. ``hidden`` = the mean over the layer pairs of
    ``Σ (h_s − h_t)² / Σ h_t²`` over the real tokens (0 when ``hidden_weight`` is 0). The models' modes are
    used as they are. With ``backward``, ``kd + hidden_weight · hidden`` is back-propagated into the
    student's parameters (gradients accumulate in ``.grad``); otherwise nothing is recorded.

    Args:
        student, teacher: causal LMs with the same vocabulary (``*ForCausalLM``), or encoders' base models
            (``BertModel``) reading the same token ids.
        batch: one batch in any form :func:`~secateur.llm.calibration.calibration_batches` accepts.
        temperature, chunk_size, hidden_weight, hidden_layers, target: as :func:`distill`
            (``chunk_size=None``: all positions at once).

    Returns:
        ``(kd, hidden)`` as Python floats.

    Raises:
        ConfigError: as :func:`distill`.
    """
    batches = calibration_batches(batch)
    setup = _setup(student, teacher, batches, temperature, chunk_size, hidden_weight, hidden_layers, target)
    n_total = sum(setup.match.units(b) for b in batches)
    kd = hidden = 0.0
    for b in batches:
        k, h = _batch_loss(setup, b, max(n_total, 1), backward)
        kd, hidden = kd + k, hidden + h
    return kd, hidden


def distillation_kl(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = DEFAULT_CHUNK,
) -> float:
    """``T² · KL(teacher ‖ student)`` of the next-token distributions, averaged over every real token of
    ``data`` (nats per token; at ``T = 1`` the plain KL), both models in eval mode, no gradients.

    The held-out measure of :func:`distill`'s progress for causal LMs: 0 when the student computes the
    teacher's logits.

    Raises:
        ConfigError: as :func:`distill` (vocabulary mismatch, bad data, not a causal LM).
    """
    batches = calibration_batches(data)
    with _modes(student, train=False), _modes(teacher, train=False), torch.no_grad():
        setup = _setup(student, teacher, batches, temperature, chunk_size, 0.0, None, "logits")
        n_total = max(1, sum(setup.match.units(b) for b in batches))
        return sum(_batch_loss(setup, b, n_total, False)[0] for b in batches)


def embedding_cosine(student: nn.Module, teacher: nn.Module, data: Any) -> float:
    """Mean cosine similarity, over the sentences (rows with a real token) of ``data``, of the student's and
    the teacher's sentence embeddings (:func:`mean_pooled` last hidden states), both models in eval mode, no
    gradients; in [-1, 1], 1 when the student computes the teacher's embeddings.

    The held-out measure of :func:`distill`'s progress for encoders (``target="embedding"``); from texts,
    :func:`secateur.data.text.sentence_embeddings` and :func:`~secateur.data.text.mean_cosine` give the same.

    Raises:
        ConfigError: as :func:`distill` (vocabulary or width mismatch, bad data, no last hidden states).
    """
    batches = calibration_batches(data)
    with _modes(student, train=False), _modes(teacher, train=False), torch.no_grad():
        setup = _setup(student, teacher, batches, 1.0, None, 0.0, None, "embedding")
        n_total = max(1, sum(setup.match.units(b) for b in batches))
        return 1.0 - sum(_batch_loss(setup, b, n_total, False)[0] for b in batches)


@torch.no_grad()
def perplexity(model: nn.Module, data: Any, *, chunk_size: int | None = DEFAULT_CHUNK) -> float:
    """Next-token perplexity ``exp(mean NLL)`` of a causal LM on ``data``, the LM head run in chunks.

    Each position ``t`` predicts token ``t + 1`` of its row; a prediction counts when both positions are
    real (``attention_mask``). The NLL is summed in float64; the model runs in eval mode (restored after).
    Memory: the body's activations of one batch plus ``chunk_size × V`` logits.

    Raises:
        ConfigError: bad data, not a causal LM (no LM head), or no position with a real next token.
    """
    batches = calibration_batches(data)
    head = _Head(model, "model")
    nll, count = 0.0, 0
    with _modes(model, train=False):
        for b in batches:
            h, _ = _body(model, head, b)
            mask = b["attention_mask"].bool().to(h.device)
            ids = b["input_ids"].to(h.device)
            pick = mask[:, :-1] & mask[:, 1:]
            hs, targets = h[:, :-1][pick], ids[:, 1:][pick]
            step = hs.shape[0] if chunk_size is None else chunk_size
            for i in range(0, hs.shape[0], max(step, 1)):
                logits = head(hs[i : i + step]).double()
                nll += float(
                    torch.nn.functional.cross_entropy(logits, targets[i : i + step], reduction="sum")
                )
            count += hs.shape[0]
    if count == 0:
        raise ConfigError("perplexity: no position with a real next token in data")
    return math.exp(nll / count)


class _modes:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Put every module of ``model`` in train or eval mode; each module's own flag is restored on exit."""

    def __init__(self, model: nn.Module, train: bool) -> None:
        self.model, self.train = model, train
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.train)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, was in self.saved:
            m.training = was


# ----------------------------------------------------------------------------------------------------
# the training loop: what is trained, the order of batches, checkpoints
# ----------------------------------------------------------------------------------------------------
def _trainable(student: nn.Module, train_embeddings: bool) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs trained: those with ``requires_grad``, less (unless
    ``train_embeddings``) the input and output embeddings and every other ``nn.Embedding`` table (position
    and token-type tables: the embedding parameters of :func:`secateur.llm.parameter_counts`)."""
    skip: set[int] = set()
    if not train_embeddings:
        tables = [m for m in student.modules() if isinstance(m, nn.Embedding)]
        for get in ("get_input_embeddings", "get_output_embeddings"):
            fn = getattr(student, get, None)
            emb = fn() if callable(fn) else None
            if isinstance(emb, nn.Module):
                tables.append(emb)
        skip = {id(p) for t in tables for p in t.parameters()}
    out = [(n, p) for n, p in student.named_parameters() if p.requires_grad and id(p) not in skip]
    if not out:
        raise ConfigError(
            "the student has no trainable parameter (all have requires_grad=False"
            + ("" if train_embeddings else ", or only the embeddings do: pass train_embeddings=True")
            + ")"
        )
    return out


def _zero_masks(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Bool masks of the exact zeros of every weight matrix (dim >= 2) that holds any."""
    out = {}
    with torch.no_grad():
        for name, p in params:
            if p.dim() >= 2:
                z = p == 0
                if bool(z.any()):
                    out[name] = z
    return out


def _batch_order(n_batches: int, k: int, seed: int, shuffle: bool) -> int:
    """Index of the ``k``-th micro-batch: epochs of a permutation seeded by ``(seed, epoch)``."""
    epoch, pos = divmod(k, n_batches)
    if not shuffle:
        return pos
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n_batches, generator=g)[pos])


def _fingerprint(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask"):
            t = b[key].detach().to("cpu", torch.int64).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Run:
    """What :mod:`secateur.train.checkpoint` saves and restores (its ``Trainer`` protocol)."""

    def __init__(
        self, student: nn.Module, optimizer: torch.optim.Optimizer, settings: dict[str, Any]
    ) -> None:
        self.model = student
        self.optimizer = optimizer
        self.callbacks: list[Any] = []
        self.train_loader = None
        self.global_step = 0
        self.epoch = 0
        self.settings = settings
        self.history: list[dict[str, float]] = []
        self.where = ""

    def json_state(self) -> dict[str, Any]:
        return {
            "kind": "secateur.llm.distill",
            "global_step": self.global_step,
            "settings": self.settings,
            "history": self.history,
            "rng": get_rng_state(),
        }

    def check_json_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != "secateur.llm.distill":
            raise ConfigError(f"{self.where}: not a checkpoint of secateur.llm.distill")
        saved = {**_LEGACY_SETTINGS, **state.get("settings", {})}
        for key, value in self.settings.items():
            if saved.get(key) != value:
                raise ConfigError(
                    f"{self.where}: the checkpoint was saved with {key}={saved.get(key)!r}, this call has "
                    f"{key}={value!r}; resume with the same settings and data, or use another checkpoint_dir"
                )
        step = state.get("global_step")
        if not isinstance(step, int) or not 0 <= step <= self.settings["steps"]:
            raise ConfigError(
                f"{self.where}: checkpoint step {step!r} is outside [0, {self.settings['steps']}]"
            )

    def load_json_state(self, state: dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_loop_args(
    steps: int,
    lr: float,
    grad_accum: int,
    optimizer: str,
    schedule: str,
    warmup_steps: int,
    weight_decay: float,
    checkpoint_every: int | None,
    max_grad_norm: float | None,
) -> None:
    _check_int(steps, "steps", 1)
    _check_int(grad_accum, "grad_accum", 1)
    _check_int(warmup_steps, "warmup_steps", 0)
    if checkpoint_every is not None:
        _check_int(checkpoint_every, "checkpoint_every", 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not max_grad_norm > 0
    ):
        raise ConfigError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; available: {list(OPTIMIZERS)}")
    if schedule not in SCHEDULES or schedule == "step":
        raise ConfigError(f"unknown schedule {schedule!r}; available: ['cosine', 'constant']")


def _make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _resume_point(checkpoint_dir: Path | None, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuse to mix a fresh run into a used folder."""
    if checkpoint_dir is None:
        if resume:
            raise ConfigError("resume=True needs checkpoint_dir")
        return None
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise ConfigError(f"checkpoint_dir {checkpoint_dir} exists and is not a folder")
    found = latest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if found is None:
        if checkpoint_dir.is_dir() and list_checkpoints(checkpoint_dir) and resume:
            raise ConfigError(f"{checkpoint_dir}: no checkpoint verifies; nothing to resume from")
        return None
    if not resume:
        raise ConfigError(
            f"{checkpoint_dir} already holds checkpoints ({found.name}); pass resume=True to continue that "
            "run or choose an empty checkpoint_dir"
        )
    return found


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int,
    lr: float = 1e-4,
    target: str = "auto",
    temperature: float = 1.0,
    hidden_weight: float = 0.0,
    hidden_layers: Sequence[int] | Mapping[int, int] | None = None,
    grad_accum: int = 1,
    chunk_size: int | None = DEFAULT_CHUNK,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    train_embeddings: bool = False,
    keep_zeros: bool = True,
    dropout: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillReport:
    """Train a pruned ``student`` to match its dense ``teacher`` on calibration text (knowledge distillation).

    Each step draws ``grad_accum`` micro-batches of ``data`` (epochs of a permutation seeded by ``seed``),
    computes the distillation term ``kd``, plus ``hidden_weight`` times the scale-free hidden-state MSE
    ``Σ (h_s − h_t)² / Σ h_t²`` on the chosen block outputs, and takes one optimizer step. ``kd`` depends on
    ``target`` (the one difference between the two; the loop, masks and checkpoints are shared):

    - ``"logits"`` (causal LMs): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` of the next-token logits averaged
      over the step's real tokens (Minitron's recovery, Muralidharan et al. 2024, sec. 3.3; the loss of
      Hinton et al. 2015); the LM heads run over chunks of positions (the module docstring gives the peak
      memory);
    - ``"embedding"`` (encoders' base models such as ``BertModel``: all-MiniLM-L6-v2 and other
      sentence-embedding models): ``1 − cos(e_s, e_t)`` averaged over the step's sentences, ``e`` the
      :func:`mean_pooled` last hidden states (mean over the real tokens, L2-normalised), as Reimers &
      Gurevych (2020) distil sentence embeddings; with ``hidden_weight`` the per-layer term of TinyBERT /
      MiniLM (Jiao et al. 2020; Wang et al. 2020) is added;
    - ``"auto"`` (default): ``"logits"`` when both models have an LM head (``get_output_embeddings()``),
      ``"embedding"`` when neither has one; a pair with one LM head is refused (an explicit choice is
      needed there, and silently comparing other things would be wrong).

    The teacher runs in eval mode under ``torch.no_grad`` and is never changed; the student trains in train
    mode (eval mode with ``dropout=False``); every module's mode and every ``requires_grad`` flag is restored
    at the end.

    Works after any pruning that keeps the vocabulary (and, for embeddings, the hidden width): one-shot
    (masks or plain zeros: the zero pattern of every trained weight matrix is kept exactly, ``keep_zeros``),
    width (:func:`~secateur.llm.structural.prune_decoder`) or depth (:func:`~secateur.llm.depth.prune_depth`;
    give ``hidden_layers`` as a student → teacher map).

    Args:
        student: the pruned model (trained in place): a causal LM, or an encoder's base model.
        teacher: the dense model of the same kind, reading the same token ids (same vocabulary).
        data: calibration batches (:func:`~secateur.llm.calibration.calibration_batches` forms); padding
            (``attention_mask == 0``) is excluded from the loss.
        steps: optimizer steps in all (a resumed run continues up to ``steps``); >= 1.
        lr: peak learning rate; ``schedule`` ``"cosine"`` (default, to 0 at ``steps``) or ``"constant"``,
            after ``warmup_steps`` linear warmup steps (:func:`secateur.train.lr_at_step`).
        target: ``"auto"``, ``"logits"`` or ``"embedding"`` (:data:`TARGETS`; above).
        temperature: ``T > 0`` (1: the plain distributions, Minitron's choice); logits only.
        hidden_weight: weight of the hidden-state loss (0: logits only).
        hidden_layers: block indices compared in both models (a sequence), or ``{student block: teacher
            block}``; None: the last block of each.
        grad_accum: micro-batches per step (the loss is normalised by the step's real tokens, so this
            equals one step on their concatenation).
        chunk_size: positions per chunk of the LM heads and the KL (None: all at once); logits only.
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (momentum 0.9); ``weight_decay`` decoupled for AdamW.
        max_grad_norm: clip the gradient's global L2 norm (None: no clipping).
        train_embeddings: also train the embedding tables (token, position, token-type) and the LM head
            (default: frozen; pruning never changes them and for Gemma 3 they are most of the parameters).
        keep_zeros: hold the exact zeros of every trained weight matrix at zero (pruned weights).
        dropout: True (default): the student trains in train mode (its dropout active); False: in eval mode,
            so no dropout (BERT's 0.1 adds noise that a short distillation on a few hundred sentences does
            not average out; measured on all-MiniLM-L6-v2 in docs/llm.md). Gradients flow either way.
        shuffle, seed: order of the micro-batches (a pure function of the step, for exact resume).
        checkpoint_dir: save a checkpoint (:mod:`secateur.train.checkpoint`) every ``checkpoint_every`` steps
            (default: only at the end) and after the last step. A folder holding checkpoints needs
            ``resume=True``.
        resume: continue from ``checkpoint_dir``'s newest complete checkpoint (a fresh start when the folder
            holds none); its settings (steps, lr, T, schedule, data fingerprint ...) must equal this call's.
            Bit-exact on CPU.
        progress: a tqdm progress bar (loss, learning rate).
        on_step: called as ``on_step(step, record)`` after each step (and its checkpoint, if any); an
            exception raised there stops the run (the checkpoints written so far stay).

    Returns:
        :class:`DistillReport`.

    Raises:
        ConfigError: ``steps < 1``, a bad ``lr``, ``temperature``, ``grad_accum``, ``chunk_size``,
            ``hidden_weight``, ``target`` or optimizer name; student and teacher the same object; for
            logits, models that are not causal LMs, with different vocabularies or logits that are not
            ``head(hidden)``; for embeddings, outputs without ``last_hidden_state``, different input
            vocabularies (tokenizers) or hidden widths; one model with an LM head and one without under
            ``target="auto"``; token ids outside the vocabulary; ``hidden_layers`` out of range or of
            different widths; no trainable parameter; a ``checkpoint_dir`` with checkpoints but
            ``resume=False``, or a checkpoint with other settings. All raised before any weight changes.
        SerializationError: an unreadable checkpoint (from :func:`secateur.train.load_checkpoint`).
    """
    t0 = time.perf_counter()
    _check_loop_args(
        steps,
        lr,
        grad_accum,
        optimizer,
        schedule,
        warmup_steps,
        weight_decay,
        checkpoint_every,
        max_grad_norm,
    )
    batches = calibration_batches(data)
    setup = _setup(student, teacher, batches, temperature, chunk_size, hidden_weight, hidden_layers, target)
    params = _trainable(student, train_embeddings)
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    found = _resume_point(root, resume)
    settings = {
        "steps": steps,
        "lr": float(lr),
        "target": setup.match.name,
        "temperature": float(temperature),
        "hidden_weight": float(hidden_weight),
        "hidden_layers": [list(p) for p in setup.pairs],
        "grad_accum": grad_accum,
        "optimizer": optimizer,
        "weight_decay": float(weight_decay),
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "max_grad_norm": max_grad_norm,
        "train_embeddings": train_embeddings,
        "keep_zeros": keep_zeros,
        "dropout": dropout,
        "shuffle": shuffle,
        "seed": seed,
        "data": _fingerprint(batches),
        "trainable": [n for n, _ in params],
    }
    opt = _make_optimizer(optimizer, [p for _, p in params], lr, weight_decay)
    run = _Run(student, opt, settings)
    report = DistillReport(
        steps=0,
        start_step=0,
        trainable_params=sum(p.numel() for _, p in params),
        peak_chunk_bytes=setup.match.peak_bytes(batches),
        target=setup.match.name,
    )
    if found is not None:
        run.where = str(found)
        load_checkpoint(run, found)  # checks the settings before anything is loaded
        report.start_step, report.resumed_from = run.global_step, str(found)
    zeros = _zero_masks(params) if keep_zeros else {}
    report.kept_zeros = sum(int(z.sum()) for z in zeros.values())
    trained = {id(p) for _, p in params}
    flags = [(p, p.requires_grad) for p in student.parameters()]
    n_batches = len(batches)
    # no tqdm object when off: even a disabled bar takes tqdm's lock, shared with a forking parent
    bar = tqdm(total=steps, initial=run.global_step, desc="distill", dynamic_ncols=True) if progress else None
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in trained)
        with _modes(student, train=dropout), _modes(teacher, train=False):
            while run.global_step < steps:
                record = _train_step(run, setup, batches, params, zeros, n_batches, settings, max_grad_norm)
                report.tokens_per_step.append(int(record["tokens"]))
                if root is not None and (
                    run.global_step == steps or (checkpoint_every and run.global_step % checkpoint_every == 0)
                ):
                    report.checkpoint = str(save_checkpoint(run, root))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if on_step is not None:
                    on_step(run.global_step, record)
    finally:
        if bar is not None:
            bar.close()
        for p, was in flags:
            p.requires_grad_(was)
        opt.zero_grad(set_to_none=True)
    report.steps, report.history = run.global_step, list(run.history)
    report.seconds = time.perf_counter() - t0
    return report


def _train_step(
    run: _Run,
    setup: _Setup,
    batches: list[Batch],
    params: list[tuple[str, nn.Parameter]],
    zeros: dict[str, torch.Tensor],
    n_batches: int,
    settings: dict[str, Any],
    max_grad_norm: float | None,
) -> dict[str, float]:
    """One optimizer step: ``grad_accum`` micro-batches, masked gradients, step, zeros re-imposed."""
    step = run.global_step
    lr = lr_at_step(
        step,
        base_lr=settings["lr"],
        total_steps=settings["steps"],
        schedule=settings["schedule"],
        warmup_steps=settings["warmup_steps"],
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accum = settings["grad_accum"]
    micro = [
        batches[_batch_order(n_batches, step * accum + j, settings["seed"], settings["shuffle"])]
        for j in range(accum)
    ]
    n_total = max(1, sum(setup.match.units(b) for b in micro))
    run.optimizer.zero_grad(set_to_none=True)
    kd = hidden = 0.0
    for b in micro:
        k, h = _batch_loss(setup, b, n_total, backward=True)
        kd, hidden = kd + k, hidden + h
    by_name = dict(params)
    with torch.no_grad():
        for name, z in zeros.items():
            g = by_name[name].grad
            if g is not None:
                g.masked_fill_(z, 0)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
        run.optimizer.step()
        for name, z in zeros.items():
            by_name[name].masked_fill_(z, 0)
    run.global_step = step + 1
    record = {
        "step": step + 1,
        "loss": kd + setup.hidden_weight * hidden,
        "kd": kd,
        "hidden": hidden,
        "lr": lr,
        "tokens": sum(_real_tokens(b) for b in micro),
    }
    run.history.append(record)
    return record
