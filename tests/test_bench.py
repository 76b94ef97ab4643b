"""The benchmark scripts on a small model, so that they work when run on a GPU machine."""
import json
import os

from helpers import run_script


def test_throughput_benchmark_fisher_equals_the_official_loop(tmp_path):
    proc = run_script("bench/throughput.py", "--model", "DiT-T/2", "--image-size", 32, "--batch-size", 2,
                      "--fisher-samples", 4, "--forget-steps", 2, "--mfu-batch-sizes", 2, 4, "--repeats", 1,
                      cwd=tmp_path)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    fisher, forget = summary["fisher"], summary["forget"]
    assert summary["device"] == "cpu" and fisher["samples"] == 4 and forget["steps"] == 2
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
    assert min(summary[k] for k in ("fisher_s", "mask_s", "forget_s", "official_fisher_s", "official_forget_s")) > 0
    # each stage wrote what the next one reads: the Fisher files, a mask from them, the run's last checkpoint
    assert sorted(f for f in os.listdir(work / "mask" / "0") if f.endswith(".pt")) == [
        "fisher_1.0.pt", "forget_fisher.pt", "remain_fisher.pt"]
    (run,) = [d for d in os.listdir(work / "results") if "forget" in d]
    assert os.listdir(work / "results" / run / "checkpoints") == ["0000002.pt"]
    log = open(work / "results" / run / "log.txt").read()
    assert "fisher_1.0.pt" in log and "(step=0000002)" in log
