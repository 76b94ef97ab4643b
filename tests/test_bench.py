"""The benchmark scripts on a small model, so that they work when run on a GPU machine."""
import json
import os

import pytest

from helpers import make_tiny_run_folder, run_script


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
    """bench/memory.py on a tiny DiT: the parts are the tensors' sizes (the official recipe: one AdamW's two moments
    per weight and the gradients; adversarial-esd-distill, confined to the mask: two AdamWs' moments and the original values of
    the free entries only, no gradient between steps), the checkpoint holds the weights and the moments, and the
    last line is the ratio of the kept state."""
    from models import DiT_models
    confined = "adversarial-esd-distill"  # a recipe whose run is confined to its mask
    proc = run_script("bench/memory.py", "--model", "DiT-T/2", "--image-size", 32, "--recipe", confined,
                      "--batch-sizes", 1, "--steps", 1, "--threads", 1, "--out", tmp_path / "memory.json", cwd=tmp_path)
    model = DiT_models["DiT-T/2"](input_size=4, num_classes=1000)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runs = {r["recipe"]: r for r in json.load(open(tmp_path / "memory.json"))["runs"]}
    official, default = runs["official"]["parts"], runs[confined]["parts"]
    free = runs[confined]["free_entries"]
    assert 0.01 < free / numel < 0.03                                   # --mask-free-share 0.02
    assert official["weights"] == pytest.approx(4 * numel / 1e9) and official["gradients"] == official["weights"]
    assert official["moments"] == pytest.approx(2 * 4 * numel / 1e9) and official["reference"] == 0
    assert default["weights"] == official["weights"] and default["gradients"] == 0
    assert default["moments"] == pytest.approx(2 * 2 * 4 * free / 1e9)  # two AdamWs, two moments, free entries
    assert default["reference"] == pytest.approx(4 * free / 1e9) and 0 < default["adversary"] < 1e-5
    assert default["mask"] == pytest.approx((numel + 8 * free) / 1e9)     # booleans and int64 indices
    assert min(r["peak"] for r in runs.values()) > 0
    # the checkpoint: the weights once ("ema" shares "model"), the moments, a few kB of settings and tensor headers
    for run in runs.values():
        stored = run["parts"]["weights"] + run["parts"]["moments"]
        assert stored < run["checkpoint"] < stored + 1e-3
    ratio = runs[confined]["persistent"] / runs["official"]["persistent"]
    assert ratio < 0.5 and proc.stdout.strip().splitlines()[-1].endswith(f"ratio {ratio:.2f}")


def test_guidance_size_is_zero_for_a_model_whose_labels_change_nothing(tmp_path):
    """bench/guidance_size.py: the RMS of eps(x_t, c) - eps(x_t, null) is positive for a model whose label rows
    differ, and 0 once every class row of the label table is the null row (then the label changes nothing)."""
    import torch
    make_tiny_run_folder(tmp_path)
    blind = torch.load(tmp_path / "tiny.pt", weights_only=True)
    table = blind["y_embedder.embedding_table.weight"]  # (classes + 1, D): the last row is the null label's
    table[:-1] = table[-1]
    torch.save(blind, tmp_path / "blind.pt")
    sizes = []
    for ckpt in ("tiny.pt", "blind.pt"):
        printed = run_script("bench/guidance_size.py", "--model", "DiT-T/2", "--ckpt", tmp_path / ckpt, "--data-path",
                             tmp_path / "data", "--classes", 1, "--batch-size", 2, cwd=tmp_path).stdout
        assert printed.startswith("class 1: guidance size ")
        sizes.append(float(printed.splitlines()[0].split()[-1]))
    assert sizes[0] > 1e-3 and sizes[1] == 0.0


def test_mixed_guidance_takes_each_half_of_the_guided_prediction_from_its_own_model():
    """bench/pathways.py: the guided prediction is uncond + s (cond - uncond) with cond from the first DiT and
    uncond from the second; a DiT paired with itself gives its own forward_with_cfg."""
    import sys
    import torch
    from helpers import tiny_dit
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from pathways import MixedGuidance
    a, b = tiny_dit(seed=0).eval(), tiny_dit(seed=1).eval()
    z = torch.randn(3, 3, 8, 8)
    x, t, y = torch.cat([z, z]), torch.tensor([5, 50, 500] * 2), torch.tensor([0, 1, 2, 4, 4, 4])
    with torch.no_grad():
        assert torch.allclose(MixedGuidance(a, a).forward_with_cfg(x, t, y, 2.0), a.forward_with_cfg(x, t, y, 2.0),
                              atol=1e-6)
        mixed = MixedGuidance(a, b).forward_with_cfg(x, t, y, 2.0)
        cond, uncond = a(z, t[:3], y[:3])[:, :3], b(z, t[3:], y[3:])[:, :3]
    expected = uncond + 2.0 * (cond - uncond)
    assert torch.allclose(mixed[:3, :3], expected, atol=1e-6) and torch.allclose(mixed[3:, :3], expected, atol=1e-6)
    assert not torch.allclose(mixed[:3, :3], a.forward_with_cfg(x, t, y, 2.0)[:3, :3], atol=1e-3)


def test_pathways_prints_four_pairings_and_rejects_a_missing_checkpoint(tmp_path):
    """bench/pathways.py on the embedded digits DiT paired with itself: the four pairings draw the same images."""
    original = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "digits_dit.pt")
    proc = run_script("bench/pathways.py", "--ckpt", original, "--forget-class", 3,
                      "--samples-per-class", 2, "--sampling-steps", 2, cwd=tmp_path)
    values = [float(line.split()[-1]) for line in proc.stdout.splitlines()[1:]]
    assert len(values) == 4 and len(set(values)) == 1 and 0 <= values[0] <= 1
    bad = run_script("bench/pathways.py", "--ckpt", tmp_path / "none.pt", "--forget-class", 3, cwd=tmp_path,
                     check=False)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [f"error: --ckpt {tmp_path / 'none.pt'} is not a file"]


def test_collateral_rates_are_first_order_and_a_label_row_moves_only_its_class(tmp_path):
    """bench/collateral.py: the forget direction is a unit descent direction of SalUn's forget term; the rate of the
    guidance direction matches a finite difference; a direction that moves only class 1's label row moves class 1's
    guidance and no other class's; the script prints each forget class's rates and rejects bf16 in one line."""
    import sys
    from contextlib import contextmanager
    import torch
    from helpers import tiny_dit, toy_batch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from collateral import forget_direction, guidance_rate
    from diffusion import create_diffusion
    from sfron.terms.base import eps_prediction, kept_labels, mean_flat_square
    model, diffusion = tiny_dit(input_size=4, hidden_size=16, depth=1, num_classes=3, scale=0.2).eval(), \
        create_diffusion(timestep_respacing="")
    forget, other = toy_batch(0, label=1, n=4), toy_batch(1, label=2, n=4)
    direction = forget_direction(model, diffusion, forget, other_class=2)
    assert float(torch.sqrt(sum(v.square().sum() for v in direction.values()))) == pytest.approx(1.0, rel=1e-5)

    @contextmanager
    def moved(scale):
        """The model's weights moved by scale along the direction, restored on exit."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(direction[n], alpha=scale)
            try:
                yield
            finally:
                for n, p in model.named_parameters():
                    p.sub_(direction[n], alpha=scale)

    def forget_term(scale):
        with moved(scale):
            target = eps_prediction(model, diffusion, forget, torch.full_like(forget.y, 2), kept_labels(forget))
            return float(mean_flat_square(eps_prediction(model, diffusion, forget, forget.y, kept_labels(forget))
                                          - target).mean())
    assert forget_term(1e-3) < forget_term(0.0)
    size, rate = guidance_rate(model, diffusion, other, direction)

    def guidance_at(scale):
        keep = kept_labels(other)
        with moved(scale):
            return eps_prediction(model, diffusion, other, other.y, keep) - \
                eps_prediction(model, diffusion, other, other.y, torch.ones_like(keep))
    finite = (guidance_at(1e-2) - guidance_at(-1e-2)) / 2e-2
    assert size == pytest.approx(float(guidance_at(0.0).square().mean().sqrt()), rel=1e-4)
    assert rate == pytest.approx(float(finite.square().mean().sqrt()), rel=1e-2) and rate > 0
    row_only = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    row_only["y_embedder.embedding_table.weight"][1] = 1.0
    assert guidance_rate(model, diffusion, forget, row_only)[1] > 0
    assert guidance_rate(model, diffusion, other, row_only)[1] == 0.0
    make_tiny_run_folder(tmp_path)
    common = ["--model", "DiT-T/2", "--ckpt", tmp_path / "tiny.pt", "--data-path", tmp_path / "data",
              "--batch-size", 2]
    printed = run_script("bench/collateral.py", *common, cwd=tmp_path).stdout.splitlines()
    assert [line.split(":")[0] for line in printed[:3]] == ["class 0", "class 1", "class 2"]
    assert printed[-1].startswith("median ") and "(3 classes, seed 0, batch 2)" in printed[-1]
    bad = run_script("bench/collateral.py", *common, "--precision", "bf16", cwd=tmp_path, check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("drop --precision")
