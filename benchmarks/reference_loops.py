"""Plain-PyTorch CBD loops to measure cbd_fast against, and the encoder floor.

All loops implement ONE full CBD batch step with exactly the semantics of ``cbd_fast.Purifier.step``
under a given ``PurifyConfig`` (``docs/method.md``, section 3):

1. clean anchors ``c = f(x)`` (BN in eval mode, no gradient);
2. contrastive PGD from a random start: K times ``g = d NTXent(f(x_adv), c) / d x_adv``,
   ``x_adv <- clip(proj_eps(x_adv + alpha * sign(g)), 0, 1)`` (BN eval, dropout off);
3. fine-tune: ``NTXent(f(x_adv), f(x)) + clean_weight * clean_term`` with the fine-tune BN policy,
   one optimizer step.

They differ only in how the work is done:

``NaiveCBD``
    what a reader of the paper writes: fp32, ``loss.backward()`` inside PGD (so parameter gradients
    are computed and then zeroed), the clean anchors recomputed at every PGD step, an eager
    elementwise PGD update (add, min, max, clamp), NT-Xent with the full 2N x 2N score matrix and
    ``F.cross_entropy``.
``StrongCBD``
    the best plain PyTorch: parameters frozen during the attack and input-only gradients through
    ``torch.autograd.grad``, anchors once per batch and normalised once, a one-clamp PGD update with
    precomputed bounds, bf16 autocast + channels_last on CUDA, foreach optimizer, and optional
    ``torch.compile`` of the encoder, a CUDA graph of the whole step, or
    ``cbd_fast.ops.nt_xent_value_and_grad`` inside PGD (the "GPU options" measured one at a time).
``CbdFastLoop``
    ``cbd_fast.Purifier(config).prepare(encoder)`` + ``.step(x)``.
``EncoderFloor``
    only the encoder passes the step cannot avoid, timed alone: anchors forward, K forwards + K
    input-only backwards, the frozen original's forward when the clean term needs it, and the
    fine-tune forward of both views + parameter backward (no loss, no PGD update, no optimizer).

Every loop has ``prepare(encoder) -> self`` (works on a deep copy; the caller's module is untouched)
and ``step(x, x_init=None, x_adv=None) -> dict[str, Tensor]`` returning on-device 0-dim float32
tensors ``{"loss", "attack_loss"}`` (``"attack_loss"``: NT-Xent between the fine-tune's features of
the adversarial images and the anchors). ``x_init`` fixes the random start (for the agreement check);
otherwise each loop draws it like ``cbd_fast.ops.pgd_init`` from its own generator. ``x_adv``, when
given, replaces the attack's result in the fine-tune (the attack still runs); after every step
``last_attack_x_adv`` holds what the loop's own attack produced. ``EncoderFloor`` has neither.

``check_agreement`` runs the loops from the same weights, data and random starts and compares each
with ``NaiveCBD``: end to end (loss curves, weight update), and, for a loop that fails that, the
attack and the fine-tune apart (the split check, see ``TOLERANCES``): float rounding that flips a
few PGD signs is told apart from another algorithm.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoopSettings",
    "NaiveCBD",
    "StrongCBD",
    "CbdFastLoop",
    "EncoderFloor",
    "naive_nt_xent",
    "strong_nt_xent",
    "make_loop",
    "LOOP_NAMES",
    "TOLERANCES",
    "check_agreement",
    "CLEAN_TERMS_SUPPORTED",
    "NO_REFERENCE",
]


#: clean terms of ``cbd_fast.core.clean_terms`` the reference loops implement.
CLEAN_TERMS_SUPPORTED = ("none", "feature_consistency", "anchor")


def _clean_weight(config: Any) -> float:
    """The clean weight a headless ``cbd_fast`` run uses (``"auto"`` resolved; 0 when absent)."""
    if hasattr(config, "loss_weights"):
        return float(config.loss_weights(False)[1])
    return float(getattr(config, "clean_weight", 0.0))


def _pull_ratio(config: Any) -> float:
    extra = getattr(config, "extra", None) or {}
    if "pull_ratio" in extra:
        return float(extra["pull_ratio"])
    try:
        from cbd_fast.core.clean_terms import CLEAN_TERMS

        return float(getattr(CLEAN_TERMS.get("anchor"), "pull_ratio", 0.3))
    except ImportError:
        return 0.3


# ----------------------------------------------------------------------------------------------------
# Settings: the part of PurifyConfig a batch step depends on
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoopSettings:
    """The hyper-parameters of one CBD batch step, resolved for a device.

    Attributes:
        epsilon, step_size, steps, temperature: the attack (L-inf radius, PGD alpha, K, tau).
        lr, momentum, weight_decay, optimizer: the fine-tune optimizer ("sgd", "adam", "adamw").
        clean_term: one of ``CLEAN_TERMS_SUPPORTED`` ("none", "feature_consistency", "anchor").
        clean_weight: weight of the clean term.
        pull_ratio: weight of the adversarial half of the "anchor" term.
        bn_policy: fine-tune BatchNorm mode: "train", "eval" or "frozen".
        amp_dtype: autocast dtype for the encoder's passes, or None for float32.
        channels_last: run the encoder and images in channels_last.
        device: where the step runs.
        seed: seeds each loop's own random-start generator.
    """

    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 5
    temperature: float = 0.5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    clean_term: str = "feature_consistency"
    clean_weight: float = 1.0
    pull_ratio: float = 0.3
    bn_policy: str = "eval"
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    device: torch.device = torch.device("cpu")
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any, device: torch.device | str) -> LoopSettings:
        """Settings equal to what ``cbd_fast.Purifier(config)`` does on ``device``.

        Args:
            config: a ``cbd_fast.PurifyConfig`` (or any object with its field names).
            device: the device the loops run on; resolves ``amp_dtype``/``channels_last`` "auto"
                (bf16 + channels_last on CUDA, float32 + contiguous on CPU).
        """
        device = torch.device(device)
        cuda = device.type == "cuda"
        amp = getattr(config, "amp_dtype", "auto")
        amp_dtype = {
            "auto": torch.bfloat16 if cuda else None,
            "float32": None,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[amp]
        cl = getattr(config, "channels_last", "auto")
        return cls(
            epsilon=float(config.epsilon),
            step_size=float(config.step_size),
            steps=int(config.steps),
            temperature=float(config.temperature),
            lr=float(config.lr),
            momentum=float(getattr(config, "momentum", 0.0)),
            weight_decay=float(getattr(config, "weight_decay", 0.0)),
            optimizer=str(getattr(config, "optimizer", "sgd")),
            clean_term=str(getattr(config, "clean_term", "none")),
            clean_weight=_clean_weight(config),
            pull_ratio=_pull_ratio(config),
            bn_policy=str(getattr(config, "bn_policy", "train")),
            amp_dtype=amp_dtype,
            channels_last=bool(cuda if cl == "auto" else cl),
            device=device,
            seed=int(getattr(config, "seed", 0)),
        )

    def check_supported(self) -> None:
        """ValueError when the reference loops do not implement a setting."""
        if self.clean_term not in CLEAN_TERMS_SUPPORTED:
            raise ValueError(
                f"clean_term must be one of {CLEAN_TERMS_SUPPORTED} for the reference loops; "
                f"got {self.clean_term!r}"
            )
        if self.bn_policy not in ("train", "eval", "frozen"):
            raise ValueError(f"bn_policy must be 'train', 'eval' or 'frozen'; got {self.bn_policy!r}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw'; got {self.optimizer!r}")


# ----------------------------------------------------------------------------------------------------
# NT-Xent, two ways
# ----------------------------------------------------------------------------------------------------
def naive_nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent as SimCLR implementations write it: the full 2N x 2N logits and a cross entropy.

    Args:
        a: [N, D] float features of view one. b: [N, D] features of view two (row i is the positive
        of row i of ``a``). temperature: tau > 0.

    Returns:
        0-dim float32 tensor: mean over the 2N rows of ``logsumexp_{j != i} s_ij - s_{i, p(i)}``.
    """
    n = a.shape[0]
    z = F.normalize(torch.cat([a, b], dim=0).float(), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def strong_nt_xent(
    a: torch.Tensor, b: torch.Tensor, temperature: float, *, b_normalized: bool = False
) -> torch.Tensor:
    """NT-Xent with fewer passes: normalise once, one matmul, diagonal filled in place.

    Args:
        a: [N, D] float features of view one. b: [N, D] features of view two. temperature: tau > 0.
        b_normalized: ``b`` is already L2-normalised float32 (the anchors, normalised once per batch).

    Returns:
        0-dim float32 tensor, equal to ``naive_nt_xent`` up to float32 rounding.
    """
    a = F.normalize(a.float(), dim=1)
    b = b.float() if b_normalized else F.normalize(b.float(), dim=1)
    u = torch.cat([a, b], dim=0)
    s = torch.mm(u, u.t()).mul_(1.0 / temperature)
    s.fill_diagonal_(float("-inf"))
    # positives: s_{i, i+N} = s_{i+N, i} = <a_i, b_i> / tau, each counted twice over the 2N rows
    pos = (a * b).sum(dim=1).mean() * (1.0 / temperature)
    return torch.logsumexp(s, dim=1).mean() - pos


# ----------------------------------------------------------------------------------------------------
# Helpers shared by the loops
# ----------------------------------------------------------------------------------------------------
def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _set_finetune_mode(model: nn.Module, bn_policy: str) -> None:
    """Train mode for everything (dropout on), BatchNorm per ``bn_policy``."""
    model.train()
    if bn_policy in ("eval", "frozen"):
        for m in _bn_modules(model):
            m.eval()


def _finetune_params(model: nn.Module, bn_policy: str) -> list[nn.Parameter]:
    """The parameters the fine-tune step trains (BN affine weights excluded when "frozen")."""
    if bn_policy != "frozen":
        return list(model.parameters())
    frozen = {id(p) for m in _bn_modules(model) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) not in frozen]


def _make_optimizer(params: list[nn.Parameter], s: LoopSettings, *, fast: bool) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"foreach": True} if fast else {"foreach": False}
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, **kw)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, **kw)


def _random_start(x: torch.Tensor, s: LoopSettings, generator: torch.Generator) -> torch.Tensor:
    """``clamp(clamp(x + U(-eps, eps), x - eps, x + eps), 0, 1)`` like ``cbd_fast.ops.pgd_init``."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    y = x.float() + (2.0 * noise - 1.0) * s.epsilon
    y = torch.clamp(torch.clamp(y, x.float() - s.epsilon, x.float() + s.epsilon), 0.0, 1.0)
    return y.to(x.dtype)


def _generator(s: LoopSettings) -> torch.Generator:
    g = torch.Generator(device=s.device)
    g.manual_seed(s.seed)
    return g


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Loop:
    """Common state: the encoder copy, the frozen original (clean term), optimizer, generator."""

    name = "loop"

    def __init__(self, settings: LoopSettings) -> None:
        settings.check_supported()
        self.s = settings
        self.model: nn.Module | None = None
        self.original: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator: torch.Generator | None = None

    def _prepare_common(self, encoder: nn.Module, *, fast: bool) -> None:
        s = self.s
        model = copy.deepcopy(encoder).to(s.device)
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(True)
        self.model = model
        if s.clean_term in ("feature_consistency", "anchor"):
            original = copy.deepcopy(model).eval()
            for p in original.parameters():
                p.requires_grad_(False)
            self.original = original
        params = _finetune_params(model, s.bn_policy)
        if s.bn_policy == "frozen":
            kept = {id(p) for p in params}
            for p in model.parameters():
                if id(p) not in kept:
                    p.requires_grad_(False)
        self.params = params
        self.optimizer = _make_optimizer(params, s, fast=fast)
        self.generator = _generator(s)

    def _clean_term(
        self, z_clean: torch.Tensor, z_adv: torch.Tensor, x: torch.Tensor, autocast: Callable[[], Any]
    ) -> torch.Tensor:
        """The clean-behaviour terms of ``cbd_fast.core.clean_terms`` against the frozen original f0:
        "feature_consistency": sum ||f(x) - f0(x)||^2 / sum ||f0(x)||^2;
        "anchor": (sum ||f(x) - f0(x)||^2 + pull_ratio * sum ||f(x_adv) - f0(x)||^2) / sum ||f0(x)||^2."""
        assert self.original is not None
        with torch.no_grad(), autocast():
            z0 = self.original(x).float()
        num = (z_clean.float() - z0).pow(2).sum()
        if self.s.clean_term == "anchor":
            num = num + self.s.pull_ratio * (z_adv.float() - z0).pow(2).sum()
        return num / z0.pow(2).sum().clamp_min(1e-12)

    def run(self, x: torch.Tensor) -> None:
        """One step followed by a device synchronisation (what the benchmarks time)."""
        self.step(x)
        _sync(self.s.device)


# ----------------------------------------------------------------------------------------------------
# (a) naive
# ----------------------------------------------------------------------------------------------------
class NaiveCBD(_Loop):
    """CBD as a reader of the paper writes it in plain PyTorch (fp32 throughout, see module doc)."""

    name = "naive"

    def prepare(self, encoder: nn.Module) -> NaiveCBD:
        """Take a deep copy of ``encoder`` (an ``nn.Module`` images -> [N, D]) to purify."""
        self._prepare_common(encoder, fast=False)
        return self

    def step(
        self, x: torch.Tensor, x_init: torch.Tensor | None = None, x_adv: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One CBD batch step on ``x`` ([N, C, H, W] float in [0, 1] on the device).

        ``x_adv`` (optional, like ``x``): fine-tune on these adversarial images instead of the
        attack's; the attack still runs and its result is kept in ``last_attack_x_adv``.
        """
        s, model, opt = self.s, self.model, self.optimizer
        assert model is not None and opt is not None
        eps, alpha = s.epsilon, s.step_size
        forced, x_adv = x_adv, None
        # attack: BN (and dropout) in eval mode
        model.eval()
        if x_init is None:
            x_adv = x + (torch.rand(x.shape, generator=self.generator, device=x.device) * 2 - 1) * eps
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0, 1)
        else:
            x_adv = x_init.clone()
        clean = None
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            clean = model(x).detach()  # the anchors, recomputed at every step
            loss = naive_nt_xent(model(x_adv), clean, s.temperature)
            opt.zero_grad()
            loss.backward()  # parameter gradients too (then thrown away)
            x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
            x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
            x_adv = torch.clamp(x_adv, 0, 1)
        if clean is None:  # K = 0: the anchors are still needed for the attack loss
            clean = model(x).detach()
        self.last_attack_x_adv = x_adv.detach()
        if forced is not None:
            x_adv = _like(x_adv, forced)
        opt.zero_grad()
        # fine-tune
        _set_finetune_mode(model, s.bn_policy)
        b = x.shape[0]
        zz = model(torch.cat([x_adv.detach(), x]))  # one forward of both views (BN "train": joint stats)
        z_adv, z = zz[:b], zz[b:]
        loss = naive_nt_xent(z_adv, z, s.temperature)
        if s.clean_term != "none":
            loss = loss + s.clean_weight * self._clean_term(z, z_adv, x, _no_autocast)
        with torch.no_grad():  # the contrastive loss the attack reached, at the final x_adv
            attack_loss = naive_nt_xent(z_adv, clean, s.temperature)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return {"loss": loss.detach(), "attack_loss": attack_loss}


# ----------------------------------------------------------------------------------------------------
# (b) strong
# ----------------------------------------------------------------------------------------------------
class StrongCBD(_Loop):
    """The best plain-PyTorch CBD step (see module doc).

    Args:
        settings: the step's hyper-parameters (``amp_dtype`` and ``channels_last`` are honoured).
        compile: ``torch.compile`` the encoder (one compiled module serves both modes).
        cuda_graph: capture the whole step (anchors, PGD, fine-tune, optimizer) in one CUDA graph on
            the first call with a given shape and replay it after (CUDA only, static shapes; SGD).
        value_and_grad: use ``cbd_fast.ops.nt_xent_value_and_grad`` for the PGD loss and its
            feature gradient (one fused pass) when it exists.
        reuse_clean_forward: record the fine-tune's clean forward f(x) BEFORE the attack and take
            the anchors from its value (one encoder forward less per batch). Exact only when the
            fine-tune mode computes what eval mode computes (bn_policy "eval"/"frozen", no dropout):
            raises ValueError for bn_policy "train". Peak memory is unchanged (2B activations
            either way). A prototype of a loop-level saving, not part of the strong baseline.
    """

    name = "strong"

    def __init__(
        self,
        settings: LoopSettings,
        *,
        compile: bool = False,
        cuda_graph: bool = False,
        value_and_grad: bool = False,
        reuse_clean_forward: bool = False,
    ) -> None:
        super().__init__(settings)
        if reuse_clean_forward and settings.bn_policy == "train":
            raise ValueError("reuse_clean_forward=True needs bn_policy 'eval' or 'frozen'; got 'train'")
        self.reuse = reuse_clean_forward
        if cuda_graph and settings.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device; got {settings.device}")
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.value_and_grad = None
        if value_and_grad:
            from cbd_fast import ops

            fn = getattr(ops, "nt_xent_value_and_grad", None)
            if fn is None:
                raise RuntimeError("cbd_fast.ops.nt_xent_value_and_grad does not exist")
            self.value_and_grad = fn
        self._graph: Any = None

    def prepare(self, encoder: nn.Module) -> StrongCBD:
        """Take a deep copy of ``encoder`` (an ``nn.Module`` images -> [N, D]) to purify."""
        self._prepare_common(encoder, fast=True)
        self.forward = torch.compile(self.model) if self.compile else self.model
        return self

    def _autocast(self) -> Any:
        s = self.s
        if s.amp_dtype is None:
            return _no_autocast()
        # CUDA graphs need autocast's weight-cast cache off (a cached cast would be baked in).
        return torch.autocast(s.device.type, dtype=s.amp_dtype, cache_enabled=not self.cuda_graph)

    def step(
        self, x: torch.Tensor, x_init: torch.Tensor | None = None, x_adv: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One CBD batch step on ``x`` ([N, C, H, W] float in [0, 1] on the device).

        ``x_adv`` (optional, like ``x``): fine-tune on these adversarial images instead of the
        attack's; the attack still runs and its result is kept in ``last_attack_x_adv``. Not with
        ``cuda_graph`` (NotImplementedError: the captured step has no such input).
        """
        if x_adv is not None and self.cuda_graph:
            raise NotImplementedError("a CUDA-graphed step cannot fine-tune on a forced x_adv")
        if self.s.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x_init is None:
            x_init = _random_start(x, self.s, self.generator)
        elif self.s.channels_last and x_init.dim() == 4:
            x_init = x_init.contiguous(memory_format=torch.channels_last)
        if self.cuda_graph:
            return self._graphed_step(x, x_init)
        return self._step(x, x_init, x_adv)

    def _step(
        self, x: torch.Tensor, x_init: torch.Tensor, forced: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        s, model, opt, f = self.s, self.model, self.optimizer, self.forward
        assert model is not None and opt is not None
        # bounds of the projection, once per batch: clip(proj_eps(y), 0, 1) == clamp(y, lo, hi)
        lo = (x - s.epsilon).clamp_(min=0.0)
        hi = (x + s.epsilon).clamp_(max=1.0)
        # 1. anchors once, normalised once; attack in eval mode with frozen parameters
        z_live = None
        if self.reuse:  # the fine-tune's clean forward, recorded now (eval-equal mode): anchors = its value
            _set_finetune_mode(model, s.bn_policy)
            with self._autocast():
                z_live = f(x).float()
            anchors = F.normalize(z_live.detach(), dim=1)
        model.eval()
        for p in self.params:
            p.requires_grad_(False)
        if z_live is None:
            with torch.no_grad(), self._autocast():
                anchors = F.normalize(f(x).float(), dim=1)
        # 2. PGD with input-only gradients
        x_adv = x_init.clone()
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            with self._autocast():
                z = f(x_adv)
            if self.value_and_grad is not None:
                _, gz = self.value_and_grad(z.float(), anchors, s.temperature)
                (g,) = torch.autograd.grad(z, x_adv, grad_outputs=gz.to(z.dtype))
            else:
                loss = strong_nt_xent(z, anchors, s.temperature, b_normalized=True)
                (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = torch.clamp(x_adv.detach().add_(g.sign_(), alpha=s.step_size), lo, hi)
        for p in self.params:
            p.requires_grad_(True)
        self.last_attack_x_adv = x_adv
        if forced is not None:
            x_adv = _like(x_adv, forced)
        # 3. fine-tune
        _set_finetune_mode(model, s.bn_policy)
        b = x.shape[0]
        if z_live is not None:
            with self._autocast():
                z_adv = f(x_adv).float()
            z = z_live
        else:
            with self._autocast():
                zz = f(torch.cat([x_adv, x])).float()  # one forward of both views
            z_adv, z = zz[:b], zz[b:]
        loss = strong_nt_xent(z_adv, z, s.temperature)
        if s.clean_term != "none":
            loss = loss + s.clean_weight * self._clean_term(z, z_adv, x, self._autocast)
        with torch.no_grad():  # the contrastive loss the attack reached, at the final x_adv
            attack_loss = strong_nt_xent(z_adv, anchors, s.temperature, b_normalized=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "attack_loss": attack_loss}

    def _graphed_step(self, x: torch.Tensor, x_init: torch.Tensor) -> dict[str, torch.Tensor]:
        key = (tuple(x.shape), x.dtype, x.stride())
        if self._graph is None or self._graph[0] != key:
            static_x, static_init = x.clone(), x_init.clone()
            model, opt = self.model, self.optimizer
            assert model is not None and opt is not None
            # The warm-up steps below really train: remember the state to put it back afterwards.
            state = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
            momenta = {
                p: opt.state[p]["momentum_buffer"].clone()
                for p in self.params
                if opt.state.get(p, {}).get("momentum_buffer") is not None
            }
            # warm up on a side stream (allocator, cuDNN autotuning, optimizer state), then capture.
            # set_to_none=True in _step keeps .grad allocation inside the captured region.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(static_x, static_init)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records only: capture runs no kernel
                out = self._step(static_x, static_init)
            static_adv = self.last_attack_x_adv  # kept alive: the replay writes it
            # Restore in place (the graph holds these addresses). A momentum buffer that did not
            # exist before is zeroed: the captured update buf <- m * buf + g then equals SGD's
            # first step buf <- g, so the replayed trajectory is the eager one.
            with torch.no_grad():
                for t, saved in zip((*model.parameters(), *model.buffers()), state):
                    t.copy_(saved)
                for p in self.params:
                    buf = opt.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        buf.copy_(momenta[p]) if p in momenta else buf.zero_()
            self._graph = (key, graph, static_x, static_init, out, static_adv)
        _, graph, static_x, static_init, out, static_adv = self._graph
        static_x.copy_(x)
        static_init.copy_(x_init)
        graph.replay()
        self.last_attack_x_adv = static_adv.clone()
        return {k: v.clone() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# cbd_fast's loop
# ----------------------------------------------------------------------------------------------------
class CbdFastLoop:
    """``cbd_fast.Purifier(config).prepare(encoder)`` + ``.step(x)`` behind the loops' interface.

    Args:
        config: the ``cbd_fast.PurifyConfig`` to run (its ``device`` picks the device).
    """

    name = "cbd_fast"

    def __init__(self, config: Any) -> None:
        import cbd_fast

        self.config = config
        self.purifier = cbd_fast.Purifier(config)
        self.device = torch.device("cpu")

    def prepare(self, encoder: nn.Module) -> CbdFastLoop:
        """Prepare a deep copy of ``encoder`` for purification."""
        self.purifier.prepare(encoder)  # works on a deep copy (inplace=False)
        self.device = torch.device(self.purifier.device)
        return self

    @property
    def model(self) -> nn.Module:
        """The encoder being purified (``Purifier.model``)."""
        return self.purifier.model

    def step(
        self, x: torch.Tensor, x_init: torch.Tensor | None = None, x_adv: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One ``Purifier.step``; ``x_init`` (when given) replaces the adversary's random start.

        ``x_adv`` (optional, like ``x``): the fine-tune takes these adversarial images instead of
        the adversary's (which still runs; its output is kept in ``last_attack_x_adv``).
        NotImplementedError when the run's step does not call its adversary as ``run.adversary(...)``
        (``free_replays``), since then there is no attack output to replace.
        """
        run = self.purifier._prepared()
        with _AdversaryTap(run, x_adv) as tap:
            if x_init is None:
                out = self.purifier.step(x)
            else:
                with _forced_random_start(x_init):
                    out = self.purifier.step(x)
        if x_adv is not None and tap.x_adv is None:
            raise NotImplementedError("this cbd_fast step did not call run.adversary: no x_adv to replace")
        self.last_attack_x_adv = tap.x_adv
        return out

    def run(self, x: torch.Tensor) -> None:
        """One step followed by a device synchronisation."""
        self.step(x)
        _sync(self.device)


class _AdversaryTap:
    """Within the block, ``run.adversary`` is wrapped: its output is recorded (``x_adv``) and, when
    ``forced`` is given, replaced by ``forced`` (same dtype, device and memory format as the output)
    before the fine-tune sees it. The run's own adversary is put back on exit."""

    def __init__(self, run: Any, forced: torch.Tensor | None) -> None:
        self.run, self.forced = run, forced
        self.x_adv: torch.Tensor | None = None

    def __enter__(self) -> _AdversaryTap:
        self.adversary = self.run.adversary
        self.run.adversary = _TappedAdversary(self.adversary, self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run.adversary = self.adversary


class _TappedAdversary:
    """A stand-in for an ``Adversary`` (attributes delegated) whose call goes through a tap."""

    def __init__(self, adversary: Any, tap: _AdversaryTap) -> None:
        self._adversary, self._tap = adversary, tap

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adversary, name)

    def __call__(self, inp: Any) -> torch.Tensor:
        own = self._adversary(inp)
        self._tap.x_adv = own.detach()
        return own if self._tap.forced is None else _like(own, self._tap.forced)


def _like(own: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """``forced``'s values with ``own``'s shape, dtype, device and memory format (detached)."""
    if forced.shape != own.shape:
        raise ValueError(f"forced x_adv has shape {tuple(forced.shape)}; the attack gave {tuple(own.shape)}")
    return torch.empty_like(own, requires_grad=False).copy_(forced.detach())


class _forced_random_start:
    """Make ``cbd_fast``'s contrastive PGD start from a given ``x_init`` (agreement checks).

    The adversary module binds ``contrastive_pgd`` by name at import, so the name is replaced where
    it is looked up (``cbd_fast.core.adversaries.pgd``) as well as where it is defined
    (``cbd_fast.core.attack``); replacing only the latter left cbd_fast on its own random start.
    """

    def __init__(self, x_init: torch.Tensor) -> None:
        self.x_init = x_init

    def __enter__(self) -> None:
        import cbd_fast.core.adversaries.pgd as pgd_adversary
        import cbd_fast.core.attack as attack

        self.modules = (attack, pgd_adversary)
        self.pgd_adversary = pgd_adversary
        self.original = attack.contrastive_pgd
        x_init = self.x_init
        original = self.original

        def forced(encoder: Any, x: torch.Tensor, clean_features: Any, **kw: Any) -> torch.Tensor:
            kw["x_init"] = x_init.to(dtype=x.dtype, device=x.device).contiguous(
                memory_format=torch.channels_last
                if x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()
                else torch.contiguous_format
            )
            return original(encoder, x, clean_features, **kw)

        for module in self.modules:
            module.contrastive_pgd = forced
        # with no ascent step (steps or step size 0) the adversary returns its random start itself
        self.original_start = pgd_adversary.random_start
        pgd_adversary.random_start = lambda x, u, eps: x_init.to(dtype=x.dtype, device=x.device)

    def __exit__(self, *exc: object) -> None:
        for module in self.modules:
            module.contrastive_pgd = self.original
        self.pgd_adversary.random_start = self.original_start


# ----------------------------------------------------------------------------------------------------
# the encoder floor
# ----------------------------------------------------------------------------------------------------
class EncoderFloor(_Loop):
    """The encoder passes a CBD step cannot avoid, timed alone (same precision and layout as
    ``StrongCBD``): no loss, no PGD update, no optimizer step. Gradients are pushed with a fixed
    random [N, D] cotangent.
    """

    name = "floor"

    def prepare(self, encoder: nn.Module) -> EncoderFloor:
        """Take a deep copy of ``encoder``."""
        self._prepare_common(encoder, fast=True)
        self._cotangent: torch.Tensor | None = None
        return self

    def _autocast(self) -> Any:
        s = self.s
        if s.amp_dtype is None:
            return _no_autocast()
        return torch.autocast(s.device.type, dtype=s.amp_dtype)

    def step(self, x: torch.Tensor, x_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The passes of one CBD batch step on ``x``; returns zeros for the loss keys."""
        s, model = self.s, self.model
        assert model is not None
        if s.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        model.eval()
        for p in self.params:
            p.requires_grad_(False)
        with torch.no_grad(), self._autocast():
            anchors = model(x)
        if self._cotangent is None or self._cotangent.shape != anchors.shape:
            g = torch.Generator(device=x.device).manual_seed(1)
            self._cotangent = torch.randn(anchors.shape, generator=g, device=x.device)
        v = self._cotangent
        x_adv = x.clone()
        for _ in range(s.steps):
            x_adv.requires_grad_(True)
            with self._autocast():
                z = model(x_adv)
            (g,) = torch.autograd.grad(z, x_adv, grad_outputs=v.to(z.dtype))
            x_adv = x_adv.detach()
        for p in self.params:
            p.requires_grad_(True)
        _set_finetune_mode(model, s.bn_policy)
        if self.original is not None:
            with torch.no_grad(), self._autocast():
                self.original(x)
        with self._autocast():
            zz = model(torch.cat([x_adv, x]))
        torch.autograd.backward(zz, torch.cat([v, v]).to(zz.dtype))
        for p in self.params:
            p.grad = None
        zero = torch.zeros((), device=x.device)
        return {"loss": zero, "attack_loss": zero}


class _no_autocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------------
#: loop name -> description; "+x" / "-x" variants are the options measured one at a time.
LOOP_NAMES = {
    "floor": "encoder passes alone",
    "floor+cl": "floor with channels_last forced on (CPU)",
    "naive": "plain PyTorch as the paper reads",
    "strong": "best plain PyTorch",
    "strong-cl": "strong with channels_last forced off",
    "strong+cl": "strong with channels_last forced on (on the CPU too)",
    "strong+compile": "strong with torch.compile(encoder)",
    "strong+graph": "strong with the whole step in one CUDA graph",
    "strong+vg": "strong with cbd_fast.ops.nt_xent_value_and_grad in PGD",
    "strong+reuse": "strong with the fine-tune's clean forward recorded before the attack (anchors)",
    "cbd_fast": "cbd_fast.Purifier (default config)",
    "cbd_fast-cl": "cbd_fast with channels_last=False",
    "cbd_fast+cl": "cbd_fast with channels_last=True (on the CPU too)",
    "cbd_fast+compile": "cbd_fast with compile=True",
    "cbd_fast@default": "cbd_fast with the default adversary (timed only: no reference loop to agree with)",
    "cbd_fast+guard": "cbd_fast with the default gradient spike guard (timed only: the references have none)",
}

#: loops timed without an agreement check (no plain-PyTorch loop computes the same thing); the
#: summary gives their time and floor multiple, never a speedup.
NO_REFERENCE = ("cbd_fast@default", "cbd_fast+guard")


def make_loop(name: str, config: Any, device: torch.device | str) -> Any:
    """Build the loop ``name`` (a key of ``LOOP_NAMES``) for ``config`` on ``device`` (not prepared).

    Args:
        name: loop name.
        config: a ``cbd_fast.PurifyConfig``; its device field is overridden by ``device``.
        device: where to run.
    """
    if name not in LOOP_NAMES:
        raise ValueError(f"name must be one of {sorted(LOOP_NAMES)}; got {name!r}")
    device = torch.device(device)
    if name.startswith("cbd_fast"):
        over: dict[str, Any] = {"device": str(device), "progress": False}
        if name in NO_REFERENCE:  # shipped defaults that have no plain-PyTorch twin
            from cbd_fast import PurifyConfig

            default = PurifyConfig()
            over["grad_spike_factor"] = default.grad_spike_factor
            if name == "cbd_fast@default":
                over["adversary"] = default.adversary
        if name == "cbd_fast-cl":
            over["channels_last"] = False
        elif name == "cbd_fast+cl":
            over["channels_last"] = True
        elif name == "cbd_fast+compile":
            over["compile"] = True
        return CbdFastLoop(config.replace(**over))
    s = LoopSettings.from_config(config, device)
    if name.endswith("-cl") or name.endswith("+cl"):
        s.channels_last = name.endswith("+cl")
    if name.startswith("floor"):
        return EncoderFloor(s)
    if name == "naive":
        return NaiveCBD(LoopSettings(**{**s.__dict__, "amp_dtype": None, "channels_last": False}))
    return StrongCBD(
        s,
        compile=name == "strong+compile",
        cuda_graph=name == "strong+graph",
        value_and_grad=name == "strong+vg",
        reuse_clean_forward=name == "strong+reuse",
    )


# ----------------------------------------------------------------------------------------------------
# agreement check
# ----------------------------------------------------------------------------------------------------
#: Tolerances of the agreement check against the naive float32 loop, by the compared loop's encoder
#: precision. ``loss_rtol``: max over steps of |loss - loss_naive| / |loss_naive| (both the fine-tune
#: loss and the attack loss). ``update_rtol``: ||dtheta - dtheta_naive|| / ||dtheta_naive|| of the
#: weight update after all steps.
#:
#: float32 (calibrated on fmnist_cnn, bs 16-64, 2-3 steps): equal-math loops with different reduction
#: orders differ by <= 1e-6 on losses with BN eval (<= 1e-4 with BN train: the clean term amplifies
#: batch-statistics rounding) and by 1e-5 to 9e-3 on updates (the high end when a PGD sign flips
#: where an input gradient is ~0 and the flip cascades: bs 32, K 5, 3 steps); a semantic
#: difference moves the update by 0.1-0.6 (K 1 vs 2: 0.22, clean weight 0.5 vs 1: 0.28, eps 4 vs
#: 8/255: 0.21, tau 0.4 vs 0.5: 0.26, no clean term: 0.57, lr 0.011 vs 0.01: 0.098, BN train vs eval:
#: 4.7e3) and the loss by 4e-5 to 70.
#: With the first evaluation's measured defaults (eps 32/255, alpha 8/255, "anchor" x 50, lr 1e-3) one
#: flipped PGD sign moves a pixel by 8/255 and the x50 term amplifies it: strong vs naive (and
#: cbd_fast vs strong) then differ by 1.2e-3 on the loss and 1.4e-2 on the update over 3 steps at
#: bs 64, K 5 (cbd_fast vs naive happened to agree to 9e-7). So 5e-3 / 5e-2: 3-4x above that noise,
#: and the check still flags every semantic difference under these defaults too (bs 16, K 2, 2 steps:
#: K 1: update 0.35; clean weight /2: 0.80; eps /2: 0.75; tau 0.4: 0.060; feature_consistency
#: instead of anchor: 0.99; lr x1.1: 0.23; BN train: 5e3; the same config: 2e-6).
#:
#: ``update_rtol`` is judged on the smaller of the plain update difference and the update difference
#: weighted per parameter by the naive loop's first-step |gradient| (``weighted_update_rdiff``):
#: Adam's first step is about lr * sign(g), so on a deep random encoder (ResNet-50) parameters whose
#: gradient is at rounding level move a full lr either way and the plain difference reads 8-12%
#: for loops whose first-step gradients agree to 0.5% (``first_grad_rdiff``, reported). Weighted,
#: every semantic difference above still reads >= 0.076 (fmnist_cnn bs 16, K 2, 2 steps: K 1 0.50,
#: clean weight /2 0.076, eps /2 0.55, tau 0.4 0.079, feature_consistency 0.99, lr x1.1 0.20).
#:
#: bfloat16: autocast noise alone moves the update by ~0.14 (fmnist_cnn, CPU autocast: a few PGD
#: signs flip), as much as a subtle semantic difference, so a bf16 comparison cannot prove the
#: semantics. On CUDA the benchmark therefore checks twice: every loop in true float32 (TF32 off)
#: with the float32 tolerances (the semantics), and the timed bf16 configuration with these loose
#: bounds (catches a broken bf16 path: NaN, garbage, an update pointing elsewhere).
#:
#: ``loss_rtol`` applies to the FIRST step (same weights: only PGD rounding differs) and
#: ``later_loss_rtol`` to the later ones: after one optimizer step equivalent loops follow
#: trajectories that drift apart chaotically (final CPU run, fmnist_cnn bs 256 K 5, step-3 loss:
#: channels_last vs NCHW 1.1e-2 with updates 2.3e-2; first-step losses agree to 1e-6).
#:
#: Split check (``check_agreement``: a loop that fails end to end may still agree when its attack and its
#: fine-tune agree separately). Channels_last convolutions sum in another order, a few input gradients near
#: 0 change sign, those pixels move 2 * alpha the other way and the difference cascades (fmnist_cnn bs 256
#: K 5 3 steps: update 0.17 end to end, K 0: 4e-6). The fine-tune check feeds the loop naive's x_adv and
#: reuses the tolerances above (measured: update <= 3e-2 on ResNet-18 with Adam's rounding-level
#: parameters, |grad|-weighted 4e-2; <= 2e-5 on fmnist_cnn; losses <= 2e-4). The attack check loads naive's
#: weights before every step, runs the loop's step and compares the x_adv its own attack produced with
#: naive's: ``xadv_share``: the largest share (over steps) of pixels differing by more than ``_XADV_ATOL``;
#: ``attack_loss_rtol``: the relative difference of NTXent(f(x_adv), f(x)) under one float32 evaluator
#: (naive's weights before the step, eval mode); and no pixel outside the eps-ball or the box. Measured
#: (first-evaluation defaults eps 40/255, alpha 8/255): channels_last changes 0.04% of the pixels
#: (ResNet-18 32 px bs 8 K 2: single flips, 2 alpha) to 2.6% (fmnist_cnn bs 256 K 5: a flip changes the
#: NT-Xent gradient of the whole batch and the next steps flip more, up to 6 alpha) and moves the attack
#: loss by <= 5e-7; semantic attack differences change 66-93% of the pixels (alpha x1.5: 66-77%, K - 1:
#: 79-88%, eps / 2: 93%) and the attack loss by 2e-3 to 6e-3. So 10% sits ~4x above the largest flip share
#: and ~7x below the smallest semantic attack difference; 1e-4 on the attack loss is 200x above the flips.
#: Without loading naive's weights the later steps compare attacks on drifted weights (ResNet-18 + Adam:
#: 7.5% then 19% of the pixels), hence the reload. tau 0.4 instead of 0.5 changes only 0.4% of the pixels
#: (the sign of the gradient barely depends on tau) but fails the fine-tune check, as every semantic
#: fine-tune difference does (lr x1.1: update 0.15, clean weight / 2, tau, BN mode). Reduced precision has
#: no split check: CPU bf16 autocast changes ~48% of the pixels, as much as alpha x1.5 (51-77%), so only
#: float32 can show that the attack is the same.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {
        "loss_rtol": 1e-3,
        "later_loss_rtol": 5e-2,
        "update_rtol": 5e-2,
        "xadv_share": 1e-1,
        "attack_loss_rtol": 1e-4,
    },
    "bfloat16": {"loss_rtol": 5e-2, "later_loss_rtol": 1e-1, "update_rtol": 1.0},
    "float16": {"loss_rtol": 5e-2, "later_loss_rtol": 1e-1, "update_rtol": 1.0},
}
#: attack check: two x_adv pixels "differ" above this (float32 rounding of x + k * alpha and of the
#: clamps is ~1e-7; the smallest step any loop takes is alpha >= 1/255 ~ 4e-3).
_XADV_ATOL = 1e-5
#: attack check: slack of the eps-ball / [0, 1] box test (float32 rounding of x +- eps).
_BALL_ATOL = 1e-6

_UNAVAILABLE_ERRORS = (ImportError, AttributeError, NotImplementedError)


def _precision(loop: Any) -> str:
    s = getattr(loop, "s", None)
    if s is not None:
        return "float32" if s.amp_dtype is None else str(s.amp_dtype).replace("torch.", "")
    cfg = getattr(loop, "config", None)
    amp = getattr(cfg, "amp_dtype", "auto")
    dev = torch.device(getattr(loop, "device", "cpu"))
    if amp == "auto":
        return "bfloat16" if dev.type == "cuda" else "float32"
    return amp


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


class _first_step_grads:
    """Capture the model's gradients as the first optimizer step that updates it sees them.

    A global optimizer pre-step hook, so it works whatever optimizer object a loop builds; the
    parameters are matched by position in ``model.parameters()`` (every loop deep-copies the same
    encoder). ``flat`` after the block: [P] float32 on the CPU, zeros where a parameter had no grad.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.grads: dict[int, torch.Tensor] = {}

    def _hook(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.grads:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                i = self.index.get(id(p))
                if i is not None and p.grad is not None:
                    self.grads[i] = p.grad.detach().float().reshape(-1).cpu().clone()

    def __enter__(self) -> _first_step_grads:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    @property
    def flat(self) -> torch.Tensor:
        return torch.cat([self.grads.get(i, torch.zeros(p.numel())) for i, p in enumerate(self.params)])


def _run_loop(
    name: str,
    config: Any,
    device: torch.device,
    encoder: nn.Module,
    batches: list[torch.Tensor],
    starts: list[torch.Tensor],
    *,
    forced: list[torch.Tensor] | None = None,
    keep_states: bool = False,
    load_states: list[dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Build, prepare and step the loop ``name`` over ``batches`` from the random starts ``starts``.

    Args:
        forced: per step, the adversarial images the fine-tune must use (``step(..., x_adv=)``).
        keep_states: also keep the model's state before each step (CPU copies), for the attack check.
        load_states: per step, a state to load into the model before the step (the attack check runs
            each step's attack from naive's weights of that step).

    Returns:
        ``{"precision", "loss", "attack_loss", "update", "grad", "x_adv", "states"}``: per-step loss
        and attack-loss floats, the flat weight update and first-step gradient ([P] float32, CPU),
        the x_adv the loop's own attack produced at each step ([N, C, H, W] float32, CPU, contiguous;
        None when the loop does not expose it) and the pre-step states (or None).
    """
    loop = make_loop(name, config, device).prepare(encoder)
    out: dict[str, Any] = {"precision": _precision(loop), "loss": [], "attack_loss": [], "x_adv": []}
    out["states"] = [] if keep_states else None
    before = _flat_params(loop.model)
    with _first_step_grads(loop.model) as captured:
        for i, (x, x0) in enumerate(zip(batches, starts)):
            if load_states is not None:
                with torch.no_grad():
                    loop.model.load_state_dict(load_states[i])
            if keep_states:
                out["states"].append(
                    {k: v.detach().cpu().clone() for k, v in loop.model.state_dict().items()}
                )
            kw = {} if forced is None else {"x_adv": forced[i].to(x.device)}
            res = loop.step(x, x_init=x0, **kw)
            out["loss"].append(float(res["loss"]))
            out["attack_loss"].append(float(res["attack_loss"]))
            own = getattr(loop, "last_attack_x_adv", None)
            out["x_adv"].append(None if own is None else own.detach().float().cpu().contiguous().clone())
    out["update"] = _flat_params(loop.model) - before
    out["grad"] = captured.flat
    del loop
    return out


def _compare_runs(run: dict[str, Any], ref: dict[str, Any], tol: dict[str, float]) -> dict[str, Any]:
    """Loss curves, weight update and first-step gradient of ``run`` against the naive ``ref``.

    Returns the metrics (``first_loss_rdiff``, ``later_loss_rdiff``, ``loss_rdiff``,
    ``update_rdiff``, ``weighted_update_rdiff``, ``first_grad_rdiff``), ``finite`` and ``ok``
    (within ``tol``: first-step and later losses, the smaller of the two update differences).
    """
    first = max(abs(run[k][0] - ref[k][0]) / max(abs(ref[k][0]), 1e-6) for k in ("loss", "attack_loss"))
    later = max(
        [
            abs(a - b) / max(abs(b), 1e-6)
            for key in ("loss", "attack_loss")
            for a, b in list(zip(run[key], ref[key]))[1:]
        ]
        or [0.0]
    )
    ref_update = ref["update"]
    udiff = float((run["update"] - ref_update).norm() / ref_update.norm().clamp_min(1e-30))
    # Adam's first step is ~lr * sign(g): a parameter whose gradient is at rounding level moves
    # a full lr in a direction the summation order decides. Weighting each parameter's update
    # by the reference's first-step |gradient| keeps what the loss feels and drops that noise.
    weight = ref["grad"].abs()
    wdiff = float(
        ((run["update"] - ref_update) * weight).norm() / (ref_update * weight).norm().clamp_min(1e-30)
    )
    gdiff = float((run["grad"] - ref["grad"]).norm() / ref["grad"].norm().clamp_min(1e-30))
    finite = all(math.isfinite(v) for v in run["loss"] + run["attack_loss"]) and math.isfinite(udiff)
    ok = (
        finite
        and first <= tol["loss_rtol"]
        and later <= tol.get("later_loss_rtol", tol["loss_rtol"])
        and min(udiff, wdiff) <= tol["update_rtol"]
    )
    return {
        "ok": bool(ok),
        "finite": finite,
        "loss_rdiff": max(first, later),
        "first_loss_rdiff": first,
        "later_loss_rdiff": later,
        "update_rdiff": udiff,
        "weighted_update_rdiff": wdiff,
        "first_grad_rdiff": gdiff,
    }


def _describe_run(m: dict[str, Any], tol: dict[str, float]) -> str:
    return (
        f"loss rel diff first step {m['first_loss_rdiff']:.2e} (tol {tol['loss_rtol']:.0e}), later "
        f"{m['later_loss_rdiff']:.2e} (tol {tol.get('later_loss_rtol', tol['loss_rtol']):.0e}), "
        f"weight-update rel diff {m['update_rdiff']:.2e}, |grad|-weighted {m['weighted_update_rdiff']:.2e} "
        f"(tol on the smaller {tol['update_rtol']:.0e}), "
        f"first-step gradient rel diff {m['first_grad_rdiff']:.2e}"
    )


def _compare_attacks(
    own: list[torch.Tensor | None],
    ref: list[torch.Tensor],
    batches: list[torch.Tensor],
    states: list[dict[str, torch.Tensor]],
    encoder: nn.Module,
    config: Any,
    tol: dict[str, float],
    device: torch.device,
) -> dict[str, Any]:
    """The attack check: the loop's x_adv against naive's, step by step (same weights up to
    fine-tune rounding, same data, same random start).

    Per step: the share of pixels differing by more than ``_XADV_ATOL``, the largest difference (also
    in units of ``config.step_size``), the pixels outside the eps-ball around x or the [0, 1] box
    (``_BALL_ATOL`` slack), and the relative difference of the attack's objective NTXent(f(x_adv), f(x))
    evaluated for both x_adv by ONE float32 evaluator: the naive loop's encoder with its weights
    before that step, in eval mode (what both attacks maximised). The worst step counts.

    Returns:
        ``{"ok", "pixel_share", "max_diff", "max_diff_steps", "outside_ball", "attack_loss_rdiff",
        "attack_loss", "attack_loss_ref"}`` (``ok`` within ``tol["xadv_share"]`` and
        ``tol["attack_loss_rtol"]``, nothing outside the ball).
    """
    if any(a is None for a in own):
        raise NotImplementedError("the loop does not expose its x_adv (last_attack_x_adv)")
    eps, alpha, tau = float(config.epsilon), float(config.step_size), float(config.temperature)
    evaluator = copy.deepcopy(encoder).to(device).float().eval()
    share = max_diff = rdiff = 0.0
    outside = 0
    losses, ref_losses, shares = [], [], []
    for a, r, x, state in zip(own, ref, batches, states):
        assert a is not None
        if a.shape != r.shape:
            raise ValueError(f"x_adv shape {tuple(a.shape)} differs from naive's {tuple(r.shape)}")
        xc = x.detach().float().cpu()
        d = (a - r).abs()
        shares.append(float((d > _XADV_ATOL).float().mean()))
        share = max(share, shares[-1])
        max_diff = max(max_diff, float(d.max()))
        outside += int(
            ((a - xc).abs() > eps + _BALL_ATOL).sum() + (a < -_BALL_ATOL).sum() + (a > 1 + _BALL_ATOL).sum()
        )
        evaluator.load_state_dict(state)
        with torch.no_grad():
            anchors = evaluator(x.float()).detach()
            la = float(naive_nt_xent(evaluator(a.to(device)), anchors, tau))
            lr = float(naive_nt_xent(evaluator(r.to(device)), anchors, tau))
        losses.append(la)
        ref_losses.append(lr)
        rdiff = max(rdiff, abs(la - lr) / max(abs(lr), 1e-6) if math.isfinite(la) else math.inf)
    ok = share <= tol["xadv_share"] and rdiff <= tol["attack_loss_rtol"] and outside == 0
    return {
        "ok": bool(ok),
        "pixel_share": share,
        "pixel_share_steps": shares,
        "max_diff": max_diff,
        "max_diff_steps": max_diff / alpha if alpha > 0 else math.inf * max_diff,
        "outside_ball": outside,
        "attack_loss_rdiff": rdiff,
        "attack_loss": losses,
        "attack_loss_ref": ref_losses,
    }


def _describe_attack(m: dict[str, Any], tol: dict[str, float]) -> str:
    return (
        f"pixels of x_adv differing from naive's {100 * m['pixel_share']:.3f}% (tol "
        f"{100 * tol['xadv_share']:g}%), largest difference {m['max_diff']:.2e} = "
        f"{m['max_diff_steps']:.2f} step sizes, {m['outside_ball']} pixels outside the eps-ball/box, "
        f"attack loss rel diff {m['attack_loss_rdiff']:.2e} (tol {tol['attack_loss_rtol']:.0e})"
    )


def check_agreement(
    encoder: nn.Module,
    batches: list[torch.Tensor],
    config: Any,
    names: list[str],
    device: torch.device | str,
    *,
    configs: dict[str, Any] | None = None,
    split: str = "auto",
) -> dict[str, Any]:
    """Run the loops ``names`` from the same weights, data and random starts; compare with naive.

    1. End to end: each loop steps through ``batches`` on its own; its loss curves, weight update
       and first-step gradient are compared with naive's (``TOLERANCES``).
    2. Split (for a loop the end-to-end check refuses, or every loop with ``split="always"``): the
       attack and the fine-tune are checked apart, because a PGD sign that flips where an input
       gradient is ~0 (another summation order, e.g. channels_last convolutions) moves a pixel by
       2 * step_size and the difference cascades through the steps, though the algorithm is the same.

       - fine-tune check: the loop runs again with its fine-tune fed naive's x_adv of each step
         (``step(x, x_init, x_adv=...)``); losses and updates must agree to the same tolerances;
       - attack check, in that same run (weights equal to naive's up to fine-tune rounding): the
         x_adv the loop's own attack produced against naive's (``_compare_attacks``): share of
         differing pixels <= ``xadv_share``, all pixels in the eps-ball and the box, attack
         objective within ``attack_loss_rtol``.

    A loop agrees when the end-to-end check passes ("agreement": "end_to_end") or both split checks
    pass ("agreement": "split"); the message keeps every number either way.

    Args:
        encoder: the starting encoder (not modified; each loop deep-copies it).
        batches: the images of each step, [N, C, H, W] float in [0, 1] on ``device``.
        config: the ``cbd_fast.PurifyConfig`` all loops follow.
        names: loop names (keys of ``LOOP_NAMES``, "floor" excluded); "naive" is the reference.
        device: where the loops run.
        configs: optional {loop name: config} replacing ``config`` for that loop (the self-test
            that a semantic difference is caught uses it).
        split: "auto" (split check for loops that fail end to end), "always" (for every loop but
            naive: its numbers are reported; the agreement is still "end_to_end" when that passes)
            or "never".

    Returns:
        ``{"reference": "naive", "steps": len(batches), "loops": {name: {"ok", "agreement",
        "unavailable", "message", "precision", "loss", "attack_loss", "loss_rdiff", "update_rdiff",
        "weighted_update_rdiff", "first_grad_rdiff", "first_loss_rdiff", "later_loss_rdiff",
        "tolerance", "split"}}}``: the top-level numbers are the end-to-end ones; ``split`` (when
        run) is ``{"ok", "finetune": {...}, "attack": {...}}`` or ``{"ok": False, "error": ...}``.
        ``agreement`` is "end_to_end", "split" or None. A loop whose API is missing is
        ``unavailable`` (ok False); an exception or a difference beyond ``TOLERANCES`` gives ok
        False with the numbers in ``message``.
    """
    if split not in ("auto", "always", "never"):
        raise ValueError(f"split must be 'auto', 'always' or 'never'; got {split!r}")
    device = torch.device(device)
    if "naive" not in names:
        names = ["naive", *names]
    from cbd_fast.ops.reference import pgd_init_reference

    starts = [
        pgd_init_reference(
            x, config.epsilon, generator=torch.Generator(device=x.device).manual_seed(1000 + i)
        )
        for i, x in enumerate(batches)
    ]
    runs: dict[str, dict[str, Any]] = {}
    loops: dict[str, dict[str, Any]] = {}

    def guarded(rec: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except _UNAVAILABLE_ERRORS as e:
            rec.update(unavailable=True, message=f"{name}: {type(e).__name__}: {e}")
        except RuntimeError as e:
            missing = "does not exist" in str(e) or "needs a CUDA" in str(e)
            rec.update(unavailable=missing, message=f"{name}: {type(e).__name__}: {e}")
        except ValueError as e:
            rec.update(unavailable=True, message=f"{name}: {type(e).__name__}: {e}")
        return None

    for name in names:
        rec: dict[str, Any] = {
            "ok": False,
            "agreement": None,
            "unavailable": False,
            "message": "",
            "precision": "?",
        }
        loops[name] = rec
        cfg = (configs or {}).get(name, config)
        run = guarded(
            rec,
            name,
            lambda cfg=cfg, name=name: _run_loop(
                name, cfg, device, encoder, batches, starts, keep_states=name == "naive"
            ),
        )
        if run is not None:
            runs[name] = run
            rec["precision"] = run["precision"]
            rec["loss"], rec["attack_loss"] = run["loss"], run["attack_loss"]
    ref = loops["naive"]
    for name, rec in loops.items():
        if "loss" not in rec:
            continue
        if "loss" not in ref:
            rec["message"] = f"{name}: the naive reference failed: {ref['message']}"
            continue
        tol = TOLERANCES.get(rec["precision"], TOLERANCES["bfloat16"])
        rec["tolerance"] = tol
        m = _compare_runs(runs[name], runs["naive"], tol)
        rec.update({k: v for k, v in m.items() if k != "ok"})
        rec["ok"] = m["ok"]
        rec["agreement"] = "end_to_end" if m["ok"] else None
        rec["message"] = (
            f"{name} ({rec['precision']}) vs naive over {len(batches)} steps: "
            f"{'agrees end to end' if m['ok'] else 'DIFFERS end to end'}: {_describe_run(m, tol)}; "
            f"loss {_fmt(rec['loss'])} vs {_fmt(ref['loss'])}, attack {_fmt(rec['attack_loss'])} vs "
            f"{_fmt(ref['attack_loss'])}"
        )
        if name == "naive" or split == "never" or (split == "auto" and m["ok"]):
            continue
        rec["split"] = sp = _split_check(
            name, (configs or {}).get(name, config), config, device, encoder, batches, starts, runs, tol
        )
        rec["message"] += "; " + sp["message"]
        if not m["ok"] and sp["ok"]:
            rec["ok"], rec["agreement"] = True, "split"
            rec["message"] += " -> agrees: split check"
    return {"reference": "naive", "steps": len(batches), "loops": loops}


def _split_check(
    name: str,
    loop_config: Any,
    config: Any,
    device: torch.device,
    encoder: nn.Module,
    batches: list[torch.Tensor],
    starts: list[torch.Tensor],
    runs: dict[str, dict[str, Any]],
    tol: dict[str, float],
) -> dict[str, Any]:
    """The fine-tune and attack checks of ``check_agreement`` for the loop ``name`` (see there)."""
    ref = runs["naive"]
    if "xadv_share" not in tol:
        why = (
            f"no split check at {runs[name]['precision']}: its rounding flips about half the PGD signs "
            "(CPU autocast, fmnist_cnn), as many as a semantic attack difference"
        )
        return {"ok": False, "error": why, "message": why}
    try:
        forced = _run_loop(name, loop_config, device, encoder, batches, starts, forced=ref["x_adv"])
        ft = _compare_runs(forced, ref, tol)
        # every step's attack from naive's weights of that step (the loop's own weights drift: Adam
        # moves parameters whose gradient is at rounding level a full lr either way)
        attacks = _run_loop(
            name,
            loop_config,
            device,
            encoder,
            batches,
            starts,
            forced=ref["x_adv"],
            load_states=ref["states"],
        )
        at = _compare_attacks(
            attacks["x_adv"], ref["x_adv"], batches, ref["states"], encoder, config, tol, device
        )
    except (*_UNAVAILABLE_ERRORS, RuntimeError, ValueError) as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "message": f"split check not run: {e}"}
    ok = ft["ok"] and at["ok"]
    message = (
        f"split check {'passes' if ok else 'FAILS'}: fine-tune on naive's x_adv "
        f"{'ok' if ft['ok'] else 'DIFFERS'} ({_describe_run(ft, tol)}); attack "
        f"{'ok' if at['ok'] else 'DIFFERS'} ({_describe_attack(at, tol)})"
    )
    return {"ok": bool(ok), "finetune": ft, "attack": at, "message": message}


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in values) + "]"
