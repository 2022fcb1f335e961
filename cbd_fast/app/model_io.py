"""Loading and saving the models users bring: TorchScript, pickled modules, factory + weights.

Forms (``LoadedModel.form``):

- ``"torchscript"``: a ``torch.jit.save`` archive (``--model model.pt``), read with ``torch.jit.load``
  only; saved back with ``torch.jit.save``.
- ``"pickle"``: a whole module pickled with ``torch.save(module)``. Unpickling it runs code the file
  names, so it is refused unless the caller opts in with ``trust_pickle=True`` (``--trust-pickle``).
  Saved back with ``torch.save(module)``.
- ``"transformers"``: a Hugging Face model folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, as ``save_pretrained`` writes it), given as the folder or ``hf:FOLDER``;
  read with ``AutoModelForImageClassification`` (an image classifier's ``architectures``) or
  ``AutoModel``, always ``trust_remote_code=False`` and ``local_files_only=True``. Saved back as a
  state_dict (reload: ``--model FOLDER --weights OUT.safetensors``).
- ``"factory"``: an architecture given as ``package.module:callable`` (``torchvision.models:resnet18``,
  ``my_pkg.nets:build``) or ``timm:NAME`` (needs timm; built with ``pretrained=False``), built with
  ``factory_kwargs`` and optionally filled from a state_dict file (``.pt``/``.pth``/``.bin`` via
  ``torch.load(weights_only=True)``, or ``.safetensors``). Saved back as a state_dict
  (``.safetensors`` when the output name says so).

Security (the model is untrusted: that is why it is purified). Nothing from a model file runs by
default. Every file is inspected first by :mod:`cbd_fast.core.safe_load`: zip structure, declared
sizes (zip bomb-like archives are refused), CRC-32 of every entry, and the globals its pickle names
(disassembled, not executed). Then:

- a ``torch.save`` file whose pickle names only tensor globals is read with
  ``torch.load(weights_only=True)``; one that names anything else (a module class, ``posix.system``,
  ``builtins.exec``) raises :class:`ModelLoadError` naming those globals, unless ``trust_pickle=True``,
  the one place in the package that calls ``torch.load(weights_only=False)``;
- a TorchScript archive is read with ``torch.jit.load``: TorchScript's own loader, no Python pickle and
  no Python import. Its code (a scripted ``forward``, ``__setstate__``) does run, at load and when
  called, but only as TorchScript: it can call any operator registered in the process (torch's own,
  and those of extensions already imported, e.g. torchvision's image file I/O), so it can compute
  anything and use CPU and memory, but it cannot import modules or call Python functions. Narrower
  than pickle, not a sandbox;
- a ``.safetensors`` header is checked against the file before the safetensors library reads it;
- a factory runs the code of the package the caller names, never code from the file.

- a Hugging Face folder is loaded with ``trust_remote_code=False`` (a config naming custom code,
  ``auto_map``, is refused before transformers reads it) and prefers safetensors weights; a
  ``pytorch_model.bin`` is inspected like any ``torch.save`` file first (non-tensor globals refused).

:class:`LoadedModel` records the input files' SHA-256 and whether ``trust_pickle`` was given;
:func:`save_model` writes both into the ``.safetensors`` copy's metadata.

Every save also writes ``<out>.safetensors`` next to the main file when safetensors is installed
(unless the main file already is one), and every file is written atomically: to a temporary name in
the same folder, flushed, fsynced, then renamed, so a crash never leaves a partial file under the
final name.

Features: CBD purifies a backbone's *features*. :func:`make_feature_fn` picks them from a classifier:
the output of a named submodule (``--feature-layer layer4``, captured by a forward hook that stops the
forward there) or timm's ``forward_features`` (+ ``forward_head(pre_logits=True)`` when present);
without either, the model's family decides (``cbd_fast.core.backbones.auto_feature_fn``: timm,
torchvision and Hugging Face transformers models; any other module's own output).

Example:
    >>> loaded = load_model("my_pkg.nets:build", weights="backdoored.safetensors")  # doctest: +SKIP
    >>> fn = make_feature_fn(loaded.module, feature_layer="backbone")               # doctest: +SKIP
    >>> save_model(loaded.module, "purified.pt", loaded=loaded)                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbd_fast.core import safe_load
from cbd_fast.core.backbones import ForwardFeatures, SubmoduleFeatures, auto_feature_fn, find_submodule
from cbd_fast.core.files import atomic_output

__all__ = [
    "FORMS",
    "LoadedModel",
    "ModelLoadError",
    "PickleTrustWarning",
    "atomic_output",
    "clone_module",
    "expected_input_shape",
    "load_model",
    "load_state_dict_file",
    "make_feature_fn",
    "save_model",
    "SubmoduleFeatures",
    "ForwardFeatures",
]

logger = logging.getLogger("cbd_fast.app.model_io")

FORMS = ("torchscript", "pickle", "factory", "transformers")

TRUST_WARNING = (
    "{path} is a pickled module and trust_pickle was given: unpickling it runs code from the file "
    "(globals: {globals})"
)

REFUSAL = (
    "refused to load {path!r}: its pickle names non-tensor globals ({globals}), and unpickling it would run "
    "code from the file. Give the architecture and plain weights (--model package.module:factory --weights "
    "state_dict.pt or .safetensors) or a TorchScript archive; only if you trust this file, pass "
    "--trust-pickle (trust_pickle=True in Python)"
)


class PickleTrustWarning(UserWarning):
    """Emitted when a whole module is unpickled under ``trust_pickle=True``: code from the file runs."""


class ModelLoadError(ValueError):
    """The model could not be loaded; the message names the file or factory and says why."""


@dataclass
class LoadedModel:
    """A model as loaded, with what is needed to save it back in the same form.

    Attributes:
        module: the ``nn.Module`` (a ``torch.jit.ScriptModule`` for TorchScript), on the CPU.
        form: one of :data:`FORMS`.
        source: the file path or the factory spec the user gave.
        weights: the state_dict file the factory model was filled from (None otherwise).
        factory_kwargs: keyword arguments the factory was called with.
        notes: human-readable remarks made while loading (e.g. a stripped ``module.`` prefix).
        sha256: SHA-256 of the model file (None for a factory).
        weights_sha256: SHA-256 of the weights file (None without one).
        trust_pickle: whether the caller opted in to unpickling code (``trust_pickle=True``).
        extra_sha256: other input files read (path -> SHA-256), e.g. a Hugging Face folder's
            ``config.json`` and weight files.
    """

    module: nn.Module
    form: str
    source: str
    weights: str | None = None
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sha256: str | None = None
    weights_sha256: str | None = None
    trust_pickle: bool = False
    extra_sha256: dict[str, str] = field(default_factory=dict)

    def input_files(self) -> list[dict[str, Any]]:
        """Every input file read, with its SHA-256: ``[{"role": "model" | "weights" | "file", "path",
        "sha256"}]`` (a factory without weights reads none)."""
        out: list[dict[str, Any]] = []
        if self.sha256 and self.form in ("torchscript", "pickle"):
            out.append({"role": "model", "path": self.source, "sha256": self.sha256})
        if self.weights is not None and self.weights_sha256:
            out.append({"role": "weights", "path": self.weights, "sha256": self.weights_sha256})
        out.extend({"role": "file", "path": p, "sha256": h} for p, h in self.extra_sha256.items())
        return out

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (form, source, weights, kwargs, class name, parameter count, the input
        files' SHA-256, trust_pickle)."""
        return {
            "form": self.form,
            "source": self.source,
            "sha256": self.sha256,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "trust_pickle": self.trust_pickle,
            "factory_kwargs": self.factory_kwargs,
            "files_sha256": dict(self.extra_sha256),
            "class": _class_name(self.module),
            "parameters": int(sum(p.numel() for p in self.module.parameters())),
            "notes": list(self.notes),
        }

    def provenance(self) -> dict[str, str]:
        """Where the model came from, as strings (for a safetensors header): the source (a file's name,
        or the factory spec), the weights file's name, their SHA-256 and ``trust_pickle``."""
        out = {
            "source": Path(self.source).name if self.sha256 else self.source,
            "source_sha256": self.sha256,
            "weights": None if self.weights is None else Path(self.weights).name,
            "weights_sha256": self.weights_sha256,
            "form": self.form,
            "trust_pickle": "true" if self.trust_pickle else "false",
        }
        return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------ loading


def _class_name(module: nn.Module) -> str:
    if isinstance(module, torch.jit.ScriptModule):
        return f"ScriptModule({getattr(module, 'original_name', type(module).__name__)})"
    return type(module).__name__


def _resolve_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model factory must look like 'package.module:callable'; got {spec!r}")
    if module_name == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError as exc:
            raise ModelLoadError(
                f"model {spec!r} needs timm, which is not installed (pip install timm)"
            ) from exc
        return lambda **kw: timm.create_model(attr, pretrained=False, **kw)
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for model factory {spec!r}: {exc}") from exc
    target: Any = mod
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"model factory {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"model factory {spec!r} is not callable; got a {type(target).__name__}")
    return target


def _unwrap_state_dict(obj: Any, path: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """Find the tensor mapping in a loaded checkpoint (plain, or under a conventional key)."""
    if isinstance(obj, nn.Module):
        raise ModelLoadError(
            f"weights file {path!r} holds a whole module, not a state_dict; pass it as --model"
        )
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = dict(obj)
        else:
            for key in ("state_dict", "model_state_dict", "model", "encoder", "backbone", "net"):
                inner = obj.get(key)
                if (
                    isinstance(inner, Mapping)
                    and inner
                    and all(isinstance(v, torch.Tensor) for v in inner.values())
                ):
                    notes.append(f"weights taken from the {key!r} entry of {path}")
                    sd = dict(inner)
                    break
            else:
                raise ModelLoadError(
                    f"weights file {path!r} is not a state_dict: no tensor mapping at the top level or under "
                    f"'state_dict'/'model'; top-level keys: {sorted(map(str, obj))[:8]}"
                )
        for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                notes.append(f"stripped the {prefix!r} prefix from the weights' keys")
        return sd
    raise ModelLoadError(f"weights file {path!r} is not a state_dict; got a {type(obj).__name__}")


def load_state_dict_file(
    path: str | os.PathLike[str], notes: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file (never unpickling code).

    The file is inspected first (:mod:`cbd_fast.core.safe_load`): a truncated, corrupted or zip
    bomb-like archive, a TorchScript archive, a pickle naming non-tensor globals, or a safetensors
    header that does not match the file is refused with a :class:`ModelLoadError` saying which.

    Args:
        path: the file.
        notes: a list that receives remarks (keys taken from a nested entry, stripped prefixes).

    Returns:
        ``{name: tensor}`` on the CPU.
    """
    return _read_state_dict(Path(path), [] if notes is None else notes)[0]


def _read_state_dict(path: Path, notes: list[str]) -> tuple[dict[str, torch.Tensor], str]:
    """``(state_dict, sha256 of the file)``; see :func:`load_state_dict_file`."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        if not importlib.util.find_spec("safetensors"):
            raise ModelLoadError(f"reading {str(path)!r} needs safetensors (pip install safetensors)")
        try:
            return safe_load.load_safetensors(path), safe_load.sha256_file(path)
        except safe_load.UnsafeFileError as exc:
            raise ModelLoadError(f"cannot read safetensors file {str(path)!r}: {exc}") from exc
    try:
        info = safe_load.inspect_torch_file(path)
    except safe_load.UnsafeFileError as exc:
        raise ModelLoadError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    if info.kind == "torchscript":
        raise ModelLoadError(
            f"weights file {str(path)!r} is a TorchScript archive, not a state_dict; pass it as --model"
        )
    if info.unsafe_globals:
        raise ModelLoadError(
            f"weights file {str(path)!r} is not a plain state_dict: its pickle names non-tensor globals "
            f"({safe_load.describe_globals(info.unsafe_globals)}), and weights are never unpickled as code. "
            "Save model.state_dict() (or a .safetensors file) instead"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read weights file {str(path)!r} as a state_dict (torch.load weights_only=True): "
            f"{_first_line(exc)}"
        ) from exc
    return _unwrap_state_dict(obj, str(path), notes), info.sha256


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def load_model(
    spec: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    strict: bool = True,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a model from a TorchScript archive, a factory (+ a state_dict), or (opt-in) a pickled module.

    Nothing from the file runs unless ``trust_pickle=True``: see the module docstring.

    Args:
        spec: a file path (TorchScript archive or pickled module), or ``package.module:callable`` /
            ``timm:NAME`` (an architecture; an existing file of that name wins over a factory).
        weights: a state_dict file (``.pt``/``.pth``/``.bin``/``.safetensors``) to fill the factory
            model with; with a file ``spec`` it overrides the loaded module's weights.
        factory_kwargs: keyword arguments for the factory (e.g. ``{"num_classes": 10}``).
        strict: require the weights' keys to match the model's exactly.
        trust_pickle: allow unpickling a whole-module file with ``torch.load(weights_only=False)``,
            which runs code the file names. Only for files you trust; recorded in the result. Without
            it such a file raises :class:`ModelLoadError` naming the globals it would have imported.

    Returns:
        a :class:`LoadedModel` on the CPU, in ``eval()`` mode.

    Raises:
        FileNotFoundError: ``spec`` or ``weights`` is a path that does not exist.
        ModelLoadError (a ValueError): the file is not a model, is refused (it needs code to load,
            or is truncated, corrupted or zip bomb-like), the factory cannot be resolved or built, or
            the weights do not fit the architecture; the message says which and why.
    """
    spec_str = os.fspath(spec)
    kwargs = dict(factory_kwargs or {})
    notes: list[str] = []
    extra: dict[str, str] = {}
    path = Path(spec_str[3:] if spec_str.startswith("hf:") else spec_str)
    if spec_str.startswith("hf:") and not path.is_dir():
        raise FileNotFoundError(f"Hugging Face model folder not found: {str(path)!r}")
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"model must be a file, a Hugging Face model folder (with config.json) or "
                    f"'package.module:factory'; got the folder {str(path)!r}, which has no config.json"
                )
            module, extra = _load_transformers(path, kwargs, notes)
            form, sha256 = "transformers", None
        else:
            if kwargs:
                raise ModelLoadError(f"factory kwargs only apply to a factory model; {spec_str!r} is a file")
            module, form, sha256 = _load_file(path, notes, trust_pickle)
    elif ":" in spec_str and not spec_str.endswith((".pt", ".pth", ".ts", ".bin", ".safetensors")):
        factory = _resolve_factory(spec_str)
        try:
            module = factory(**kwargs)
        except Exception as exc:
            raise ModelLoadError(
                f"model factory {spec_str!r}({_kw(kwargs)}) failed: {_first_line(exc)}"
            ) from exc
        if not isinstance(module, nn.Module):
            raise ModelLoadError(
                f"model factory {spec_str!r} must return an nn.Module; got a {type(module).__name__}"
            )
        form, sha256 = "factory", None
    else:
        raise FileNotFoundError(f"model file not found: {spec_str!r}")
    weights_sha256 = None
    if weights is not None:
        sd, weights_sha256 = _read_state_dict(Path(weights), notes)
        _load_weights(module, sd, str(weights), strict)
    elif form == "factory":
        notes.append("no --weights given: the factory's own initialisation is used")
    module = module.cpu().eval()
    return LoadedModel(
        module=module,
        form=form,
        source=spec_str,
        weights=None if weights is None else os.fspath(weights),
        factory_kwargs=kwargs,
        notes=notes,
        sha256=sha256,
        weights_sha256=weights_sha256,
        trust_pickle=bool(trust_pickle),
        extra_sha256=extra,
    )


def _load_transformers(
    path: Path, kwargs: dict[str, Any], notes: list[str]
) -> tuple[nn.Module, dict[str, str]]:
    """A Hugging Face model folder: ``(module, {file: sha256})``; never runs code from the folder."""
    if importlib.util.find_spec("transformers") is None:
        raise ModelLoadError(
            f"{str(path)!r} is a Hugging Face model folder; loading it needs transformers "
            "(pip install transformers)"
        )
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {str(config_file)!r} as JSON: {_first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(config_file)!r} must hold a JSON object; got a {type(config).__name__}")
    if config.get("auto_map"):
        raise ModelLoadError(
            f"{str(config_file)!r} names custom model code (auto_map: {sorted(config['auto_map'])}); "
            "cbd_fast never runs code from a model folder (trust_remote_code=False)"
        )
    st_files = sorted(path.glob("*.safetensors"))
    bin_files = sorted(path.glob("pytorch_model*.bin"))
    hashes = {str(config_file): safe_load.sha256_file(config_file)}
    try:
        for f in st_files:
            safe_load.check_safetensors(f)
            hashes[str(f)] = safe_load.sha256_file(f)
        if not st_files:
            for f in bin_files:
                info = safe_load.inspect_torch_file(f)
                if info.unsafe_globals:
                    raise ModelLoadError(
                        f"refused to load {str(f)!r}: its pickle names non-tensor globals "
                        f"({safe_load.describe_globals(info.unsafe_globals)}); save the model with "
                        "safetensors (save_pretrained's default)"
                    )
                hashes[str(f)] = info.sha256
    except safe_load.UnsafeFileError as exc:
        raise ModelLoadError(f"cannot load the weights of {str(path)!r}: {exc}") from exc
    if not st_files and not bin_files:
        raise ModelLoadError(f"{str(path)!r} has no weights (model.safetensors or pytorch_model.bin)")
    import transformers

    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    classifier = any(a.endswith("ForImageClassification") for a in archs)
    auto = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load is noise beside cbd_fast's own
    try:
        module = auto.from_pretrained(
            str(path),
            trust_remote_code=False,
            local_files_only=True,
            use_safetensors=bool(st_files),
            **kwargs,
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load Hugging Face model {str(path)!r} with {auto.__name__}: {_first_line(exc)}"
        ) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    notes.append(
        f"loaded with transformers.{auto.__name__} ({type(module).__name__}), trust_remote_code=False"
    )
    return module, hashes


def _kw(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _load_file(path: Path, notes: list[str], trust_pickle: bool) -> tuple[nn.Module, str, str]:
    """``(module, form, sha256)`` of a model file, inspected before anything reads it."""
    if path.suffix == ".safetensors":
        raise ModelLoadError(
            f"{str(path)!r} holds only weights; give the architecture: --model package.module:factory "
            f"--weights {path}"
        )
    try:
        info = safe_load.inspect_torch_file(path)
    except safe_load.UnsafeFileError as exc:
        raise ModelLoadError(f"cannot load model {str(path)!r}: {exc}") from exc
    if info.kind == "torchscript":
        try:
            with _quiet_jit():
                return torch.jit.load(str(path), map_location="cpu"), "torchscript", info.sha256
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load TorchScript archive {str(path)!r}: {_first_line(exc)}"
            ) from exc
    names = safe_load.describe_globals(info.unsafe_globals)
    if info.unsafe_globals and not trust_pickle:
        raise ModelLoadError(REFUSAL.format(path=str(path), globals=names))
    if info.unsafe_globals:
        warnings.warn(TRUST_WARNING.format(path=path, globals=names), PickleTrustWarning, stacklevel=3)
        notes.append(f"unpickled with torch.load(weights_only=False) under trust_pickle; globals: {names}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)  # the one opt-in path
        except Exception as exc:
            raise ModelLoadError(f"cannot unpickle model {str(path)!r}: {_first_line(exc)}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {str(path)!r} (torch.load weights_only=True): {_first_line(exc)}"
            ) from exc
    if isinstance(obj, nn.Module):
        return obj, "pickle", info.sha256
    if isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{str(path)!r} is a state_dict, not a model; give the architecture: "
            f"--model package.module:factory --weights {path}"
        )
    raise ModelLoadError(f"{str(path)!r} does not hold a model; got a {type(obj).__name__}")


def _load_weights(module: nn.Module, sd: dict[str, torch.Tensor], path: str, strict: bool) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(
            f"weights {path!r} do not fit the model: {len(wrong)} shape mismatch(es), e.g. {k!r} is "
            f"{tuple(sd[k].shape)} in the file but {tuple(own[k].shape)} in the model"
        )
    if strict and (missing or unexpected):
        raise ModelLoadError(
            f"weights {path!r} do not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}"
        )
    with torch.no_grad():
        module.load_state_dict(sd, strict=strict)


# ------------------------------------------------------------------------------------------ features


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch >= 2.10 deprecates TorchScript; loading/saving the user's archives still works."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _module_names(module: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in module.named_children()]
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "(none)"


def make_feature_fn(
    module: nn.Module, *, feature_layer: str | None = None, forward_features: bool = False
) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    """The ``feature_fn`` for ``cbd_fast.purify`` that reads a classifier's features.

    Args:
        module: the loaded model (used to check the request now, before any work).
        feature_layer: a submodule name (``module.named_modules()``); its output, flattened to
            [B, D], is the feature. Mutually exclusive with ``forward_features``.
        forward_features: use ``module.forward_features`` (timm classifiers).

    Without either option, the module's family decides (:func:`cbd_fast.core.backbones.auto_feature_fn`:
    timm ``forward_features`` + its pooling, a torchvision classifier's pre-logits input, a Hugging
    Face model's CLS token or pooled output); any other module's own output is the feature.

    Returns:
        a picklable callable ``(module, x[B,C,H,W]) -> features[B,D]``, or None (the module's own
        output is the feature: a headless backbone).

    Raises:
        ValueError: both options, an unknown layer (the message lists the top-level children), or a
            model without ``forward_features``.
    """
    if feature_layer and forward_features:
        raise ValueError("give either feature_layer or forward_features, not both")
    if feature_layer:
        if isinstance(module, torch.jit.ScriptModule):
            raise ValueError(
                f"feature layer {feature_layer!r}: TorchScript models take no forward hooks; save the "
                "backbone "
                "alone as TorchScript (its output is the feature) or load the model from its architecture"
            )
        if find_submodule(module, feature_layer) is None:
            raise ValueError(
                f"feature layer {feature_layer!r} not found in {_class_name(module)}; "
                f"its top-level modules are: {_module_names(module)}"
            )
        return SubmoduleFeatures(feature_layer)
    if forward_features:
        if not hasattr(module, "forward_features"):
            raise ValueError(
                f"forward_features requested but {_class_name(module)} has no forward_features method; "
                "use a feature layer name instead"
            )
        auto = auto_feature_fn(module)
        return auto if isinstance(auto, ForwardFeatures) else ForwardFeatures(family=_class_name(module))
    return auto_feature_fn(module)


def expected_input_shape(module: nn.Module) -> tuple[int | None, int | None, int | None]:
    """What the model says about its input: ``(channels, height, width)``, None where unknown.

    Channels come from the first 4-D weight (a conv's ``in_channels``); the size from a timm ViT's
    ``patch_embed.img_size``, a Hugging Face ``config.image_size``, timm's
    ``pretrained_cfg``/``default_cfg["input_size"]`` or an ``input_size``/``image_size``/``img_size``
    attribute (on the model or its ``patch_embed``).

    Args:
        module: the model.

    Returns:
        ``(C, H, W)`` with None for what cannot be known.
    """
    channels = None
    for p in module.parameters():
        if p.dim() == 4:
            channels = int(p.shape[1])
            break
    height = width = None
    embed_size = getattr(getattr(module, "patch_embed", None), "img_size", None)  # a timm ViT's real size
    if (
        isinstance(embed_size, (tuple, list))
        and len(embed_size) == 2
        and all(isinstance(v, int) for v in embed_size)
    ):
        return channels, int(embed_size[0]), int(embed_size[1])
    hf_config = getattr(module, "config", None)  # a Hugging Face model's PretrainedConfig
    hf_size = getattr(hf_config, "image_size", None) if hf_config is not None else None
    if isinstance(hf_size, int) and hf_size > 0:
        return channels or getattr(hf_config, "num_channels", None), hf_size, hf_size
    for cfg_name in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, cfg_name, None)
        if isinstance(cfg, Mapping) and isinstance(cfg.get("input_size"), (tuple, list)):
            size = cfg["input_size"]
            if len(size) == 3:
                channels = channels or int(size[0])
                height, width = int(size[1]), int(size[2])
                return channels, height, width
    for owner in (module, getattr(module, "patch_embed", None)):
        for attr in ("input_size", "image_size", "img_size"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, int) and value > 0:
                return channels, value, value
            if (
                isinstance(value, (tuple, list))
                and len(value) in (2, 3)
                and all(isinstance(v, int) for v in value)
            ):
                return channels, int(value[-2]), int(value[-1])
    return channels, height, width


# ------------------------------------------------------------------------------------------ saving


def clone_module(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are leaves with the original's ``requires_grad`` flags.

    ``copy.deepcopy`` of a ``torch.jit.ScriptModule`` under grad mode returns parameters that are
    *non-leaf clones* (``CloneBackward``) of the original's, so they cannot be trained and would
    leak gradients into the original; copying under ``no_grad`` and restoring the flags fixes that.

    Args:
        module: any module, TorchScript included.

    Returns:
        an independent copy (same class, same training flag).
    """
    with torch.no_grad():
        new = copy.deepcopy(module)
    for p_new, p_old in zip(new.parameters(), module.parameters()):
        if p_new.requires_grad != p_old.requires_grad:
            p_new.requires_grad_(p_old.requires_grad)
    return new


def _save_safetensors(module: nn.Module, path: Path, provenance: Mapping[str, str] | None = None) -> None:
    """``module``'s state_dict as safetensors; ``provenance`` (strings) joins the header metadata."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:  # tied/shared storage: safetensors refuses it; store a copy
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t.contiguous()
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(provenance or {}), "format": "pt", "producer": "cbd_fast"})


def _safetensors_available() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def save_model(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    loaded: LoadedModel | None = None,
    form: str | None = None,
    example_input: torch.Tensor | None = None,
    safetensors: bool = True,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``module`` atomically in the form it was loaded in, plus a ``.safetensors`` copy.

    Args:
        module: the (purified) model; moved to the CPU for saving (the caller's module is not moved).
        path: the main output file. A ``.safetensors`` name saves only a safetensors state_dict.
        loaded: the :class:`LoadedModel` it came from (gives the form).
        form: override the form: ``"torchscript"``, ``"pickle"`` or ``"factory"``/``"state_dict"``.
            Default: ``loaded.form``, else ``"state_dict"``.
        example_input: [B, C, H, W] inputs to trace with when a TorchScript save needs re-scripting and
            ``torch.jit.script`` fails.
        safetensors: also write ``<path minus suffix>.safetensors`` when safetensors is installed.
        metadata: a JSON-able dict written to ``<path>.json`` beside the model (atomic), e.g. how to
            load it back; None writes nothing.

    With ``loaded``, where the model came from (:meth:`LoadedModel.provenance`: the input files' names
    and SHA-256, ``trust_pickle``) goes into the ``.safetensors`` header metadata and, as ``"input"``,
    into the ``metadata`` file.

    Returns:
        ``{"files": [paths written], "form": form used, "notes": [remarks, e.g. a fallback]}``.
    """
    out = Path(path)
    chosen = form or (loaded.form if loaded is not None else "state_dict")
    if chosen in ("factory", "transformers"):
        chosen = "state_dict"
    if chosen not in ("torchscript", "pickle", "state_dict"):
        raise ValueError(f"form must be 'torchscript', 'pickle' or 'state_dict'; got {chosen!r}")
    if out.exists() and out.is_dir():
        raise ValueError(f"output path is a folder: {str(out)!r}; give a file name")
    notes: list[str] = []
    files: list[str] = []
    provenance = loaded.provenance() if loaded is not None else None
    cpu = (
        module
        if all(t.device.type == "cpu" for t in module.state_dict().values())
        else clone_module(module).cpu()
    )
    if out.suffix == ".safetensors":
        if not _safetensors_available():
            raise ValueError(f"output {str(out)!r} needs safetensors, which is not installed")
        _save_safetensors(cpu, out, provenance)
        return {"files": [str(out)], "form": "safetensors", "notes": notes}

    if chosen == "torchscript":
        scripted = cpu if isinstance(cpu, torch.jit.ScriptModule) else None
        if scripted is None:
            try:
                with _quiet_jit():
                    scripted = torch.jit.script(cpu)
            except Exception as exc:
                if example_input is not None:
                    try:
                        with torch.no_grad(), _quiet_jit():
                            scripted = torch.jit.trace(clone_module(cpu).eval(), example_input.cpu())
                        notes.append(f"torch.jit.script failed ({_first_line(exc)}); saved a traced module")
                    except Exception as exc2:
                        notes.append(f"could not script ({_first_line(exc)}) nor trace ({_first_line(exc2)})")
                else:
                    notes.append(
                        f"could not script the module ({_first_line(exc)}) and no example input to trace"
                    )
        if scripted is not None:
            with atomic_output(out) as tmp, _quiet_jit():
                torch.jit.save(scripted, str(tmp))
        else:
            chosen = "state_dict"
            notes.append("saved a state_dict instead of TorchScript")
    if chosen == "pickle":
        with atomic_output(out) as tmp:
            torch.save(cpu, tmp)
    elif chosen == "state_dict":
        with atomic_output(out) as tmp:
            torch.save({k: v.detach().cpu() for k, v in cpu.state_dict().items()}, tmp)
    files.append(str(out))
    if safetensors:
        if _safetensors_available():
            st = out.with_suffix(".safetensors")
            _save_safetensors(cpu, st, provenance)
            files.append(str(st))
        else:
            notes.append("safetensors is not installed: no .safetensors copy written")
    if metadata is not None:
        meta_path = out.with_name(out.name + ".json")
        with atomic_output(meta_path) as tmp:
            tmp.write_text(
                json.dumps(
                    dict(metadata, form=chosen, files=files, notes=notes, input=provenance),
                    indent=2,
                    default=str,
                )
            )
        files.append(str(meta_path))
    for note in notes:
        logger.info("save_model: %s", note)
    return {"files": files, "form": chosen, "notes": notes}
