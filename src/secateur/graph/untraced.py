"""Parameterised modules that a trace never reached, and what to do about them.

A trace follows the Python control flow its example input takes: a module on a branch taken only for other
inputs (``if x.mean() > 0: a(x) else: b(x)``), or used only in training (an auxiliary head), is never seen.
Its channels' couplings are unknown, so pruning the traced layers around it can break the model on the
inputs that do reach it, silently, since the oracle runs on the traced inputs only. Hence:

- ``untraced="error"`` (default): :class:`~secateur.errors.UntracedModuleError` names them and the remedies.
- ``untraced="freeze"``: the untraced modules' own parameters are never sliced (they are in no group), and
  every channel that the nearest *traced* module holding them (their *holder*) could hand to them or take
  from them is frozen: the dims of every tensor alive when a call of the holder starts (its inputs, and
  anything else its code could read) and of every tensor made during that call (whatever replaces the
  untraced branch's output inside it, and what it returns). Untraced code inside the holder then only meets
  unpruned channels, so the pruned model still runs where the other branch is taken. Not covered: untraced
  code that calls a traced module *outside* its holder in a new way, or reads tensors other than through
  Python values alive in that call. When the holder is the root model nothing stays prunable; tracing every
  branch with :class:`~secateur.graph.ExampleInputs` is then the way.

"Reached" means the module's forward ran, or an op read one of its parameters/buffers (a weight used
through another module, tied weights). The check is one pass over the modules (O(modules)).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from secateur.graph.tracer import Tracer

MODES = ("error", "freeze")


def own_tensor_names(path: str, mod: nn.Module) -> list[str]:
    """Qualnames of ``mod``'s own parameters and of its own floating buffers with more than one element
    (what pruning could slice); ``[]`` for a module with none."""
    pre = path + "." if path else ""
    names = [pre + k for k, v in mod._parameters.items() if v is not None]
    names += [
        pre + k for k, v in mod._buffers.items() if v is not None and v.is_floating_point() and v.numel() > 1
    ]
    return names


def untraced_modules(tracer: Tracer) -> list[str]:
    """Paths of the parameterised modules whose forward never ran and none of whose parameters/buffers an op
    read during the trace(s), in ``named_modules`` order.

    Modules inside a module that ran under a *module rule* (``nn.MultiheadAttention``: one opaque op whose
    rule accounts for everything inside it, e.g. ``out_proj``, whose weight it reads without calling it)
    count as reached."""
    out = []
    for path, mod in tracer.modules.items():
        if id(mod) in tracer.called:
            continue
        names = own_tensor_names(path, mod)
        if names and not any(tracer.param_seen(n) for n in names) and not _inside_opaque(tracer, path):
            out.append(path)
    return out


def _inside_opaque(tracer: Tracer, path: str) -> bool:
    """True if an ancestor of ``path`` (the root model included) ran and has a module rule."""
    anc = path
    while anc:
        anc = anc.rpartition(".")[0]
        mod = tracer.modules.get(anc, tracer.model) if anc else tracer.model
        if id(mod) in tracer.called and type(mod) in tracer.module_rules:
            return True
    return False


def holders(tracer: Tracer, paths: list[str]) -> dict[str, list[str]]:
    """``{nearest traced ancestor: [untraced module paths under it]}`` (the root model is ``""``)."""
    called_paths = {p for p, m in tracer.modules.items() if id(m) in tracer.called}
    out: dict[str, list[str]] = {}
    for p in paths:
        anc = p
        while anc:
            anc = anc.rpartition(".")[0]
            if anc in called_paths:
                break
        out.setdefault(anc, []).append(p)
    return out


def _cls(tracer: Tracer, path: str) -> str:
    mod = tracer.modules.get(path, tracer.model)
    return type(mod).__name__


def _names(tracer: Tracer, paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{p}' ({_cls(tracer, p)})" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def untraced_message(tracer: Tracer, paths: list[str]) -> str:
    """The UntracedModuleError text: the modules, where the trace read values, and the remedies."""
    by_holder = holders(tracer, paths)
    where = ""
    if tracer.value_reads:
        where = (
            f" The trace read tensor values at {'; '.join(tracer.value_reads)}: a data-dependent branch "
            f"there may have skipped them."
        )
    held = ", ".join(f"'{h or '<root>'}'" for h in by_holder)
    return (
        f"{len(paths)} module(s) with parameters were never reached by the traced forward pass, so how "
        f"their channels couple to the rest is unknown and pruning around them could break the model on "
        f"inputs that reach them: {_names(tracer, paths)}.{where} Either trace every branch: pass "
        f"secateur.graph.ExampleInputs([x1, x2, ...]) whose inputs together reach every module (modules "
        f"used only in training, such as auxiliary heads, are reached by tracing in train mode); or pass "
        f"untraced='freeze' to keep them whole and freeze every channel their traced holder ({held}) "
        f"computes; or delete the modules if the model never uses them."
    )


def freeze_around(tracer: Tracer, by_holder: dict[str, list[str]]) -> list[str]:
    """Freeze, in ``tracer.atoms``, every dim recorded in ``tracer.watched`` for each holder (a trace run
    with ``watch=by_holder``); returns one line per holder for the warning."""
    lines = []
    for holder, paths in by_holder.items():
        arrs = [d for dims in tracer.watched.get(holder, []) for d in dims if d is not None]
        label = f"'{holder or '<root>'}' ({_cls(tracer, holder)})"
        if arrs:
            tracer.atoms.freeze(
                np.concatenate(arrs),
                f"read or made by {label}, which holds untraced modules {_names(tracer, paths, 3)} "
                f"(untraced='freeze')",
            )
        lines.append(f"{_names(tracer, paths)} kept whole; every channel {label} reads or makes is frozen")
    return lines
