"""The set-up and CI scripts: they parse, refuse misuse clearly, and the README's two set-up
commands name scripts that exist (cheap checks; .ci/run itself is what CI runs)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_SCRIPTS = [ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_scripts_parse(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().splitlines()[0].startswith("#!"), f"{script} has no shebang"


def test_readme_has_exactly_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Set-up section has no bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    commands = [c for c in commands if c]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"], commands
    for command in commands:
        assert (ROOT / command.split()[1]).is_file()


def test_ci_run_rejects_unknown_stage() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "no-such-stage"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "no-such-stage" in proc.stderr and "cuda-ext" in proc.stderr


def test_triton_check_refuses_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_triton_hopper.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr


def test_install_script_rejects_unknown_argument() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install.sh"), "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def _load_script(name: str):  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_heldout_eval_merges_cells_without_losing_other_methods() -> None:
    """Adding methods to a cell keeps the others; a change of CBD defaults drops only the results
    that depend on them."""
    mod = _load_script("heldout_eval")
    old = {"cbd_config": {"steps": 5}, "results": {"cbd": 1, "plain_finetune": 2, "nad": 3, "no_defense": 0}}
    same = mod.merge_cell(old, {"cbd_config": {"steps": 5}, "results": {"i_bau": 4, "no_defense": 0}})
    assert same["results"] == {"cbd": 1, "plain_finetune": 2, "nad": 3, "no_defense": 0, "i_bau": 4}
    other = mod.merge_cell(old, {"cbd_config": {"steps": 2}, "results": {"no_defense": 0}})
    assert other["results"] == {"nad": 3, "no_defense": 0} and other["cbd_config"] == {"steps": 2}
    assert mod.merge_cell(None, {"results": {"x": 1}}) == {"results": {"x": 1}}
    # a field added to the config since, left at None (a switch that is off), changes nothing
    added = mod.merge_cell(old, {"cbd_config": {"steps": 5, "new_switch": None}, "results": {}})
    assert added["results"] == old["results"]
    on = mod.merge_cell(old, {"cbd_config": {"steps": 5, "new_switch": 2}, "results": {}})
    assert on["results"] == {"nad": 3, "no_defense": 0}
    # ... at any depth: a new adversary option left at None; a changed or removed one is another setting
    nested = {**old, "cbd_config": {"steps": 5, "adversary_defaults": {"restarts": 2}}}
    for adv, kept in (
        ({"restarts": 2, "mask_restarts": None}, True),
        ({"restarts": 2, "mask_restarts": 1}, False),
        ({"restarts": 1, "mask_restarts": None}, False),
        ({}, False),
    ):
        new = mod.merge_cell(nested, {"cbd_config": {"steps": 5, "adversary_defaults": adv}, "results": {}})
        assert (new["results"] == old["results"]) is kept, adv
    # another backdoored model (a retrained zoo model that came out differently): nothing old is kept
    rec = {"acc": 0.9, "asr": 0.99, "seconds": 80.0}
    old_m = {**old, "model_record": rec}
    same_model = mod.merge_cell(
        old_m, {"cbd_config": {"steps": 5}, "model_record": {**rec, "seconds": 99.0}, "results": {}}
    )
    assert same_model["results"] == old["results"]
    new_model = {"cbd_config": {"steps": 5}, "model_record": {**rec, "asr": 0.98}, "results": {"i_bau": 4}}
    assert mod.merge_cell(old_m, new_model)["results"] == {"i_bau": 4}
    # an older record without the scores (seconds and settings only) is not another model
    old_rec = {**old, "model_record": {"seconds": 700.0, "settings": {"eps": 0.1}}}
    kept = mod.merge_cell(old_rec, {"cbd_config": {"steps": 5}, "model_record": rec, "results": {"i_bau": 4}})
    assert kept["results"] == {**old["results"], "i_bau": 4}
    # ... unless the model itself scores differently before any defense: nothing old is kept
    before = {"acc": 0.9, "asr": 0.785}
    old_b = {**old_rec, "results": {**old["results"], "no_defense": before}}
    rebuilt = {"cbd_config": {"steps": 5}, "model_record": {"seconds": 1.0}, "results": {"no_defense": {}}}
    rebuilt["results"]["no_defense"] = {**before, "asr": 0.963}
    assert mod.merge_cell(old_b, rebuilt)["results"] == rebuilt["results"]
    same_b = {"cbd_config": {"steps": 5}, "results": {"no_defense": dict(before), "i_bau": 4}}
    assert mod.merge_cell(old_b, same_b)["results"] == {**old_b["results"], "i_bau": 4}
    # the same test decides, before a cell runs, whether it must run every requested method
    assert mod.same_model(old_b, {"seconds": 1.0}, dict(before))
    assert not mod.same_model(old_b, None, {**before, "asr": 0.963})
    assert not mod.same_model(old_m, {**rec, "acc": 0.8}, None)
    assert mod.same_model({"results": {}}, rec, before)  # nothing stored to compare: the same


def test_heldout_eval_out_keeps_cells_apart(tmp_path: Path) -> None:
    """``--out`` reads and writes another JSON (and renders its table beside it), never the stored one."""
    mod = _load_script("heldout_eval")
    stored_path = mod.OUT_JSON
    stored = stored_path.read_bytes() if stored_path.is_file() else None
    cell = {
        "arch": "fmnistnet",
        "attack": "lf",
        "split": "report",
        "kind": "poison",
        "seed": 1,
        "floor_asr": 0.01,
        "cbd_config": {"steps": 7},
        "results": {
            "no_defense": {"acc": 0.9, "asr": 0.99, "seconds": 0.0},
            "cbd": {"acc": 0.88, "asr": 0.04, "der": 0.96, "seconds": 60.0},
        },
    }
    out = tmp_path / "apart.json"
    out.write_text(json.dumps({"cells": {"fmnistnet/lf/1": cell}}))
    assert mod.main(["--render", "--out", str(out)]) == 0
    table = (tmp_path / "apart.md").read_text()
    assert "| fmnistnet | lf | 1 |" in table and "88.0 / 4.0" in table
    assert f"from `{out.resolve()}`" in table  # the header names the file the table came from
    assert mod.OUT_JSON == out.resolve() != stored_path
    assert (stored_path.read_bytes() if stored_path.is_file() else None) == stored
    with pytest.raises(SystemExit, match="apart.csv"):
        mod.main(["--render", "--out", str(tmp_path / "apart.csv")])


def test_paired_defaults_restores_each_previous_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``paired_defaults.py --previous``: ``head`` restores the defaults before the head term (and
    before the scan's own-pattern fills), ``scan`` only the search before the fills; a run's own
    settings still override them, and the current defaults are left as they are elsewhere."""
    import cbd_fast
    from cbd_fast.core.adversaries.base import make_adversary

    mod = _load_script("research/paired_defaults")
    current = cbd_fast.PurifyConfig
    monkeypatch.setattr(cbd_fast, "PurifyConfig", current)  # restored after the test
    for which, weights in (("head", (50.0, 0.0, False)), ("scan", ("auto", "auto", True))):
        mod._use_previous_defaults(which)
        cfg = cbd_fast.PurifyConfig(seed=2).validate()
        assert (cfg.clean_weight, cfg.head_weight, cfg.head_clean) == weights and cfg.seed == 2
        opts = make_adversary(cfg).options
        assert (opts["scan_ascent"], opts["mask_window"], opts["scan_areas"]) == (0, 0.0, 2)
        other = cbd_fast.PurifyConfig(adversary_options={"scan_ascent": 2}).validate()
        assert make_adversary(other).options["scan_ascent"] == 2
        monkeypatch.setattr(cbd_fast, "PurifyConfig", current)
    mod._use_previous_defaults("areas")  # before 4.28: two scan sizes, nothing else changed
    opts = make_adversary(cbd_fast.PurifyConfig().validate()).options
    assert (opts["scan_areas"], opts["scan_ascent"], opts["mask_window"]) == (2, 3, 0.5)
    monkeypatch.setattr(cbd_fast, "PurifyConfig", current)
    opts = make_adversary(current().validate()).options
    assert (opts["scan_ascent"], opts["mask_window"], opts["scan_areas"]) == (3, 0.5, 3)


def test_paired_defaults_summary_pairs_returned_runs_and_counts_stops() -> None:
    """``paired_defaults.py --summary``: per-attack means over the seeds (a stopped run left out of
    its mean and counted), totals over the cells where both settings returned."""
    mod = _load_script("research/paired_defaults")

    def cell(attack: str, seed: int, before: float, prev: dict, cur: dict) -> dict:
        res = {"no_defense": {"acc": 0.90, "asr": before}, "cbd_previous": prev, "cbd": cur}
        for r in (prev, cur):  # heldout_eval.summarize reads the DER (any value here) and seconds
            r.update({} if "error" in r else {"der": 0.9, "seconds": 1.0})
        return {"attack": attack, "seed": seed, "results": res}

    stop = {"error": "HealthError: ..."}
    cells = [
        cell("a", 1, 1.0, {"acc": 0.89, "asr": 0.10}, {"acc": 0.885, "asr": 0.04}),
        cell("a", 2, 1.0, {"acc": 0.885, "asr": 0.02}, {"acc": 0.87, "asr": 0.02}),
        cell("b", 1, 0.9, stop, {"acc": 0.86, "asr": 0.30}),
    ]
    out = mod.summarize({"cells": {str(i): c for i, c in enumerate(cells)}})
    assert "| a | 1,2 | 90.0 / 100.0 | 88.8 / 6.0 | 87.8 / 3.0 |" in out
    assert "| b | 1 | 90.0 / 90.0 | stopped | 86.0 / 30.0 |" in out
    assert "previous defaults: 2 cells where both returned: mean ASR 6.00%, mean ACC drop 1.25; " in out
    # met: a/1 current (4%, 1.5 points) and a/2 previous (2%, 1.5 points); a/2 current loses 3 points
    assert "of all 3 cells 1 meet both targets, 1 stopped" in out
    assert "current defaults: 2 cells where both returned: mean ASR 3.00%, mean ACC drop 2.25; " in out
    assert "current against previous: lower on 1, higher on 0, equal on 1 of 2" in out


def test_heldout_eval_reads_the_settings_tune_baselines_chose(tmp_path: Path) -> None:
    """The evaluation uses what the dev tuning chose (tune_baselines' JSON layout), recomputes a
    baseline stored with other settings, and refuses a file of another layout."""
    mod = _load_script("heldout_eval")
    tuned = tmp_path / "baselines.json"
    tuned.write_text(
        '{"methods": {"nad": {"settings": [], "chosen": {"epochs": 3}, "chosen_index": 1},'
        ' "fine_tuning": {"settings": [], "chosen": {"lr": 0.01}, "chosen_index": 0}}}'
    )
    got = mod.baseline_settings(tuned)
    assert got["nad"] == {"epochs": 3} and got["fine_tuning"] == {"lr": 0.01} and got["i_bau"] == {}
    assert "dev-tuned fine_tuning, nad" in got["_source"]
    assert mod.baseline_settings(tmp_path / "absent.json")["nad"] == {}
    cell = {
        "cbd_config": mod._cbd_config(1),
        "results": {"cbd": {}, "nad": {"settings": {}}, "fine_tuning": {"settings": {"lr": 0.01}}},
    }
    methods = ("cbd", "nad", "fine_tuning", "i_bau")
    assert mod.stale_methods(cell, methods, 1, got) == ["nad", "i_bau"]
    cell["cbd_config"] = {"steps": 1}
    assert mod.stale_methods(cell, ("cbd", "fine_tuning"), 1, got) == ["cbd"]
    # results stored before a field that is off by default (None) existed are still current
    before_field = {k: v for k, v in mod._cbd_config(1).items() if k != "free_replays"}
    cell["cbd_config"] = before_field
    assert mod.stale_methods(cell, ("cbd", "fine_tuning"), 1, got) == []
    # a change of the default adversary's own settings (not visible in PurifyConfig) is a change too
    cell["cbd_config"] = mod._cbd_config(1) | {"adversary_defaults": {"sparse_weight": 0.0}}
    assert mod.stale_methods(cell, ("cbd", "fine_tuning"), 1, got) == ["cbd"]
    (tmp_path / "other.json").write_text('{"chosen": {"nad": {}}}')
    with pytest.raises(SystemExit, match="tune_baselines"):
        mod.baseline_settings(tmp_path / "other.json")


def test_diagnose_miss_names_the_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load_script("diagnose_miss")
    assert mod.main(["--attack", "trojannn", "--seed", "3", "--zoo", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "trojannn_seed3" in err and "train_zoo.py --attacks trojannn --archs fmnistnet --seeds 3" in err


def test_heldout_eval_summary_counts_met_cells_and_skips_failures() -> None:
    mod = _load_script("heldout_eval")
    before = {"acc": 0.90, "asr": 1.0}

    def cell(acc: float, asr: float) -> dict:
        return {"results": {"no_defense": before, "cbd": {"acc": acc, "asr": asr, "der": 0.9, "seconds": 2}}}

    failed = {"results": {"no_defense": before, "cbd": {"error": "RuntimeError: stop", "seconds": 1}}}
    rows = [cell(0.89, 0.04), cell(0.87, 0.04), cell(0.895, 0.30), failed]
    st = mod.summarize(rows, "cbd")
    assert st["n"] == 4 and st["met"] == 1  # the 3-point drop and the 30% ASR miss; the failure counts in n
    assert st["stopped"] == 1
    assert abs(st["mean_asr"] - (4 + 4 + 30) / 3) < 1e-9 and abs(st["max_asr"] - 30) < 1e-9
    assert mod.summarize(rows, "nad") is None


def test_heldout_eval_readme_table_shows_stopped_runs() -> None:
    """A CBD run the health check stopped is shown as such, never averaged as if it had finished."""
    mod = _load_script("heldout_eval")
    before = {"acc": 0.90, "asr": 1.0}
    stopped = {"error": "HealthError: feature drift 0.300 > 0.1", "seconds": 1}

    def cell(seed: int, cbd: dict) -> dict:
        res = {"no_defense": before, "cbd": cbd}
        return {
            "arch": "fmnistnet",
            "split": "report",
            "attack": "a",
            "seed": seed,
            "floor_asr": 0.01,
            "results": res,
        }

    done = {"acc": 0.89, "asr": 0.03, "der": 0.98, "seconds": 2}
    data = {"cells": {"1": cell(1, done), "2": cell(2, stopped)}}
    row = mod.readme_table(data).splitlines()[2]
    assert "89.0 / 3.0 (1)" in row  # the one finished seed, marked
    data = {"cells": {"1": cell(1, stopped), "2": cell(2, stopped)}}
    assert "| stopped |" in mod.readme_table(data).splitlines()[2]


def test_heldout_eval_der_by_attack_compares_means_over_the_same_seeds() -> None:
    """Per attack, CBD's mean DER against the best label-using baseline's over the seeds where both
    ran; a stopped CBD run counts as keeping the backdoored model (DER 0.5), never skipped."""
    mod = _load_script("heldout_eval")

    def cell(attack: str, seed: int, **ders: float | None) -> dict:
        res = {m: ({"error": "HealthError"} if d is None else {"der": d}) for m, d in ders.items()}
        return {"attack": attack, "seed": seed, "results": res}

    cells = [
        cell("a", 1, cbd=0.90, nad=0.95, i_bau=0.80),
        cell("a", 2, cbd=0.96, nad=0.85, i_bau=0.99),
        cell("a", 3, cbd=0.97),  # no baseline on this seed: left out of the means
        cell("b", 1, cbd=0.99, nad=0.90),
        cell("b", 2, cbd=None, nad=0.90),  # CBD stopped: 0.5
        cell("c", 1, cbd=0.95),  # nothing to compare with
    ]
    rows = {r["attack"]: r for r in mod.der_by_attack(cells)}
    assert set(rows) == {"a", "b"}
    a, b = rows["a"], rows["b"]
    assert a["seeds"] == [1, 2] and abs(a["cbd"] - 0.93) < 1e-9
    assert a["best"] == "nad" and abs(a["best_der"] - 0.90) < 1e-9 and a["wins"]  # i_bau: 0.895
    assert abs(b["cbd"] - (0.99 + mod.STOPPED_DER) / 2) < 1e-9 and b["best"] == "nad" and not b["wins"]
    text = "\n".join(mod._der_summary(cells))
    assert "on 1 of 2 attacks" in text


def _tune_record(attack: str, seed: int, asr: float | None, **extra: object) -> dict:
    after = None if asr is None else {"acc": 0.88, "asr": asr}
    return {"tag": "t", "attack": attack, "seed": 0, "before": {"acc": 0.9, "asr": 1.0}, "after": after} | {
        "overrides": {},
        **({"run_seed": seed} if seed is not None else {}),
        **extra,
    }


def test_tune_defaults_summary_averages_run_seeds() -> None:
    """Cells average the run seeds; a later record of the same run seed replaces the earlier one; an
    old record without ``run_seed`` counts under its override's (or its model's) seed."""
    mod = _load_script("tune_defaults")
    rows = [
        _tune_record("wanet", 0, 0.50),
        _tune_record("wanet", 0, 0.10),  # rerun of run seed 0: replaces 0.50
        _tune_record("wanet", 1, 0.30),
        _tune_record("badnets", None, 0.04, overrides={"seed": 2}),  # old record: run seed 2
        _tune_record("sig", 1, None, error="HealthError: stopped"),
    ]
    (row,) = mod.summarize(rows)
    assert row["run_seeds"] == [0, 1, 2]
    assert row["runs"] == 4
    acc, asr = row["cells"]["wanet"]
    assert asr == pytest.approx(20.0) and acc == pytest.approx(88.0)
    assert row["cells"]["badnets"][1] == pytest.approx(4.0)
    assert row["cells"]["sig"] == "stopped"
    assert row["cells"]["blended"] is None
    assert row["mean_asr"] == pytest.approx((10 + 30 + 4) / 3)
    assert row["max_acc_drop"] == pytest.approx(2.0)


def test_tune_defaults_removal_summary_per_tag() -> None:
    """The removal-test summary: ASR by run seed (the latest record of each), mean, max, and the seeds
    under the test's 30% limit."""
    mod = _load_script("tune_defaults")

    def rec(tag: str, seed: int, asr: float) -> dict:
        return {"kind": "removal_test", "tag": tag, "run_seed": seed, "after": {"acc": 1.0, "asr": asr}}

    rows = [rec("a", 1, 0.40), rec("a", 0, 0.10), rec("a", 1, 0.35), rec("b", 0, 0.05)]
    a, b = mod.summarize_removal(rows)
    assert a["run_seeds"] == [0, 1] and a["asr"] == pytest.approx([10.0, 35.0])
    assert a["mean_asr"] == pytest.approx(22.5) and a["max_asr"] == pytest.approx(35.0)
    assert a["passed"] == 1
    assert b["tag"] == "b" and b["passed"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--run-seeds", "0,x"], "--run-seeds must be comma-separated integers"),
        (["--run-seeds", "0,1", "--set", "seed=3"], "use one"),
        (["--attacks", "trojannn"], "not dev attacks"),
    ],
)
def test_tune_defaults_refuses_bad_arguments(argv: list[str], message: str) -> None:
    mod = _load_script("tune_defaults")
    with pytest.raises(SystemExit, match=message):
        mod.main(argv)


def test_found_triggers_reads_the_search_state_of_a_checkpoint(tmp_path: Path) -> None:
    """``found_triggers.py`` finds the trigger search's universal sets inside a real checkpoint,
    parses ``--set`` and refuses a report attack (the protocol's split)."""
    import torch
    from torch import nn

    from cbd_fast import Purifier, PurifyConfig
    from cbd_fast.core.checkpoint import load_checkpoint

    mod = _load_script("research/found_triggers")
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    cfg = PurifyConfig(epochs=1, batch_size=16, progress=False, checkpoint_dir=str(tmp_path), seed=1)
    Purifier(cfg.validate()).fit(enc, torch.rand(32, 1, 12, 12))
    state = mod._search_state(load_checkpoint(sorted(tmp_path.iterdir())[-1]))
    assert state is not None and set(mod.UNIVERSAL) <= set(state["params"])
    assert all(len(state["params"][f]) == 2 for f in mod.UNIVERSAL)  # the default two restarts
    assert mod._search_state({"model": {}, "step": 3}) is None
    assert mod._overrides(["epochs=6", "adversary=pgd"]) == {"epochs": 6, "adversary": "pgd"}
    with pytest.raises(SystemExit, match="key=value"):
        mod._overrides(["epochs"])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/research/found_triggers.py"), "--attack", "blended_image"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "invalid choice: 'blended_image'" in proc.stderr
