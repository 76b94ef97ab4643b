"""The benchmark scripts on a small model, so that a GPU session finds them working."""
import json
import os
import re

from helpers import run_script


def test_throughput_benchmark_fisher_equals_the_official_loop(tmp_path):
    proc = run_script("bench/throughput.py", "--model", "DiT-S/8", "--image-size", 64, "--batch-size", 2,
                      "--fisher-samples", 4, "--forget-steps", 2, "--mfu-batch-sizes", 2, 4, "--repeats", 1,
                      cwd=tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["fisher_speedup"] > 0 and summary["forget_speedup"] > 0
    assert set(summary["forget_step_mfu"]) == {"2", "4"}
    difference = float(re.search(r"relative L1 difference of the Fisher ([0-9.e+-]+)", proc.stdout).group(1))
    assert difference < 1e-5  # per-sample hooks at batch 2 = the batch-1 loop with CPU copies


def test_full_run_runs_the_three_scripts(tmp_path):
    work = tmp_path / "work"
    proc = run_script("bench/full_run.py", "--model", "DiT-S/8", "--image-size", 64, "--images-per-class", 4,
                      "--fisher-samples", 4, "--fisher-batch-size", 2, "--forget-steps", 2, "--batch-size", 2,
                      "--num-workers", 0, "--reference-fisher-samples", 1, "--reference-forget-steps", 1,
                      "--work", work, cwd=tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(summary["total_s"] - summary["fisher_s"] - summary["mask_s"] - summary["forget_s"]) < 0.2
    assert summary["official_projected_s"] > 0
    assert sorted(os.listdir(work / "mask" / "0")) == ["fisher_1.0.pt", "forget_fisher.pt", "remain_fisher.pt"]
    (run,) = [d for d in os.listdir(work / "results") if "forget" in d]
    assert os.listdir(work / "results" / run / "checkpoints") == ["0000002.pt"]
