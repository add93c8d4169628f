"""Every benchmark script still starts as its docs say (`python benchmarks/X.py ...`): a refactor that renames what a
script imports breaks it only here, not in a benchmark run an hour later (loop_demo.py did, once)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")


def test_every_benchmark_is_listed():
    assert {"finetune_speed.py", "learning_cpu.py", "loop_demo.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:300]


@pytest.mark.parametrize("replay", ["shapes", "distill"])
def test_loop_demo_runs_rounds_for_real_and_reports_each(tmp_path, replay):
    """benchmarks/loop_demo.py for real in a seconds-long mode (tiny sizes): the real `clipseg serve` with its
    embedded Redis, worker and gate, two rounds of corrections of one project, with each replay source; the JSON
    holds one record per round with the issue-27 keys, and the printed lines say the same."""
    out_json = tmp_path / "loop.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loop_demo.py"), "--pretrain-steps", "3",
                           "--batch-size", "4", "--corrections", "12", "--finetune-steps", "4", "--val", "6",
                           "--rounds", "2", "--replay-ratio", "1", "--replay", replay, "--out", str(tmp_path / "work"),
                           "--json", str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out_json.read_text())
    assert summary["replay"] == replay and summary["concepts"] == ["green", "yellow"]
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["concept"] for r in rounds] == ["green", "yellow"]
    for r in rounds:
        assert {"new_before", "new_after", "old_before", "old_after", "seconds_to_served", "verdict"} <= set(r)
        assert r["verdict"] in ("promoted", "rejected", "inconclusive")
        for key in ("new_before", "new_after", "old_before", "old_after"):
            assert 0.0 <= r[key] <= 1.0
        assert 0 < r["seconds_to_served"] < 300
        if r["verdict"] != "promoted":  # the served model stays the parent
            assert (r["new_after"], r["old_after"]) == (r["new_before"], r["old_before"])
        kept = r["forgetting"]
        assert kept["scale"] == ("agreement" if replay == "distill" else "accuracy") and kept["budget"] > 0
    assert rounds[1]["old_before"] == rounds[0]["old_after"]  # one project, one lineage: round 2 starts where 1 ended
    assert summary["cumulative_old_drop"] == pytest.approx(summary["old_start"] - rounds[-1]["old_after"], abs=1e-4)
    for r in rounds:
        assert f"round {r['round']} '{r['concept']}': new {r['new_before']:.3f} -> {r['new_after']:.3f}" in done.stdout
    assert "cumulative drop" in done.stdout


def test_visual_prompts_benchmark_runs_for_real_in_quick_mode(tmp_path):
    """benchmarks/visual_prompts.py --quick: both models trained (3 steps each) and measured through the serving
    path (ExemplarSegmenter); the JSON and the printed summary hold the issue-28 keys, every mIoU in [0, 1]."""
    out_json = tmp_path / "visual.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "visual_prompts.py"), "--quick",
                           "--json", str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout[:done.stdout.rindex("}") + 1])
    summary = json.loads(out_json.read_text())
    assert printed == summary
    keys = ("unseen_text", "one_shot", "five_shot", "mixed", "known_text")
    for key in keys:
        assert 0.0 <= summary[key] <= 1.0, key
    assert set(summary["models"]) == {"text_only", "visual_mixed_in"}
    for model in summary["models"].values():
        assert set(keys) <= set(model)
    assert summary["known_text_delta"] == pytest.approx(summary["known_text"] - summary["known_text_text_only"], abs=1e-4)
    assert summary["train"]["visual_prompt_ratio"] > 0 and summary["quick"] is True
    assert f"one example {summary['one_shot']:.3f}" in done.stdout
