"""The recipes shipped with secateur, and loading a recipe by file or shipped name (the CLI's ``--recipe``).

The recipe itself (:class:`secateur.Recipe`, the same object in Python and in YAML) lives in
:mod:`secateur.pruners.recipe`; this module only knows where the shipped YAML files are
(``secateur/app/recipes/*.yaml``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from secateur.errors import ConfigError, did_you_mean
from secateur.pruners.recipe import ONESHOT_METHODS, Recipe, parse_yaml

__all__ = ["load_recipe", "shipped_recipes", "suited_kinds"]


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package, sorted."""
    folder = resources.files("secateur.app.recipes")
    return sorted(Path(f.name).stem for f in folder.iterdir() if f.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a YAML file (:meth:`Recipe.from_yaml`), or a shipped recipe by name (``"gmp90"``).

    Raises:
        ConfigError: neither an existing file nor a shipped name (the closest shipped name by
            difflib's similarity is suggested, :func:`secateur.errors.did_you_mean`, and every shipped
            one is listed), or
            whatever :meth:`Recipe.from_yaml` raises (the file and the fields at fault are named).
    """
    p = Path(path_or_name)
    if p.exists():
        return Recipe.from_yaml(p)
    name = str(path_or_name).removesuffix(".yaml")
    shipped = shipped_recipes()
    if name not in shipped:
        raise ConfigError(
            f"recipe {str(path_or_name)!r} is neither a file nor a shipped recipe"
            f"{did_you_mean(name, shipped)}; shipped: {shipped} (secateur recipes describes each)"
        )
    text = resources.files("secateur.app.recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    source = f"{name} (shipped)"
    return Recipe.from_dict(parse_yaml(text, source), source)


def suited_kinds(recipe: Recipe) -> tuple[list[str], str]:
    """The model kinds (:attr:`secateur.app.inputs.ModelKind.label`) ``recipe`` runs on from the command
    line, and the data it needs, derived from its fields:

    - fine-tuning (``finetune.epochs > 0``): the command line trains with cross-entropy on labelled images,
      so image classifiers only (zoo CNNs, Hugging Face ``*ForImageClassification``), with images;
    - Wanda / SparseGPT at N:M: models built of transformer blocks (decoder LMs, text encoders, vision
      transformers), with calibration data (text or images);
    - otherwise (element or channel pruning in one shot): any model that runs on its example inputs (channel
      pruning: any model the dependency graph traces), data only for the metric.
    """
    if recipe.finetune.epochs > 0:
        return ["image-classifier"], "labelled images (fashion-mnist or an image folder)"
    if recipe.nm is not None and recipe.criterion in ONESHOT_METHODS:
        kinds = ["causal-lm", "text-encoder", "text-classifier", "image-classifier (transformer blocks)"]
        return kinds, f"calibration data: text or images ({recipe.data_batches} batches)"
    if recipe.granularity == "channel" and _needs_gradients(recipe.criterion):
        return ["image-classifier"], "labelled images (the criterion reads gradients of the loss)"
    kinds = ["image-classifier", "text-encoder", "text-classifier", "causal-lm"]
    if recipe.granularity == "channel" and _needs_data(recipe.criterion):
        return kinds, f"calibration data: text or images ({recipe.data_batches} batches)"
    return kinds, "any (--data none counts only; data gives the metric)"


def _needs_data(criterion: str) -> bool:
    from secateur.criteria.group.base import GROUP_CRITERIA

    return bool(getattr(GROUP_CRITERIA.get(criterion), "needs_data", False))


def _needs_gradients(criterion: str) -> bool:
    """Whether the group criterion ``criterion`` scores from gradients of a loss (``needs_data`` and
    ``needs_backward``: Taylor, Fisher, LLM-Pruner, Michel), which the command line computes with labels."""
    from secateur.criteria.group.base import GROUP_CRITERIA

    cls = GROUP_CRITERIA.get(criterion)
    return bool(getattr(cls, "needs_data", False) and getattr(cls, "needs_backward", True))
