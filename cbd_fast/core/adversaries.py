"""Adversaries used inside the CBD loop (step 2: evoke the backdoor), as a small registry.

``PurifyConfig.adversary`` names an entry of :data:`ADVERSARIES`. An adversary receives an
:class:`AttackInputs` (clean batch, clean anchors, sample indices, epoch, ...) and returns the
detached adversarial batch. Adding a candidate is one class:

    >>> from cbd_fast.core.adversaries import Adversary, register_adversary
    >>> @register_adversary("noise")                                         # doctest: +SKIP
    ... class UniformNoise(Adversary):
    ...     def __call__(self, inp):
    ...         u = per_sample_uniform(inp.indices, inp.x.shape[1:], seed=inp.config.seed, epoch=inp.epoch)
    ...         return random_start(inp.x, u, inp.config.epsilon)

An adversary's own settings are declared in its ``OPTIONS`` (name -> :class:`Option`: default, type,
range) and set with ``PurifyConfig(adversary_options={...})``; unknown keys and bad values are rejected
when the config is validated.

Randomness is drawn per sample from (seed, epoch, sample index) by :func:`per_sample_uniform`, a
counter-based hash evaluated on the images' device: the same sample gets the same random start
whatever the batch composition, the number of ranks or the device, so distributed runs and resumed
runs reproduce single-process ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from cbd_fast.core.registry import instantiate, registrar

if TYPE_CHECKING:  # pragma: no cover
    from cbd_fast.core.config import PurifyConfig

__all__ = [
    "AttackInputs",
    "Adversary",
    "Option",
    "ADVERSARIES",
    "register_adversary",
    "make_adversary",
    "per_sample_uniform",
    "random_start",
]


@dataclass
class AttackInputs:
    """What an adversary may use, for one batch.

    Attributes:
        encoder: the module being purified, mapping images [B, C, H, W] to features [B, D] (already
            flattened; NOT wrapped in DDP). The adversary must leave its flags and requires_grad as
            it found them (``cbd_fast.core.attack.contrastive_pgd`` does).
        x: [B, C, H, W] float clean images in [0, 1] on the device (this rank's slice).
        clean_features: [B_global, D] float32 clean anchors f_theta(x) (no gradient; gathered over
            ranks when distributed, with this rank's rows at its offset).
        indices: [B] int64 sample indices on the device, the key of the per-sample randomness.
        epoch: 0-based epoch.
        gather: None in one process; when distributed, [B, D] -> [B_global, D] all-gather that keeps
            the local rows' gradient path (for the attack's features).
        config: the run's PurifyConfig (epsilon, step_size, steps, temperature, backend, seed...).
        rank: this rank's index (0 in one process): its anchors are ``clean_features[rank*B:(rank+1)*B]``
            (every rank holds the same B), see :attr:`local_clean_features`.
    """

    encoder: nn.Module
    x: torch.Tensor
    clean_features: torch.Tensor
    indices: torch.Tensor
    epoch: int
    gather: Callable[[torch.Tensor], torch.Tensor] | None
    config: PurifyConfig
    rank: int = 0

    @property
    def local_clean_features(self) -> torch.Tensor:
        """[B, D] the anchors of this rank's own images (all of ``clean_features`` in one process)."""
        b = self.x.shape[0]
        return self.clean_features[self.rank * b : (self.rank + 1) * b]

    def part(self, lo: int, hi: int, *, global_negatives: bool) -> AttackInputs:
        """The inputs restricted to this rank's rows ``lo:hi`` (a sub-attack on part of the batch).

        Args:
            lo, hi: 0 <= lo <= hi <= B, the same on every rank.
            global_negatives: keep ``gather`` and, as anchors, rows ``lo:hi`` of EVERY rank's slice
                (rank-major, matching what ``gather`` returns for the part's features): the part's
                loss then uses all ranks' parts as negatives. False: local anchors, ``gather=None``
                (for sub-attacks whose state is rank-local). Identical in one process.
        """
        b = self.x.shape[0]
        if global_negatives and self.gather is not None:
            world = self.clean_features.shape[0] // b
            anchors = self.clean_features.view(world, b, -1)[:, lo:hi].reshape(world * (hi - lo), -1)
            gather = self.gather
        else:
            anchors, gather = self.local_clean_features[lo:hi], None
        return AttackInputs(
            encoder=self.encoder,
            x=self.x[lo:hi],
            clean_features=anchors,
            indices=self.indices[lo:hi],
            epoch=self.epoch,
            gather=gather,
            config=self.config,
            rank=self.rank if gather is not None else 0,
        )


@dataclass(frozen=True)
class Option:
    """One setting of an adversary (a key of ``PurifyConfig.adversary_options``).

    Attributes:
        default: the value when the user gives none (None: derived at run time, see ``doc``).
        kind: ``int`` or ``float`` (ints are accepted for floats).
        minimum: inclusive lower bound.
        maximum: inclusive upper bound (None: unbounded).
        doc: one line for the docs and the error messages.
    """

    default: Any
    kind: type
    minimum: float
    maximum: float | None = None
    doc: str = ""

    def check(self, adversary: str, key: str, value: Any) -> Any:
        """``value`` as ``kind``; TypeError/ValueError naming the adversary, the key and the value."""
        where = f"adversary_options[{key!r}] of adversary {adversary!r}"
        if value is None and self.default is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind is int and isinstance(value, float):
            ok = ok and value.is_integer()
        if not ok:
            raise TypeError(
                f"{where} must be {'an integer' if self.kind is int else 'a real number'}; got {value!r}"
            )
        value = self.kind(value)
        if value != value or value < self.minimum or (self.maximum is not None and value > self.maximum):
            hi = "" if self.maximum is None else f" and <= {self.maximum:g}"
            raise ValueError(f"{where} must be >= {self.minimum:g}{hi} ({self.doc}); got {value}")
        return value


class Adversary:
    """Base class: ``__call__(inputs) -> x_adv`` (detached, same shape/dtype/device as ``inputs.x``).

    Settings: a subclass declares its settings in ``OPTIONS`` (name -> :class:`Option`); the user sets
    them with ``PurifyConfig(adversary_options={...})`` and the instance reads them, defaults filled
    in, from ``self.options``.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, config: PurifyConfig) -> None:
        self.config = config
        self.options = self.check_options(getattr(config, "adversary_options", None))

    @classmethod
    def check_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """``OPTIONS``' defaults updated with ``options`` (a new dict; ``options`` is not modified).

        Raises:
            TypeError: ``options`` is not a dict or None, or a value has the wrong type.
            ValueError: a key the adversary does not have (the valid ones are listed) or a value out of
                range.
        """
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise TypeError(f"adversary_options must be a dict or None; got {type(options).__name__}")
        unknown = sorted(str(k) for k in options if k not in cls.OPTIONS)
        if unknown:
            valid = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(
                f"adversary_options {', '.join(map(repr, unknown))} not settings of adversary {cls.name!r}; "
                f"its settings: {valid}"
            )
        out = {k: opt.default for k, opt in cls.OPTIONS.items()}
        for k, v in options.items():
            out[k] = cls.OPTIONS[k].check(cls.name, k, v)
        cls.check_combination(out)
        return out

    @classmethod
    def check_combination(cls, options: dict[str, Any]) -> None:
        """Constraints between settings (ValueError naming them); none by default."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State kept across batches (e.g. a scanned patch, a persistent flow field) as plain data:
        tensors (CPU), numbers, strings, None, lists, dicts, what ``torch.load(weights_only=True)``
        reads. The loop saves it in every checkpoint so a resumed run continues exactly. Default:
        ``{}`` (a stateless adversary)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (tensors may arrive on the CPU).

        Args:
            state: a dict from :meth:`state_dict` of the same adversary class.
        """
        if state:
            raise ValueError(f"adversary {self.name!r} keeps no state; got state keys {sorted(state)}")


#: name -> Adversary subclass. ``PurifyConfig.adversary`` must be one of these keys.
ADVERSARIES: dict[str, type[Adversary]] = {}


#: Class decorator: ``@register_adversary(name)`` adds an Adversary subclass to ADVERSARIES.
register_adversary: Callable[[str], Callable[[type[Adversary]], type[Adversary]]] = registrar(
    ADVERSARIES, Adversary, "an adversary"
)


def make_adversary(config: PurifyConfig) -> Adversary:
    """Instantiate the adversary ``config.adversary`` names (ValueError listing registered names)."""
    return instantiate(ADVERSARIES, "adversary", config)  # type: ignore[return-value]


@register_adversary("pgd")
class ContrastivePGD(Adversary):
    """The paper's attack: uniform random start in the eps-ball (per sample), then K steps of signed
    gradient ascent on NT-Xent(f(x_adv), clean anchors) via ``cbd_fast.core.attack.contrastive_pgd``
    (input-only gradients, BatchNorm/dropout in eval mode)."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        from cbd_fast.core.attack import contrastive_pgd

        cfg = self.config
        x_init = None
        if cfg.epsilon > 0:
            u = per_sample_uniform(inp.indices, inp.x.shape[1:], seed=cfg.seed, epoch=inp.epoch)
            x_init = random_start(inp.x, u, cfg.epsilon)
        if cfg.steps == 0 or cfg.epsilon == 0 or cfg.step_size == 0:
            return (inp.x if x_init is None else x_init).detach()
        kwargs = {} if inp.gather is None else {"gather": inp.gather}
        return contrastive_pgd(
            inp.encoder,
            inp.x,
            inp.clean_features,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.steps,
            temperature=cfg.temperature,
            random_start=True,
            backend=cfg.backend,
            x_init=x_init,
            **kwargs,
        )


@register_adversary("none")
class NoAdversary(Adversary):
    """x_adv = x: CBD's loss without an attack, i.e. plain contrastive fine-tuning (a baseline)."""

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        return inp.x.detach()


def random_start(x: torch.Tensor, u: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``clamp(clamp(x + (2u - 1) * eps, x - eps, x + eps), 0, 1)`` computed in float32, in x's dtype.

    Args:
        x: [B, ...] float clean images in [0, 1].
        u: uniform [0, 1) noise of x's shape (float32, same device), e.g. from :func:`per_sample_uniform`.
        epsilon: L-inf radius (>= 0).

    Returns:
        a new tensor like ``x`` (same dtype and memory format).
    """
    xf = x.float()
    y = xf + (2.0 * u - 1.0) * epsilon
    y = torch.clamp(torch.minimum(torch.maximum(y, xf - epsilon), xf + epsilon), 0.0, 1.0)
    fmt = (
        torch.channels_last
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    return y.to(x.dtype).contiguous(memory_format=fmt)


_MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2^32 for int64 ``a`` in [0, 2^32) and a constant ``b`` < 2^32, without int64 overflow."""
    lo, hi = b & 0xFFFF, b >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def per_sample_uniform(
    indices: torch.Tensor,
    sample_shape: torch.Size | tuple[int, ...],
    *,
    seed: int,
    epoch: int,
    stream: int = 0,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Uniform [0, 1) float32 noise per sample, a pure function of (seed, epoch, stream, index, element).

    Args:
        indices: [B] integer tensor of sample indices (>= 0) on the target device.
        sample_shape: the shape of one sample's noise, e.g. (C, H, W).
        seed: run seed (>= 0).
        epoch: 0-based epoch (>= 0).
        stream: an extra key to draw independent noises for the same sample (>= 0).
        chunk_elements: bound on the elements hashed at once (memory: ~5 int64 temporaries each).

    Returns:
        [B, *sample_shape] float32 tensor on ``indices.device``. On CPU each sample's row comes from a
        torch.Generator seeded with the sample's 32-bit key; on other devices from a counter-based hash
        evaluated there (24 random bits per value). Either way a sample's noise depends only on
        (seed, epoch, stream, index), not on the batch or rank it lands in; CPU and CUDA values differ.
    """
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex:
        raise ValueError(f"indices must be a 1-D integer tensor; got {indices.dtype} {tuple(indices.shape)}")
    dev = indices.device
    m = 1
    for s in sample_shape:
        m *= int(s)
    # 1. key_i = H(H(H(H(seed) ^ epoch) ^ stream) ^ index_lo ^ H(index_hi)): one 32-bit key per sample.
    k = _hash32(torch.full((1,), int(seed) & _MASK32, dtype=torch.int64, device=dev) ^ 0x5BD1E995)
    k = _hash32(k ^ (int(epoch) & _MASK32))
    k = _hash32(k ^ (int(stream) & _MASK32))
    idx = indices.to(torch.int64)
    key = _hash32(k ^ (idx & _MASK32) ^ _hash32((idx >> 32) & _MASK32))  # [B]
    shape = (indices.shape[0], *[int(s) for s in sample_shape])
    if dev.type == "cpu":
        return _generator_uniform(key, m).view(shape)
    return _hashed_uniform(key, m, chunk_elements).view(shape)


def _generator_uniform(key: torch.Tensor, m: int) -> torch.Tensor:
    """CPU: row i = torch.rand(m) from a generator seeded with key_i (seeding costs ~microseconds,
    much less than hashing every element with unfused int64 ops)."""
    out = torch.empty((key.shape[0], m), dtype=torch.float32)
    gen = torch.Generator()
    for r, ki in enumerate(key.tolist()):
        gen.manual_seed(int(ki) | (1 << 32))
        torch.rand((m,), generator=gen, out=out[r])
    return out


def _hashed_uniform(key: torch.Tensor, m: int, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Accelerators: a counter-based hash of (key_i, element j), evaluated on key's device in chunks."""
    dev = key.device
    out = torch.empty((key.shape[0], m), dtype=torch.float32, device=dev)
    rows = max(1, chunk_elements // max(m, 1))
    j = torch.arange(m, dtype=torch.int64, device=dev)
    jh = _hash32(_mul32(j, 0x9E3779B1) ^ 0x68E31DA4)  # 2. a per-element counter hash [M]
    for r0 in range(0, key.shape[0], rows):
        # 3. value_ij = H(H(key_i ^ jh_j) + key_i): two rounds over the pair.
        kk = key[r0 : r0 + rows, None]
        v = _hash32((_hash32(kk ^ jh[None, :]) + kk) & _MASK32)
        # 4. top 24 bits -> float32 in [0, 1) exactly representable.
        out[r0 : r0 + rows] = (v >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return out


# --- label-free searches for sample-agnostic triggers (issue 6; measurements in docs/results.md) ---

_PATCH_OPTIONS: dict[str, Option] = {
    "patch_size": Option(
        None, int, 1, doc="side k of the scanned square patches; None: max(3, min(H, W) / 10)"
    ),
    "patch_stride": Option(None, int, 1, doc="scan stride; None: at most 32 positions per axis"),
    "patch_candidates": Option(4, int, 1, doc="best-scoring patches kept, used round robin"),
    "patch_scan_images": Option(16, int, 1, doc="images of the first batch scored by the scan"),
}


@register_adversary("pgd_patch")
class PGDAndPatch(Adversary):
    """Per-sample contrastive PGD on one half of the batch, a universal patch adversary on the other.

    Triggers are sample-agnostic shortcuts of two kinds (``docs/results.md``): global ones (blends,
    signals, warps) that a per-sample L-inf attack of radius ``epsilon`` evokes, and local patches
    that no small L-inf ball reaches (a white patch on a black corner needs a change of 1.0). The
    patch half looks for the latter label-free: on its first call it scans constant ``k x k`` patches
    (black and white, every position with stride ``patch_stride``) over a few images and keeps the
    ``patch_candidates`` positions whose patch moves the features most (relative squared shift
    ``||f(x') - f(x)||^2 / ||f(x)||^2``; a patch trigger is a 100x outlier); then on every batch it
    pastes one of those patches (round robin) on its images and refines the patch's pixels, shared by
    the images, with ``steps`` signed-gradient steps of size 0.25 on NT-Xent(f(x'), clean anchors).

    Settings (``PurifyConfig.adversary_options``): ``patch_size``, ``patch_stride``,
    ``patch_candidates``, ``patch_scan_images`` and ``patch_fraction`` (share of the batch given to the
    patch half, default 0.5); see ``OPTIONS``. The scan runs once, on the first batch; the found
    patches, their refined pixels and the round-robin counter are the adversary's
    :meth:`state_dict`, saved in checkpoints, so a resumed run continues exactly (no rescan).

    Distributed: the PGD half uses global negatives (every rank's PGD half, via ``inputs.gather``),
    as the plain ``"pgd"`` adversary does. The patch half is rank-local: each rank scans its own
    first batch, refines its own patches against its own anchors, and the batch halves are taken
    per rank, so a multi-rank run does not reproduce a one-process run bit for bit (use
    ``adversary="pgd"`` for that). Checkpoints are written by rank 0, so a resumed multi-rank run
    continues every rank from rank 0's patches.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        **_PATCH_OPTIONS,
        "patch_fraction": Option(0.5, float, 0.0, 1.0, doc="share of each batch given to the patch half"),
    }

    def __init__(self, config: PurifyConfig) -> None:
        super().__init__(config)
        # the PGD half is the plain "pgd" adversary (the options here are not its settings)
        self._pgd = ContrastivePGD(dataclasses.replace(config, adversary="pgd", adversary_options=None))
        self._patches: list[tuple[int, int, torch.Tensor]] | None = None
        self._k = 0
        self._calls = 0
        self.scan_scores: list[tuple[float, int, int, float]] = []

    @torch.no_grad()
    def _scan(self, encoder: nn.Module, x: torch.Tensor) -> None:
        from cbd_fast.core.attack import attack_mode

        opt = self.options
        _, c, h, w = x.shape
        k = opt["patch_size"] if opt["patch_size"] is not None else max(3, round(min(h, w) / 10))
        k = max(1, min(k, h, w))
        stride = opt["patch_stride"] or max(1, (max(h, w) - k + 1) // 32)
        x = x[: opt["patch_scan_images"]].float()
        rows, cols = list(range(0, h - k + 1, stride)), list(range(0, w - k + 1, stride))
        with attack_mode(encoder):
            # 1. reference features of the clean images and their mean squared norm.
            z0 = encoder(x).flatten(1).float()
            den = z0.pow(2).sum(1).mean().clamp_min(1e-12)
            scores: list[tuple[float, int, int, float]] = []
            for val in (0.0, 1.0):
                for r in rows:
                    # 2. one forward for a whole row of patch positions: [len(cols) * n] images.
                    xs = x.unsqueeze(0).repeat(len(cols), 1, 1, 1, 1)
                    for j, q in enumerate(cols):
                        xs[j, :, :, r : r + k, q : q + k] = val
                    z = encoder(xs.flatten(0, 1)).flatten(1).float().view(len(cols), x.shape[0], -1)
                    # 3. score = relative squared feature shift, averaged over the images.
                    s = (z - z0).pow(2).sum(2).mean(1) / den
                    scores += [(float(s[j]), r, q, val) for j, q in enumerate(cols)]
        scores.sort(reverse=True)
        self.scan_scores = scores[:16]
        top = opt["patch_candidates"]
        self._patches = [
            (r, q, torch.full((1, c, k, k), val, device=x.device)) for _, r, q, val in scores[:top]
        ]
        self._k = k

    def _paste(self, x: torch.Tensor, r: int, q: int, p: torch.Tensor) -> torch.Tensor:
        k = self._k
        out = x.clone()
        out[:, :, r : r + k, q : q + k] = p.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``patches`` (None before the scan, else a list of {row, col, pixels [1, C, k, k] CPU}),
        ``k``, ``calls`` (the round-robin counter) and ``scan_scores``."""
        patches = None
        if self._patches is not None:
            patches = [{"row": r, "col": q, "pixels": p.detach().cpu().clone()} for r, q, p in self._patches]
        return {
            "patches": patches,
            "k": self._k,
            "calls": self._calls,
            "scan_scores": [list(s) for s in self.scan_scores],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (the pixels move to the images' device on use)."""
        patches = state["patches"]
        self._patches = (
            None
            if patches is None
            else [(int(d["row"]), int(d["col"]), d["pixels"].clone()) for d in patches]
        )
        self._k = int(state["k"])
        self._calls = int(state["calls"])
        self.scan_scores = [(float(a), int(b), int(c), float(d)) for a, b, c, d in state["scan_scores"]]

    def _patch_attack(self, inp: AttackInputs, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        from cbd_fast.core.attack import attack_mode
        from cbd_fast.ops import nt_xent

        assert self._patches is not None
        i = self._calls % len(self._patches)
        r, q, p = self._patches[i]
        p = p.to(x.device)
        cfg = self.config
        with attack_mode(inp.encoder), torch.enable_grad():
            for _ in range(cfg.steps if x.shape[0] >= 2 else 0):
                p = p.detach().requires_grad_(True)
                z = inp.encoder(self._paste(x, r, q, p)).flatten(1).float()
                loss = nt_xent(z, anchors, cfg.temperature, backend=cfg.backend)
                (g,) = torch.autograd.grad(loss, p)
                # p <- clip(p + 0.25 * sign(g), 0, 1): the patch pixels are unbounded in [0, 1].
                p = (p.detach() + 0.25 * g.sign()).clamp(0.0, 1.0)
        self._patches[i] = (r, q, p.detach())
        return self._paste(x, r, q, p.detach()).detach()

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        b = inp.x.shape[0]
        if self._patches is None:
            self._scan(inp.encoder, inp.x)
        n_patch = int(round(b * self.options["patch_fraction"]))
        n_pgd = b - n_patch
        parts = []
        if n_pgd > 0:
            parts.append(self._pgd(inp.part(0, n_pgd, global_negatives=True)))
        if n_patch > 0:
            parts.append(self._patch_attack(inp, inp.x[n_pgd:], inp.local_clean_features[n_pgd:b]))
        self._calls += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]


@register_adversary("pgd_patch_warp")
class PGDPatchWarp(PGDAndPatch):
    """``pgd_patch`` plus a universal smooth-warp adversary; each batch is split PGD / patch / warp.

    Warping triggers (WaNet) move pixels instead of adding to them, which an L-inf ball reaches only
    partly. The warp part applies a flow field shared by its images: a ``4 x 4`` grid of 2-D
    displacements (pixels, each within ``+-warp_pixels``) upsampled bicubically to the image, sampled
    bilinearly. ``warp_restarts`` such fields persist across batches (seeded random starts from
    ``config.seed``) and take turns, one per batch; the batch's field takes ``warp_steps`` (None:
    ``config.steps``) signed-gradient steps of ``warp_pixels / 4`` on NT-Xent(f(x'), clean anchors).
    Several fields keep the fine-tuning from becoming invariant to one warp only. The fields are part
    of the :meth:`state_dict` (checkpointed).

    Split: ``patch_fraction`` (default 1/6) and ``warp_fraction`` (1/2) of each batch, rounded down,
    go to the patch and warp parts, the rest (1/3) to per-sample PGD; a lone PGD image (NT-Xent needs
    a negative) joins the warp part. Distributed: as ``pgd_patch`` (PGD part global, patch and warp
    parts rank-local).

    Measured defaults (``scripts/research/log.md``, 3 seeds per attack): ``warp_pixels`` 1.5 and 4
    fields, WaNet ASR 8.6% vs 13.1% with one field of 2 px (3 px fields: 20.9%; fresh per-batch or
    per-image starts: 21%; 10 steps: 8.5%; fresh fields every epoch: 14.6%); shares 1/3-1/6-1/2 instead
    of thirds: WaNet 6.9% vs 8.8%, Blended 4.5% vs 4.8%, BadNets 2.9% vs 2.4%; shares 0.3-0.1-0.6 cost
    BadNets (4.9%) for no WaNet gain (7.3%).
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        **_PATCH_OPTIONS,
        "warp_pixels": Option(1.5, float, 0.0, doc="bound of each flow control displacement, in pixels"),
        "warp_restarts": Option(4, int, 1, doc="persistent flow fields, used in turn"),
        "warp_steps": Option(None, int, 0, doc="signed-gradient steps per batch; None: config.steps"),
        "patch_fraction": Option(1 / 6, float, 0.0, 1.0, doc="share of each batch given to the patch part"),
        "warp_fraction": Option(1 / 2, float, 0.0, 1.0, doc="share of each batch given to the warp part"),
    }

    @classmethod
    def check_combination(cls, options: dict[str, Any]) -> None:
        """The patch and warp shares leave the rest of the batch to PGD: their sum must be <= 1."""
        total = options["patch_fraction"] + options["warp_fraction"]
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"adversary_options patch_fraction + warp_fraction of adversary {cls.name!r} must be <= 1; "
                f"got {options['patch_fraction']} + {options['warp_fraction']} = {total}"
            )

    def __init__(self, config: PurifyConfig) -> None:
        super().__init__(config)
        self._flow: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        """``pgd_patch``'s state plus ``flow`` (None before the first batch, else
        [warp_restarts, 2, 4, 4] float32 CPU)."""
        state = super().state_dict()
        state["flow"] = None if self._flow is None else self._flow.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        super().load_state_dict(state)
        flow = state["flow"]
        self._flow = None if flow is None else flow.clone()

    def _warp_apply(self, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Warp ``x`` [n, C, H, W] with ``flow`` [1, 2, g, g] (displacements in pixels, x then y)."""
        n, _, h, w = x.shape
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, h, device=x.device),
            torch.linspace(-1, 1, w, device=x.device),
            indexing="ij",
        )
        ident = torch.stack([xs, ys], -1)[None]
        scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=x.device)
        # 1. control displacements (pixels) -> dense field, 2. pixels -> normalised grid offsets.
        up = torch.nn.functional.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True)
        grid = (ident + up.permute(0, 2, 3, 1) * scale).clamp(-1, 1).expand(n, h, w, 2)
        # 3. bilinear resampling of every image with the same field.
        return torch.nn.functional.grid_sample(
            x.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=True
        ).to(x.dtype)

    def _warp_attack(self, inp: AttackInputs, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        from cbd_fast.core.attack import attack_mode
        from cbd_fast.ops import nt_xent

        cfg, opt = self.config, self.options
        smax, m = opt["warp_pixels"], opt["warp_restarts"]
        steps = cfg.steps if opt["warp_steps"] is None else opt["warp_steps"]
        if self._flow is None:
            g = torch.Generator().manual_seed(int(cfg.seed) + 7919)
            self._flow = ((torch.rand(m, 2, 4, 4, generator=g) * 2 - 1) * smax).to(x.device)
        i = self._calls % self._flow.shape[0]  # this batch's field
        flow = self._flow[i : i + 1].to(x.device)
        with attack_mode(inp.encoder), torch.enable_grad():
            for _ in range(steps if x.shape[0] >= 2 else 0):
                flow = flow.detach().requires_grad_(True)
                z = inp.encoder(self._warp_apply(x, flow)).flatten(1).float()
                loss = nt_xent(z, anchors, cfg.temperature, backend=cfg.backend)
                (g,) = torch.autograd.grad(loss, flow)
                flow = (flow.detach() + smax / 4 * g.sign()).clamp(-smax, smax)
        self._flow = self._flow.clone()
        self._flow[i : i + 1] = flow.detach().to(self._flow.device)
        return self._warp_apply(x, flow.detach()).detach()

    def __call__(self, inp: AttackInputs) -> torch.Tensor:
        b = inp.x.shape[0]
        n_patch = int(b * self.options["patch_fraction"] + 1e-9)
        n_warp = int(b * self.options["warp_fraction"] + 1e-9)
        if self._patches is None and n_patch > 0:
            self._scan(inp.encoder, inp.x)
        n_pgd = b - n_patch - n_warp
        if n_pgd == 1:  # NT-Xent needs a negative: a lone PGD image joins the warp (else patch) part
            n_pgd = 0
            if n_warp > 0 or n_patch == 0:
                n_warp += 1
            else:
                n_patch += 1
        parts = [self._pgd(inp.part(0, n_pgd, global_negatives=True))] if n_pgd > 0 else []
        local = inp.local_clean_features
        if n_patch > 0:
            sl = slice(n_pgd, n_pgd + n_patch)
            parts.append(self._patch_attack(inp, inp.x[sl], local[sl]))
        if n_warp > 0:
            sl = slice(n_pgd + n_patch, b)
            parts.append(self._warp_attack(inp, inp.x[sl], local[sl]))
        self._calls += 1
        return torch.cat(parts)
