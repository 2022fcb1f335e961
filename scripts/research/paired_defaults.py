"""Paired check of a defaults change on REPORT cells: CBD with the previous defaults on the same zoo
models, the same defender images and the same test images as ``scripts/heldout_eval.py`` (its
``run_cell``), so that a cell's two CBD results differ only by the defaults.

    python scripts/research/paired_defaults.py --cells fmnistnet/blended_image/1,fmnistnet/lf/2 \
        --new benchmarks/results/heldout_head_paired.json --previous head --jobs 2

``--previous``: which defaults the cells are compared with. ``head`` (the default): those before
the head term (``docs/method.md`` 4.23: ``head_weight=0``, ``clean_weight=50``,
``head_clean=False``, and the search without the scan's own-pattern fills and mask window, as it
was then); ``scan``: those before 4.24 (the head term on, the search without the own-pattern fills
and mask window: ``scan_ascent=0``, ``mask_window=0``); ``areas``: those before 4.28 (two square
sizes in the mask scan: ``scan_areas=2``).

``--new``: a JSON whose ``cells`` hold the current defaults' results of those cells (written by
``heldout_eval.py`` on the same zoo models); the previous defaults' results are added to each cell
under ``results["cbd_previous"]``, and the file is rewritten. ``--summary`` prints the per-attack
comparison of such a file (:func:`summarize`) and runs nothing. Nothing here chooses a setting: the
cells are report cells, read after the choice was made on the dev attacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


#: the search's settings before ``docs/method.md`` 4.24 (no own-pattern fills, masks anywhere; and
#: two scan sizes, as every default before 4.28)
_SEARCH_BEFORE_SCAN_FILLS = {"scan_ascent": 0, "mask_window": 0.0, "scan_areas": 2}
#: ``--previous`` -> the PurifyConfig defaults it restores
PREVIOUS: dict[str, dict] = {
    "head": {
        "clean_weight": 50.0,
        "head_weight": 0.0,
        "head_clean": False,
        "adversary_options": _SEARCH_BEFORE_SCAN_FILLS,
    },
    "scan": {"adversary_options": _SEARCH_BEFORE_SCAN_FILLS},
    "areas": {"adversary_options": {"scan_areas": 2}},
}


def _use_previous_defaults(which: str) -> None:
    """Make ``cbd_fast.PurifyConfig`` (as ``run_cell`` imports it) default to ``PREVIOUS[which]``."""
    import cbd_fast
    from cbd_fast.core.config import PurifyConfig

    fields = []
    for name, value in PREVIOUS[which].items():
        if isinstance(value, dict):
            default = dataclasses.field(default_factory=lambda v=value: dict(v))
        else:
            default = dataclasses.field(default=value)
        fields.append((name, type(value), default))
    cbd_fast.PurifyConfig = dataclasses.make_dataclass("PreviousDefaults", fields, bases=(PurifyConfig,))


def _run(key: str, which: str) -> tuple[str, dict]:
    import torch

    torch.set_num_threads(1)
    _use_previous_defaults(which)
    import heldout_eval

    arch, attack, seed = key.split("/")
    cell = heldout_eval.run_cell(arch, attack, int(seed), ("cbd",))
    return key, cell


def summarize(data: dict) -> str:
    """Markdown: per attack, the means over its seeds of ACC / ASR before, with the previous and with
    the current defaults (``cbd_previous`` and ``cbd`` of every cell that has both; a run stopped by
    the health check is left out of its mean and counted in brackets), then the totals over the
    cells where both returned: mean ASR, mean ACC drop, cells lower / higher, cells meeting both
    targets (ASR <= 5%, drop <= 2)."""
    import statistics

    cells = [c for c in data["cells"].values() if {"cbd", "cbd_previous"} <= set(c["results"])]
    if not cells:
        return "no cell holds both cbd and cbd_previous"
    by_attack: dict[str, list[dict]] = {}
    for c in sorted(cells, key=lambda c: (c["attack"], c["seed"])):
        by_attack.setdefault(c["attack"], []).append(c)

    def cell(rs: list[dict]) -> str:
        ok = [r for r in rs if "asr" in r]
        if not ok:
            return "stopped"
        acc, asr = (100 * statistics.mean(r[k] for r in ok) for k in ("acc", "asr"))
        return f"{acc:.1f} / {asr:.1f}" + (f" ({len(rs) - len(ok)} stopped)" if len(ok) < len(rs) else "")

    lines = [
        "| attack | seeds | before | previous defaults | current defaults |",
        "|---|---|---|---|---|",
    ]
    for attack, cs in by_attack.items():
        res = [[c["results"][m] for c in cs] for m in ("no_defense", "cbd_previous", "cbd")]
        seeds = ",".join(str(c["seed"]) for c in cs)
        lines.append(f"| {attack} | {seeds} | " + " | ".join(cell(r) for r in res) + " |")
    both = [c for c in cells if all("asr" in c["results"][m] for m in ("cbd", "cbd_previous"))]
    lines.append("")
    if not both:
        return "\n".join([*lines, "- no cell where both settings returned a model"])
    import heldout_eval  # the held-out tables' own statistics and met rule

    for m, name in (("cbd_previous", "previous defaults"), ("cbd", "current defaults")):
        paired, every = heldout_eval.summarize(both, m), heldout_eval.summarize(cells, m)
        lines.append(
            f"- {name}: {len(both)} cells where both returned: mean ASR {paired['mean_asr']:.2f}%, mean "
            f"ACC drop {paired['mean_drop']:.2f}; of all {len(cells)} cells {every['met']} meet both "
            f"targets, {every['stopped']} stopped"
        )
    d = [c["results"]["cbd"]["asr"] - c["results"]["cbd_previous"]["asr"] for c in both]
    lines.append(
        f"- current against previous: lower on {sum(x < 0 for x in d)}, higher on {sum(x > 0 for x in d)}, "
        f"equal on {sum(x == 0 for x in d)} of {len(both)}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", help="comma-separated ARCH/ATTACK/SEED report cells")
    p.add_argument("--new", required=True, type=Path, help="JSON with the current defaults' cells")
    p.add_argument("--previous", choices=sorted(PREVIOUS), default="head", help="the defaults compared with")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--summary", action="store_true", help="print the per-attack comparison of --new and exit")
    args = p.parse_args(argv)
    data = json.loads(args.new.read_text())
    if args.summary:
        print(summarize(data))
        return 0
    if not args.cells:
        p.error("--cells is required (or --summary)")
    keys = [k for k in args.cells.split(",") if k]
    missing = [k for k in keys if k not in data["cells"]]
    if missing:
        raise SystemExit(f"--cells {missing}: not in {args.new}")
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        futs = [ex.submit(_run, k, args.previous) for k in keys]
        for f in as_completed(futs):
            key, cell = f.result()
            prev, same = cell["results"]["cbd"], data["cells"][key]["results"]["no_defense"]
            got = cell["results"]["no_defense"]
            if [got[m] for m in ("acc", "asr")] != [same[m] for m in ("acc", "asr")]:
                raise SystemExit(f"{key}: the zoo model differs from the one in {args.new}")
            data["cells"][key]["results"]["cbd_previous"] = prev
            args.new.write_text(json.dumps(data, indent=1, default=str))
            new = data["cells"][key]["results"]["cbd"]
            print(
                f"{key}: previous {prev.get('acc', 0) * 100:.1f} / {prev.get('asr', 0) * 100:.1f}  "
                f"current {new.get('acc', 0) * 100:.1f} / {new.get('asr', 0) * 100:.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
