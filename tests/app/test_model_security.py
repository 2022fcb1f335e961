"""Hostile model and data files: nothing from a file runs unless the caller opts in with trust_pickle.

A pickle whose ``__reduce__`` writes a sentinel file is refused by every loader (API, CLI in-process and
as a subprocess) and the sentinel never appears; only ``trust_pickle=True`` / ``--trust-pickle`` runs
it. Truncated, corrupted and zip bomb-like archives, a state_dict with wrong shapes and safetensors
headers that lie are each one clear error, without traceback or partial output. The opt-in and the
input's SHA-256 are recorded in the report and in the ``.safetensors`` copy's metadata.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cbd_fast.app import cli
from cbd_fast.app import images as imagedata
from cbd_fast.app import model_io as modelio
from cbd_fast.core import safe_load
from cbd_fast.evaluation import models as fmnist_models
from cbd_fast.evaluation.models import FMNISTNet

KW = {"width": 4, "feature_dim": 16}
FACTORY = "cbd_fast.evaluation.models:FMNISTNet"
FAST = ["--set", "epochs=1", "--set", "steps=1", "--set", "batch_size=16", "-q"]
REPO = Path(__file__).resolve().parents[2]


class WritesSentinel:
    """Unpickling this object writes ``path``: the stand-in for an attacker's payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.path!r}, 'w').write('pwned')",))


class CallsSystem:
    """Unpickling this would call ``os.system`` (never unpickled here: only its name is checked)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny FMNISTNet as a state_dict / safetensors / TorchScript / pickled module, and unlabeled data."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("sec")
    torch.manual_seed(0)
    net = FMNISTNet(**KW).eval()
    torch.save(net.state_dict(), d / "sd.pt")
    save_file(net.state_dict(), str(d / "sd.safetensors"))
    torch.save(net, d / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(d / "net.ts"))
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.save(x, d / "x.pt")
    names = {"sd": "sd.pt", "st": "sd.safetensors", "whole": "whole.pt", "ts": "net.ts", "x": "x.pt"}
    return {"dir": d, **{key: d / name for key, name in names.items()}}


@pytest.fixture()
def sentinel(tmp_path) -> Path:
    return tmp_path / "PWNED"


def _evil_files(folder: Path, sentinel: Path) -> dict[str, Path]:
    """The sentinel payload as a torch.save zip, the legacy torch format and a bare protocol-4 pickle."""
    files = {"zip": folder / "evil.pt", "legacy": folder / "evil_legacy.pt", "bare": folder / "evil_bare.pt"}
    torch.save(WritesSentinel(sentinel), files["zip"])
    torch.save(WritesSentinel(sentinel), files["legacy"], _use_new_zipfile_serialization=False)
    files["bare"].write_bytes(pickle.dumps(WritesSentinel(sentinel), protocol=4))  # STACK_GLOBAL
    return files


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbd-fast: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _no_output(out: Path) -> None:
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    assert not list(out.parent.glob("*.tmp"))


# ------------------------------------------------------------------------------------------ the sentinel


@pytest.mark.parametrize("kind", ["zip", "legacy", "bare"])
def test_sentinel_pickle_is_refused_by_every_python_loader(tmp_path, sentinel, kind):
    evil = _evil_files(tmp_path, sentinel)[kind]
    with pytest.raises(modelio.ModelLoadError, match=r"refused to load .*builtins\.exec.*--trust-pickle"):
        modelio.load_model(evil)
    with pytest.raises(modelio.ModelLoadError, match=r"not a plain state_dict.*builtins\.exec"):
        modelio.load_model(FACTORY, weights=evil, factory_kwargs=KW)
    with pytest.raises(modelio.ModelLoadError, match=r"builtins\.exec"):
        modelio.load_state_dict_file(evil)
    with pytest.raises(ValueError, match=r"cannot read tensor file .*builtins\.exec"):
        imagedata.load_images(evil)
    with pytest.raises(ValueError, match=r"cannot read labels file .*builtins\.exec"):
        imagedata.load_labels(evil)
    with pytest.raises(ValueError, match=r"FMNISTNet weights .*builtins\.exec"):
        fmnist_models.load_model(str(evil))
    info = safe_load.inspect_torch_file(evil)
    assert info.unsafe_globals == ("builtins.exec",)
    assert info.sha256 == hashlib.sha256(evil.read_bytes()).hexdigest()
    assert not sentinel.exists()


def test_sentinel_runs_only_with_the_api_opt_in(tmp_path, sentinel):
    evil = _evil_files(tmp_path, sentinel)["zip"]
    with pytest.raises(modelio.ModelLoadError, match="refused"):
        modelio.load_model(evil)
    assert not sentinel.exists()
    with pytest.warns(modelio.PickleTrustWarning), pytest.raises(modelio.ModelLoadError, match="no"):
        modelio.load_model(evil, trust_pickle=True)  # the payload ran; what it returned is no model
    assert sentinel.read_text() == "pwned"


@pytest.mark.parametrize("command", ["purify", "evaluate"])
def test_cli_refuses_the_sentinel_in_process_and_runs_it_only_with_trust_pickle(
    assets, tmp_path, sentinel, capsys, command
):
    evil = _evil_files(tmp_path, sentinel)["zip"]
    out = tmp_path / "out.pt"
    argv = [command, "--model", evil, "--data", assets["x"]]
    argv += ["--out", out, *FAST] if command == "purify" else ["--labels", assets["x"], "-q"]
    code, stdout, err = run(argv, capsys)
    line = _one_error_line(err)
    assert code == 1 and stdout == ""
    assert "refused to load" in line and "builtins.exec" in line and "--trust-pickle" in line
    assert not sentinel.exists()
    _no_output(out)
    code, _, err = run([*argv, "--trust-pickle"], capsys)
    assert code == 1 and "does not hold a model" in err.strip().splitlines()[-1]
    assert sentinel.exists()
    _no_output(out)


def test_cli_subprocess_refuses_the_sentinel(assets, tmp_path, sentinel):
    evil = _evil_files(tmp_path, sentinel)["zip"]
    out = tmp_path / "out.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "cbd_fast", "purify", "--model", str(evil)]
    argv += ["--data", str(assets["x"]), "--out", str(out), *FAST]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert "refused to load" in line and "builtins.exec" in line and "--trust-pickle" in line
    assert not sentinel.exists()
    _no_output(out)


def test_globals_are_named_and_computed_globals_are_refused(tmp_path):
    bare = tmp_path / "system.pt"
    bare.write_bytes(pickle.dumps({"w": CallsSystem()}, protocol=2))
    with pytest.raises(modelio.ModelLoadError, match=rf"\({os.system.__module__}\.system\)"):
        modelio.load_model(bare)
    # STACK_GLOBAL whose operands are computed (here: the result of a call), not literal strings
    computed = b"\x80\x04N\x8c\x06system\x93."  # PROTO 4, NONE, "system", STACK_GLOBAL, STOP
    assert any(g.startswith("<") for g in safe_load.pickle_globals(computed))
    with pytest.raises(safe_load.UnsafeFileError, match="malformed or truncated pickle"):
        safe_load.pickle_globals(b"\x80\x02c")


def test_torchscript_archive_with_a_hostile_pickle_never_reaches_python_pickle(assets, tmp_path, sentinel):
    buf = io.BytesIO()
    torch.save(WritesSentinel(sentinel), buf)
    with zipfile.ZipFile(buf) as zf:
        payload = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    hostile = tmp_path / "hostile.ts"
    with zipfile.ZipFile(assets["ts"]) as src, zipfile.ZipFile(hostile, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    for trust in (False, True):  # torch.jit.load only: even the opt-in does not unpickle it in Python
        with pytest.raises(modelio.ModelLoadError, match="cannot load TorchScript archive"):
            modelio.load_model(hostile, trust_pickle=trust)
    assert not sentinel.exists()


# ------------------------------------------------------------------------------------------ broken archives


def _corrupt(raw: bytes, entry_suffix: str, zf_path: Path) -> bytes:
    """``raw`` with one byte flipped inside the stored data of the entry ending in ``entry_suffix``."""
    with zipfile.ZipFile(zf_path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(entry_suffix))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :]


def _bad_model_files(assets: dict[str, Path], d: Path) -> dict[str, tuple[Path, str]]:
    """``{case: (file, what the error must say)}`` for files given as --model."""
    sd_raw, ts_raw = assets["sd"].read_bytes(), assets["ts"].read_bytes()
    cases: dict[str, tuple[bytes, str]] = {
        "truncated zip": (sd_raw[: len(sd_raw) // 2], "truncated or corrupted zip archive"),
        "truncated torchscript": (ts_raw[: len(ts_raw) - 100], "truncated or corrupted zip archive"),
        "corrupted tensor bytes": (_corrupt(sd_raw, "data/0", assets["sd"]), "corrupted zip archive: entry"),
        "corrupted data.pkl": (_corrupt(sd_raw, "data.pkl", assets["sd"]), "corrupted zip archive: entry"),
        "corrupted torchscript": (_corrupt(ts_raw, "data/0", assets["ts"]), "corrupted zip archive: entry"),
        "truncated legacy pickle": (pickle.dumps({"a": 1}, protocol=2)[:-3], "malformed or truncated pickle"),
        "empty file": (b"", "an empty file"),
    }
    out = {}
    for name, (raw, match) in cases.items():
        path = d / (name.replace(" ", "_") + ".pt")
        path.write_bytes(raw)
        out[name] = (path, match)
    # zip bomb-like: a deflated entry of 8 MiB of zeros (a few KB on disk) ...
    bomb = d / "bomb.pt"
    with zipfile.ZipFile(assets["sd"]) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("sd/extra/bomb", b"\0" * (8 << 20), compress_type=zipfile.ZIP_DEFLATED)
    out["zip bomb"] = (bomb, "zip bomb-like archive")
    # ... and a stored entry whose central directory declares 2 GiB
    raw = bytearray(sd_raw)
    name = next(n for n in zipfile.ZipFile(assets["sd"]).namelist() if n.endswith("data/0")).encode()
    cd = raw.index(b"PK\x01\x02")
    while raw[cd + 46 : cd + 46 + len(name)] != name:  # the entry's central directory record
        cd = raw.index(b"PK\x01\x02", cd + 4)
    struct.pack_into("<I", raw, cd + 24, 2**31 - 1)  # its uncompressed size
    lying = d / "lying_size.pt"
    lying.write_bytes(bytes(raw))
    out["declared size lie"] = (lying, "declares 2147483647 bytes")
    return out


def test_broken_archives_are_clear_errors(assets, tmp_path):
    for name, (path, match) in _bad_model_files(assets, tmp_path).items():
        assert path.stat().st_size < 64 << 10, f"{name}: keep test files small"
        with pytest.raises(modelio.ModelLoadError, match=match) as exc_info:
            modelio.load_model(path, trust_pickle=True)  # refused before any unpickling, opt-in or not
        assert str(path.name) in str(exc_info.value), name
        assert "\n" not in str(exc_info.value), name


def test_broken_archives_as_weights_and_data(assets, tmp_path):
    files = _bad_model_files(assets, tmp_path)
    for name in ("truncated zip", "corrupted tensor bytes", "zip bomb", "declared size lie"):
        path, match = files[name]
        with pytest.raises(modelio.ModelLoadError, match=match):
            modelio.load_model(FACTORY, weights=path, factory_kwargs=KW)
        with pytest.raises(ValueError, match=match):
            imagedata.load_images(path)
    npz = tmp_path / "bomb.npz"
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((8 << 20,), np.uint8))
        zf.writestr("images.npy", buf.getvalue())
    with pytest.raises(ValueError, match="zip bomb-like"):
        imagedata.load_images(npz)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read tensor file .*allow_pickle=False"):
        imagedata.load_images(objects)


@pytest.mark.parametrize(
    "case",
    ["truncated zip", "corrupted tensor bytes", "zip bomb", "declared size lie", "truncated torchscript"],
)
def test_cli_broken_archive_one_line_no_output(assets, tmp_path, capsys, case):
    path, match = _bad_model_files(assets, tmp_path)[case]
    out = tmp_path / "out.pt"
    argv = ["purify", "--model", path, "--data", assets["x"], "--out", out, *FAST]
    code, _, err = run(argv, capsys)
    assert code == 1 and match in _one_error_line(err)
    _no_output(out)


# ------------------------------------------------------------------------------------------ shapes, headers


def test_state_dict_with_wrong_shapes_names_the_key_and_both_shapes(assets, tmp_path, capsys):
    wrong = FMNISTNet(width=6, feature_dim=16).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    key = next(k for k in wrong if wrong[k].shape != torch.load(assets["sd"], weights_only=True)[k].shape)
    own = FMNISTNet(**KW).state_dict()[key].shape
    with pytest.raises(modelio.ModelLoadError) as exc_info:
        modelio.load_model(FACTORY, weights=tmp_path / "wrong.pt", factory_kwargs=KW)
    msg = str(exc_info.value)
    assert repr(key) in msg and str(tuple(wrong[key].shape)) in msg and str(tuple(own)) in msg
    out = tmp_path / "out.pt"
    argv = ["purify", "--model", FACTORY, "--factory-kwargs", json.dumps(KW)]
    argv += ["--weights", tmp_path / "wrong.pt", "--data", assets["x"], "--out", out, *FAST]
    code, _, err = run(argv, capsys)
    assert code == 1 and "do not fit the model" in _one_error_line(err) and repr(key) in err
    _no_output(out)


def _safetensors_with(raw: bytes, edit, length: int | None = None) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + raw[8 + n :]


def test_safetensors_with_a_lying_header(assets, tmp_path, capsys):
    raw = assets["st"].read_bytes()
    first = next(k for k, v in FMNISTNet(**KW).state_dict().items() if v.dim() == 4)  # the first conv

    def bigger_shape(h):
        h[first]["shape"] = [h[first]["shape"][0] * 10, *h[first]["shape"][1:]]

    def offsets_past_end(h):
        h[first]["data_offsets"] = [h[first]["data_offsets"][0], 10**9]

    def negative_dim(h):
        h[first]["shape"] = [-1]

    cases = {
        "shape": (_safetensors_with(raw, bigger_shape), rf"tensor '{first}': shape .* needs \d+ bytes"),
        "offsets": (_safetensors_with(raw, offsets_past_end), rf"tensor '{first}': data_offsets .* outside"),
        "dims": (_safetensors_with(raw, negative_dim), "non-negative integers"),
        "length": (_safetensors_with(raw, lambda h: None, length=2**40), "header length says"),
        "json": (struct.pack("<Q", 5) + b"{nope" + raw[8:], "not valid JSON"),
        "truncated": (raw[: len(raw) // 2], "cannot read safetensors file"),
        "tiny": (b"\x01\x02", "too short"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(modelio.ModelLoadError, match=match):
            modelio.load_model(FACTORY, weights=path, factory_kwargs=KW)
    out = tmp_path / "out.pt"
    argv = ["purify", "--model", FACTORY, "--factory-kwargs", json.dumps(KW)]
    argv += ["--weights", tmp_path / "shape.safetensors", "--data", assets["x"], "--out", out, *FAST]
    code, _, err = run(argv, capsys)
    assert code == 1 and f"tensor '{first}'" in _one_error_line(err)
    _no_output(out)


# ------------------------------------------------------------------------------------------ records


def test_trust_pickle_and_input_hash_are_recorded(assets, tmp_path, capsys):
    from safetensors import safe_open

    out, rep = tmp_path / "p.pt", tmp_path / "rep"
    code, _, err = run(
        ["purify", "--model", assets["whole"], "--trust-pickle", "--feature-layer", "backbone",
         "--data", assets["x"], "--out", out, "--report", rep, "--report-samples", "8", *FAST],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    digest = hashlib.sha256(assets["whole"].read_bytes()).hexdigest()
    model = json.loads((rep / "report.json").read_text())["extra"]["model"]
    assert model["trust_pickle"] is True and model["sha256"] == digest and model["form"] == "pickle"
    with safe_open(str(out.with_suffix(".safetensors")), "pt") as f:
        meta = f.metadata()
    assert meta["trust_pickle"] == "true" and meta["source_sha256"] == digest and meta["source"] == "whole.pt"

    loaded = modelio.load_model(FACTORY, weights=assets["st"], factory_kwargs=KW)
    assert loaded.sha256 is None and not loaded.trust_pickle
    assert loaded.weights_sha256 == hashlib.sha256(assets["st"].read_bytes()).hexdigest()
    ts = modelio.load_model(assets["ts"])
    assert ts.form == "torchscript"
    assert ts.describe()["sha256"] == hashlib.sha256(assets["ts"].read_bytes()).hexdigest()


def test_plain_files_still_load_without_the_opt_in(assets):
    sd = torch.load(assets["sd"], weights_only=True)
    legacy = assets["dir"] / "legacy_sd.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    for weights in (assets["sd"], assets["st"], legacy):
        loaded = modelio.load_model(FACTORY, weights=weights, factory_kwargs=KW)
        assert all(torch.equal(loaded.module.state_dict()[k], v.float()) for k, v in sd.items())
    assert safe_load.inspect_torch_file(assets["sd"]).unsafe_globals == ()


# ------------------------------------------------------------------------------------------ the package


def _calls(tree: ast.AST, owner: str, attr: str) -> list[ast.Call]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            base = node.func.value
            name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
            if name == owner:
                found.append(node)
    return found


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "<missing>"


def test_every_loader_in_the_package_is_safe_by_default():
    """Every torch.load is weights_only=True but the one opt-in path; np.load never allows pickle;
    torch.jit.load and the opt-in live in model_io only; nothing calls pickle.load directly."""
    unsafe, jit = [], []
    for path in sorted((REPO / "cbd_fast").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(REPO).as_posix()
        for call in _calls(tree, "torch", "load"):
            flag = _keyword(call, "weights_only")
            assert flag in (True, False), f"{rel}:{call.lineno}: torch.load without an explicit weights_only"
            if flag is False:
                unsafe.append(rel)
        for call in _calls(tree, "np", "load") + _calls(tree, "numpy", "load"):
            assert _keyword(call, "allow_pickle") is False, f"{rel}:{call.lineno}: np.load may unpickle"
        for name in ("load", "loads", "Unpickler"):
            assert not _calls(tree, "pickle", name), f"{rel}: calls pickle.{name}"
        jit += [rel for _ in _calls(tree, "jit", "load")]
    assert unsafe == ["cbd_fast/app/model_io.py"]
    assert jit == ["cbd_fast/app/model_io.py"]
