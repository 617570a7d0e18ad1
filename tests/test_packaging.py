"""Packaging: the core install works alone, optional features name their extra, the wheel carries what it
should, and published files get the user's umask.

The core-only checks run in a subprocess whose meta-path finder refuses every optional package (as if
only the core dependencies were installed). The real check, a wheel installed into a fresh venv, is
``scripts/check_wheel.sh`` (``make check-wheel``).
"""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

import secateur as sc
from secateur._files import file_stamps, honour_umask, honour_umask_of_changed
from secateur._optional import EXTRAS, install_hint, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "numpy", "safetensors", "pyyaml", "pydantic", "click", "tqdm", "rich"}
# every package that is not a core dependency (nor one of theirs) and that secateur may import somewhere
OPTIONAL = sorted(set(EXTRAS) | {"scipy", "sklearn", "sentence_transformers", "tokenizers", "huggingface_hub",
                                 "pytorch_lightning", "datasets", "gguf"})

# Installed-but-hidden: the path finder answers "not found" for these packages, as it does when they are not
# installed (importlib.util.find_spec gives None, import raises ModuleNotFoundError).
BLOCKER = textwrap.dedent(
    f"""
    import importlib.machinery, sys
    BLOCKED = {OPTIONAL!r}
    class HidingPathFinder:
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)
        @classmethod
        def invalidate_caches(cls):
            importlib.machinery.PathFinder.invalidate_caches()
    sys.meta_path[:] = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    """
)


def _requirement_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-")


def _run_core_only(code: str, tmp_path: Path, timeout: float = 240) -> str:
    script = tmp_path / "core_only.py"
    script.write_text(BLOCKER + textwrap.dedent(code))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


# ------------------------------------------------------------------------------------------ metadata
def test_core_dependencies_are_exactly_the_core():
    deps = PYPROJECT["project"]["dependencies"]
    assert {_requirement_name(d) for d in deps} == CORE
    assert all(re.search(r"[<>=]", d) for d in deps), "every dependency states a version range"


def test_every_extra_named_by_an_error_exists_and_installs_that_package():
    extras = PYPROJECT["project"]["optional-dependencies"]

    def resolved(name: str, seen: frozenset = frozenset()) -> set[str]:
        out = set()
        for req in extras[name]:
            m = re.fullmatch(r"secateur\[([\w,-]+)\]", req)
            if m:
                for sub in m.group(1).split(","):
                    assert sub not in seen, f"extra {name} includes itself"
                    out |= resolved(sub, seen | {name})
            else:
                out.add(_requirement_name(req))
        return out

    pip_name = {"PIL": "pillow", "torch_pruning": "torch-pruning"}
    for module, extra in EXTRAS.items():
        assert extra in extras, f"secateur._optional names extra [{extra}], absent from pyproject.toml"
        assert pip_name.get(module, module) in resolved(extra), f"[{extra}] does not install {module}"
    # the test suite's optional packages come with [dev]: `make test` needs nothing else
    for needed in ("transformers", "matplotlib", "onnxruntime", "torch-pruning", "lightning", "pytest"):
        assert needed in resolved("dev"), needed
    assert {"hf", "llm", "onnx", "report", "peers", "vision", "docs", "all", "dev"} <= set(extras)


def test_license_py_typed_and_classifiers():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10000  # the whole text, not a stub
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (ROOT / "src/secateur/py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["secateur"]
    classifiers = PYPROJECT["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # PEP 639: the license expression says it


def test_require_names_the_feature_and_the_extra():
    with pytest.raises(ImportError, match=r"loading X needs transformers: pip install 'secateur\[hf\]'"):
        require("transformers.no_such_module_here", "loading X")
    with pytest.raises(ImportError, match="pip install secateur_no_such_pkg") as info:
        require("secateur_no_such_pkg", "a test")
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert install_hint("matplotlib.pyplot") == "pip install 'secateur[report]'"
    assert require("json", "a test") is json


# ------------------------------------------------------------------------------------------ core only
def test_core_paths_work_without_any_optional_package(tmp_path):
    """import secateur, element and channel pruning, save/load and the CLI's --help and recipes, with every
    optional package refused; features that need one raise ImportError naming the extra."""
    torch.manual_seed(0)
    import transformers  # the parent may use it: build a Hugging Face folder the child cannot load

    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=40, max_position_embeddings=16)
    sc.save(transformers.BertModel(cfg), tmp_path / "hf_saved")

    out = _run_core_only(
        """
        import sys, torch
        import secateur as sc
        from secateur.zoo import create_model
        loaded = sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))
        assert not loaded, loaded

        x = torch.randn(4, 1, 28, 28)
        model = create_model("lenet5").eval()
        pruner = sc.Pruner(model, schedule=0.5, scope=sc.Scope(exclude_first=True, exclude_last=True))
        pruner.step(0)
        pruner.finalize()
        counts = sc.count_params(model)
        assert counts["nonzero_params"] < counts["params"], counts

        cnn = create_model("resnet8").eval()
        small, plan = sc.prune_channels(cnn, torch.zeros(1, 1, 28, 28), sparsity=0.3, verify=True)
        assert sc.count_params(small)["params"] < sc.count_params(create_model("resnet8"))["params"]
        sc.save(small, "out/pruned", plan=plan)
        again = sc.load("out/pruned").eval()
        with torch.no_grad():
            assert torch.equal(small(x), again(x))

        from click.testing import CliRunner
        from secateur.app.cli import main
        for args in (["--help"], ["recipes"]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 0, (args, r.output, r.exception)
        assert "wanda_2_4" in r.output

        for what in ("import secateur.integrations.hf_trainer", "sc.load('hf_saved')"):
            try:
                exec(what)
            except ImportError as e:
                assert "pip install 'secateur[hf]'" in str(e), str(e)
            else:
                raise AssertionError(what + " worked without transformers")
        print("core-ok")
        """,
        tmp_path,
    )
    assert out.strip().endswith("core-ok")


# ------------------------------------------------------------------------------------------ wheel
def test_built_wheel_carries_license_typing_marker_recipes_and_core_requirements(tmp_path):
    """The wheel setuptools builds from a copy of the project (the shared checkout is not written to)."""
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-qq", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("secateur-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(meta_name))
        license_name = next(n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n)
        assert z.read(license_name) == (ROOT / "LICENSE").read_bytes()
    assert "secateur/py.typed" in names
    recipes = (ROOT / "src/secateur/app/recipes").glob("*.yaml")
    assert {f"secateur/app/recipes/{p.name}" for p in recipes} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    unconditional = {_requirement_name(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert unconditional == CORE
    assert {"hf", "onnx", "report", "peers", "vision", "docs", "all"} <= set(meta.get_all("Provides-Extra"))


# ------------------------------------------------------------------------------------------ file modes
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_saved_folders_and_checkpoints_get_the_umask(tmp_path, umask_027):
    from secateur.train import Trainer
    from secateur.train.checkpoint import save_checkpoint
    from secateur.zoo import create_model

    model = create_model("lenet5")
    sc.save(model, tmp_path / "saved")
    for name in ("model.safetensors", "plan.json"):
        assert _mode(tmp_path / "saved" / name) == 0o640, name  # 0666 & ~027; safetensors alone gives 0600

    trainer = Trainer(model, [(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))], epochs=1,
                      progress=False)
    ckpt = save_checkpoint(trainer, tmp_path / "ckpts")
    assert _mode(ckpt) == 0o750
    assert {_mode(f) for f in ckpt.iterdir()} == {0o640}


def test_save_pretrained_gets_the_umask_and_leaves_other_files_alone(tmp_path, umask_027):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, vocab_size=40, max_position_embeddings=16)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    os.chmod(out / "notes.txt", 0o600)
    sc.save_pretrained(transformers.BertModel(cfg), out)
    modes = {f.name: _mode(f) for f in out.iterdir()}
    assert modes.pop("notes.txt") == 0o600  # not written by save_pretrained: untouched
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_streamed_llm_pruning_output_folder_gets_the_umask(tmp_path, umask_027):
    transformers = pytest.importorskip("transformers")
    from secateur.llm import prune_checkpoint

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "in")  # transformers' own 0600 file
    batches = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    prune_checkpoint(tmp_path / "in", tmp_path / "out", batches, "magnitude", 0.5)
    assert _mode(tmp_path / "out") == 0o750  # a temporary folder (0700) renamed into place
    assert _mode(tmp_path / "out" / "model.safetensors") == 0o640


def test_download_publishes_with_the_umask(tmp_path, umask_027):
    import hashlib

    from secateur.data.download import download_file

    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    dest = download_file(src.as_uri(), tmp_path / "d" / "f.bin", hashlib.sha256(b"x" * 1000).hexdigest(),
                         progress=False)
    assert dest.read_bytes() == b"x" * 1000 and _mode(dest) == 0o640


def test_honour_umask_of_changed_touches_only_new_or_rewritten_files(tmp_path, umask_027):
    (tmp_path / "old").write_text("a")
    (tmp_path / "rewritten").write_text("b")
    (tmp_path / "link").symlink_to(tmp_path / "old")
    for n in ("old", "rewritten"):
        os.chmod(tmp_path / n, 0o600)
    before = file_stamps(tmp_path)
    assert set(before) == {"old", "rewritten"}  # symlinks left out
    (tmp_path / "new").write_text("c")
    os.chmod(tmp_path / "new", 0o600)
    (tmp_path / "rewritten.tmp").write_text("B")
    os.replace(tmp_path / "rewritten.tmp", tmp_path / "rewritten")
    os.chmod(tmp_path / "rewritten", 0o600)
    assert honour_umask_of_changed(tmp_path, before) == ["new", "rewritten"]
    assert {n: _mode(tmp_path / n) for n in ("old", "new", "rewritten")} == {
        "old": 0o600, "new": 0o640, "rewritten": 0o640}
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    honour_umask(d)
    assert _mode(d) == 0o750


def test_no_print_outside_the_command_line():
    """The library reports through logging (module loggers in the ``secateur`` tree) and warnings; only the
    CLI (secateur.app) prints."""
    import ast

    offenders = []
    for path in sorted((ROOT / "src/secateur").rglob("*.py")):
        rel = path.relative_to(ROOT / "src")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if rel.parts[1] == "app":
                break
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}: print")
        for node in tree.body:  # a module's own logger: logging.getLogger(__name__) or a "secateur..." name
            call = node.value if isinstance(node, ast.Assign) else None
            if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "getLogger":
                arg = call.args[0] if call.args else None
                if not (isinstance(arg, ast.Name) and arg.id == "__name__") and not (
                    isinstance(arg, ast.Constant) and str(arg.value).startswith("secateur")
                ):
                    offenders.append(f"{rel}:{node.lineno}: module logger outside the 'secateur' tree")
    assert not offenders, offenders
