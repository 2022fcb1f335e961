"""Paired check of a defaults change on REPORT cells: CBD with the previous defaults on the same zoo
models, the same defender images and the same test images as ``scripts/heldout_eval.py`` (its
``run_cell``), so that a cell's two CBD results differ only by the defaults.

    python scripts/research/paired_defaults.py --cells fmnistnet/blended_image/1,fmnistnet/lf/2 \
        --new benchmarks/results/heldout_head_paired.json --previous head --jobs 2

``--previous``: which defaults the cells are compared with. ``head`` (the default): those before
the head term (``docs/method.md`` 4.23: ``head_weight=0``, ``clean_weight=50``,
``head_clean=False``, and the search without the scan's own-pattern fills and mask window, as it
was then); ``scan``: those before 4.24 (the head term on, the search without the own-pattern fills
and mask window: ``scan_ascent=0``, ``mask_window=0``).

``--new``: a JSON whose ``cells`` hold the current defaults' results of those cells (written by
``heldout_eval.py`` on the same zoo models); the previous defaults' results are added to each cell
under ``results["cbd_previous"]``, and the file is rewritten. Nothing here chooses a setting: the
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


#: the search's settings before ``docs/method.md`` 4.24 (no own-pattern fills, masks anywhere)
_SEARCH_BEFORE_SCAN_FILLS = {"scan_ascent": 0, "mask_window": 0.0}
#: ``--previous`` -> the PurifyConfig defaults it restores
PREVIOUS: dict[str, dict] = {
    "head": {
        "clean_weight": 50.0,
        "head_weight": 0.0,
        "head_clean": False,
        "adversary_options": _SEARCH_BEFORE_SCAN_FILLS,
    },
    "scan": {"adversary_options": _SEARCH_BEFORE_SCAN_FILLS},
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", required=True, help="comma-separated ARCH/ATTACK/SEED report cells")
    p.add_argument("--new", required=True, type=Path, help="JSON with the current defaults' cells")
    p.add_argument("--previous", choices=sorted(PREVIOUS), default="head", help="the defaults compared with")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    data = json.loads(args.new.read_text())
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
