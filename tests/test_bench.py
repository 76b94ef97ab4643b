"""The benchmark scripts on a small model, so that they work when run on a GPU machine."""
import json
import os

import pytest

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


def test_memory_benchmark_counts_each_part_of_the_state(tmp_path):
    """bench/memory.py on a tiny DiT: the parts are the tensors' sizes (one AdamW's two moments for the official
    recipe, two AdamWs' and the frozen original for the default), and the last line is their ratio."""
    from models import DiT_models
    from sfron.recipes import DEFAULT_RECIPE
    proc = run_script("bench/memory.py", "--model", "DiT-T/2", "--image-size", 32, "--batch-sizes", 1, "--steps", 1,
                      "--threads", 1, "--out", tmp_path / "memory.json", cwd=tmp_path)
    model = DiT_models["DiT-T/2"](input_size=4, num_classes=1000)
    weights = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad) / 1e9
    everything = sum(t.numel() * 4 for t in model.state_dict().values()) / 1e9
    runs = {r["recipe"]: r for r in json.load(open(tmp_path / "memory.json"))["runs"]}
    official, default = runs["official"]["parts"], runs[DEFAULT_RECIPE]["parts"]
    assert official["weights"] == pytest.approx(weights) and official["gradients"] == pytest.approx(weights)
    assert official["moments"] == pytest.approx(2 * weights) and official["reference"] == official["adversary"] == 0
    assert default["moments"] == pytest.approx(4 * weights) and default["reference"] == pytest.approx(everything)
    assert 0 < default["adversary"] < 1e-5 and min(r["peak"] for r in runs.values()) > 0
    ratio = runs[DEFAULT_RECIPE]["persistent"] / runs["official"]["persistent"]
    assert proc.stdout.strip().splitlines()[-1].endswith(f"ratio {ratio:.2f}")
