"""The purification report: ``report.json``, a self-contained ``report.html`` and PNG figures.

:func:`write_report` writes, into one folder,

- ``report.html``: everything below in one file a browser opens offline, figures as inline SVG
  (``cbd_fast.app.html_report``; needs no matplotlib);
- ``loss_curves.png``: every loss term per logged step (``history[i]["steps"]``), or per epoch;
- ``throughput.png``: images per second per epoch;
- ``features_2d.png``: the paper's Figure 1 picture: clean / contrastive-adversarial (/ triggered,
  when the trigger is known) features in 2-D, before and after purification side by side. The
  projection is PCA of the L2-normalised features (the geometry NT-Xent sees), fitted on the *before*
  clean features and applied unchanged to every set, so the two panels share axes and basis;
- ``report.json`` (written last: its presence means the report is complete): the config, versions
  (cbd_fast, torch, python, platform, numpy, triton), the build record, the per-epoch history and
  timings, the evocation diagnostic, ACC/ASR when evaluable, the projection's numbers (explained
  variance, centroid cosines), the list of figures and notes.

matplotlib is optional (the ``report`` extra); without it there are no PNG files, a warning says so
once (stderr), and so do the ``notes``; ``report.html`` and ``report.json`` are written either way.
Every file is written atomically (temporary name, fsync, rename).

Example:
    >>> proj = collect_projections(backdoored, purified, x_unlabeled, x_triggered=x_trig)  # doctest: +SKIP
    >>> write_report("runs/r1", config=cfg.to_dict(), history=res.history, projections=proj)  # doctest: +SKIP
    PosixPath('runs/r1/report.json')
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbd_fast.core.attack import contrastive_pgd
from cbd_fast.core.config import PurifyConfig
from cbd_fast.core.device import module_device
from cbd_fast.core.features import FeatureFn, batched_features, encoder_features
from cbd_fast.core.files import atomic_output
from cbd_fast.core.modes import eval_mode
from cbd_fast.core.progress import progress

__all__ = ["write_report", "collect_projections", "project_2d", "jsonable", "versions", "REPORT_VERSION"]

REPORT_VERSION = 1
MATPLOTLIB_MISSING = (
    "matplotlib is not installed: no PNG figures (report.html has them as SVG); "
    "pip install 'cbd_fast[report]' for the PNGs"
)
_WARNED: set[str] = set()
_SETS = ("clean", "adversarial", "triggered")
_COLORS = {"clean": "#1f77b4", "adversarial": "#ff7f0e", "triggered": "#d62728"}


# ------------------------------------------------------------------------------------------ JSON


def jsonable(value: Any) -> Any:
    """``value`` made JSON-safe: tensors/arrays -> lists (scalars -> numbers), NaN/Inf -> None,
    dataclasses -> dicts, paths/devices/dtypes -> strings, unknown objects -> ``repr``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return jsonable(value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (os.PathLike, torch.device, torch.dtype)):
        return str(value)
    return repr(value)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """Versions of what produced the report (no heavy imports: triton is looked up, not imported)."""
    import cbd_fast

    return {
        "cbd_fast": cbd_fast.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": np.__version__,
        "triton": _dist_version("triton"),
        "matplotlib": _dist_version("matplotlib"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else None,
    }


def _build_record() -> dict[str, Any]:
    try:
        from cbd_fast.ops.build_info import build_info

        return dict(build_info())
    except Exception as exc:  # pragma: no cover - the record is best effort
        return {"note": f"build info unavailable: {exc}"}


# ------------------------------------------------------------------------------------------ history


def _numeric_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in history:
        for k, v in row.items():
            if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def _loss_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    return [k for k in _numeric_keys(history) if "loss" in k.lower()]


def _throughput_key(history: Sequence[Mapping[str, Any]]) -> str | None:
    keys = _numeric_keys(history)
    for want in ("images_per_s", "images_per_sec", "img_per_s", "throughput"):
        for k in keys:
            if k.lower() == want:
                return k
    return next((k for k in keys if "per_s" in k.lower() or "throughput" in k.lower()), None)


def _epochs(history: Sequence[Mapping[str, Any]]) -> list[float]:
    out = []
    for i, row in enumerate(history):
        e = row.get("epoch")
        out.append(float(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else float(i + 1))
    return out


def _timings(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    secs = [float(r["seconds"]) for r in history if isinstance(r.get("seconds"), (int, float))]
    key = _throughput_key(history)
    rates = [float(r[key]) for r in history if key and isinstance(r.get(key), (int, float))]
    return {
        "epochs": len(history),
        "total_seconds": sum(secs) if secs else None,
        "seconds_per_epoch": (sum(secs) / len(secs)) if secs else None,
        "images_per_s_mean": (sum(rates) / len(rates)) if rates else None,
        "images_per_s_last": rates[-1] if rates else None,
    }


# ------------------------------------------------------------------------------------------ projection


def _as_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"projections[{name}] must be [n, D]; got shape {list(arr.shape)}")
    return arr


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def project_2d(projections: Mapping[str, Mapping[str, Any]], *, normalize: bool = True) -> dict[str, Any]:
    """Project every feature set to 2-D with ONE PCA basis fitted on ``projections["before"]["clean"]``.

    Args:
        projections: ``{"before": {"clean": [n, D], "adversarial": [m, D], "triggered": [k, D]},
            "after": {...}}`` (arrays or tensors; "after" and any set but before/clean optional).
        normalize: L2-normalise each feature row first (the cosine geometry NT-Xent sees).

    Returns:
        ``{"points": {phase: {set: ndarray[n, 2]}}, "explained_variance": [2 floats] (share of the
        before-clean variance on each axis), "stats": {phase: {...centroid cosines...}}}``.
    """
    if "before" not in projections or "clean" not in projections["before"]:
        raise ValueError(f"projections must hold before/clean features; got phases {sorted(projections)}")
    phases: dict[str, dict[str, np.ndarray]] = {}
    dim = None
    for phase in ("before", "after"):
        if phase not in projections or projections[phase] is None:
            continue
        phases[phase] = {}
        for name, value in projections[phase].items():
            if value is None:
                continue
            arr = _as_array(value, f"{phase}.{name}")
            if dim is None:
                dim = arr.shape[1]
            elif arr.shape[1] != dim:
                raise ValueError(
                    f"projections[{phase}.{name}] has feature dim {arr.shape[1]}, expected {dim}"
                )
            phases[phase][name] = _unit_rows(arr) if normalize else arr
    base = phases["before"]["clean"]
    if base.shape[0] < 2:
        raise ValueError(f"projections[before.clean] needs at least 2 rows; got {base.shape[0]}")
    mean = base.mean(axis=0, keepdims=True)
    _, s, vh = np.linalg.svd(base - mean, full_matrices=False)
    basis = vh[:2]
    if basis.shape[0] < 2:  # 1-D features: a zero second axis
        basis = np.vstack([basis, np.zeros_like(basis)])
    for i in range(basis.shape[0]):  # a deterministic sign: the largest entry positive
        j = int(np.argmax(np.abs(basis[i])))
        if basis[i, j] < 0:
            basis[i] = -basis[i]
    var = s**2
    explained = [
        float(v / var.sum()) if var.sum() > 0 else 0.0 for v in list(var[:2]) + [0.0] * (2 - len(var[:2]))
    ]
    points = {ph: {k: (v - mean) @ basis.T for k, v in sets.items()} for ph, sets in phases.items()}
    stats = {ph: _centroid_stats(sets) for ph, sets in phases.items()}
    return {"points": points, "explained_variance": explained, "stats": stats, "normalized": normalize}


def _centroid_stats(sets: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Mean cosine of each set's features to each set's centroid (how close adversaries sit to the
    triggered cluster vs the clean one), and adversarial-to-own-clean cosine when paired."""
    out: dict[str, Any] = {"count": {k: int(v.shape[0]) for k, v in sets.items()}}
    units = {k: _unit_rows(v) for k, v in sets.items()}
    for ref in ("clean", "triggered"):
        if ref not in units:
            continue
        c = units[ref].mean(axis=0)
        c = c / max(float(np.linalg.norm(c)), 1e-12)
        out[f"mean_cos_to_{ref}_centroid"] = {k: float((u @ c).mean()) for k, u in units.items()}
    if "clean" in units and "adversarial" in units and units["clean"].shape == units["adversarial"].shape:
        out["mean_cos_adversarial_to_own_clean"] = float(
            (units["clean"] * units["adversarial"]).sum(1).mean()
        )
    return out


# ------------------------------------------------------------------------------------------ figures


def _matplotlib() -> tuple[Any, Any] | None:
    """``(Figure, FigureCanvasAgg)`` or None; never touches pyplot's global backend."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _save_figure(fig: Any, canvas_cls: Any, path: Path) -> None:
    canvas_cls(fig)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_losses(mpl: tuple[Any, Any], history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    keys = _loss_keys(history)
    if not keys:
        return False
    figure_cls, canvas_cls = mpl
    fig = figure_cls(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    from cbd_fast.app.html_report import step_series

    per_step = any(isinstance(r.get("steps"), list) and r.get("steps") for r in history)
    x, rows = step_series(history) if per_step else (_epochs(history), list(history))
    for k in keys:
        pts = [(xi, float(r[k])) for xi, r in zip(x, rows) if isinstance(r.get(k), (int, float))]
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) <= 40 else None, ms=3, label=k
        )
    _integer_ticks(ax)
    ax.set_xlabel("epoch (fraction done)" if per_step else "epoch")
    ax.set_ylabel("loss")
    ax.set_title("CBD loss terms per logged step" if per_step else "CBD loss terms per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, canvas_cls, path)
    return True


def _plot_throughput(mpl: tuple[Any, Any], history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    key = _throughput_key(history)
    if key is None:
        return False
    figure_cls, canvas_cls = mpl
    fig = figure_cls(figsize=(6.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    x = [xi for xi, r in zip(_epochs(history), history) if isinstance(r.get(key), (int, float))]
    y = [float(r[key]) for r in history if isinstance(r.get(key), (int, float))]
    ax.bar(x, y, color="#2ca02c", width=0.6)
    _integer_ticks(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("images / s")
    ax.set_title(f"purification throughput ({key})")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save_figure(fig, canvas_cls, path)
    return True


def _plot_projection(mpl: tuple[Any, Any], proj: Mapping[str, Any], path: Path) -> None:
    figure_cls, canvas_cls = mpl
    phases = [p for p in ("before", "after") if p in proj["points"]]
    fig = figure_cls(figsize=(5.2 * len(phases), 4.6))
    allpts = np.concatenate([v for ph in phases for v in proj["points"][ph].values()], axis=0)
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    pad = 0.05 * np.maximum(hi - lo, 1e-6)
    ev = proj["explained_variance"]
    for i, ph in enumerate(phases):
        ax = fig.add_subplot(1, len(phases), i + 1)
        for name in (*_SETS, *sorted(set(proj["points"][ph]) - set(_SETS))):
            pts = proj["points"][ph].get(name)
            if pts is None:
                continue
            ax.scatter(
                pts[:, 0], pts[:, 1], s=7, alpha=0.55, color=_COLORS.get(name), label=f"{name} ({len(pts)})"
            )
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_title(f"{ph} purification")
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f}% of clean variance)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", markerscale=2)
    fig.suptitle("features in 2-D (PCA fitted on clean 'before' features)")
    fig.tight_layout()
    _save_figure(fig, canvas_cls, path)


# ------------------------------------------------------------------------------------------ report


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    config: dict,
    history: list[dict],
    evaluation: dict | None = None,
    diagnostic: dict | None = None,
    projections: dict | None = None,
    extra: dict | None = None,
    html: bool = True,
) -> Path:
    """Write ``report.json``, ``report.html`` and the PNG figures into ``out_dir`` (created if missing).

    Args:
        out_dir: the report folder.
        config: the run's configuration (e.g. ``PurifyConfig.to_dict()``; a dataclass is accepted).
        history: per-epoch dicts from ``PurifyResult.history``: every numeric key containing "loss" is
            plotted as a loss term; ``images_per_s`` (or a key containing "per_s") as throughput;
            ``seconds`` feeds the timings.
        evaluation: ACC/ASR numbers when evaluable (e.g. ``{"before": {"acc": .9, "asr": .98},
            "after": {...}}``), written as given.
        diagnostic: the evocation diagnostic (``cbd_fast.evaluation.diagnostics``), written as given.
        projections: ``{"before": {"clean": ndarray[n, D], "adversarial": ..., "triggered": ...},
            "after": {...}}`` (see :func:`collect_projections`): drawn as ``features_2d.png``; only
            summary numbers go into the JSON.
        extra: anything else JSON-able (model/data descriptions, command line, ...); the HTML page
            shows ``model``, ``data``, ``features`` and ``record`` (the purification record) from it.
        html: also write ``report.html`` (one self-contained file).

    Returns:
        the path of ``report.json``.

    Raises:
        TypeError: ``history`` is not a list of dicts, or ``config`` not a mapping/dataclass.
        ValueError: malformed ``projections`` (wrong ranks, mismatched feature dims).
    """
    if not isinstance(history, (list, tuple)) or not all(isinstance(r, Mapping) for r in history):
        raise TypeError(f"history must be a list of dicts; got {type(history).__name__}")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = jsonable(config)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict; got {type(config).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"report folder is a file: {str(out)!r}")
    proj = project_2d(projections) if projections is not None else None  # validate before writing
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    figures: list[str] = []
    mpl = _matplotlib()
    if mpl is None:
        notes.append(MATPLOTLIB_MISSING)
        if "matplotlib" not in _WARNED:
            _WARNED.add("matplotlib")
            warnings.warn(MATPLOTLIB_MISSING, RuntimeWarning, stacklevel=2)
    else:
        if _plot_losses(mpl, history, out / "loss_curves.png"):
            figures.append("loss_curves.png")
        elif history:
            notes.append("history has no loss terms: no loss_curves.png")
        if _plot_throughput(mpl, history, out / "throughput.png"):
            figures.append("throughput.png")
        if proj is not None:
            _plot_projection(mpl, proj, out / "features_2d.png")
            figures.append("features_2d.png")
    if not history:
        notes.append("empty history: nothing to plot per epoch")
    doc = {
        "report_version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(sys.argv),
        "config": config,
        "versions": versions(),
        "build": _build_record(),
        "history": list(history),
        "timings": _timings(history),
        "evaluation": evaluation,
        "diagnostic": diagnostic,
        "projection": None
        if proj is None
        else {
            "method": "PCA fitted on before/clean"
            + (", L2-normalised features" if proj["normalized"] else ""),
            "explained_variance": proj["explained_variance"],
            "stats": proj["stats"],
        },
        "figures": figures,
        "notes": notes,
        "extra": extra,
    }
    doc = jsonable(doc)
    if html:
        from cbd_fast.app.html_report import render_html

        page = render_html(doc, None if proj is None else proj["points"])
        with atomic_output(out / "report.html") as tmp:
            tmp.write_text(page, encoding="utf-8")
        doc["html"] = "report.html"
    path = out / "report.json"
    text = json.dumps(doc, indent=2, allow_nan=False)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n")
    return path


# ------------------------------------------------------------------------------------------ collection


def _cfg_get(config: Any, name: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _attack_settings(config: Any) -> dict[str, Any]:
    """``contrastive_pgd`` keyword arguments from ``config``; a missing setting takes
    ``PurifyConfig``'s default."""
    defaults = PurifyConfig()
    return {
        "epsilon": float(_cfg_get(config, "epsilon", defaults.epsilon)),
        "step_size": float(_cfg_get(config, "step_size", defaults.step_size)),
        "steps": int(_cfg_get(config, "steps", defaults.steps)),
        "temperature": float(_cfg_get(config, "temperature", defaults.temperature)),
        "backend": _cfg_get(config, "backend", defaults.backend),
    }


def _features_and_adversaries(
    encoder: nn.Module,
    x: torch.Tensor,
    x_trig: torch.Tensor | None,
    feature_fn: FeatureFn | None,
    config: Any,
    batch_size: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Clean [N, D], contrastive-adversarial [N, D] (and triggered [N', D]) float64 features.

    ``encoder`` runs in eval mode (``eval_mode``: its flags restored); each batch of ``x`` is
    attacked with ``contrastive_pgd`` and the settings of :func:`_attack_settings`.
    """
    device = module_device(encoder)
    settings = _attack_settings(config)
    out: dict[str, list[torch.Tensor]] = {"clean": [], "adversarial": []}
    g = torch.Generator(device=device).manual_seed(int(seed))
    with eval_mode(encoder):
        for i in progress(range(0, x.shape[0], batch_size), desc="report: features + attack", unit="batch"):
            xb = _to_float(x[i : i + batch_size]).to(device)
            with torch.no_grad():
                clean = encoder_features(encoder, xb, feature_fn).float()
            adv = contrastive_pgd(encoder, xb, clean, generator=g, feature_fn=feature_fn, **settings)
            with torch.no_grad():
                out["clean"].append(clean.cpu())
                out["adversarial"].append(encoder_features(encoder, adv, feature_fn).float().cpu())
        if x_trig is not None:
            trig = batched_features(
                encoder, _to_float(x_trig), batch_size=batch_size, feature_fn=feature_fn, device=device
            )
            out["triggered"] = [trig.float().cpu()]
    return {k: torch.cat(v).double().numpy() for k, v in out.items() if v}


def collect_projections(
    encoder_before: nn.Module,
    encoder_after: nn.Module,
    x_clean: torch.Tensor,
    *,
    feature_fn: FeatureFn | None = None,
    x_triggered: torch.Tensor | None = None,
    config: Any = None,
    n: int = 512,
    batch_size: int = 256,
) -> dict:
    """Features for the before/after picture: clean, contrastive-adversarial (and triggered) sets.

    The adversaries are found against each encoder in turn (``cbd_fast.core.attack.contrastive_pgd``, the
    same attack the purification uses) with ``config``'s epsilon/step_size/steps/temperature/backend
    (a missing one: ``PurifyConfig``'s default), seeded by ``config.seed``. Both encoders run in
    eval mode and get their training flags back; their weights are not changed.

    Args:
        encoder_before: the encoder before purification.
        encoder_after: the purified encoder.
        x_clean: [N, C, H, W] clean images (float in [0, 1] or uint8).
        feature_fn: ``(module, x) -> [B, D]`` features (None: the module's output).
        x_triggered: [N', C, H, W] the same kind of images with the trigger (when known), or None.
        config: a ``PurifyConfig``, a dict with those keys, or None.
        n: at most this many images of each set (a seeded random subset when there are more).
        batch_size: images per forward/attack batch.

    Returns:
        ``{"before": {"clean": ndarray[n, D], "adversarial": ..., "triggered": ...}, "after": {...}}``
        (float64; ``triggered`` only with ``x_triggered``) — the ``projections`` of :func:`write_report`.
    """
    if not isinstance(x_clean, torch.Tensor) or x_clean.dim() != 4:
        raise ValueError(
            f"x_clean must be a [N, C, H, W] tensor; got {getattr(x_clean, 'shape', type(x_clean))}"
        )
    if x_triggered is not None and (not isinstance(x_triggered, torch.Tensor) or x_triggered.dim() != 4):
        raise ValueError(
            f"x_triggered must be a [N, C, H, W] tensor; got {getattr(x_triggered, 'shape', None)}"
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2; got {n!r}")
    seed = int(_cfg_get(config, "seed", PurifyConfig().seed))
    g = torch.Generator().manual_seed(seed)
    if x_clean.shape[0] > n:
        x_clean = x_clean[torch.randperm(x_clean.shape[0], generator=g)[:n].sort().values]
    if x_triggered is not None and x_triggered.shape[0] > n:
        x_triggered = x_triggered[torch.randperm(x_triggered.shape[0], generator=g)[:n].sort().values]
    return {
        phase: _features_and_adversaries(enc, x_clean, x_triggered, feature_fn, config, batch_size, seed)
        for phase, enc in (("before", encoder_before), ("after", encoder_after))
    }
