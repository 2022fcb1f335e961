"""The ``cbd-fast`` command line (also ``python -m cbd_fast``).

Subcommands::

    cbd-fast demo [demo options]            the Fashion-MNIST demo (cbd_fast.app.demo)
    cbd-fast purify --model M --data D --out OUT [--config cfg.yaml] [--set key=value ...]
                    [--report DIR] [--limit N | --fraction F] [--feature-layer NAME | --forward-features]
                    [--head NAME|none]
    cbd-fast evaluate --model M (--data D --labels L | --dataset fashion-mnist) [--trigger T] [--target 0]
    cbd-fast verify-record RECORD [MODEL ...] [--input FILE] [--data FILE] [--all]
    cbd-fast info [--json]                  how cbd_fast was built, which backends run here

Models (``--model``): a TorchScript archive (``torch.jit.load``), a Hugging Face model folder
(``config.json`` + safetensors; ``hf:FOLDER`` or the folder), or an architecture
``package.module:factory`` (``torchvision.models:resnet50``) / ``timm:NAME`` with ``--weights
state_dict.(pt|safetensors)`` (read with ``torch.load(weights_only=True)`` / safetensors) and
``--factory-kwargs '{"num_classes": 10}'``. A whole pickled module is refused (unpickling runs
code from the file) unless ``--trust-pickle`` is given; the report records the flag and the input
files' SHA-256. Data (``--data``): a folder of
images (recursive) or a ``.npy``/``.npz``/``.pt`` tensor file (read with ``allow_pickle=False`` /
``weights_only=True``); ``--dataset fashion-mnist`` for the Debian package's files.

Features: ``--feature-layer NAME`` / ``--forward-features``, else chosen by the model's family
(``cbd_fast.core.backbones``: timm ``forward_features`` + its pooling, a torchvision classifier's
pre-logits input, a Hugging Face model's CLS token or pooled output) and printed (``features: ...``).
``--head NAME`` names the classifier that reads them (default: such a model's own head, when it
verifiably does; ``none``: no head), so that the health check measures the predictions it changes.

Outputs of ``purify``: the model (``--out``, plus ``.safetensors``), the purification record
``<out stem>.record.json`` + ``.record.md`` (SHA-256 of the input model files, the outputs and the
data; config, versions, backends, health, evaluation: ``cbd_fast.app.record``), and with
``--report DIR`` ``report.json``, a self-contained ``report.html`` and PNG figures.
``verify-record`` recomputes a record's hashes: exit 0 when every check passes, 1 otherwise.

Configuration precedence: ``PurifyConfig`` defaults < ``--config`` file (YAML, JSON or TOML; a flat
mapping or one under ``purify:``) < ``--set key=value`` (values parsed as YAML/JSON scalars;
``8/255`` is accepted for numbers). Unknown keys are an error listing the valid ones.

Exit status: 0 on success, 1 on an error (one line on stderr; ``--verbose`` adds the traceback),
2 on a usage error, 130 when interrupted. Progress bars go to stderr (``--quiet`` hides them),
results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbd_fast.core.backbones import with_standardisation

__all__ = ["main", "build_parser", "load_config_file", "parse_set_options", "merge_config", "CLIError"]

PROG = "cbd-fast"
logger = logging.getLogger("cbd_fast.app.cli")


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


class UsageError(CLIError):
    """A command-line usage error; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (one clear line, testable)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------ config


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRACTION = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _coerce(value: Any) -> Any:
    """Strings that spell numbers become numbers: ``"1e-3"`` (YAML 1.1 keeps it a string), ``"8/255"``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _NUMBER.match(text):
        number = float(text)
        return int(number) if re.match(r"^[+-]?\d+$", text) else number
    m = _FRACTION.match(text)
    if m:
        den = float(m.group(2))
        if den == 0:
            raise ValueError(f"division by zero in {value!r}")
        return float(m.group(1)) / den
    return value


def _parse_scalar(text: str) -> Any:
    """A ``--set`` value: YAML (or JSON without PyYAML) scalar, else the raw string."""
    try:
        import yaml

        value = yaml.safe_load(text) if text.strip() else ""
    except ImportError:
        try:
            value = json.loads(text)
        except ValueError:
            value = text
    except Exception:
        value = text
    return _coerce(value)


def parse_set_options(items: Sequence[str] | None) -> dict[str, Any]:
    """``["epochs=3", "epsilon=8/255"]`` -> ``{"epochs": 3, "epsilon": 0.0313...}`` (later wins).

    Args:
        items: ``key=value`` strings from ``--set``.

    Returns:
        the parsed mapping.

    Raises:
        UsageError: an item without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set expects key=value; got {item!r}")
        try:
            out[key] = _parse_scalar(raw)
        except ValueError as exc:
            raise UsageError(f"--set {item!r}: {exc}") from None
    return out


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), JSON (.json) or TOML (.toml) config: a flat mapping of PurifyConfig
    fields, or such a mapping under a top-level ``purify`` key.

    Args:
        path: the file.

    Returns:
        ``{field: value}`` (string numbers like ``"8/255"`` converted).

    Raises:
        FileNotFoundError: the file does not exist.
        CLIError: an unknown suffix, a parse error, or a top level that is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {str(p)!r}")
    suffix = p.suffix.lower()
    text = p.read_text()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise CLIError(f"reading {str(p)!r} needs PyYAML (pip install pyyaml)") from None
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text) if text.strip() else None
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - python < 3.11
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            raise CLIError(f"config file must end in .yaml, .yml, .json or .toml; got {str(p)!r}")
    except CLIError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot parse config file {str(p)!r}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"config file {str(p)!r} must hold a mapping of settings; got a {type(data).__name__}")
    if set(data) == {"purify"} and isinstance(data["purify"], dict):
        data = data["purify"]
    return {str(k).replace("-", "_"): _coerce(v) for k, v in data.items()}


def merge_config(
    file_values: dict[str, Any], set_values: dict[str, Any], *, quiet: bool = False, preset: str = "defaults"
) -> Any:
    """Preset < file < --set, checked against ``PurifyConfig``; returns a validated PurifyConfig.

    ``preset``: ``"defaults"`` (the library's defaults) or ``"paper"`` (``PurifyConfig.PAPER``, the
    published method's settings, over the defaults).

    Raises:
        CLIError: unknown keys (one line listing the valid ones) or invalid values (the config's own
            message naming the field and value).
    """
    from cbd_fast.core.config import PurifyConfig

    valid = PurifyConfig.field_names()
    for origin, values in (("config file", file_values), ("--set", set_values)):
        unknown = sorted(k for k in values if k not in valid)
        if unknown:
            raise CLIError(
                f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"(from {origin}); valid keys: {', '.join(valid)}"
            )
    if preset not in ("defaults", "paper"):
        raise CLIError(f"--preset must be 'defaults' or 'paper'; got {preset!r}")
    base = dict(PurifyConfig.PAPER) if preset == "paper" else {}
    merged = {**base, **file_values, **set_values}
    if quiet:
        merged["progress"] = False
    try:
        return PurifyConfig.from_dict(merged)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"invalid config: {exc}") from None


# ------------------------------------------------------------------------------------------ parser


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output control")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    g.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (twice: debug; adds tracebacks)",
    )


def _add_model(p: argparse.ArgumentParser, *, features: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="TorchScript archive, package.module:factory or timm:NAME (pickled module: --trust-pickle)",
    )
    g.add_argument("--weights", metavar="FILE", help="state_dict for the model (.pt/.pth/.bin/.safetensors)")
    g.add_argument(
        "--factory-kwargs",
        metavar="JSON",
        default=None,
        help="keyword arguments for the factory, e.g. '{\"num_classes\": 10}'",
    )
    g.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a whole pickled module: torch.load(weights_only=False) runs code from the file; "
        "only for files you trust (recorded in the report)",
    )
    if features:
        m = g.add_mutually_exclusive_group()
        m.add_argument(
            "--feature-layer", metavar="NAME", help="purify the output of this submodule (e.g. layer4)"
        )
        m.add_argument(
            "--forward-features",
            action="store_true",
            help="features from model.forward_features (timm classifiers)",
        )
        g.add_argument(
            "--head",
            metavar="NAME",
            default=None,
            help="the classifier submodule that maps the features to logits, for the health check's "
            "changed predictions and the head term that guides the fine-tuning (verified against the "
            "model's output); 'none': no head; default: a "
            "timm / torchvision / Hugging Face classifier's own head when it verifiably reads the features",
        )


def _add_data(p: argparse.ArgumentParser, *, default_split: str) -> None:
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--data", metavar="PATH", help="folder of images (recursive) or a .npy/.npz/.pt tensor file"
    )
    src.add_argument("--dataset", choices=["fashion-mnist"], help="a known dataset instead of --data")
    g.add_argument(
        "--dataset-root", metavar="DIR", help="folder of the dataset's files (default: the system's)"
    )
    g.add_argument(
        "--split", choices=["train", "test"], default=default_split, help=f"dataset split ({default_split})"
    )
    g.add_argument("--image-size", metavar="N|HxW", help="resize/centre-crop images to this size")
    sub = g.add_mutually_exclusive_group()
    sub.add_argument("--limit", type=int, metavar="N", help="use a seeded random subset of N images")
    sub.add_argument("--fraction", type=float, metavar="F", help="use a seeded random fraction F in (0, 1]")
    g.add_argument("--subset-seed", type=int, default=0, metavar="S", help="seed of --limit/--fraction (0)")


def build_parser() -> argparse.ArgumentParser:
    """The ``cbd-fast`` argument parser (subcommands demo, purify, evaluate, info)."""
    parser = _Parser(
        prog=PROG,
        description="Label-free backdoor purification of vision backbones (Contrastive Backdoor Defense).",
        epilog="Run 'cbd-fast SUBCOMMAND --help' for a subcommand's options.",
    )
    parser.set_defaults(quiet=False, verbose=0, command=None)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_common(parser)
    subs = parser.add_subparsers(
        dest="command", metavar="{demo,purify,evaluate,verify-record,info}", parser_class=_Parser
    )

    p = subs.add_parser(
        "demo", help="the Fashion-MNIST demo (purify a shipped backdoored model)", add_help=False
    )
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options passed to the demo (see 'cbd-fast demo --help')"
    )

    p = subs.add_parser("purify", help="purify a backbone with unlabeled images", description=_PURIFY_DOC)
    _add_common(p)
    _add_model(p, features=True)
    _add_data(p, default_split="train")
    g = p.add_argument_group("configuration and output")
    g.add_argument(
        "--preset",
        choices=("defaults", "paper"),
        default="defaults",
        help="starting settings: the library's defaults or the paper's CBD (PurifyConfig.paper()); "
        "--config and --set apply on top",
    )
    g.add_argument("--config", metavar="FILE", help="PurifyConfig settings (.yaml/.yml/.json/.toml)")
    g.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)"
    )
    g.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the purified model file (same form as loaded); the purification record "
        "<stem>.record.json/.record.md is written beside it",
    )
    g.add_argument("--no-safetensors", action="store_true", help="do not also write OUT.safetensors")
    g.add_argument(
        "--report",
        metavar="DIR",
        help="write report.json, a self-contained report.html and PNG figures into DIR",
    )
    r = p.add_argument_group("report extras (optional; labels only evaluate, never purify)")
    r.add_argument("--trigger", choices=_TRIGGERS, help="a known trigger: triggered features in the picture")
    r.add_argument("--target", type=int, default=0, help="the trigger's target class for ASR (0)")
    r.add_argument("--eval-data", metavar="PATH", help="labelled images for ACC/ASR before and after")
    r.add_argument("--eval-labels", metavar="FILE", help="labels of --eval-data (if it carries none)")
    r.add_argument("--eval-dataset", choices=["fashion-mnist"], help="evaluate on this dataset's test split")
    r.add_argument("--eval-limit", type=int, metavar="N", help="evaluate on a seeded subset of N images")
    r.add_argument(
        "--report-samples", type=int, default=512, metavar="N", help="images in the 2-D picture (512)"
    )
    r.add_argument(
        "--diagnostic",
        action="store_true",
        help="add the evocation diagnostic of the original model (slow: 3 radii x 10 PGD steps)",
    )

    p = subs.add_parser("evaluate", help="clean accuracy (ACC) and attack success rate (ASR) of a classifier")
    _add_common(p)
    _add_model(p, features=False)
    _add_data(p, default_split="test")
    g = p.add_argument_group("evaluation")
    g.add_argument("--labels", metavar="FILE", help="labels (.npy/.pt/.txt) when the data carries none")
    g.add_argument("--trigger", choices=_TRIGGERS, help="measure the ASR of this trigger")
    g.add_argument("--target", type=int, default=0, help="the trigger's target class (0)")
    g.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' for stdout)")
    g.add_argument(
        "--device", default="auto", help="where the model runs: auto (CUDA if visible), cpu, cuda:N"
    )
    g.add_argument(
        "--input-mean",
        metavar="M[,M...]",
        help="standardise the [0, 1] images with this per-channel mean before the model (with --input-std; "
        "what purify's input_mean does), e.g. 0.485,0.456,0.406",
    )
    g.add_argument("--input-std", metavar="S[,S...]", help="the per-channel std of --input-mean")

    p = subs.add_parser(
        "verify-record",
        help="check a purification record's SHA-256 hashes against model and data files",
        description="Recompute the hashes of a purification record (<out>.record.json): the record's "
        "own content hash, each MODEL file against the recorded outputs, and optionally the input model "
        "and data files. Exit status 0 when every check passes, 1 when any fails.",
    )
    _add_common(p)
    p.add_argument("record", metavar="RECORD", help="the record (<out stem>.record.json)")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model file(s) that must be recorded outputs")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="FILE",
        help="an input model/weights file (repeatable)",
    )
    p.add_argument("--data", metavar="FILE", help="the data file purified on (a tensor file)")
    p.add_argument(
        "--all",
        action="store_true",
        help="also check every file at the path the record names (inputs, outputs, data)",
    )
    p.add_argument("--json", action="store_true", help="print the checks as JSON")

    p = subs.add_parser("info", help="build record and backend availability", add_help=False)
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, help="options for 'python -m cbd_fast.info' (e.g. --json)"
    )
    return parser


_TRIGGERS = ["badnets", "blended", "sig", "wanet"]
_PURIFY_DOC = (
    "Purify a (possibly backdoored) backbone without labels: contrastive PGD evokes the backdoor, "
    "fine-tuning pulls adversarial features back to clean ones. Settings: PurifyConfig defaults < "
    "--config < --set."
)


# ------------------------------------------------------------------------------------------ helpers


def _factory_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--factory-kwargs must be a JSON object; got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--factory-kwargs must be a JSON object; got {text!r}")
    return value


def _load_model(args: argparse.Namespace) -> Any:
    from cbd_fast.app import model_io as modelio

    t0 = time.perf_counter()
    loaded = modelio.load_model(
        args.model,
        weights=args.weights,
        factory_kwargs=_factory_kwargs(args.factory_kwargs),
        trust_pickle=args.trust_pickle,
    )
    logger.info(
        "loaded %s model %s (%s, %d parameters) in %.1f s",
        loaded.form,
        args.model,
        loaded.describe()["class"],
        loaded.describe()["parameters"],
        time.perf_counter() - t0,
    )
    for note in loaded.notes:
        logger.info("model: %s", note)
    return loaded


def _load_data(args: argparse.Namespace, module: Any, *, split: str, labels: str | None = None) -> Any:
    """The images of --data/--dataset (with --labels matched to the whole source, then subset)."""
    from cbd_fast.app import images as imagedata
    from cbd_fast.app import model_io as modelio

    channels, h, w = modelio.expected_input_shape(module)
    expected = (h, w) if h and w else None
    if args.dataset:
        for flag, value in (("--image-size", args.image_size), ("--labels", labels)):
            if value:
                logger.warning("%s is ignored with --dataset", flag)
        data = imagedata.load_dataset(
            args.dataset,
            split=split,
            root=args.dataset_root,
            limit=args.limit,
            fraction=args.fraction,
            seed=args.subset_seed,
        )
        if channels is not None and channels != data.images.shape[1]:
            if data.images.shape[1] == 1 and channels == 3:
                data.images = data.images.expand(-1, 3, -1, -1).contiguous()
                data.notes.append("grayscale images repeated to 3 channels for the model")
            else:
                raise CLIError(
                    f"{args.dataset} images have {data.images.shape[1]} channel(s); model expects {channels}"
                )
    else:
        data = imagedata.load_images(
            args.data,
            image_size=args.image_size,
            expected_size=expected,
            channels=channels,
            limit=args.limit,
            fraction=args.fraction,
            seed=args.subset_seed,
            labels=labels,
        )
    logger.info("data: %d images of shape %s from %s", len(data), list(data.images.shape[1:]), data.source)
    for note in data.notes:
        logger.info("data: %s", note)
    return data


def _check_out_path(path: str, what: str) -> Path:
    p = Path(path)
    if p.exists() and p.is_dir():
        raise CLIError(f"{what} {path!r} is a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{what} folder does not exist: {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"{what} folder is not writable: {str(parent)!r}")
    return p


class _Standardised(nn.Module):
    """``module`` behind an input standardisation step (``StandardisedInputs``)."""

    def __init__(self, module: nn.Module, step: Any) -> None:
        super().__init__()
        self.module = module
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(self.module, x)


def _standardisation_options(args: argparse.Namespace) -> Any:
    """``--input-mean`` / ``--input-std`` as a validated ``PurifyConfig`` carrying them (both fields
    None when the flags are not given).

    Raises:
        UsageError: a value that is not a comma-separated list of numbers, or one the config refuses
            (only one of the two, different lengths, std <= 0).
    """
    from cbd_fast import PurifyConfig

    values = {}
    for name in ("input_mean", "input_std"):
        raw = getattr(args, name)
        if raw is None:
            continue
        try:
            values[name] = tuple(float(v) for v in raw.split(","))
        except ValueError:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} must be comma-separated numbers, e.g. 0.485,0.456,0.406; got {raw!r}"
            ) from None
    try:
        return PurifyConfig(**values).validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--input-mean/--input-std: {exc}") from None


def _standardised(module: nn.Module, config: Any) -> nn.Module:
    """``module`` as the run read it: behind ``PurifyConfig.input_mean`` / ``input_std`` when set (for
    the report's evaluation and diagnostic), else ``module`` itself."""
    step = with_standardisation(None, config.input_mean, config.input_std)
    return module if step is None else _Standardised(module, step)


class _Counting(nn.Module):
    """Runs a classifier on ``device`` and advances a progress bar by each batch's size; returns
    CPU logits (the labels stay on the CPU)."""

    def __init__(self, model: nn.Module, bar: Any, device: torch.device) -> None:
        super().__init__()
        self.inner = model
        self.bar = bar
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.to(self.device))
        self.bar.update(int(x.shape[0]))
        return out.float().cpu()


def _resolve_device(spec: str | None) -> torch.device:
    """``--device`` as a ``torch.device`` (``cbd_fast.core.device.resolve_device``).

    Raises:
        UsageError: ``spec`` is not a device string (exit status 2).
        CLIError: ``spec`` is a CUDA device but none is visible here (exit status 1).
    """
    from cbd_fast.core.device import CUDAUnavailableError, resolve_device

    try:
        return resolve_device(spec)
    except CUDAUnavailableError:  # a valid device string this machine cannot serve
        raise CLIError(f"--device {spec!r}: no CUDA device is visible") from None
    except ValueError:
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {spec!r}") from None


def _evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger_name: str | None,
    target: int,
    desc: str,
    device: torch.device | None = None,
) -> dict:
    """ACC (and ASR when a trigger is known) with cbd_fast.evaluation.metrics, behind one progress bar.

    ``images`` [N, C, H, W] (uint8 or float in [0, 1]) and ``labels`` [N] int64 stay on the CPU; the
    model runs on ``device`` (None: where it is) in eval mode (``metrics.predict``) and gets its
    device and training flags back. Returns ``{"n", "acc"[, "asr", "trigger", "target"]}``.
    """
    from cbd_fast.core.progress import progress
    from cbd_fast.evaluation import metrics

    x = images.float().div(255.0) if not images.dtype.is_floating_point else images.float()
    result: dict[str, Any] = {"n": int(x.shape[0])}
    trigger = None
    total = x.shape[0]
    if trigger_name:
        from cbd_fast.evaluation import backdoors as attacks

        trigger = attacks.make_trigger(trigger_name)
        result.update(trigger=trigger_name, target=int(target))
        total += int((labels != target).sum())
    original_device = _module_device(model)
    device = original_device if device is None else device
    model.to(device)
    with progress(total=total, desc=desc, unit="img") as bar:
        counted = _Counting(model, bar, device)
        try:
            result["acc"] = float(metrics.accuracy(counted, x, labels))
            if trigger is not None:
                result["asr"] = float(metrics.attack_success_rate(counted, x, labels, trigger, target))
        finally:
            model.to(original_device)
    return result


def _labelled(data: Any, what: str) -> Any:
    if data.labels is None:
        raise CLIError(
            f"{what} carries no labels; give them with {'--labels' if what == 'data' else '--eval-labels'}"
        )
    return data.labels


# ------------------------------------------------------------------------------------------ commands


def _cmd_demo(args: argparse.Namespace) -> int:
    import importlib

    try:
        demo = importlib.import_module("cbd_fast.app.demo")
    except ModuleNotFoundError as exc:
        if exc.name in ("cbd_fast.app.demo",):
            raise CLIError(
                "the demo is not available in this install (cbd_fast.app.demo is missing)"
            ) from None
        raise
    rest = list(args.rest)
    if args.quiet and "--quiet" not in rest:
        rest.append("--quiet")
    code = demo.main(rest)
    return int(code or 0)


def _cmd_info(args: argparse.Namespace) -> int:
    from cbd_fast.app import info

    return int(info.main(list(args.rest)) or 0)


def _cmd_purify(args: argparse.Namespace) -> int:
    from cbd_fast.app import model_io as modelio

    # 1. everything that can be checked without work, first
    file_values = load_config_file(args.config) if args.config else {}
    config = merge_config(
        file_values, parse_set_options(args.set), quiet=args.quiet, preset=getattr(args, "preset", "defaults")
    )
    out = _check_out_path(args.out, "output")
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise CLIError(f"report folder {args.report!r} is a file")
    if args.report_samples < 2:
        raise UsageError(f"--report-samples must be >= 2; got {args.report_samples}")
    if (args.eval_data or args.eval_labels) and args.eval_dataset:
        raise UsageError("give either --eval-data/--eval-labels or --eval-dataset, not both")
    if args.eval_labels and not args.eval_data:
        raise UsageError("--eval-labels needs --eval-data")
    extras = [f for f in ("trigger", "eval_data", "eval_dataset", "diagnostic") if getattr(args, f)]
    if extras and not args.report:
        logger.warning("--%s only shape the report: ignored without --report", extras[0].replace("_", "-"))

    # 2. model and data
    loaded = _load_model(args)
    feature_fn = modelio.make_feature_fn(
        loaded.module, feature_layer=args.feature_layer, forward_features=args.forward_features
    )
    data = _load_data(args, loaded.module, split=args.split)
    evaluation_set = None
    if args.report and (args.eval_data or args.eval_dataset):
        evaluation_set = _evaluation_set(args, loaded.module)

    # 3. purify (the "before" copy is kept only when a report needs it)
    before = modelio.clone_module(loaded.module) if args.report else None
    from cbd_fast import Purifier

    t0 = time.perf_counter()
    head = False if args.head is not None and args.head.lower() == "none" else args.head
    result = Purifier(config).fit(loaded.module, data.images, feature_fn=feature_fn, inplace=True, head=head)
    seconds = time.perf_counter() - t0
    purified = result.encoder
    from cbd_fast.core.distributed import is_main_process

    if not is_main_process():  # torchrun: rank 0 alone writes the model and the report
        return 0

    # 4. the model, atomically, in the form it came in
    example = data.float_images()[:2] if loaded.form == "torchscript" else None
    saved = modelio.save_model(
        purified, out, loaded=loaded, example_input=example, safetensors=not args.no_safetensors
    )
    for note in saved["notes"]:
        logger.warning("save: %s", note)

    # 5. the labelled evaluation (report only), the purification record, the report
    evaluation = None
    if evaluation_set is not None:
        ex, ey = evaluation_set
        evaluation = {
            "before": _evaluate(
                _standardised(before, config), ex, ey, args.trigger, args.target, "evaluating (before)"
            ),
            "after": _evaluate(
                _standardised(purified, config), ex, ey, args.trigger, args.target, "evaluating (after)"
            ),
        }
    record_json, record_md, record = _write_record(args, config, result, data, loaded, saved, evaluation)
    report_path = None
    if args.report:
        report_path = _write_purify_report(
            args,
            config,
            result,
            before,
            purified,
            feature_fn,
            data,
            loaded,
            saved,
            seconds,
            evaluation,
            record,
        )
    print(f"purified model written to {', '.join(saved['files'])} ({saved['form']}; {seconds:.1f} s)")
    if result.features:
        print(f"features: {result.features}")
    if result.head:
        weight = (result.runtime or {}).get("head_weight", 0.0)
        guide = f"; head term weight {weight:g}" if weight else ""
        print(f"head: {result.head} (the health check counts its changed predictions{guide})")
    health = _health_line(result.history)
    if health:
        print(health)
    print(f"purification record written to {record_json} and {record_md}")
    if report_path is not None:
        print(f"report written to {report_path} and {report_path.with_name('report.html')}")
    return 0


def _write_record(
    args: argparse.Namespace,
    config: Any,
    result: Any,
    data: Any,
    loaded: Any,
    saved: dict,
    evaluation: dict | None,
) -> tuple[Path, Path, dict]:
    """The purification record beside the model (``cbd_fast.app.record``): (json, md, record)."""
    from cbd_fast.app import record as rec

    model = loaded.describe()
    record = rec.build_record(
        inputs=loaded.input_files(),
        outputs=saved["files"],
        data=rec.data_entry(data.images, source=data.source, files=data.files),
        config=config.to_dict(),
        history=result.history,
        features=result.features,
        head=result.head,
        runtime=result.runtime,
        model={
            k: model[k] for k in ("form", "source", "class", "parameters", "trust_pickle", "factory_kwargs")
        },
        evaluation=evaluation,
    )
    json_path, md_path = rec.record_paths(args.out)
    rec.write_record(record, json_path)
    return json_path, md_path, record


def _health_line(history: list[dict[str, float]]) -> str | None:
    """The last epoch's label-free health figures as one line (None when the check was off)."""
    last = history[-1] if history else {}
    if "health_knn" not in last:
        return None
    return (
        f"health after epoch {int(last['epoch'])} (label-free, vs the original encoder): k-NN agreement "
        f"{last['health_knn']:.3f}, CKA {last['health_cka']:.3f}, effective rank ratio "
        f"{last['health_rank']:.3f}, spread ratio {last['health_spread']:.3f}"
        + (f", feature drift {last['health_drift']:.3f}" if "health_drift" in last else "")
        + (f", pseudo-class changes {last['health_flip']:.3f}" if "health_flip" in last else "")
        + (f", changed predictions {last['health_head_change']:.3f}" if "health_head_change" in last else "")
    )


def _evaluation_set(args: argparse.Namespace, module: Any) -> tuple[Any, Any]:
    from cbd_fast.app import images as imagedata
    from cbd_fast.app import model_io as modelio

    if args.eval_dataset:
        data = imagedata.load_dataset(
            args.eval_dataset,
            split="test",
            root=args.dataset_root,
            limit=args.eval_limit,
            seed=args.subset_seed,
        )
        channels = modelio.expected_input_shape(module)[0]
        if channels == 3 and data.images.shape[1] == 1:
            data.images = data.images.expand(-1, 3, -1, -1)
        return data.images, data.labels
    channels, h, w = modelio.expected_input_shape(module)
    data = imagedata.load_images(
        args.eval_data,
        image_size=args.image_size,
        expected_size=(h, w) if h and w else None,
        channels=channels,
        limit=args.eval_limit,
        seed=args.subset_seed,
        labels=args.eval_labels,
    )
    return data.images, _labelled(data, "--eval-data")


def _write_purify_report(
    args: argparse.Namespace,
    config: Any,
    result: Any,
    before: Any,
    purified: Any,
    feature_fn: Any,
    data: Any,
    loaded: Any,
    saved: dict,
    seconds: float,
    evaluation: dict | None,
    record: dict | None = None,
) -> Path:
    from cbd_fast.app import record as rec
    from cbd_fast.app import report

    x = data.float_images()
    x_trig = None
    if args.trigger:
        from cbd_fast.evaluation import backdoors as attacks

        x_trig = attacks.make_trigger(args.trigger)(x[: args.report_samples].clone())
    device = _module_device(purified)
    before = before.to(device)
    t0 = time.perf_counter()
    view_fn = with_standardisation(feature_fn, config.input_mean, config.input_std)  # as the run read them
    projections = report.collect_projections(
        before, purified, x, feature_fn=view_fn, x_triggered=x_trig, config=config, n=args.report_samples
    )
    diagnostic = None
    if args.diagnostic:
        diagnostic = _diagnostic(args, before, feature_fn, x[: args.report_samples], config)
    extra = {
        "model": loaded.describe(),
        "feature_fn": repr(feature_fn),
        "features": result.features,
        "head": result.head,
        "runtime": result.runtime,
        "data": data.describe(),
        "outputs": saved,
        "purify_seconds": seconds,
        "report_seconds": time.perf_counter() - t0,
    }
    if record is not None:
        extra["record"] = {
            "path": str(rec.record_paths(args.out)[0]),
            "content_sha256": record.get("content_sha256"),
            "input_model": record.get("input_model"),
            "output_model": record.get("output_model"),
            "data": record.get("data"),
        }
    return report.write_report(
        args.report,
        config=config.to_dict() if hasattr(config, "to_dict") else dict(config),
        history=list(result.history),
        evaluation=evaluation,
        diagnostic=diagnostic,
        projections=projections,
        extra=extra,
    )


def _diagnostic(args: argparse.Namespace, model: Any, feature_fn: Any, images: Any, config: Any) -> dict:
    """The evocation diagnostic (``cbd_fast.evaluation.diagnostics``) of the original ``model``.

    ``images`` [N, C, H, W] float in [0, 1]; the encoder is ``model`` read through ``feature_fn``
    behind the run's input standardisation, and with a ``feature_fn`` the whole ``model`` is also the
    classifier of the class shares.
    """
    from cbd_fast.core.features import Features
    from cbd_fast.evaluation import diagnostics

    kwargs: dict[str, Any] = {}
    if feature_fn is not None:  # the loaded model is a classifier: class shares are measurable
        kwargs["classifier"] = _standardised(model, config)
    if args.trigger:
        from cbd_fast.evaluation import backdoors as attacks

        kwargs.update(trigger=attacks.make_trigger(args.trigger), target=args.target)
    encoder = Features(model, with_standardisation(feature_fn, config.input_mean, config.input_std))
    return diagnostics.evocation_diagnostic(encoder, images.to(_module_device(model)), **kwargs)


def _module_device(module: nn.Module) -> torch.device:
    """Where ``module`` lives: its first parameter's (else first buffer's) device, else the CPU."""
    from cbd_fast.core.device import module_device

    return module_device(module)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.json and args.json != "-":
        json_out = _check_out_path(args.json, "--json output")
    device = _resolve_device(args.device)
    loaded = _load_model(args)
    data = _load_data(args, loaded.module, split=args.split, labels=args.labels)
    labels = _labelled(data, "data")
    model = _standardised(loaded.module, _standardisation_options(args))
    result = _evaluate(model, data.images, labels, args.trigger, args.target, "evaluating", device)
    result.update(
        model=args.model,
        model_sha256=loaded.sha256,
        weights=args.weights,
        weights_sha256=loaded.weights_sha256,
        trust_pickle=loaded.trust_pickle,
        data=data.source,
    )
    line = f"ACC {100 * result['acc']:.2f}%"
    if "asr" in result:
        line += f"  ASR {100 * result['asr']:.2f}% (trigger {args.trigger}, target {args.target})"
    line += f"  on {result['n']} images"
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(line)
        if args.json:
            from cbd_fast.core.files import atomic_output

            with atomic_output(json_out) as tmp:
                tmp.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _cmd_verify_record(args: argparse.Namespace) -> int:
    from cbd_fast.app import record as rec

    if not args.models and not args.input and not args.data and not args.all:
        raise UsageError("give the MODEL file(s) to check (or --input/--data/--all)")
    doc = rec.read_record(args.record)
    result = rec.verify_record(
        doc, args.models, inputs=args.input, data=args.data, check_recorded_paths=args.all
    )
    if args.json:
        checks = [c.__dict__ for c in result.checks]
        print(json.dumps({"ok": result.ok, "record": args.record, "checks": checks}, indent=2))
    else:
        for line in result.lines():
            print(line)
    failed = [c for c in result.checks if not c.ok]
    if failed:
        print(
            f"{PROG}: error: verification failed: {len(failed)} of {len(result.checks)} check(s) "
            f"({', '.join(c.what for c in failed)})",
            file=sys.stderr,
        )
        return 1
    if not args.json:
        print(f"verified: {len(result.checks)} check(s) passed for {args.record}")
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "purify": _cmd_purify,
    "evaluate": _cmd_evaluate,
    "verify-record": _cmd_verify_record,
    "info": _cmd_info,
}


# ------------------------------------------------------------------------------------------ main


class _Formatter(logging.Formatter):
    """``cbd-fast: warning: message`` (lower-case level, like the error line)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logging_to_stderr(verbose: int) -> Iterator[None]:
    pkg = logging.getLogger("cbd_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    old_level, old_propagate = pkg.level, pkg.propagate
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING)
    pkg.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")

            def show(message: Any, category: Any, *_a: Any, **_k: Any) -> None:
                print(f"{PROG}: warning: {message}", file=sys.stderr)

            warnings.showwarning = show
            yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        pkg.propagate = old_propagate


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename!r}"
    if isinstance(exc, (KeyError,)) or (not isinstance(exc, (CLIError, ValueError, TypeError, OSError))):
        text = f"{type(exc).__name__}: {text}"
    return text


_GLOBAL_FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose", "-vv": "verbose"}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``demo``/``info`` hand everything after their name to their own parser
    (argparse's REMAINDER would swallow neither a leading ``--help`` nor other options reliably)."""
    for i, token in enumerate(argv):
        if token in ("demo", "info"):
            head = argv[:i]
            if all(t in _GLOBAL_FLAGS for t in head):
                verbose = sum(2 if t == "-vv" else 1 for t in head if _GLOBAL_FLAGS[t] == "verbose")
                quiet = any(_GLOBAL_FLAGS[t] == "quiet" for t in head)
                return argparse.Namespace(command=token, rest=argv[i + 1 :], quiet=quiet, verbose=verbose)
            break
        if not token.startswith("-"):
            break
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cbd-fast`` command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        the exit status: 0 success, 1 error (one line on stderr), 2 usage error, 130 interrupted.
    """
    from cbd_fast.core import progress

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a in ("-v", "--verbose") for a in argv) + 2 * sum(a == "-vv" for a in argv)
    previous_quiet = progress._QUIET
    try:
        parser = build_parser()
        try:
            args = _parse(parser, argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        if getattr(args, "version", False):
            import cbd_fast

            print(f"cbd_fast {cbd_fast.__version__}")
            return 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        verbose = args.verbose
        if args.quiet:
            progress.set_quiet(True)
        with _logging_to_stderr(verbose):
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        progress.set_quiet(previous_quiet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
