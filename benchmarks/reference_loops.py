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
and ``step(x, x_init=None) -> dict[str, Tensor]`` returning on-device 0-dim float32 tensors
``{"loss", "attack_loss"}`` (``"attack_loss"``: NT-Xent between the adversarial features of the
last PGD forward and the anchors). ``x_init`` fixes the random start (for the agreement check);
otherwise each loop draws it like ``cbd_fast.ops.pgd_init`` from its own generator.
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
            clean_weight=float(getattr(config, "clean_weight", 0.0)),
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

    def step(self, x: torch.Tensor, x_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One CBD batch step on ``x`` ([N, C, H, W] float in [0, 1] on the device)."""
        s, model, opt = self.s, self.model, self.optimizer
        assert model is not None and opt is not None
        eps, alpha = s.epsilon, s.step_size
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

    def step(self, x: torch.Tensor, x_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One CBD batch step on ``x`` ([N, C, H, W] float in [0, 1] on the device)."""
        if self.s.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if x_init is None:
            x_init = _random_start(x, self.s, self.generator)
        elif self.s.channels_last and x_init.dim() == 4:
            x_init = x_init.contiguous(memory_format=torch.channels_last)
        if self.cuda_graph:
            return self._graphed_step(x, x_init)
        return self._step(x, x_init)

    def _step(self, x: torch.Tensor, x_init: torch.Tensor) -> dict[str, torch.Tensor]:
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
            self._graph = (key, graph, static_x, static_init, out)
        _, graph, static_x, static_init, out = self._graph
        static_x.copy_(x)
        static_init.copy_(x_init)
        graph.replay()
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

    def step(self, x: torch.Tensor, x_init: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One ``Purifier.step``; ``x_init`` (when given) replaces the adversary's random start."""
        if x_init is None:
            return self.purifier.step(x)
        with _forced_random_start(x_init):
            return self.purifier.step(x)

    def run(self, x: torch.Tensor) -> None:
        """One step followed by a device synchronisation."""
        self.step(x)
        _sync(self.device)


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
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"loss_rtol": 1e-3, "later_loss_rtol": 5e-2, "update_rtol": 5e-2},
    "bfloat16": {"loss_rtol": 5e-2, "later_loss_rtol": 1e-1, "update_rtol": 1.0},
    "float16": {"loss_rtol": 5e-2, "later_loss_rtol": 1e-1, "update_rtol": 1.0},
}

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


def check_agreement(
    encoder: nn.Module,
    batches: list[torch.Tensor],
    config: Any,
    names: list[str],
    device: torch.device | str,
    *,
    configs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the loops ``names`` from the same weights, data and random starts; compare with naive.

    Args:
        encoder: the starting encoder (not modified; each loop deep-copies it).
        batches: the images of each step, [N, C, H, W] float in [0, 1] on ``device``.
        config: the ``cbd_fast.PurifyConfig`` all loops follow.
        names: loop names (keys of ``LOOP_NAMES``, "floor" excluded); "naive" is the reference.
        device: where the loops run.
        configs: optional {loop name: config} replacing ``config`` for that loop (the self-test
            that a semantic difference is caught uses it).

    Returns:
        ``{"reference": "naive", "steps": len(batches), "loops": {name: {"ok", "unavailable",
        "message", "precision", "loss", "attack_loss", "loss_rdiff", "update_rdiff", "tolerance"}}}``.
        A loop whose API is missing is ``unavailable`` (ok False); an exception or a difference
        beyond ``TOLERANCES`` gives ok False with the numbers in ``message``.
    """
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
    updates: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    loops: dict[str, dict[str, Any]] = {}
    for name in names:
        rec: dict[str, Any] = {"ok": False, "unavailable": False, "message": "", "precision": "?"}
        loops[name] = rec
        try:
            loop = make_loop(name, (configs or {}).get(name, config), device).prepare(encoder)
            rec["precision"] = _precision(loop)
            before = _flat_params(loop.model)
            losses, attack = [], []
            with _first_step_grads(loop.model) as captured:
                for x, x0 in zip(batches, starts):
                    out = loop.step(x, x_init=x0)
                    losses.append(float(out["loss"]))
                    attack.append(float(out["attack_loss"]))
            rec["loss"], rec["attack_loss"] = losses, attack
            updates[name] = _flat_params(loop.model) - before
            grads[name] = captured.flat
            del loop
        except _UNAVAILABLE_ERRORS as e:
            rec.update(unavailable=True, message=f"{name}: {type(e).__name__}: {e}")
        except RuntimeError as e:
            missing = "does not exist" in str(e) or "needs a CUDA" in str(e)
            rec.update(unavailable=missing, message=f"{name}: {type(e).__name__}: {e}")
        except ValueError as e:
            rec.update(unavailable=True, message=f"{name}: {type(e).__name__}: {e}")
    ref = loops["naive"]
    for name, rec in loops.items():
        if "loss" not in rec:
            continue
        if "loss" not in ref:
            rec["message"] = f"{name}: the naive reference failed: {ref['message']}"
            continue
        tol = TOLERANCES.get(rec["precision"], TOLERANCES["bfloat16"])
        rec["tolerance"] = tol
        first = max(abs(rec[k][0] - ref[k][0]) / max(abs(ref[k][0]), 1e-6) for k in ("loss", "attack_loss"))
        later = max(
            [
                abs(a - b) / max(abs(b), 1e-6)
                for key in ("loss", "attack_loss")
                for a, b in list(zip(rec[key], ref[key]))[1:]
            ]
            or [0.0]
        )
        ldiff = max(first, later)
        ref_update = updates["naive"]
        udiff = float((updates[name] - ref_update).norm() / ref_update.norm().clamp_min(1e-30))
        # Adam's first step is ~lr * sign(g): a parameter whose gradient is at rounding level moves
        # a full lr in a direction the summation order decides. Weighting each parameter's update
        # by the reference's first-step |gradient| keeps what the loss feels and drops that noise.
        weight = grads["naive"].abs()
        wdiff = float(
            ((updates[name] - ref_update) * weight).norm() / (ref_update * weight).norm().clamp_min(1e-30)
        )
        gdiff = float((grads[name] - grads["naive"]).norm() / grads["naive"].norm().clamp_min(1e-30))
        finite = all(math.isfinite(v) for v in rec["loss"] + rec["attack_loss"]) and math.isfinite(udiff)
        rec["loss_rdiff"], rec["update_rdiff"] = ldiff, udiff
        rec["weighted_update_rdiff"], rec["first_grad_rdiff"] = wdiff, gdiff
        rec["first_loss_rdiff"], rec["later_loss_rdiff"] = first, later
        rec["ok"] = (
            finite
            and first <= tol["loss_rtol"]
            and later <= tol.get("later_loss_rtol", tol["loss_rtol"])
            and min(udiff, wdiff) <= tol["update_rtol"]
        )
        rec["message"] = (
            f"{name} ({rec['precision']}) vs naive over {len(batches)} steps: loss rel diff first step "
            f"{first:.2e} (tol {tol['loss_rtol']:.0e}), later {later:.2e} "
            f"(tol {tol.get('later_loss_rtol', tol['loss_rtol']):.0e}), weight-update rel diff {udiff:.2e}, "
            f"|grad|-weighted {wdiff:.2e} (tol on the smaller {tol['update_rtol']:.0e}), first-step "
            f"gradient rel diff {gdiff:.2e}; "
            f"loss {_fmt(rec['loss'])} vs {_fmt(ref['loss'])}, attack {_fmt(rec['attack_loss'])} vs "
            f"{_fmt(ref['attack_loss'])}"
        )
    return {"reference": "naive", "steps": len(batches), "loops": loops}


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6f}" for v in values) + "]"
