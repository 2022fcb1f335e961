"""The purification record: what a reviewer needs to tie a deployed model to how it was cleaned.

``cbd-fast purify --out OUT`` writes, beside the model,

- ``<OUT stem>.record.json``: SHA-256 of every input model file (the TorchScript/pickle file, the
  weights, a Hugging Face folder's files), of every output file, and of the data (the exact image
  tensor purified — dtype, shape and bytes — and the data file or each image file read); the
  config; the features read; the library, torch and package versions; the device, precision and op
  backends; the per-epoch health figures and losses; the ACC/ASR evaluation when there was one; and
  ``content_sha256``, the SHA-256 of the record's own canonical JSON without that field (it catches
  an edited or damaged record; it is not a signature);
- ``<OUT stem>.record.md``: the same as a Markdown model card for people.

:func:`verify_record` (``cbd-fast verify-record RECORD MODEL``) recomputes the hashes: the model file
given must be one of the record's outputs, byte for byte, and the record must be intact; input
model and data files are checked too when given (or, with ``check_recorded_paths``, wherever the
record says they were).

Example:
    >>> rec = read_record("purified.record.json")                     # doctest: +SKIP
    >>> verify_record(rec, "purified.safetensors").ok                 # doctest: +SKIP
    True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cbd_fast.core.files import atomic_output
from cbd_fast.core.safe_load import sha256_file

__all__ = [
    "RECORD_VERSION",
    "RecordError",
    "Check",
    "Verification",
    "tensor_sha256",
    "file_entry",
    "data_entry",
    "build_record",
    "content_sha256",
    "record_paths",
    "write_record",
    "read_record",
    "model_card",
    "verify_record",
]

RECORD_VERSION = 1
HEALTH_KEYS = (
    "health_knn",
    "health_cka",
    "health_rank",
    "health_spread",
    "health_drift",
    "health_flip",
    "health_head_change",
)


class RecordError(ValueError):
    """A record file that cannot be read or is not a purification record."""


# ------------------------------------------------------------------------------------------ hashes


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (C order, on the CPU).

    ``sha256(b"<dtype>|<d0>x<d1>x...|" + bytes)``: two tensors hash alike exactly when they have the
    same dtype, the same shape and the same values bit for bit (whatever their device or strides).

    Args:
        t: any tensor (not modified).

    Returns:
        the hex digest (64 characters).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_sha256 needs a torch.Tensor; got {type(t).__name__}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{str(t.dtype).replace('torch.', '')}|{'x'.join(map(str, t.shape))}|".encode())
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def file_entry(path: str | os.PathLike[str], role: str) -> dict[str, Any]:
    """``{"role", "path", "name", "bytes", "sha256"}`` of an existing file (read in chunks)."""
    p = Path(path)
    return {
        "role": role,
        "path": str(p),
        "name": p.name,
        "bytes": p.stat().st_size,
        "sha256": sha256_file(p),
    }


def data_entry(
    images: torch.Tensor, *, source: str = "", files: Sequence[str] | None = None
) -> dict[str, Any]:
    """The data part of a record.

    Args:
        images: [N, C, H, W] the images exactly as purified (uint8 or float32).
        source: where they came from (a file, a folder, ``"fashion-mnist:train"``).
        files: the image files read, in order (a folder source), each hashed.

    Returns:
        ``{"source", "count", "shape", "dtype", "tensor_sha256", "files": [file entries]}``; a file
        source is hashed too (role ``"data"``).
    """
    entry: dict[str, Any] = {
        "source": source,
        "count": int(images.shape[0]),
        "shape": [int(s) for s in images.shape[1:]],
        "dtype": str(images.dtype).replace("torch.", ""),
        "tensor_sha256": tensor_sha256(images),
        "files": [],
    }
    if files:
        entry["files"] = [file_entry(f, "image") for f in files]
    elif source and Path(source).is_file():
        entry["files"] = [file_entry(source, "data")]
    return entry


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def content_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, no spaces) without ``content_sha256``."""
    body = {k: v for k, v in record.items() if k != "content_sha256"}
    return hashlib.sha256(_canonical(body)).hexdigest()


# ------------------------------------------------------------------------------------------ building


def _json_safe(value: Any) -> Any:
    from cbd_fast.app.report import jsonable

    return jsonable(value)


def _versions() -> dict[str, Any]:
    import importlib.metadata
    import platform

    import cbd_fast

    out: dict[str, Any] = {
        "cbd_fast": cbd_fast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("numpy", "safetensors", "timm", "torchvision", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _finite_or_none(value: Any) -> Any:
    """``value``, or None for a non-finite float (a record is strict JSON: no NaN/Infinity)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _health(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    rows = [
        {"epoch": r.get("epoch"), **{k: _finite_or_none(r[k]) for k in HEALTH_KEYS if k in r}}
        for r in history
        if any(k in r for k in HEALTH_KEYS)
    ]
    if not rows:
        return None
    return {"final": rows[-1], "per_epoch": rows}


def _losses(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "loss", "loss_pull", "loss_clean", "attack_loss", "images", "seconds", "images_per_s")
    return [{k: r[k] for k in keys if k in r} for r in history]


def build_record(
    *,
    inputs: Sequence[Mapping[str, Any]],
    outputs: Sequence[str | os.PathLike[str]],
    data: Mapping[str, Any],
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] = (),
    features: str | None = None,
    head: str | None = None,
    runtime: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A purification record (a JSON-able dict, ``content_sha256`` included).

    Args:
        inputs: the input model files already hashed: ``[{"role", "path", "sha256"}]``
            (``LoadedModel.input_files()``); an entry without ``bytes`` gets it when the file exists.
        outputs: the files written (hashed here).
        data: :func:`data_entry` of the images purified.
        config: ``PurifyConfig.to_dict()``.
        history: ``PurifyResult.history`` (losses and health figures are summarised).
        features: what the features were (``PurifyResult.features``).
        head: the head the health check read (``PurifyResult.head``; None: none).
        runtime: device, precision and op backends (``PurifyResult.runtime``).
        model: a description of the model (form, class, parameters, source).
        evaluation: ACC/ASR before and after, when measured.
        command: the command line (default ``sys.argv``).

    Returns:
        the record.
    """
    ins = []
    for entry in inputs:
        e = {"role": entry.get("role", "model"), "path": str(entry["path"]), "sha256": entry["sha256"]}
        e["name"] = Path(e["path"]).name
        p = Path(e["path"])
        if p.is_file():
            e["bytes"] = p.stat().st_size
        ins.append(e)
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "kind": "cbd_fast purification record",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv if command is None else command),
        "input_model": {**(dict(model) if model else {}), "files": ins},
        "output_model": {"files": [file_entry(p, "output") for p in outputs]},
        "data": dict(data),
        "features": features,
        "head": head,
        "config": dict(config),
        "versions": _versions(),
        "runtime": dict(runtime) if runtime else None,
        "health": _health(history),
        "losses": _losses(history),
        "evaluation": dict(evaluation) if evaluation else None,
    }
    record = _json_safe(record)
    record["content_sha256"] = content_sha256(record)
    return record


def record_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<out stem>.record.json, <out stem>.record.md)`` beside the model file ``out``."""
    p = Path(out)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".record.json"), p.with_name(stem + ".record.md")


def write_record(record: Mapping[str, Any], json_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the record as JSON and its Markdown model card (``.md`` beside it), atomically.

    Returns:
        ``(json path, markdown path)``.
    """
    jp = Path(json_path)
    mp = (
        jp.with_name(jp.name[: -len(".json")] + ".md") if jp.name.endswith(".json") else jp.with_suffix(".md")
    )
    with atomic_output(jp) as tmp:
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    with atomic_output(mp) as tmp:
        tmp.write_text(model_card(record))
    return jp, mp


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a record file.

    Raises:
        FileNotFoundError: no such file.
        RecordError: not JSON, or not a purification record.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"record not found: {str(p)!r}")
    try:
        doc = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{str(p)!r} is not a JSON record: {exc}") from None
    if not isinstance(doc, dict) or "record_version" not in doc or "output_model" not in doc:
        raise RecordError(
            f"{str(p)!r} is not a cbd_fast purification record (no record_version/output_model)"
        )
    return doc


# ------------------------------------------------------------------------------------------ model card


def _md(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _md(value)


def model_card(record: Mapping[str, Any]) -> str:
    """The record as a Markdown model card (hashes, how it was purified, health, evaluation)."""
    lines: list[str] = []
    outs = record.get("output_model", {}).get("files", [])
    title = outs[0]["name"] if outs else "model"
    lines += [f"# Model card: {title} (purified with cbd_fast)", ""]
    lines += [
        f"Purified on {record.get('created')} with cbd_fast {record.get('versions', {}).get('cbd_fast')} "
        f"(torch {record.get('versions', {}).get('torch')}): label-free Contrastive Backdoor Defense.",
        "",
        "Check the files against this card: `cbd-fast verify-record "
        f"{title.rsplit('.', 1)[0]}.record.json {title}`.",
        "",
        "## Files",
        "",
        "| role | file | bytes | SHA-256 |",
        "| --- | --- | --- | --- |",
    ]
    for e in record.get("input_model", {}).get("files", []):
        lines.append(
            f"| input {e.get('role')} | {_md(e.get('path'))} | {e.get('bytes', '')} | `{e.get('sha256')}` |"
        )
    for e in outs:
        lines.append(f"| output | {_md(e.get('path'))} | {e.get('bytes', '')} | `{e.get('sha256')}` |")
    data = record.get("data") or {}
    for e in (data.get("files") or [])[:20]:
        lines.append(
            f"| {e.get('role')} | {_md(e.get('path'))} | {e.get('bytes', '')} | `{e.get('sha256')}` |"
        )
    if len(data.get("files") or []) > 20:
        lines.append(f"| image | ... {len(data['files']) - 20} more in the JSON record | | |")
    lines += [
        "",
        "## Data",
        "",
        f"{data.get('count')} unlabeled images of shape {data.get('shape')} ({data.get('dtype')}) from "
        f"{_md(data.get('source'))}; SHA-256 of the image tensor (dtype, shape, bytes): "
        f"`{data.get('tensor_sha256')}`.",
        "",
        "## Model and method",
        "",
    ]
    model = record.get("input_model", {})
    for key in ("form", "source", "class", "parameters", "trust_pickle"):
        if key in model:
            lines.append(f"- {key}: {_md(model[key])}")
    lines.append(f"- features purified: {_md(record.get('features'))}")
    if record.get("head"):
        lines.append(f"- head whose changed predictions the health check counted: {_md(record['head'])}")
    runtime = record.get("runtime") or {}
    for key, value in runtime.items():
        lines.append(f"- {key}: {_md(value)}")
    lines += ["", "## Configuration", "", "| setting | value |", "| --- | --- |"]
    for key, value in (record.get("config") or {}).items():
        lines.append(f"| {key} | {_fmt(value)} |")
    health = record.get("health")
    lines += ["", "## Label-free health (vs the original encoder)", ""]
    if health:
        lines += ["| epoch | " + " | ".join(HEALTH_KEYS) + " |", "| --- " * (len(HEALTH_KEYS) + 1) + "|"]
        for row in health["per_epoch"]:
            lines.append(
                f"| {row.get('epoch')} | " + " | ".join(_fmt(row.get(k)) for k in HEALTH_KEYS) + " |"
            )
    else:
        lines.append("Not measured (health='off').")
    ev = record.get("evaluation")
    lines += ["", "## Evaluation (labelled, after the fact)", ""]
    if ev:
        lines += ["| | ACC | ASR |", "| --- | --- | --- |"]
        for phase in ("before", "after"):
            row = ev.get(phase) or {}
            acc, asr = row.get("acc"), row.get("asr")
            lines.append(
                f"| {phase} | {'' if acc is None else f'{100 * acc:.2f}%'} | "
                f"{'' if asr is None else f'{100 * asr:.2f}%'} |"
            )
    else:
        lines.append("None recorded.")
    versions = record.get("versions") or {}
    lines += ["", "## Versions", ""] + [f"- {k}: {_md(v)}" for k, v in versions.items()]
    lines += ["", f"Record content SHA-256: `{record.get('content_sha256')}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ verification


@dataclass
class Check:
    """One hash comparison: ``what`` (e.g. ``"output purified.pt"``), ``path``, ``expected``,
    ``actual`` (None when the file is missing), ``ok``, and a ``note``."""

    what: str
    path: str
    expected: str | None
    actual: str | None
    ok: bool
    note: str = ""


@dataclass
class Verification:
    """The result of :func:`verify_record`: every :class:`Check`; ``ok`` when all passed."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def lines(self) -> list[str]:
        """One line per check: ``ok       output purified.pt  sha256 1a2b...`` / ``MISMATCH ...``."""
        out = []
        for c in self.checks:
            status = "ok" if c.ok else ("MISSING" if c.actual is None else "MISMATCH")
            text = f"{status:<8} {c.what}: {c.path}"
            if c.ok:
                text += f"  sha256 {c.actual}"
            elif c.actual is not None:
                text += f"  sha256 {c.actual}, recorded {c.expected}"
            if c.note:
                text += f" ({c.note})"
            out.append(text)
        return out


def _check_file(what: str, path: Path, expected: str | None) -> Check:
    if not path.is_file():
        return Check(what, str(path), expected, None, False, "file not found")
    actual = sha256_file(path)
    return Check(what, str(path), expected, actual, actual == expected)


def verify_record(
    record: Mapping[str, Any] | str | os.PathLike[str],
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    inputs: Sequence[str | os.PathLike[str]] = (),
    data: str | os.PathLike[str] | None = None,
    images: torch.Tensor | None = None,
    check_recorded_paths: bool = False,
) -> Verification:
    """Recompute the hashes a record holds.

    Args:
        record: the record (a dict) or its file.
        model: the model file(s) to check: each must be byte-for-byte one of the record's outputs (the
            one of the same name, else any).
        inputs: input model files (the file purified, its weights): each must match a recorded input.
        data: the data file (a tensor file): must match the recorded data file.
        images: the image tensor: must match the recorded ``tensor_sha256``.
        check_recorded_paths: also check every input, output and data file at the path the record
            names (relative paths from the current folder).

    Returns:
        a :class:`Verification`: always includes the record's own ``content_sha256`` check.
    """
    if not isinstance(record, Mapping):
        record = read_record(record)
    checks = [
        Check(
            "record content",
            "content_sha256",
            record.get("content_sha256"),
            content_sha256(record),
            record.get("content_sha256") == content_sha256(record),
            "" if record.get("content_sha256") == content_sha256(record) else "the record was edited",
        )
    ]
    outs = list(record.get("output_model", {}).get("files", []))
    ins = list(record.get("input_model", {}).get("files", []))
    data_files = list((record.get("data") or {}).get("files", []))
    models = [] if model is None else [model] if isinstance(model, (str, os.PathLike)) else list(model)
    for m in models:
        checks.append(_match("output", Path(m), outs))
    for f in inputs:
        checks.append(_match("input", Path(f), ins))
    if data is not None:
        checks.append(_match("data", Path(data), data_files))
    if images is not None:
        expected = (record.get("data") or {}).get("tensor_sha256")
        actual = tensor_sha256(images)
        checks.append(Check("data tensor", "images", expected, actual, actual == expected))
    if check_recorded_paths:
        for label, entries in (("output", outs), ("input", ins), ("data", data_files)):
            for e in entries:
                checks.append(
                    _check_file(f"{label} {e.get('name', '')}".strip(), Path(e["path"]), e["sha256"])
                )
    return Verification(checks)


def _match(label: str, path: Path, entries: list[Mapping[str, Any]]) -> Check:
    """``path`` against the recorded entry of the same name (else any entry with its hash)."""
    what = f"{label} {path.name}"
    if not entries:
        return Check(what, str(path), None, None, False, f"the record lists no {label} file")
    if not path.is_file():
        return Check(what, str(path), None, None, False, "file not found")
    actual = sha256_file(path)
    same_name = [
        e for e in entries if e.get("name") == path.name or Path(str(e.get("path"))).name == path.name
    ]
    if any(e.get("sha256") == actual for e in entries):
        return Check(what, str(path), actual, actual, True)
    expected = same_name[0]["sha256"] if same_name else None
    names = ", ".join(str(e.get("name") or Path(str(e.get("path"))).name) for e in entries)
    note = (
        f"differs from the recorded {same_name[0].get('name')}"
        if same_name
        else f"matches none of the recorded {label} files ({names})"
    )
    return Check(what, str(path), expected, actual, False, note)
