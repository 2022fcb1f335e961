# ---- DRAFT for cbd_fast/adversaries.py (to be appended after purify_ready) ----


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

    ``config.extra`` keys (all optional): ``patch_size`` (default ``max(3, round(min(H, W) / 10))``),
    ``patch_stride`` (default: positions at most 32 per axis), ``patch_candidates`` (4),
    ``patch_scan_images`` (16), ``patch_fraction`` (share of the batch for the patch half, 0.5).
    """

    def __init__(self, config: PurifyConfig) -> None:
        super().__init__(config)
        self._pgd = ContrastivePGD(config)
        self._patches: list[tuple[int, int, torch.Tensor]] | None = None
        self._k = 0
        self._calls = 0
        self.scan_scores: list[tuple[float, int, int, float]] = []

    @torch.no_grad()
    def _scan(self, encoder: nn.Module, x: torch.Tensor) -> None:
        from cbd_fast.attack import attack_mode

        ex = self.config.extra
        _, c, h, w = x.shape
        k = int(ex.get("patch_size", max(3, round(min(h, w) / 10))))
        k = max(1, min(k, h, w))
        stride = int(ex.get("patch_stride", max(1, (max(h, w) - k + 1) // 32)))
        x = x[: int(ex.get("patch_scan_images", 16))].float()
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
        top = int(ex.get("patch_candidates", 4))
        self._patches = [(r, q, torch.full((1, c, k, k), val, device=x.device)) for _, r, q, val in scores[:top]]
        self._k = k

    def _paste(self, x: torch.Tensor, r: int, q: int, p: torch.Tensor) -> torch.Tensor:
        k = self._k
        out = x.clone()
        out[:, :, r : r + k, q : q + k] = p.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        return out

    def _patch_attack(self, inp: AttackInputs, x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        from cbd_fast.attack import attack_mode
        from cbd_fast.ops import nt_xent

        assert self._patches is not None
        i = self._calls % len(self._patches)
        r, q, p = self._patches[i]
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
        n_patch = int(round(b * float(self.config.extra.get("patch_fraction", 0.5))))
        n_pgd = b - n_patch
        parts = []
        if n_pgd > 0:
            sub = AttackInputs(
                encoder=inp.encoder, x=inp.x[:n_pgd], clean_features=inp.clean_features[:n_pgd],
                indices=inp.indices[:n_pgd], epoch=inp.epoch, gather=None, config=inp.config,
            )
            parts.append(self._pgd(sub))
        if n_patch > 0:
            parts.append(self._patch_attack(inp, inp.x[n_pgd:], inp.clean_features[n_pgd:b]))
        self._calls += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]


# ---- DRAFT for cbd_fast/regularizers.py ----


@register_clean_term("anchor")
class OriginalAnchor(CleanTerm):
    """Pull both views to the FROZEN original encoder's clean features, in squared distance.

    ``L = (||z - z0||^2 + pull_ratio * ||z_adv - z0||^2) / ||z0||^2`` summed over the batch, with
    ``z0 = f_0(x)``: clean features stay where the original head reads them (norms included: the
    head is not scale-invariant, NT-Xent is), and adversarial features, the stand-ins for triggered
    ones, are pulled to the ORIGINAL clean features rather than to the drifting f_theta(x).
    ``config.extra["pull_ratio"]`` (default 0.2) weighs the adversarial half against the clean half.
    """

    needs_reference = True

    def __call__(self, inp: CleanTermInputs) -> torch.Tensor:
        assert inp.reference_features is not None
        z0 = inp.reference_features(inp.x)
        ratio = float(inp.config.extra.get("pull_ratio", 0.2))
        den = z0.pow(2).sum().clamp_min(1e-12)
        # 1. clean consistency, 2. adversarial pull to the original clean features.
        return ((inp.z_clean - z0).pow(2).sum() + ratio * (inp.z_adv - z0).pow(2).sum()) / den
