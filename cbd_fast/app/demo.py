"""The Fashion-MNIST demo (``cbd-fast demo``): purify a backdoored model without labels, side by side
with the baselines, and write a report.

1. Loads a shipped backdoored ``FMNISTNet`` (``cbd_fast/evaluation/assets/<attack>_seed<seed>.pt``, trained by
   ``scripts/train_backdoor.py``) or trains one on the fly when the asset is missing.
2. Measures clean accuracy (ACC) and attack success rate (ASR) before.
3. ``cbd_fast.purify`` with its DEFAULTS on 5% of the training images (3,000), without labels.
4. ACC/ASR after, and the baselines on the same model and images: no defense, plain fine-tuning
   (same loss, epsilon 0), supervised fine-tuning (labels), adversarial unlearning (labels).
5. Prints a table, runs the evocation diagnostic and writes a report (``cbd_fast.app.report``):
   report.json + PNGs (loss curves, features before/after in 2-D).

Labels are used only to evaluate (and by the two label-using baselines).

Example:
    >>> from cbd_fast.app.demo import run_demo                       # doctest: +SKIP
    >>> summary = run_demo(attack="badnets", quick=True)         # doctest: +SKIP
    >>> summary["results"]["cbd"]["asr"] < summary["results"]["no_defense"]["asr"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbd_fast.evaluation.models import asset_path

__all__ = ["main", "run_demo", "load_or_train"]

_ALL_ATTACKS = ("badnets", "blended", "sig", "wanet", "badencoder")


def load_or_train(
    attack: str,
    seed: int = 0,
    *,
    train: Any = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    epochs: int = 3,
) -> nn.Module:
    """The backdoored ``FMNISTNet`` for (``attack``, ``seed``): the shipped asset, else a cached one in
    ``cache_dir``, else trained now (poisoned training, ~2-4 minutes on 2 CPU cores; saved to
    ``cache_dir`` when given).

    Args:
        attack: one of ``badnets``, ``blended``, ``sig``, ``wanet``, ``badencoder``.
        seed: model seed.
        train: the Fashion-MNIST training ``ImageSet`` (loaded when None and training is needed).
        cache_dir: where to look for / save models not shipped.
        progress: progress bar while training.
        epochs: training epochs when training.
    """
    from cbd_fast.evaluation.backdoors import build_backdoored_model
    from cbd_fast.evaluation.models import load_model, save_model

    if attack not in _ALL_ATTACKS:
        raise ValueError(f"attack must be one of {_ALL_ATTACKS}; got {attack!r}")
    candidates = [asset_path(attack, seed)]
    if cache_dir is not None:
        candidates.append(Path(cache_dir) / f"{attack}_seed{seed}.pt")
    for c in candidates:
        if c.is_file():
            return load_model(str(c))
    if train is None:
        from cbd_fast.evaluation.fmnist import load_fashion_mnist

        train = load_fashion_mnist("train")
    model = build_backdoored_model(attack, train, seed=seed, epochs=epochs, progress=progress)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        save_model(model, str(Path(cache_dir) / f"{attack}_seed{seed}.pt"))
        model = load_model(str(Path(cache_dir) / f"{attack}_seed{seed}.pt"))  # same fp16-rounded weights
    return model


def _classifier(
    backbone: nn.Module, head: nn.Module | None, probe_data: tuple[torch.Tensor, torch.Tensor] | None
) -> nn.Module:
    from cbd_fast.evaluation.metrics import linear_probe

    if head is not None:
        return nn.Sequential(backbone, head).eval()
    assert probe_data is not None
    return linear_probe(backbone, *probe_data)


def run_demo(
    attack: str = "badnets",
    *,
    seed: int = 0,
    report_dir: str | Path | None = "runs/demo",
    quick: bool = False,
    baselines: bool = True,
    quiet: bool = False,
    unlabeled_fraction: float = 0.05,
    n_test: int | None = None,
    cache_dir: str | Path | None = "runs/models",
    diagnostic: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the demo and return a JSON-able summary.

    Args:
        attack: backdoor of the model to purify (``badnets`` (shipped), ``blended``, ``sig``, ``wanet``,
            ``badencoder`` (self-supervised: evaluated with a linear probe)).
        seed: model seed (0 is shipped) and seed of the unlabeled draw and of purification.
        report_dir: where the report goes (None: no report).
        quick: a tiny run for CI (300 unlabeled images, 1,000 test images, 1 epoch, one diagnostic radius).
        baselines: also run the baselines.
        quiet: no progress bars and no table.
        unlabeled_fraction: share of the 60,000 training images given to the defense, unlabeled.
        n_test: test images used (None: all 10,000; ``quick``: 1,000).
        cache_dir: where models trained on the fly are kept.
        diagnostic: run the evocation diagnostic.
        overrides: ``PurifyConfig`` fields passed to ``purify`` (empty: the defaults).

    Returns:
        ``{"attack", "seed", "results": {method: {"acc", "asr", "der", "seconds"}}, "diagnostic",
        "history", "config", "runtime", "report", "seconds"}``.
    """
    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.evaluation.backdoors import trigger_for
    from cbd_fast.evaluation.baselines import adversarial_unlearning, plain_finetune, supervised_finetune
    from cbd_fast.evaluation.fmnist import load_fashion_mnist
    from cbd_fast.evaluation.metrics import defense_effectiveness_rate, evaluate_backdoor
    from cbd_fast.evaluation.protocol import defender_images

    t_start = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if quick:
        unlabeled_fraction = min(unlabeled_fraction, 0.005)
        n_test = n_test or 1000
        overrides = {"epochs": 1, **overrides}
    if n_test is not None:
        g = torch.Generator().manual_seed(123)
        ti = torch.randperm(len(test), generator=g)[:n_test]
        test = test.subset(ti)
    trigger = trigger_for(attack)
    ssl = attack == "badencoder"

    model = load_or_train(attack, seed, train=train, cache_dir=cache_dir, progress=not quiet)
    head = None if ssl else model.head
    probe_data = (train.images[:10000], train.labels[:10000]) if ssl else None
    # the defender's images: drawn independently of the images the attacker poisoned
    x_unl, idx = defender_images(train, unlabeled_fraction, seed=seed)
    y_unl = train.labels[idx]  # ONLY for the label-using baselines

    def evaluate(backbone: nn.Module, hd: nn.Module | None = head) -> dict[str, float]:
        return evaluate_backdoor(_classifier(backbone, hd, probe_data), test.images, test.labels, trigger)

    results: dict[str, dict[str, float]] = {}
    before = evaluate(model.backbone)
    results["no_defense"] = {**before, "seconds": 0.0}
    say(
        f"[{attack}] backdoored model: ACC {100 * before['acc']:.1f}%  ASR {100 * before['asr']:.1f}%  "
        f"({len(x_unl)} unlabeled images for the defense)"
    )

    config = PurifyConfig(**{"seed": seed, "progress": not quiet, **overrides}).validate()
    t0 = time.perf_counter()
    # a supervised model's own head guides and checks the run (docs/method.md 4.12, 4.23);
    # the encoder attack has none the defender could use
    fit = Purifier(config).fit(model.backbone, x_unl, head=False if head is None else head)
    purified = fit.encoder
    results["cbd"] = {**evaluate(purified), "seconds": time.perf_counter() - t0}

    if baselines:
        t0 = time.perf_counter()
        ft = plain_finetune(model.backbone, x_unl, config)
        results["plain_finetune"] = {**evaluate(ft), "seconds": time.perf_counter() - t0}
        sup_head = head if head is not None else nn.Linear(model.head.in_features, 10)
        epochs = config.epochs
        t0 = time.perf_counter()
        bb, hd = supervised_finetune(model.backbone, sup_head, x_unl, y_unl, epochs=epochs, seed=seed)
        results["supervised_finetune"] = {
            **evaluate(bb, None if ssl else hd),
            "seconds": time.perf_counter() - t0,
        }
        t0 = time.perf_counter()
        bb, hd = adversarial_unlearning(model.backbone, sup_head, x_unl, y_unl, epochs=epochs, seed=seed)
        results["adversarial_unlearning"] = {
            **evaluate(bb, None if ssl else hd),
            "seconds": time.perf_counter() - t0,
        }
    for r in results.values():
        r["der"] = defense_effectiveness_rate(before["acc"], before["asr"], r["acc"], r["asr"])

    diag = None
    if diagnostic:
        from cbd_fast.evaluation.diagnostics import evocation_diagnostic

        n_diag = 128 if quick else 512
        eps = (config.epsilon or PurifyConfig().epsilon,) if quick else (8 / 255, 16 / 255, 32 / 255)
        xs = test.images[:n_diag]
        diag = {
            "before": evocation_diagnostic(
                model.backbone,
                xs,
                classifier=_classifier(model.backbone, head, probe_data),
                trigger=trigger,
                target=0,
                epsilons=eps,
                steps=5 if quick else 10,
            ),
            "after": evocation_diagnostic(
                purified,
                xs,
                classifier=_classifier(purified, head, probe_data),
                trigger=trigger,
                target=0,
                epsilons=eps,
                steps=5 if quick else 10,
            ),
        }

    if not quiet:
        _print_table(attack, results)
        if diag is not None:
            for row in diag["before"]["per_epsilon"]:
                say(
                    f"  diagnostic (before): eps {row['epsilon_255']:.0f}/255: "
                    f"{100 * row['target_share']:.1f}% of "
                    f"contrastive adversaries classified as the target (chance {100 * row['chance']:.1f}%), "
                    f"cos to triggered centroid {row['cos_adv_to_trigger_centroid']:.2f} vs clean "
                    f"{diag['before']['cos_clean_to_trigger_centroid']:.2f}"
                )

    report = None
    if report_dir is not None:
        report = _write_report(
            report_dir,
            config,
            fit.history,
            fit.runtime,
            results,
            diag,
            model.backbone,
            purified,
            test.images[:256],
            trigger,
            attack,
            seed,
            len(x_unl),
        )
        say(f"report: {report}")
    total = time.perf_counter() - t_start
    say(f"total {total:.0f} s")
    return {
        "attack": attack,
        "seed": seed,
        "results": results,
        "diagnostic": diag,
        "history": fit.history,
        "config": config.to_dict() if hasattr(config, "to_dict") else vars(config),
        "runtime": fit.runtime,  # includes the loss weights "auto" resolved to
        "report": str(report) if report else None,
        "seconds": total,
    }


def _print_table(attack: str, results: dict[str, dict[str, float]]) -> None:
    print(f"\n{'method (' + attack + ')':<28}{'labels':>8}{'ACC %':>8}{'ASR %':>8}{'DER':>7}{'s':>7}")
    uses_labels = {"supervised_finetune": "yes", "adversarial_unlearning": "yes"}
    for name, r in results.items():
        print(
            f"{name:<28}{uses_labels.get(name, 'no'):>8}{100 * r['acc']:>8.1f}{100 * r['asr']:>8.1f}"
            f"{r['der']:>7.3f}{r['seconds']:>7.0f}"
        )
    print()


def _write_report(
    report_dir, config, history, runtime, results, diag, before, after, x, trigger, attack, seed, n_unl
):
    try:
        from cbd_fast.app.report import collect_projections, write_report
    except ImportError:  # pragma: no cover - the report module is optional
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(
            json.dumps(
                {"results": results, "diagnostic": diag, "history": history, "runtime": runtime},
                default=str,
                indent=1,
            )
        )
        return out / "report.json"
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    proj = collect_projections(
        copy.deepcopy(before), copy.deepcopy(after), x, x_triggered=trigger(x), config=config, n=256
    )
    return write_report(
        report_dir,
        config=cfg,
        history=history,
        evaluation={"attack": attack, "seed": seed, "unlabeled_images": n_unl, "results": results},
        diagnostic=diag,
        projections=proj,
        extra={"demo": "cbd_fast.app.demo", "runtime": runtime},
    )


def main(argv: list[str] | None = None) -> int:
    """``cbd-fast demo`` entry point. Returns the exit status."""
    p = argparse.ArgumentParser(prog="cbd-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--attack", default="badnets", choices=_ALL_ATTACKS, help="backdoor to remove (default badnets)"
    )
    p.add_argument("--seed", type=int, default=0, help="model / data seed (0 is shipped)")
    p.add_argument("--report", default="runs/demo", metavar="DIR", help="report folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny subset, 1 epoch (CI smoke test)")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    run_demo(
        args.attack,
        seed=args.seed,
        report_dir=args.report,
        quick=args.quick,
        baselines=not args.no_baselines,
        quiet=args.quiet,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
