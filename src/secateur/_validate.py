"""Argument checks shared by the entry points: each raises a named secateur error that names the argument.

One place for the checks every public entry point makes first (a model that is a real module with values, a
ratio that is a number, a ``round_to`` that is a positive int, name patterns whose regexes compile), so the
messages are the same wherever the argument is taken. Callers pass the argument's name as the user wrote it
(``"model"``, ``"ratio"``, ``"protect"``) so the error names it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from secateur.errors import ConfigError, InvalidModelError

__all__ = [
    "check_model",
    "check_name_patterns",
    "check_ratio",
    "check_round_to",
    "check_sparsity",
    "compile_name_pattern",
]


def _describe(value: object) -> str:
    """``"the string 'resnet'"`` / ``"a Tensor"``: how an unexpected argument value reads in a message."""
    if isinstance(value, str):
        shown = value if len(value) <= 80 else value[:77] + "..."
        return f"the string {shown!r}"
    return f"{'an' if type(value).__name__[:1].lower() in 'aeiou' else 'a'} {type(value).__name__}"


def check_model(model: object, argname: str = "model") -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` whose parameters and buffers all hold values.

    Args:
        model: the argument to check.
        argname: the argument's name, used in the message.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` (a string such as ``"resnet"``, a path, a class
            rather than an instance), or one of its parameters or buffers is on the meta device (shapes
            without values: the message names the first one and how to give it values).
    """
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise InvalidModelError(
            f"{argname} must be an nn.Module instance, got the class {model.__name__}: build it first"
        )
    if not isinstance(model, nn.Module):
        hint = ""
        if isinstance(model, str):
            hint = (
                ": build the model first, e.g. secateur.zoo.create_model('resnet8') or "
                "secateur.load(folder)"
            )
        raise InvalidModelError(f"{argname} must be an nn.Module, got {_describe(model)}{hint}")
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.is_meta:
                raise InvalidModelError(
                    f"{argname} has its {kind} {name!r} (shape {tuple(t.shape)}) on the meta device: it has "
                    "no values to prune or save; materialise the model first (model.to_empty(device='cpu') "
                    "and load its weights, or build it outside torch.device('meta'))"
                )
    return model


def check_ratio(value: object, argname: str = "ratio", *, allow_one: bool = False) -> float:
    """Return ``value`` as a float fraction in [0, 1) (or [0, 1] with ``allow_one``).

    Accepts Python and NumPy real numbers (not ``bool``). Raises:
        ConfigError: a string (even ``"0.5"``), a bool, NaN or a number outside the range; the message names
            ``argname`` and the value.
    """
    upper = "1]" if allow_one else "1)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = (
            f" (write {argname}={float(value)!r}, a number)"
            if isinstance(value, str) and _is_float(value)
            else ""
        )
        raise ConfigError(f"{argname} must be a fraction in [0, {upper}, got {_describe(value)}{hint}")
    v = float(value)
    if math.isnan(v) or v < 0.0 or v > 1.0 or (v == 1.0 and not allow_one):
        raise ConfigError(f"{argname} must be a fraction in [0, {upper}, got {value!r}")
    return v


def check_sparsity(sparsity: object, what: str = "sparsity") -> float:
    """Return ``sparsity`` (the fraction of weights or units to remove) as a float in [0, 1).

    1.0 would remove every weight, so it is refused. Raises:
        ConfigError: as :func:`check_ratio`, naming ``what``.
    """
    return check_ratio(sparsity, what)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_round_to(value: object, argname: str = "round_to") -> int:
    """Return ``value`` if it is an int >= 1 (kept unit counts are rounded to multiples of it).

    Raises:
        ConfigError: a bool, a non-int (``2.0``, ``"8"``) or an int < 1 (``0``: division by zero; a negative
            count means nothing); the message names ``argname``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{argname} must be an int >= 1, got {_describe(value)} ({value!r})")
    if int(value) < 1:
        raise ConfigError(f"{argname} must be an int >= 1 (1: no rounding), got {value!r}")
    return int(value)


def compile_name_pattern(pattern: object, argname: str = "protect") -> re.Pattern[str] | None:
    """The compiled regex of a ``"re:..."`` module-name pattern, or None for a glob (fnmatch) pattern.

    Raises:
        ConfigError: a pattern that is not a string, or a ``"re:"`` pattern that is not a valid regular
            expression (the message names ``argname``, the pattern and the regex error).
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"{argname}: a pattern must be a string, got {_describe(pattern)}")
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except re.error as e:
        raise ConfigError(f"{argname}: pattern {pattern!r} is not a valid regular expression: {e}") from None


def check_name_patterns(patterns: Any, argname: str = "protect") -> tuple[str, ...]:
    """Return ``patterns`` (module-name patterns: fnmatch globs, or regexes written ``"re:..."``) as a tuple,
    after checking each regex compiles.

    Raises:
        ConfigError: ``patterns`` is a single string (a list is expected: ``[pattern]``) or not
            iterable, a pattern is not a string, or a regex does not compile (named with the pattern).
    """
    if isinstance(patterns, str):
        raise ConfigError(
            f"{argname} must be a list of patterns, got {_describe(patterns)}: write [{patterns!r}]"
        )
    if not isinstance(patterns, Iterable):
        raise ConfigError(f"{argname} must be a list of patterns, got {_describe(patterns)}")
    out = tuple(patterns)
    for p in out:
        compile_name_pattern(p, argname)
    return out
