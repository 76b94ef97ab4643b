"""The benchmark scripts on a small model, so that a GPU session finds them working."""
import json
import os
import re

import pytest

from helpers import run_script


def test_throughput_benchmark_fisher_equals_the_official_loop(tmp_path):
    proc = run_script("bench/throughput.py", "--model", "DiT-T/2", "--image-size", 32, "--batch-size", 2,
                      "--fisher-samples", 4, "--forget-steps", 2, "--mfu-batch-sizes", 2, 4, "--repeats", 1,
                      cwd=tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    fisher, forget = summary["fisher"], summary["forget"]
    assert summary["device"] == "cpu" and fisher["samples"] == 4 and forget["steps"] == 2
    # the speedups are the ratios of the timed runs, and the printed rates come from the same times
    assert summary["fisher_speedup"] == pytest.approx(fisher["reference_s"] / fisher["ours_s"])
    assert summary["forget_speedup"] == pytest.approx(forget["reference_s"] / forget["ours_s"])
    rates = re.search(r"Fisher:  reference +([0-9.]+) samples/s \| ours +([0-9.]+) samples/s", proc.stdout).groups()
    assert [float(r) for r in rates] == pytest.approx([4 / fisher["reference_s"], 4 / fisher["ours_s"]], abs=0.01)
    assert set(summary["forget_step_mfu"]) == {"2", "4"}
    # both Fisher loops computed the same quantity: per-sample hooks at batch 2 = the batch-1 loop with CPU copies
    assert fisher["relative_l1_difference"] < 1e-5


def test_full_run_runs_the_three_scripts(tmp_path):
    work = tmp_path / "work"
    proc = run_script("bench/full_run.py", "--model", "DiT-T/2", "--image-size", 32, "--images-per-class", 4,
                      "--fisher-samples", 4, "--fisher-batch-size", 2, "--forget-steps", 2, "--batch-size", 2,
                      "--num-workers", 0, "--reference-fisher-samples", 1, "--reference-forget-steps", 1,
                      "--work", work, cwd=tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(summary["total_s"] - summary["fisher_s"] - summary["mask_s"] - summary["forget_s"]) < 0.2
    # the projection: two Fisher passes of 4 samples and 2 forget steps, from 1 timed sample and 1 timed step
    projected = 2 * 4 * summary["official_fisher_s"] / 1 + 2 * summary["official_forget_s"] / 1
    assert summary["official_projected_s"] == pytest.approx(projected, abs=0.01)
    assert sorted(os.listdir(work / "mask" / "0")) == ["fisher_1.0.pt", "forget_fisher.pt", "remain_fisher.pt"]
    (run,) = [d for d in os.listdir(work / "results") if "forget" in d]
    assert os.listdir(work / "results" / run / "checkpoints") == ["0000002.pt"]
