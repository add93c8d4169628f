"""Every benchmark script runs for real in a seconds-long mode (tiny sizes) and prints its result: a refactor that
renames what a script imports, or a preset change a script inherits, breaks it here, not in a benchmark run an hour
later (loop_demo.py did both, once). Each test checks the printed result, not only the exit status."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
RUN_FOR_REAL = {"faults.py", "finetune_speed.py", "learning_cpu.py", "load.py", "loop_demo.py", "visual_prompts.py"}
# A real run of these starts Label Studio (tests/e2e/ls_harness.py: a venv built on first use, minutes, and a
# server the e2e tests own); here they only start. The pre-label path they time is run for real in tests/e2e.
NEEDS_LABEL_STUDIO = {"prelabel_throughput.py"}


def bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_every_benchmark_is_run_or_says_why_not():
    assert {"finetune_speed.py", "learning_cpu.py", "loop_demo.py"} <= set(SCRIPTS)
    assert set(SCRIPTS) == RUN_FOR_REAL | NEEDS_LABEL_STUDIO, "a new benchmark script needs a test here"


@pytest.mark.parametrize("script", sorted(NEEDS_LABEL_STUDIO))
def test_label_studio_benchmark_starts(script):
    done = bench(script, "--help", timeout=120)
    assert done.stdout.startswith("usage:"), done.stdout[:300]


def test_finetune_speed_runs_both_paths_and_compares_them(tmp_path):
    """The cached and today's path on 8 tiny corrections: same first-step losses, both timed, the summary line."""
    out = tmp_path / "speed.json"
    done = bench("finetune_speed.py", "--tiny", "--steps", "4", "--reference-steps", "2", "--corrections", "8",
                 "--work-dir", str(tmp_path / "models"), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny-clipseg" and result["steps"] == 4 and result["corrections"] == 8
    assert len(result["losses_today"]) == len(result["losses_cached"]) == 2
    assert result["max_loss_difference_first_steps"] < 1e-4  # the same computation on both paths
    assert result["cached_cold"]["steps_timed"] == 4 and result["cached_cold"]["total"] > 0
    assert result["today"]["total_extrapolated"] > 0 and result["speedup_cold"] > 0
    printed = re.search(r"^\{$.*^\}$", done.stdout, re.M | re.S)  # after "building tiny-clipseg ..." lines
    assert printed is not None and json.loads(printed.group()) == result, done.stdout[-1000:]
    assert re.search(r"fine-tune of 8 corrections, 4 steps, tiny-clipseg: today's path \d+ s \(extrapolated from 2 "
                     r"steps", done.stdout), done.stdout[-500:]


def test_learning_cpu_trains_and_reports_every_kind():
    """Three steps of the from-scratch benchmark on a few scenes: the summary, the line and the per-kind table."""
    done = bench("learning_cpu.py", "--steps", "3", "--batch-size", "2", "--train-samples", "24", "--val-samples",
                 "10", "--num-workers", "0")
    text, _, lines = done.stdout.partition("\nheld-out mIoU ")
    summary = json.loads(text)
    assert summary["train"]["steps"] == 3 and summary["heldout"]["n"] == 10
    assert 0.0 <= summary["heldout"]["miou"] <= 1.0 and summary["final_loss"] > 0
    assert lines.startswith(f"{summary['heldout']['miou']:.4f} (mean Dice") and "n=10)" in lines
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+|nan) \|$", lines, re.M))
    assert set(rows) == {"color_shape", "color", "shape", "position", "size", "all"}
    assert float(rows["all"]) == pytest.approx(summary["heldout"]["miou"], abs=5e-4)


def test_learning_cpu_with_visual_prompts_adds_a_one_shot_column():
    """The visual-prompt column (issue 28): trained with visual prompts mixed in, the table gets each kind's one-shot
    mIoU (prompted by another held-out scene's object of the same concept); word attention is refused."""
    done = bench("learning_cpu.py", "--steps", "3", "--batch-size", "2", "--train-samples", "24", "--val-samples",
                 "16", "--num-workers", "0", "--no-word-attention", "--visual-prompt-ratio", "0.5")
    text, _, lines = done.stdout.partition("\nheld-out mIoU ")
    summary = json.loads(text)
    assert summary["train"]["visual_prompt_ratio"] == 0.5 and summary["one_shot"]["n"] > 0, summary["one_shot"]
    rows = {k: (a, b) for k, a, b in re.findall(r"^\| (\w+) \| ([\d.]+|nan) \| ([\d.]+|nan)", lines, re.M)}
    assert {"color", "all"} <= set(rows), lines
    assert float(rows["all"][1]) == pytest.approx(summary["one_shot"]["miou"], abs=5e-4)
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning_cpu.py"), "--visual-prompt-ratio",
                              "0.5", "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--no-word-attention" in refused.stderr, refused.stderr[-500:]


def test_faults_row_loses_nothing(tmp_path):
    """One fault row for real (a second `clipseg serve` on the same DATA_DIR): refused, every acknowledged
    correction stored, and the table row says so."""
    out = tmp_path / "faults.json"
    done = bench("faults.py", "--rows", "two_serves", "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert row["row"] == "two_serves" and row["acknowledged"] == 5 and row["stored"] == 5, row
    assert row["note"].startswith("refused (exit "), row
    assert f"| {row['fault']} | 5 | 5 | 0 | 0.0 s |" in done.stdout, done.stdout[-1000:]


def test_load_runs_clients_without_errors(tmp_path):
    """Two clients for three seconds against a real `clipseg serve`: requests answered, no errors, webhooks taken."""
    out = tmp_path / "load.json"
    done = bench("load.py", "--clients", "2", "--minutes", "0.05", "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["clients"] == 2 and result["requests"] > 0 and result["throughput_rps"] > 0
    assert result["error_count"] == 0 and result["errors"] == {}, result["errors"]
    assert result["webhooks"]["sent"] > 0 and result["webhooks"]["accepted"] == result["webhooks"]["sent"]
    assert result["server"]["ready"] is True and result["latency_ms"]["p50"] > 0
    assert '"error_count": 0' in done.stderr  # the result is logged as it is written


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
