"""The attack zoo's table: one ``ZooAttack`` per registered name, its split, kind, paper and settings.

Splits: ``dev`` (the attacks anything may be tuned on: the five the defense was first designed against,
delegated to ``backdoors.py``, two sparse ones from ``sparse.py``, an optimised patch from
``adversarial_patch.py``, a smooth global blend from ``reflection.py``, a per-image generated patch
from ``generated_patch.py`` and inked edges from ``edges.py``) and ``report`` (twelve attacks never
used to tune anything). Kinds: ``poison`` (dirty-label poisoning of the training set), ``clean_label``
(only target-class images are modified, labels kept), ``encoder`` (a backdoor planted into an encoder
without labels; evaluate with a linear probe).

Lookups: ``get_attack(name)``, ``attack_names(split)``, ``select("all" | "dev" | "report" | "a,b,dev")``;
triggers: ``test_trigger(name)`` (the test-time trigger of a stateless attack, or the untrained
initial trigger of a stateful one) and ``load_trigger(path)`` (a stateful trigger saved with its model).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cbd_fast.evaluation.backdoors import Trigger
from cbd_fast.evaluation.zoo import (
    adversarial_patch,
    clean_label,
    dev,
    dynamic,
    edges,
    encoder,
    generated_patch,
    optimized_patch,
    reflection,
    sample_specific,
    sparse,
    warps,
)
from cbd_fast.evaluation.zoo.base import ZooTrigger, read_trigger_file
from cbd_fast.evaluation.zoo.blends import ImageBlend
from cbd_fast.evaluation.zoo.filters import ToneFilter
from cbd_fast.evaluation.zoo.frequency import LowFrequency
from cbd_fast.evaluation.zoo.patches import PatchTrigger, checkerboard, random_binary
from cbd_fast.evaluation.zoo.quantize import BitDepthSqueeze
from cbd_fast.evaluation.zoo.training import BuildJob, ZooBuild, build_poisoned

__all__ = [
    "KINDS",
    "SPLITS",
    "ZOO",
    "ZooAttack",
    "attack_names",
    "get_attack",
    "load_trigger",
    "resolve_settings",
    "select",
    "test_trigger",
]

SPLITS: tuple[str, ...] = ("dev", "report")
KINDS: tuple[str, ...] = ("poison", "clean_label", "encoder")

Settings = Mapping[str, Any]


@dataclass(frozen=True)
class ZooAttack:
    """One registered attack.

    Attributes:
        name: the registered name.
        split: ``"dev"`` or ``"report"``.
        kind: ``"poison"``, ``"clean_label"`` or ``"encoder"``.
        citation: authors, title, venue, year of the paper followed.
        summary: one line on the trigger and its settings.
        settings: the default settings (read-only; ``build(..., settings=)`` overrides some).
        stateful: the trigger is learned/optimised with the model and must be saved with it.
        make_trigger: ``settings -> trigger``: the test-time trigger (stateless) or the untrained initial
            one (stateful; the real one comes from the build or ``load_trigger``).
        builder: ``BuildJob -> ZooBuild``.
        trigger_class: the class that rebuilds a saved stateful trigger (``None`` when stateless).
    """

    name: str
    split: str
    kind: str
    citation: str
    summary: str
    settings: Settings
    stateful: bool
    make_trigger: Callable[[Settings], Trigger]
    builder: Callable[[BuildJob], ZooBuild]
    trigger_class: type[ZooTrigger] | None = None


def _static(make: Callable[[Settings], Trigger]) -> Callable[[BuildJob], ZooBuild]:
    """The builder of a fixed-trigger dirty-label attack: ``build_poisoned(job, make(settings))``."""
    return lambda job: build_poisoned(job, make(job.settings))


def _dev(name: str, summary: str) -> ZooAttack:
    return ZooAttack(
        name=name,
        split="dev",
        kind="encoder" if name == "badencoder" else "poison",
        citation=dev.DEV_CITATIONS[name],
        summary=summary,
        settings=MappingProxyType({}),
        stateful=False,
        make_trigger=lambda _s, n=name: dev.dev_trigger(n),
        builder=dev.build_dev,
    )


def _fixed_dev(
    name: str, summary: str, settings: dict[str, Any], make: Callable[[Settings], Trigger]
) -> ZooAttack:
    """A zoo dev attack with a fixed trigger (``sparse.py``, ``reflection.py``, ``edges.py``): dirty-label
    poisoning (``build_poisoned``)."""
    return ZooAttack(
        name=name,
        split="dev",
        kind="poison",
        citation=_FIXED_DEV_CITATIONS[name],
        summary=summary,
        settings=MappingProxyType(dict(settings)),
        stateful=False,
        make_trigger=make,
        builder=_static(make),
    )


def _report(
    name: str,
    kind: str,
    citation: str,
    summary: str,
    settings: dict[str, Any],
    make: Callable[[Settings], Trigger],
    builder: Callable[[BuildJob], ZooBuild] | None = None,
    trigger_class: type[ZooTrigger] | None = None,
) -> ZooAttack:
    return ZooAttack(
        name=name,
        split="report",
        kind=kind,
        citation=citation,
        summary=summary,
        settings=MappingProxyType(dict(settings)),
        stateful=trigger_class is not None,
        make_trigger=make,
        builder=builder if builder is not None else _static(make),
        trigger_class=trigger_class,
    )


_BADNETS = dev.DEV_CITATIONS["badnets"]
_BLENDED = dev.DEV_CITATIONS["blended"]
_FIXED_DEV_CITATIONS = {
    "pixels": _BADNETS + " (the pixel backdoor, spread over the image)",
    "random_location": "Salem, Wen, Backes, Ma, Zhang. Dynamic Backdoor Attacks Against Machine Learning "
    "Models. IEEE EuroS&P 2022 (Random Backdoor: a trigger at a random location per input)",
    "reflection": reflection.CITATION,
    "poison_ink": edges.CITATION,
}


def _checker(s: Settings) -> Trigger:
    return PatchTrigger(
        pattern=checkerboard(int(s["size"])), top=int(s["top"]), left=int(s["left"]), name="badnets_checker"
    )


def _random_patch(s: Settings) -> Trigger:
    pattern = random_binary(int(s["size"]), seed=int(s["pattern_seed"]))
    return PatchTrigger(pattern=pattern, top=int(s["top"]), left=int(s["left"]), name="badnets_random")


def _trojan_initial(s: Settings) -> Trigger:
    import torch

    size = int(s["size"])
    pattern = torch.rand(1, size, size, generator=torch.Generator().manual_seed(0))
    return optimized_patch.OptimizedPatch(
        pattern=pattern, top=int(s["top"]), left=int(s["left"]), name="trojannn"
    )


_ATTACKS: list[ZooAttack] = [
    _dev("badnets", "3x3 white square in the bottom-right corner (backdoors.BadNets)"),
    _dev("blended", "seeded uniform noise blended at alpha 0.2 (backdoors.Blended)"),
    _dev("sig", "horizontal sinusoid, amplitude 0.1, 6 periods (backdoors.SIG)"),
    _dev("wanet", "k=4 warp, strength 1 px, no noise mode (backdoors.WaNet)"),
    _dev(
        "badencoder",
        "BadNets patch planted into a supervised FMNISTNet backbone (backdoors.plant_feature_backdoor)",
    ),
    _fixed_dev(
        "pixels",
        "12 white pixels at fixed random positions (seed 17), 1 px from the border",
        {"count": 12, "position_seed": 17},
        lambda s: sparse.ScatteredPixels(count=int(s["count"]), position_seed=int(s["position_seed"])),
    ),
    _fixed_dev(
        "random_location",
        "4x4 fixed random binary pattern (seed 11) at a position chosen per image by its content",
        {"size": 4, "pattern_seed": 11},
        lambda s: sparse.RandomLocationPatch(
            pattern=random_binary(int(s["size"]), seed=int(s["pattern_seed"]))
        ),
    ),
    ZooAttack(
        name="adversarial_patch",
        split="dev",
        kind="poison",
        citation=adversarial_patch.CITATION,
        summary="4x4 patch at rows 12-15, columns 22-25 optimised on a clean surrogate toward the target "
        "class, then dirty-label poisoning of a model trained from scratch",
        settings=MappingProxyType(
            {"size": 4, "top": 12, "left": 22, "patch_steps": 200, "patch_images": 256}
        ),
        stateful=True,
        make_trigger=lambda s: adversarial_patch.initial_trigger(
            int(s["size"]), int(s["top"]), int(s["left"])
        ),
        builder=adversarial_patch.build_adversarial_patch,
        trigger_class=optimized_patch.OptimizedPatch,
    ),
    _fixed_dev(
        "reflection",
        "an out-of-focus procedural scene (5 seeded ellipses, blur 6% of the side) blended at alpha 0.15",
        {"alpha": 0.15, "seed": 23, "shapes": 5, "blur": 0.06},
        lambda s: reflection.ReflectionBlend(
            alpha=float(s["alpha"]), seed=int(s["seed"]), shapes=int(s["shapes"]), blur=float(s["blur"])
        ),
    ),
    ZooAttack(
        name="ban",
        split="dev",
        kind="poison",
        citation=generated_patch.CITATION,
        summary="a 4x4 pattern made per image by a generator from random noise, pasted at one of 4 seeded "
        "places; generator and model trained together",
        settings=MappingProxyType(
            {
                "size": 4,
                "noise_dim": 16,
                "hidden": 64,
                "positions": 4,
                "position_seed": 29,
                "lambda_div": 1.0,
            }
        ),
        stateful=True,
        make_trigger=lambda s: generated_patch.GeneratedPatch(
            size=int(s["size"]),
            noise_dim=int(s["noise_dim"]),
            hidden=int(s["hidden"]),
            positions=int(s["positions"]),
            position_seed=int(s["position_seed"]),
        ),
        builder=generated_patch.build_ban,
        trigger_class=generated_patch.GeneratedPatch,
    ),
    _fixed_dev(
        "poison_ink",
        "the image's own edges (the 4% of pixels with the largest Sobel gradient) set to white",
        {"density": 0.04, "strength": 1.0, "value": 1.0},
        lambda s: edges.InkedEdges(
            density=float(s["density"]), strength=float(s["strength"]), value=float(s["value"])
        ),
    ),
    _report(
        "badnets_checker",
        "poison",
        _BADNETS,
        "4x4 black/white checkerboard at rows 1-4, columns 1-4 (top-left area)",
        {"size": 4, "top": 1, "left": 1},
        _checker,
    ),
    _report(
        "badnets_random",
        "poison",
        _BADNETS,
        "5x5 fixed random binary pattern at rows 4-8, columns 18-22 (not a corner)",
        {"size": 5, "top": 4, "left": 18, "pattern_seed": 5},
        _random_patch,
    ),
    _report(
        "blended_image",
        "poison",
        _BLENDED,
        "procedural concentric-rings image blended at alpha 0.2",
        {"alpha": 0.2, "period": 0.25},
        lambda s: ImageBlend(alpha=float(s["alpha"]), period=float(s["period"])),
    ),
    _report(
        "wanet_noise",
        "poison",
        dev.DEV_CITATIONS["wanet"],
        f"k=4 warp, s={warps.WARP_STRENGTH} (paper units), noise mode with cross_ratio 2",
        {"k": 4, "s": warps.WARP_STRENGTH, "cross_ratio": 2.0, "flow_seed": 2021},
        lambda s: warps.NoisyWarp(k=int(s["k"]), s=float(s["s"]), seed=int(s["flow_seed"])),
        builder=warps.build_wanet_noise,
    ),
    _report(
        "lf",
        "poison",
        "Zeng, Park, Mao, Jia. Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective. ICCV 2021",
        "random pattern low-pass filtered to <= 3 cycles/image, L-inf 0.1, additive",
        {"eps": 0.1, "cutoff": 3, "pattern_seed": 3},
        lambda s: LowFrequency(eps=float(s["eps"]), cutoff=int(s["cutoff"]), seed=int(s["pattern_seed"])),
    ),
    _report(
        "bpp",
        "poison",
        "Wang, Zhai, Ma. BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via "
        "Image Quantization and Contrastive Adversarial Learning. CVPR 2022",
        "3-bit colour-depth squeezing with Floyd-Steinberg dithering (no contrastive negatives)",
        {"bits": 3},
        lambda s: BitDepthSqueeze(bits=int(s["bits"])),
    ),
    _report(
        "input_aware",
        "poison",
        "Nguyen, Tran. Input-Aware Dynamic Backdoor Attack. NeurIPS 2020",
        "per-image pattern and mask from conv generators, diversity loss, cross-trigger mode (10%)",
        {
            "width": 8,
            "mask_steps": 300,
            "density": 0.032,
            "lambda_norm": 100.0,
            "lambda_div": 1.0,
            "cross_rate": 0.1,
        },
        lambda s: dynamic.InputAwareTrigger(channels=1, width=int(s["width"]), seed=0),
        builder=dynamic.build_input_aware,
        trigger_class=dynamic.InputAwareTrigger,
    ),
    _report(
        "ssba",
        "poison",
        "Li, Li, Wu, Li, He, Lyu. Invisible Backdoor Attack with Sample-Specific Triggers. ICCV 2021",
        "per-image invisible residual (L-inf 0.05) from a briefly trained code-embedding encoder",
        {"bits": 16, "eps": 0.05, "width": 8, "encoder_steps": 1000},
        lambda s: sample_specific.SampleSpecificTrigger(
            channels=1, bits=int(s["bits"]), eps=float(s["eps"]), width=int(s["width"]), seed=0
        ),
        builder=sample_specific.build_ssba,
        trigger_class=sample_specific.SampleSpecificTrigger,
    ),
    _report(
        "filter",
        "poison",
        "Liu, Lee, Tao, Ma, Aafer, Zhang. ABS: Scanning Neural Networks for Back-doors by Artificial Brain "
        "Stimulation. ACM CCS 2019 (filter triggers)",
        "global faded-film tone curve (gamma 0.7, blacks 0.12, whites 0.95) with a vignette",
        {"gamma": 0.7, "lift": 0.12, "gain": 0.95, "vignette": 0.35},
        lambda s: ToneFilter(
            gamma=float(s["gamma"]),
            lift=float(s["lift"]),
            gain=float(s["gain"]),
            vignette=float(s["vignette"]),
        ),
    ),
    _report(
        "trojannn",
        "poison",
        "Liu, Ma, Aafer, Lee, Zhai, Wang, Zhang. Trojaning Attack on Neural Networks. NDSS 2018",
        "5x5 patch at rows 21-25, columns 2-6 optimised to excite the 2 most-connected feature units, "
        "then poisoned fine-tuning",
        {
            "size": 5,
            "top": 21,
            "left": 2,
            "units": 2,
            "patch_steps": 200,
            "patch_images": 256,
            "retrain_epochs": 1,
        },
        _trojan_initial,
        builder=optimized_patch.build_trojannn,
        trigger_class=optimized_patch.OptimizedPatch,
    ),
    _report(
        "label_consistent",
        "clean_label",
        "Turner, Tsipras, Madry. Label-Consistent Backdoor Attacks. arXiv:1912.02771, 2019",
        "target-class images only, labels kept: PGD (L-inf 32/255) then a 3x3 checkerboard in the four "
        "corners (training amplitude reduced)",
        {"eps": 32 / 255, "pgd_steps": 10, "train_amplitude": 64 / 255, "surrogate_epochs": 1},
        lambda s: clean_label.corner_trigger(1.0),
        builder=clean_label.build_label_consistent,
    ),
    _report(
        "badencoder_simclr",
        "encoder",
        "Jia, Liu, Gong. BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning. "
        "IEEE S&P 2022; SimCLR: Chen, Kornblith, Norouzi, Hinton. ICML 2020",
        "SimCLR-pretrained backbone, BadEncoder planting with a white 5x5 plus at rows 1-5, columns 22-26",
        {
            "simclr_images": 20000,
            "simclr_epochs": 2,
            "simclr_batch": 256,
            "temperature": 0.5,
            "shadow_images": 10000,
            "references": 10,
            "plant_epochs": 2,
        },
        lambda s: encoder.plus_trigger(),
        builder=encoder.build_badencoder_simclr,
    ),
]

#: name -> ZooAttack, dev attacks first, then the report split.
ZOO: Mapping[str, ZooAttack] = MappingProxyType({a.name: a for a in _ATTACKS})


def get_attack(name: str) -> ZooAttack:
    """The registered attack ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if not isinstance(name, str) or name not in ZOO:
        raise ValueError(f"attack must be one of {sorted(ZOO)}; got {name!r}")
    return ZOO[name]


def attack_names(split: str | None = None) -> list[str]:
    """Registered names in table order, all or those of ``split`` (``"dev"`` or ``"report"``)."""
    if split is None:
        return list(ZOO)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} or None; got {split!r}")
    return [a.name for a in ZOO.values() if a.split == split]


def select(spec: str) -> list[str]:
    """Comma-separated names and groups (``all``, ``dev``, ``report``) -> names in table order, no repeats.

    Raises:
        ValueError: an unknown item (the message names it and lists the valid choices).
    """
    if not isinstance(spec, str) or not spec.strip(" ,"):
        raise ValueError(f"attacks must be 'all', 'dev', 'report' or comma-separated names; got {spec!r}")
    wanted: set[str] = set()
    bad = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            wanted.update(ZOO)
        elif item in SPLITS:
            wanted.update(attack_names(item))
        elif item in ZOO:
            wanted.add(item)
        else:
            bad.append(item)
    if bad:
        raise ValueError(
            f"unknown attack(s) {bad}; choose 'all', 'dev', 'report' or names from {sorted(ZOO)}"
        )
    return [n for n in ZOO if n in wanted]


def resolve_settings(attack: ZooAttack, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The attack's default settings with ``overrides`` applied.

    Raises:
        ValueError: an override key the attack does not have, or a value of the wrong type (both named).
    """
    settings = dict(attack.settings)
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(
                f"{attack.name} has no setting {key!r}; valid settings: {sorted(settings) or 'none'}"
            )
        default = settings[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and not isinstance(default, bool):
            ok = ok and float(value).is_integer()
        if not ok:
            raise ValueError(
                f"{attack.name} setting {key!r} must be a number like {default!r}; got {value!r}"
            )
        settings[key] = type(default)(value)
    return settings


def test_trigger(name: str, *, settings: Mapping[str, Any] | None = None) -> Trigger:
    """The test-time trigger of ``name`` built from its settings.

    For a stateful attack (``adversarial_patch``, ``ban``, ``input_aware``, ``ssba``, ``trojannn``) this is
    the *untrained* initial trigger (shape and range are right, the backdoor is not in it): use the
    trigger a build returns, or ``load_trigger`` on the file saved next to the model.
    """
    attack = get_attack(name)
    return attack.make_trigger(resolve_settings(attack, settings))


test_trigger.__test__ = False  # not a pytest test despite the name


def load_trigger(path: str | os.PathLike[str], *, attack: str | None = None) -> ZooTrigger:
    """Rebuild a stateful trigger saved by ``base.save_trigger``.

    Args:
        path: the trigger file.
        attack: when given, the file must belong to this attack.

    Raises:
        ValueError: not a trigger file, another attack's, or an attack without saved state.
    """
    payload = read_trigger_file(path)
    name = payload.get("attack")
    if attack is not None and name != attack:
        raise ValueError(f"{str(path)!r} holds the trigger of {name!r}, not of {attack!r}")
    spec = get_attack(name)
    if spec.trigger_class is None:
        raise ValueError(f"{name!r} has no saved trigger state (its trigger is fixed by its settings)")
    return spec.trigger_class.from_state(dict(payload["config"]), dict(payload["state"]))
