"""Paired check of a defaults change on REPORT cells: CBD with the previous loss weights (no head
term: ``head_weight=0``, ``clean_weight=50``, ``head_clean=False``) on the same zoo models, the
same defender images and the same test images as ``scripts/heldout_eval.py`` (its ``run_cell``),
so that a cell's two CBD results differ only by the defaults.

    python scripts/research/paired_defaults.py --cells fmnistnet/blended_image/1,fmnistnet/lf/2 \\
        --new benchmarks/results/heldout_head_paired.json --jobs 2

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


def _use_previous_defaults() -> None:
    """Make ``cbd_fast.PurifyConfig`` (as ``run_cell`` imports it) default to the previous weights."""
    import cbd_fast
    from cbd_fast.core.config import PurifyConfig

    @dataclasses.dataclass
    class PreviousDefaults(PurifyConfig):
        clean_weight: float | str = 50.0
        head_weight: float | str = 0.0
        head_clean: bool = False

    cbd_fast.PurifyConfig = PreviousDefaults


def _run(key: str) -> tuple[str, dict]:
    import torch

    torch.set_num_threads(1)
    _use_previous_defaults()
    import heldout_eval

    arch, attack, seed = key.split("/")
    cell = heldout_eval.run_cell(arch, attack, int(seed), ("cbd",))
    return key, cell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", required=True, help="comma-separated ARCH/ATTACK/SEED report cells")
    p.add_argument("--new", required=True, type=Path, help="JSON with the current defaults' cells")
    p.add_argument("--jobs", type=int, default=1)
    args = p.parse_args(argv)
    data = json.loads(args.new.read_text())
    keys = [k for k in args.cells.split(",") if k]
    missing = [k for k in keys if k not in data["cells"]]
    if missing:
        raise SystemExit(f"--cells {missing}: not in {args.new}")
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        futs = [ex.submit(_run, k) for k in keys]
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
