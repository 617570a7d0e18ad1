"""The recipes shipped with secateur, and loading a recipe by file or shipped name (the CLI's ``--recipe``).

The recipe itself (:class:`secateur.Recipe`, the same object in Python and in YAML) lives in
:mod:`secateur.pruners.recipe`; this module only knows where the shipped YAML files are
(``secateur/app/recipes/*.yaml``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from secateur.errors import ConfigError
from secateur.pruners.recipe import Recipe, parse_yaml

__all__ = ["load_recipe", "shipped_recipes"]


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with the package, sorted."""
    folder = resources.files("secateur.app.recipes")
    return sorted(Path(f.name).stem for f in folder.iterdir() if f.name.endswith(".yaml"))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe from a YAML file (:meth:`Recipe.from_yaml`), or a shipped recipe by name (``"gmp90"``).

    Raises:
        ConfigError: neither an existing file nor a shipped name (the shipped ones are listed), or
            whatever :meth:`Recipe.from_yaml` raises (the file and the fields at fault are named).
    """
    p = Path(path_or_name)
    if p.exists():
        return Recipe.from_yaml(p)
    name = str(path_or_name).removesuffix(".yaml")
    if name not in shipped_recipes():
        raise ConfigError(
            f"recipe {str(path_or_name)!r} is neither a file nor a shipped recipe; "
            f"shipped: {shipped_recipes()}"
        )
    text = resources.files("secateur.app.recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    source = f"{name} (shipped)"
    return Recipe.from_dict(parse_yaml(text, source), source)
