"""What the trigger search found on a DEV model, and whether the purification removed it.

    python scripts/research/found_triggers.py --attack reflection --run-seeds 0,1,2
    python scripts/research/found_triggers.py --attack adversarial_patch --run-seeds 0 --set epochs=6

Runs ``purify`` (the defaults, updated with ``--set``) on a dev attack's tuning-seed model, as
``scripts/tune_defaults.py`` does (the protocol refuses report attacks), with a checkpoint at the end.
Then it applies every universal parameter set the search held at the end (the mask + pattern, warp,
tone and additive sets) to the first ``--images`` validation images and measures, on the images
whose label is not the target, the share the head sends to the target class through the ORIGINAL
encoder (did the search find something that fires the backdoor?) and through the PURIFIED one (was
it removed?), beside the real trigger's. Prints one line per set and appends a JSON line per run to
``--out``. Encoder attacks (no head) are refused.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from tune_defaults import DEV_ATTACKS, load_case  # noqa: E402

from cbd_fast import Purifier, PurifyConfig  # noqa: E402
from cbd_fast.core.adversaries.search import TriggerSearch  # noqa: E402
from cbd_fast.core.checkpoint import load_checkpoint  # noqa: E402

UNIVERSAL = ("mask", "warp", "tone", "additive")


def _search_state(state: Any) -> dict[str, Any] | None:
    """The trigger search's ``state_dict`` inside a checkpoint (the dict whose ``params`` hold the
    universal sets)."""
    if isinstance(state, dict):
        params = state.get("params")
        if isinstance(params, dict) and "additive" in params:
            return state
        for v in state.values():
            found = _search_state(v)
            if found is not None:
                return found
    return None


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected key=value; got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run(attack: str, run_seed: int, overrides: dict[str, Any], n_images: int) -> dict[str, Any]:
    model, trigger, head, _probe, val, x_unl = load_case(attack, 0)
    if head is None:
        raise SystemExit(f"{attack!r} is an encoder attack: no head to read the target rate through")
    with tempfile.TemporaryDirectory() as ckpt:
        cfg = PurifyConfig(seed=run_seed, progress=False, checkpoint_dir=ckpt, **overrides).validate()
        if cfg.adversary != "trigger_search":
            raise SystemExit(f"adversary {cfg.adversary!r}: this probe reads the trigger search's state")
        fit = Purifier(cfg).fit(model.backbone, x_unl, head=head)
        state = _search_state(load_checkpoint(sorted(glob.glob(f"{ckpt}/*"))[-1]))
    if state is None:
        raise SystemExit("no trigger-search state in the last checkpoint")
    x, y = val.images[:n_images], val.labels[:n_images]
    off_target = y != 0

    @torch.no_grad()
    def target_rate(encoder: torch.nn.Module, images: torch.Tensor) -> float:
        return float((head(encoder(images)).argmax(1)[off_target] == 0).float().mean())

    search = TriggerSearch(cfg)
    rows = []
    for family in UNIVERSAL:
        for i, ps in enumerate(state["params"].get(family) or []):
            xa = search._apply(family, x, [t.float() for t in ps])
            rows.append(
                {
                    "set": f"{family}[{i}]",
                    "original": target_rate(model.backbone, xa),
                    "purified": target_rate(fit.encoder, xa),
                    "max_change": float((xa - x).abs().max()),
                }
            )
    return {
        "attack": attack,
        "run_seed": run_seed,
        "overrides": overrides,
        "trigger": {
            "original": target_rate(model.backbone, trigger(x)),
            "purified": target_rate(fit.encoder, trigger(x)),
        },
        "strength": state.get("strength"),
        "sets": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", required=True, choices=DEV_ATTACKS)
    ap.add_argument("--run-seeds", default="0")
    ap.add_argument("--set", nargs="*", default=[], help="PurifyConfig overrides, key=value")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "runs" / "tune" / "found_triggers.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    overrides = _overrides(args.set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.run_seeds.split(",")):
        rec = run(args.attack, seed, overrides, args.images)
        t = rec["trigger"]
        print(f"{args.attack} run seed {seed}: trigger {t['original']:.3f} -> {t['purified']:.3f}")
        for r in rec["sets"]:
            print(f"  {r['set']:12s} original {r['original']:.3f}  purified {r['purified']:.3f}")
        with out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
