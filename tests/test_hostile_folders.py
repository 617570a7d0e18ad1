"""Hostile saved folders: a folder is data. Each case raises a named secateur error naming the file or field,
runs no code the folder names, reads nothing outside the folder and leaves every file as it was."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import safetensors
import torch
from torch import nn

import secateur as sc
import secateur.io.folder as ser
from secateur.app.recipe import load_recipe
from secateur.errors import (
    ConfigError,
    SecateurError,
    SerializationError,
    UnsafePathError,
    UntrustedCodeError,
)
from secateur.io import from_pretrained, load, save, save_pretrained
from secateur.zoo import create_model

transformers = pytest.importorskip("transformers")

HERE = "tests.test_hostile_folders"


# ------------------------------------------------------------------------------------------------ helpers
def make_linear(features: int = 3) -> nn.Module:
    """A user factory (the trusted case)."""
    torch.manual_seed(1)
    return nn.Linear(features, features)


def write_marker(marker: str) -> nn.Module:
    """A user factory with a side effect: it must run only when the caller trusts it."""
    Path(marker).write_text("ran")
    return nn.Linear(3, 3)


def _snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (FIFOs and sockets by type only, never opened)."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.exists() and not p.is_dir():
                out[str(p)] = "special"
    return out


class ReadSpy:
    """Records every file opened through Python (builtins/io/os.open) or the safetensors readers."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real_open, real_os_open = builtins.open, os.open
        real_safe_open, real_load_file = safetensors.safe_open, ser.load_file

        def spy_open(file, *a, **k):
            self._add(file)
            return real_open(file, *a, **k)

        def spy_os_open(path, *a, **k):
            self._add(path)
            return real_os_open(path, *a, **k)

        def spy_safe_open(path, *a, **k):
            self._add(path)
            return real_safe_open(path, *a, **k)

        def spy_load_file(path, *a, **k):
            self._add(path)
            return real_load_file(path, *a, **k)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        monkeypatch.setattr(safetensors, "safe_open", spy_safe_open)
        monkeypatch.setattr(ser, "load_file", spy_load_file)

    def _add(self, path: object) -> None:
        if isinstance(path, (str, os.PathLike)):
            self.paths.append(os.path.realpath(path))

    def outside(self, folder: Path) -> list[str]:
        """Opened files that are not inside ``folder`` (library files under site-packages excluded)."""
        root = os.path.realpath(folder)
        return [p for p in self.paths if os.path.commonpath([root, p]) != root and "site-packages" not in p]


def test_read_spy_sees_reads_outside_the_folder(tmp_path, monkeypatch):
    """The spy the tests rely on does catch a read outside the folder (Python and safetensors paths)."""
    folder, outside = tmp_path / "in", tmp_path / "out.safetensors"
    folder.mkdir()
    safetensors.torch.save_file({"a": torch.zeros(2)}, outside)
    with monkeypatch.context() as m:
        spy = ReadSpy(m)
        outside.read_bytes()
        ser.load_file(outside)
    assert spy.outside(folder) == [str(outside)] * 2


def _assert_refused(
    exc: type[SecateurError],
    match: str,
    folder: Path,
    call,
    monkeypatch: pytest.MonkeyPatch,
    also_untouched: tuple[Path, ...] = (),
) -> SecateurError:
    """``call()`` raises ``exc`` matching ``match``; nothing outside ``folder`` is opened; no file changes."""
    before = _snapshot(folder, *also_untouched)
    with monkeypatch.context() as m:
        spy = ReadSpy(m)
        with pytest.raises(exc, match=match) as info:
            call()
    assert spy.outside(folder) == [], f"read outside the folder: {spy.outside(folder)}"
    assert _snapshot(folder, *also_untouched) == before
    return info.value


def _doc(folder: Path) -> dict:
    return json.loads((folder / "plan.json").read_text())


def _write_doc(folder: Path, doc: object) -> None:
    (folder / "plan.json").write_text(json.dumps(doc))


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pruned_lenet(tmp_path_factory) -> Path:
    """A channel-pruned zoo model saved with its plan (copied per test before being tampered with)."""
    model = create_model("lenet5").eval()
    x = torch.zeros(1, 1, 28, 28)
    model, plan = sc.prune_channels(model, x, sparsity=0.5, criterion="l1", verify=False)
    return save(model, tmp_path_factory.mktemp("src") / "lenet", plan=plan)


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny BERT saved with secateur.save (kind huggingface) and with save_pretrained in shards."""
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(cfg).eval()
    base = tmp_path_factory.mktemp("bert")
    single = save(model, base / "saved")
    sharded = save_pretrained(model, base / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    return single, sharded


@pytest.fixture
def lenet(pruned_lenet, tmp_path) -> Path:
    return Path(shutil.copytree(pruned_lenet, tmp_path / "lenet"))


# ------------------------------------------------------------------------------------- code in a folder
def test_factory_named_by_a_folder_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    folder = save(
        nn.Linear(3, 3),
        tmp_path / "f",
        factory=f"{HERE}:write_marker",
        factory_kwargs={"marker": str(marker)},
    )
    err = _assert_refused(UntrustedCodeError, "write_marker", folder, lambda: load(folder), monkeypatch)
    msg = str(err)
    assert "plan.json" in msg and "factory=" in msg and "trust_factory=" in msg
    assert not marker.exists()
    with pytest.raises(UntrustedCodeError):  # trusting another name does not trust this one
        load(folder, trust_factory=[f"{HERE}:make_linear"])
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os:system", "subprocess:run", "builtins:exec"])
def test_os_system_in_plan_json_runs_nothing(tmp_path, monkeypatch, target):
    marker = tmp_path / "pwned"
    folder = save(nn.Linear(3, 3), tmp_path / "f", factory=f"{HERE}:make_linear")
    doc = _doc(folder)
    doc["architecture"] = {"kind": "factory", "factory": target, "kwargs": {"command": f"touch {marker}"}}
    _write_doc(folder, doc)
    _assert_refused(UntrustedCodeError, target, folder, lambda: load(folder), monkeypatch)
    _assert_refused(UntrustedCodeError, target, folder, lambda: from_pretrained(folder), monkeypatch)
    assert not marker.exists()


def test_factory_module_in_the_folder_is_not_imported(tmp_path, monkeypatch):
    """A module the folder ships (and names) is not imported: importing it would already run code."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_factory_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\ndef build(): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = save(nn.Linear(3, 3), tmp_path / "f", factory="evil_factory_mod:build")
    _assert_refused(UntrustedCodeError, "evil_factory_mod:build", folder, lambda: load(folder), monkeypatch)
    assert not marker.exists() and "evil_factory_mod" not in sys.modules


def test_trusted_factory_is_accepted_both_ways(tmp_path):
    model = make_linear(4)
    folder = save(model, tmp_path / "f", factory=f"{HERE}:make_linear", factory_kwargs={"features": 4})
    x = torch.randn(2, 4)
    ref = _out(model, x)
    for loaded in (
        load(folder, factory=make_linear),  # the callable itself
        load(folder, factory=f"{HERE}:make_linear"),  # a name the caller gives
        load(folder, trust_factory=[f"{HERE}:make_linear"]),  # the recorded name, allowed
        load(folder, trust_factory=f"{HERE}:make_linear"),  # one string is one name
        from_pretrained(folder, trust_factory=[f"{HERE}:make_linear"]),
    ):
        assert torch.equal(_out(loaded, x), ref)
    # A model rebuilt by a named factory records it, so it can be saved and loaded again.
    again = save(load(folder, trust_factory=[f"{HERE}:make_linear"]), tmp_path / "g")
    assert _doc(again)["architecture"]["factory"] == f"{HERE}:make_linear"
    with pytest.raises(ConfigError, match="trust_factory"):
        load(folder, trust_factory=["not a name"])


def test_huggingface_class_outside_transformers_is_refused(bert_folders, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    for field, value in (("class", "os:system"), ("config_class", "subprocess:Popen")):
        folder = Path(shutil.copytree(bert_folders[0], tmp_path / field))
        doc = _doc(folder)
        doc["architecture"][field] = value
        doc["architecture"]["config"]["command"] = f"touch {marker}"
        _write_doc(folder, doc)
        _assert_refused(
            UntrustedCodeError, f"architecture.{field}", folder, lambda f=folder: load(f), monkeypatch
        )
    # A name under transformers that is not a model class (a module attribute) is refused too.
    folder = Path(shutil.copytree(bert_folders[0], tmp_path / "attr"))
    doc = _doc(folder)
    doc["architecture"]["class"] = "transformers.models.bert.modeling_bert:torch"
    _write_doc(folder, doc)
    _assert_refused(
        SerializationError, "not a transformers PreTrainedModel", folder, lambda: load(folder), monkeypatch
    )
    assert not marker.exists()


def test_auto_map_and_hub_kernels_in_a_config_are_ignored_or_refused(bert_folders, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    folder = Path(shutil.copytree(bert_folders[0], tmp_path / "automap"))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(folder))
    doc = _doc(folder)
    doc["architecture"]["config"]["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    doc["architecture"]["config"]["trust_remote_code"] = True
    _write_doc(folder, doc)
    loaded = load(folder)  # auto_map is ignored: the BertModel class is built
    assert type(loaded).__name__ == "BertModel" and not marker.exists()
    assert "modeling_evil" not in sys.modules
    doc["architecture"]["config"]["attn_implementation"] = "kernels-community/evil"
    _write_doc(folder, doc)
    _assert_refused(SerializationError, "attn_implementation", folder, lambda: load(folder), monkeypatch)


# -------------------------------------------------------------------------------------- files and paths
@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_sharded_index_entry_outside_the_folder(bert_folders, tmp_path, monkeypatch, entry):
    folder = Path(shutil.copytree(bert_folders[1], tmp_path / "m"))
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shard = sorted(set(doc["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / shard, outside)  # a valid file: reading it would succeed
    entry = str(outside) if entry == "ABSOLUTE" else entry
    doc["weight_map"] = {k: (entry if v == shard else v) for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    what = "absolute path" if os.path.isabs(entry) else "outside the folder"
    err = _assert_refused(
        UnsafePathError, what, folder, lambda: from_pretrained(folder), monkeypatch, (outside,)
    )
    assert "model.safetensors.index.json" in str(err)


def test_symlinks_leaving_the_folder_are_refused(lenet, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("model.safetensors", "plan.json"):
        folder = Path(shutil.copytree(lenet, tmp_path / f"link_{name}"))
        shutil.move(folder / name, outside / name)  # a valid file, one level up
        (folder / name).symlink_to(outside / name)
        _assert_refused(
            UnsafePathError, "through a symlink", folder, lambda f=folder: load(f), monkeypatch, (outside,)
        )
        shutil.move(outside / name, tmp_path / f"kept_{name}")
    # A symlink that stays inside the folder is fine.
    (lenet / "weights.bin").write_bytes((lenet / "model.safetensors").read_bytes())
    (lenet / "model.safetensors").unlink()
    (lenet / "model.safetensors").symlink_to("weights.bin")
    load(lenet)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", ["model.safetensors", "plan.json"])
def test_fifo_is_refused_without_blocking(lenet, monkeypatch, name):
    (lenet / name).unlink()
    os.mkfifo(lenet / name)
    t0 = time.perf_counter()
    _assert_refused(
        UnsafePathError, f"{name}: not a regular file \\(a FIFO\\)", lenet, lambda: load(lenet), monkeypatch
    )
    assert time.perf_counter() - t0 < 10


@pytest.mark.timeout(20)
def test_fifo_shard_and_fifo_path_argument(bert_folders, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(bert_folders[1], tmp_path / "m"))
    shard = sorted(
        set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    )[0]
    (folder / shard).unlink()
    os.mkfifo(folder / shard)
    _assert_refused(UnsafePathError, "FIFO", folder, lambda: from_pretrained(folder), monkeypatch)
    os.mkfifo(tmp_path / "given.fifo")  # a FIFO passed as the path itself: not opened either
    with pytest.raises(SerializationError, match="not a folder"):
        load(tmp_path / "given.fifo")


# ------------------------------------------------------------------------------------------ plan.json
def _tensor_with_dim(doc: dict) -> tuple[str, str, list[int]]:
    name, dims = next(
        (n, d) for n, d in doc["plan"]["tensors"].items() if any(len(k) > 2 for k in d.values())
    )
    dim = next(k for k, v in dims.items() if len(v) > 2)
    return name, dim, dims[dim]


@pytest.mark.parametrize(
    "tamper,match",
    [
        (lambda kept: [kept[0], *kept[:-1]], r"listed twice \(indices must be unique\)"),
        (lambda kept: [kept[1], kept[0], *kept[2:]], "must be sorted ascending"),
        (lambda kept: [*kept[:-1], 10**6], "out of range for a dimension of size"),
        (lambda kept: [-1, *kept[1:]], "is negative"),
        (lambda kept: [*kept[:-1], 2.5], "must be ints"),
        (lambda kept: [], "non-empty list"),
    ],
    ids=["duplicate", "unsorted", "out_of_range", "negative", "float", "empty"],
)
def test_bad_kept_indices_are_named(lenet, monkeypatch, tamper, match):
    doc = _doc(lenet)
    name, dim, kept = _tensor_with_dim(doc)
    doc["plan"]["tensors"][name][dim] = tamper(kept)
    _write_doc(lenet, doc)
    err = _assert_refused(SerializationError, match, lenet, lambda: load(lenet), monkeypatch)
    assert "plan.json" in str(err) and f"plan.tensors[{name!r}][{dim!r}]" in str(err)


def test_plan_nested_200000_deep_is_refused_without_recursion_error(lenet, monkeypatch):
    depth = 200_000
    text = (lenet / "plan.json").read_text()
    deep = "[" * depth + "]" * depth
    (lenet / "plan.json").write_text(text.rstrip()[:-1] + f', "metadata": {{"x": {deep}}}}}')
    _assert_refused(
        SerializationError,
        f"plan.json: plan nests {depth + 2} levels deep",
        lenet,
        lambda: load(lenet),
        monkeypatch,
    )
    (lenet / "plan.json").write_text(deep)
    _assert_refused(SerializationError, "levels deep", lenet, lambda: load(lenet), monkeypatch)


@pytest.mark.parametrize(
    "doc,match",
    [
        ([1, 2, 3], "a plan must be a JSON object, got an array"),
        ("plan", "a plan must be a JSON object, got a string"),
        ({"format": "secateur", "version": 1, "architecture": []}, "architecture: expected a JSON object"),
        ({"format": "secateur", "version": 1, "architecture": {"kind": "pickle"}}, "unknown kind 'pickle'"),
    ],
    ids=["list", "string", "architecture_list", "unknown_kind"],
)
def test_plan_of_the_wrong_shape_is_named(lenet, monkeypatch, doc, match):
    _write_doc(lenet, doc)
    _assert_refused(SerializationError, match, lenet, lambda: load(lenet), monkeypatch)


def test_plan_cannot_set_private_attributes(lenet, monkeypatch):
    doc = _doc(lenet)
    doc["plan"]["attributes"] = {"": {"__class__": ["Module", "Evil"]}}
    _write_doc(lenet, doc)
    _assert_refused(
        SerializationError,
        r"plan\.attributes\[''\]\['__class__'\]: not a plain attribute name",
        lenet,
        lambda: load(lenet),
        monkeypatch,
    )
    doc["plan"]["attributes"] = {"no.such.module": {"out_features": [1, 2]}}
    _write_doc(lenet, doc)
    _assert_refused(
        SerializationError,
        "the plan does not fit the model.*no such module",
        lenet,
        lambda: load(lenet),
        monkeypatch,
    )


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize(
    "value,match",
    [
        (10**12, r"architecture\.record\.num_classes: 1000000000000 exceeds every size the weights can back"),
        (
            1000,
            r"weights do not fit the rebuilt model: fc3\.bias: \(10,\) in the file, \(1000,\) in the model",
        ),
    ],
)
def test_absurd_sizes_in_a_zoo_record(lenet, monkeypatch, value, match):
    """num_classes=10**12 would reach the allocator; a plausible but wrong one is caught on the meta model."""
    doc = _doc(lenet)
    doc["architecture"]["record"]["num_classes"] = value
    _write_doc(lenet, doc)
    _assert_refused(SerializationError, match, lenet, lambda: load(lenet), monkeypatch)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("vocab_size", 10**12, r"architecture\.config\.vocab_size: 1000000000000 exceeds"),
        ("num_hidden_layers", 100_000, r"architecture\.config\.num_hidden_layers: 100000 layers but"),
        ("intermediate_size", 4096, r"weights do not fit the rebuilt model: .*intermediate\.dense"),
    ],
)
def test_absurd_sizes_in_a_huggingface_config(bert_folders, tmp_path, monkeypatch, key, value, match):
    for folder, loader in ((bert_folders[0], load), (bert_folders[1], from_pretrained)):
        folder = Path(shutil.copytree(folder, tmp_path / f"{folder.name}_{key}"))
        doc = _doc(folder)
        doc["architecture"]["config"][key] = value
        _write_doc(folder, doc)
        _assert_refused(SerializationError, match, folder, lambda f=folder, ld=loader: ld(f), monkeypatch)


def test_huge_integer_literal_is_named(lenet, monkeypatch):
    text = (lenet / "plan.json").read_text()
    (lenet / "plan.json").write_text(text.replace('"num_classes": 10', '"num_classes": 1' + "0" * 5000))
    _assert_refused(
        SerializationError,
        "plan.json: plan holds a value Python cannot read",
        lenet,
        lambda: load(lenet),
        monkeypatch,
    )


def test_mask_of_the_wrong_shape_is_named(tmp_path, monkeypatch):
    model = create_model("lenet5")
    sc.Pruner(model, 0.5).step(0)
    folder = save(model, tmp_path / "m")
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.startswith("__mask__/"))
    tensors[name] = tensors[name][:1]
    safetensors.torch.save_file(tensors, folder / "model.safetensors")
    _assert_refused(
        SerializationError, f"mask for '{name[9:]}' has shape", folder, lambda: load(folder), monkeypatch
    )


def test_untampered_folders_still_load_exactly(lenet, bert_folders):
    x = torch.randn(2, 1, 28, 28)
    a, b = load(lenet), load(lenet)
    assert torch.equal(_out(a, x), _out(b, x))
    ids = torch.randint(0, 64, (1, 6))
    single, sharded = (load(bert_folders[0]).eval(), from_pretrained(bert_folders[1]))
    with torch.no_grad():
        assert torch.equal(single(ids).last_hidden_state, sharded(ids).last_hidden_state)


# ------------------------------------------------------------------------------------------------- YAML
def test_yaml_alias_bomb_is_refused_naming_the_file(tmp_path):
    lines = ["sparsity: 0.5", "criterion_kwargs:", "  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    before = _snapshot(bomb)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: expands to more than 10000 nodes"):
        load_recipe(bomb)
    assert time.perf_counter() - t0 < 5 and _snapshot(bomb) == before
    # A few aliases (a normal use) still load and dump.
    ok = tmp_path / "ok.yaml"
    ok.write_text("sparsity: &s 0.5\ncriterion_kwargs: {a: &a [1, 2], b: *a, c: *s}\n")
    assert "sparsity: 0.5" in load_recipe(ok).to_yaml()


@pytest.mark.timeout(20)
def test_yaml_recursive_alias_deep_nesting_and_fifo(tmp_path):
    rec = tmp_path / "rec.yaml"
    rec.write_text("sparsity: 0.5\ncriterion_kwargs: {a: &a [*a]}\n")
    with pytest.raises(ConfigError, match=r"rec\.yaml: holds a recursive alias"):
        load_recipe(rec)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: nests deeper than 32 levels"):
        load_recipe(deep)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo\.yaml: not a regular file"):
        load_recipe(fifo)
