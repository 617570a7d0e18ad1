"""The layout's rules that import-linter does not check: no private names across modules, self-registering
criteria packages (adding a criterion is one file)."""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import secateur

SRC = Path(secateur.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_module_imports_a_private_name_of_another_module():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        importer = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("secateur"):
                continue
            for alias in node.names:
                # a private module (secateur._validate) is fine; a private name from another module is not
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    target = f"{node.module}.{alias.name}"
                    if importlib.util.find_spec(node.module) and not _is_module(target):
                        offenders.append(f"{importer}: from {node.module} import {alias.name}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def test_criteria_packages_import_every_module_they_hold():
    import secateur.criteria.element as element
    import secateur.criteria.group as group

    for pkg in (element, group):
        for mod in pkgutil.iter_modules(pkg.__path__):
            name = f"{pkg.__name__}.{mod.name}"
            assert name in sys.modules, f"{mod.name} is not imported by {pkg.__name__}"
