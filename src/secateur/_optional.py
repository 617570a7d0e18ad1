"""Optional dependencies: imported when a feature needs them, with an error that names the extra to install.

The core install (``pip install secateur``) needs only torch, numpy, safetensors, pyyaml, pydantic, click,
tqdm and rich. Everything else sits behind an extra of ``pyproject.toml``; a module that needs such a package
imports it inside the function that uses it, through :func:`require`, so ``import secateur`` and
``secateur --help`` work with the core alone.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "install_hint", "require"]

# top-level package -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {
    "transformers": "hf",
    "accelerate": "hf",
    "matplotlib": "report",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "torch_pruning": "peers",
    "lightning": "lightning",
    "PIL": "images",
    "datasets": "data",
    "torchvision": "vision",
    "timm": "vision",
}


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` (a dotted module name) the way secateur expects.

    ``"transformers.trainer"`` gives ``pip install 'secateur[hf]'``; a package no extra provides gives
    ``pip install <top-level name>``.
    """
    top = module.split(".")[0]
    extra = EXTRAS.get(top)
    return f"pip install 'secateur[{extra}]'" if extra else f"pip install {top}"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"transformers"``) for ``feature`` (what needs it, in a few words).

    Returns the imported module.

    Raises:
        ImportError: the module (or one it imports) is not installed; the message names ``feature`` and the
            install command (:func:`install_hint`), e.g. ``loading a Hugging Face model needs transformers:
            pip install 'secateur[hf]'``. The original error is chained (``__cause__``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(f"{feature} needs {top}: {install_hint(module)}", name=top) from exc
