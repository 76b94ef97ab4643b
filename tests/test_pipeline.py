"""The README's three commands end to end, and the invariances the pipeline promises."""
import os
import shutil

import pytest
import torch

from download import find_model
from sfron.checkpoint import find_checkpoint
from sfron.data import class_folders
from models import DiT_models
from helpers import (assert_fisher_close, experiment_dirs, make_checkpoint, make_image_folder, make_tiny_run_folder,
                     make_vae_folder, run_in_process)
from sfron.mask import saliency_mask
from sfron.vae import encode_moments


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_tiny_run_folder(tmp_path_factory.mktemp("pipeline"))


def fisher_args(workdir, bz, iters, mask, *extra):
    return ("--model", "DiT-T/2", "--data-path", workdir / "data", "--batch-size", bz, "--ckpt", workdir / "tiny.pt",
            "--n-iters", iters, "--forget-class", 1, "--mask-path", mask, "--results-dir", workdir / "results",
            "--num-workers", 0, *extra)


def test_seed_commands_on_a_pixel_space_dit(workdir, tmp_path):
    """generate_fisher.py, generate_mask.py, forget.py exactly as in the README (paths, model, iters aside)."""
    mask = tmp_path / "mask"
    run_in_process("generate_fisher.py", "--model", "DiT-T/2", "--data-path", workdir / "data", "--batch-size", 2,
                   "--ckpt", workdir / "tiny.pt", "--n-iters", 3, "--forget-class", 1, "--mask-path", mask, cwd=tmp_path,
                   check=True)
    forget_fisher, remain_fisher = load(mask / "1" / "forget_fisher.pt"), load(mask / "1" / "remain_fisher.pt")
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(forget_fisher) == set(remain_fisher) == trainable
    assert all(v.dtype == torch.float32 and (v >= 0).all() for v in forget_fisher.values())
    assert sum(v.sum() for v in forget_fisher.values()) > 0

    proc = run_in_process("generate_mask.py", "--mask-path", mask, "--forget-class", 1, "--thresholds", "0.5", "1", "3",
                          "5", "10", cwd=tmp_path, check=True)
    assert proc.stdout.count("sparsity") == 5
    for th in ("0.5", "1.0", "3.0", "5.0", "10.0"):
        assert (mask / "1" / f"fisher_{th}.pt").is_file()

    run_in_process("forget.py", "--model", "DiT-T/2", "--data-path", workdir / "data", "--batch-size", 2, "--ckpt",
                   workdir / "tiny.pt", "--n-iters", 50, "--snapshot-every", 50, "--lr", "1e-4", "--forget-class", 1,
                   "--method", "ron", "--unlearn-loss", "ga", "--forget-alpha", "1e-3", "--decay-forget-alpha",
                   "--remain-alpha", "1.0", "--mask-path", mask, cwd=tmp_path, check=True)
    # the official numbering: one folder per run in ./results, counted from 000
    fisher_run, run = experiment_dirs(tmp_path / "results")
    assert os.path.basename(fisher_run) == "000-DiT-T-2-fisher"
    assert os.path.basename(run) == "001-DiT-T-2-forget-1-ron-ga-lr0.0001-f0.001-r1.0"
    files = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert files == ["0000000_sample.png", "0000050.pt", "0000050_sample.png"]
    log = open(os.path.join(run, "log.txt")).read()
    assert "fisher_1.0.pt" in log and "(step=0000050)" in log
    # the official loader's reading of the checkpoint ("ema" first) is the unlearned model
    unlearned, original = find_model(os.path.join(run, "checkpoints", "0000050.pt")), load(workdir / "tiny.pt")
    ckpt = load(os.path.join(run, "checkpoints", "0000050.pt"))
    assert all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert max((unlearned[k] - original[k]).abs().max() for k in original) > 1e-4


def test_seed_commands_on_dit_s8_with_a_local_vae_and_an_imagenet_subset(tmp_path):
    """A 1000-class latent DiT on a folder of three ImageNet synsets: the folders are the classes 0, 207 and 999
    (not their sorted positions 0, 1, 2), and forget.py forgets class 207, the golden retriever's folder."""
    make_image_folder(tmp_path / "data", per_class=3, synsets=[0, 207, 999])
    assert sorted(os.listdir(tmp_path / "data" / "train")) == ["n01440764", "n02099601", "n15075141"]
    folders = class_folders(str(tmp_path / "data"), 1000)
    assert folders.indices == (0, 207, 999) and folders.position(207) == 1
    make_checkpoint(tmp_path / "s8.pt", model="DiT-S/8", input_size=32, in_channels=4, num_classes=1000)
    vae = make_vae_folder(tmp_path / "vae")
    common = ("--model", "DiT-S/8", "--data-path", tmp_path / "data", "--batch-size", 2, "--ckpt", tmp_path / "s8.pt",
              "--vae", vae)
    # in this process (the VAE's import alone costs a subprocess seconds); the pixel-space test runs them as processes
    run_in_process("generate_fisher.py", *common, "--n-iters", 2, "--forget-class", 207, "--mask-path",
                   tmp_path / "mask", cwd=tmp_path, check=True)
    run_in_process("generate_mask.py", "--mask-path", tmp_path / "mask", "--forget-class", 207, "--thresholds", "1",
                   cwd=tmp_path, check=True)
    run_in_process("forget.py", *common, "--n-iters", 2, "--snapshot-every", 50, "--lr", "1e-4", "--forget-class",
                   207, "--method", "ron", "--unlearn-loss", "ga", "--forget-alpha", "1e-3", "--decay-forget-alpha",
                   "--remain-alpha", "1.0", "--mask-path", tmp_path / "mask", "--num-sampling-steps", 5, cwd=tmp_path,
                   check=True)
    (run,) = [d for d in experiment_dirs(tmp_path / "results") if "-forget-207-" in d]
    log = open(os.path.join(run, "log.txt")).read()
    assert "256x256, 1000 classes, latent space" in log and "Forget set: 3 images, remain set: 6 images" in log
    assert "classes by ImageNet synset indices" in log
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000000_sample.png", "0000002.pt"]
    # the saved weights are not the starting ones: the entries the mask frees and the forget gradient reaches moved
    start, saved = load(tmp_path / "s8.pt"), load(os.path.join(run, "checkpoints", "0000002.pt"))["model"]
    mask, forget_fisher = (load(tmp_path / "mask" / "207" / name) for name in ("fisher_1.0.pt", "forget_fisher.pt"))
    reached = {k: m.bool() & (forget_fisher[k] > 0) for k, m in mask.items()}
    moved = sum(int((saved[k] != start[k])[r].sum()) for k, r in reached.items())
    total = sum(int(r.sum()) for r in reached.values())
    assert total > 1000 and moved > 0.9 * total, (moved, total)
    # the position of the golden retriever's folder is no class of this root
    wrong = run_in_process("forget.py", *common, "--n-iters", 1, "--forget-class", 1, "--results-dir", tmp_path / "w",
                           cwd=tmp_path)
    assert wrong.returncode == 1 and "--forget-class 1: no class folder" in wrong.stderr


def test_a_subset_that_is_not_imagenet_needs_its_class_indices(tmp_path):
    """Three folders for a 1000-class model, not named by synsets: one error line before anything is made, and a
    --class-index-file gives each folder its class."""
    make_image_folder(tmp_path / "data", num_classes=3, per_class=2)
    make_checkpoint(tmp_path / "big.pt", num_classes=1000)
    args = ("--model", "DiT-T/2", "--data-path", tmp_path / "data", "--ckpt", tmp_path / "big.pt", "--batch-size", 2,
            "--n-iters", 1, "--forget-class", 5, "--snapshot-every", 0, "--results-dir", tmp_path / "res",
            "--num-workers", 0)
    proc = run_in_process("forget.py", *args, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "3 class folders for a model of 1000 classes" in proc.stderr and "--class-index-file" in proc.stderr
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())
    (tmp_path / "classes.txt").write_text("class0 3\nclass1 5\nclass2 9\n")
    run_in_process("forget.py", *args, "--class-index-file", tmp_path / "classes.txt", cwd=tmp_path, check=True)
    assert class_folders(str(tmp_path / "data"), 1000, str(tmp_path / "classes.txt")).indices == (3, 5, 9)


def test_fisher_is_the_same_at_any_batch_size(workdir):
    """6 samples as 6 x 1, 3 x 2 and 2 x 3: the same per-sample draws, the same Fisher."""
    results = []
    for bz, iters in ((1, 6), (2, 3), (3, 2)):
        mask = workdir / f"mask_bz{bz}"
        run_in_process("generate_fisher.py", *fisher_args(workdir, bz, iters, mask), cwd=workdir, check=True)
        results.append(load(mask / "1" / "forget_fisher.pt"))
    for other in results[1:]:
        assert_fisher_close(other, results[0])


def test_generate_mask_is_the_threshold_rule(tmp_path):
    folder = tmp_path / "m" / "4"
    folder.mkdir(parents=True)
    ff = {"a": torch.tensor([0.0, 1.0, 2.0, 6.0]), "b": torch.tensor([[1e-20, 3.0]])}
    rf = {"a": torch.tensor([0.0, 2.0, 1.0, 2.0]), "b": torch.tensor([[0.0, 1.0]])}
    torch.save(ff, folder / "forget_fisher.pt")
    torch.save(rf, folder / "remain_fisher.pt")
    other = tmp_path / "m" / "9"  # several classes at once, as the README allows
    other.mkdir()
    torch.save(rf, other / "forget_fisher.pt")
    torch.save(ff, other / "remain_fisher.pt")
    proc = run_in_process("generate_mask.py", "--mask-path", tmp_path / "m", "--forget-class", 4, 9, "--thresholds",
                          "1", "3", cwd=tmp_path, check=True)
    assert load(other / "fisher_3.0.pt")["a"].tolist() == [False, False, False, False]
    m1, m3 = load(folder / "fisher_1.0.pt"), load(folder / "fisher_3.0.pt")
    # (f + 1e-15) / (r + 1e-15): 0/0 -> 1, 1/2, 2, 3, ~1.01, 3
    assert m1["a"].tolist() == [True, False, True, True] and m1["b"].tolist() == [[True, True]]
    assert m3["a"].tolist() == [False, False, False, True] and m3["b"].tolist() == [[False, True]]
    assert m1["a"].dtype == torch.bool
    assert "sparsity 16.67%" in proc.stdout and "sparsity 66.67%" in proc.stdout
    torch.testing.assert_close(saliency_mask(ff, rf, 3.0)["a"], m3["a"])


def interrupted_copy(run, step):
    """A copy of an experiment folder that holds only its checkpoint of `step`, as a run killed after it leaves."""
    interrupted = run + "-interrupted"
    os.makedirs(os.path.join(interrupted, "checkpoints"))
    name = f"{step:07d}.pt"
    os.link(os.path.join(run, "checkpoints", name), os.path.join(interrupted, "checkpoints", name))
    return interrupted


def test_fisher_files_of_the_official_script_give_a_mask_forget_py_uses(workdir, tmp_path):
    """The official generate_fisher.py saves DDP keys ('module.' prefix) and the frozen pos_embed as the integer 0."""
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=3)
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "mask" / "1"
    folder.mkdir(parents=True)
    for name in ("forget_fisher.pt", "remain_fisher.pt"):
        fisher = {f"module.{n}": torch.rand(p.shape, generator=g) for n, p in model.named_parameters()
                  if p.requires_grad}
        fisher["module.pos_embed"] = 0
        torch.save(fisher, folder / name)
    proc = run_in_process("generate_mask.py", "--mask-path", tmp_path / "mask", "--forget-class", 1, "--thresholds", 1,
                          cwd=tmp_path, check=True)
    assert "skipped 1 entries that are not tensors (pos_embed)" in proc.stdout
    mask = load(folder / "fisher_1.0.pt")
    assert set(mask) == {n for n, p in model.named_parameters() if p.requires_grad}
    proc = run_in_process("forget.py", "--model", "DiT-T/2", "--data-path", workdir / "data", "--ckpt",
                          workdir / "tiny.pt", "--forget-class", 1, "--n-iters", 1, "--snapshot-every", 0,
                          "--mask-path", tmp_path / "mask", "--results-dir", tmp_path / "results", "--num-workers", 0,
                          cwd=tmp_path, check=True)
    assert "fisher_1.0.pt: 49." in proc.stdout or "fisher_1.0.pt: 50." in proc.stdout  # about half the weights


@pytest.mark.parametrize("extra, state", [
    ((), None), (("--separate-forget-optimizer", "--remain-lr", "2e-5", "--remain-loss", "distill"), "forget_opt"),
    (("--adversarial-steps", "2"), "adversary")], ids=["official", "own-forget-moments", "adversarial-label"])
def test_resumed_run_ends_where_an_uninterrupted_one_does(workdir, tmp_path, extra, state):
    """--resume continues bit-identically, the forget step's own AdamW moments and the adversarial label included."""
    if "--separate-forget-optimizer" in extra:  # it acts through a mask: a random half of every tensor
        g = torch.Generator().manual_seed(0)
        torch.save({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in load(workdir / "tiny.pt").items()},
                   tmp_path / "half.pt")
        extra = (*extra, "--mask-path", tmp_path / "half.pt")
    results = tmp_path / "runs"
    args = ("--model", "DiT-T/2", "--data-path", workdir / "data", "--batch-size", 2, "--ckpt", workdir / "tiny.pt",
            "--n-iters", 6, "--ckpt-every", 3, "--snapshot-every", 0, "--forget-class", 0, "--forget-alpha", "0.1",
            "--decay-forget-alpha", "--unlearn-loss", "adaga", "--results-dir", results, "--num-workers", 0, *extra)
    run_in_process("forget.py", *args, cwd=workdir, check=True)
    (full,) = experiment_dirs(results)
    interrupted = interrupted_copy(full, 3)
    proc = run_in_process("forget.py", *args, "--resume", interrupted, cwd=workdir, check=True)
    assert "from step 3" in proc.stdout
    a = load(os.path.join(full, "checkpoints", "0000006.pt"))
    b = load(os.path.join(interrupted, "checkpoints", "0000006.pt"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6
    if extra:
        assert state in a and state in b
        return
    bad = run_in_process("forget.py", *args, "--lr", "1e-3", "--resume", interrupted, cwd=workdir, check=False)
    assert bad.returncode == 1 and "--lr 0.001 differs from the resumed run's 1e-05" in bad.stderr


def test_resume_keeps_the_mask_and_the_data_of_the_run(workdir, tmp_path):
    """A resumed run refuses another mask (other threshold, none, a changed file) and other data, one line each."""
    import forget
    from sfron.utils import UserError
    mask = tmp_path / "mask"
    proc = run_in_process("generate_fisher.py", *fisher_args(workdir, 2, 2, mask)[:-2], "--results-dir",
                          tmp_path / "f", "--log-every", 1, cwd=tmp_path, check=True)
    assert "Generate remain fisher: 2/2 batches" in proc.stdout  # the log line names its loop
    run_in_process("generate_mask.py", "--mask-path", mask, "--forget-class", 1, "--thresholds", 1, 2, cwd=tmp_path,
                   check=True)
    args = ["--model", "DiT-T/2", "--data-path", str(workdir / "data"), "--batch-size", "2", "--ckpt",
            str(workdir / "tiny.pt"), "--n-iters", "4", "--ckpt-every", "2", "--snapshot-every", "0",
            "--forget-class", "1", "--results-dir", str(tmp_path / "r"), "--num-workers", "0"]
    run_in_process("forget.py", *args, "--mask-path", mask, "--threshold", 1, cwd=tmp_path, check=True)
    (run,) = experiment_dirs(tmp_path / "r")
    interrupted = interrupted_copy(run, 2)

    def resume(*extra, data=None):
        argv = args + ["--resume", interrupted, *map(str, extra)]
        if data:
            argv[argv.index("--data-path") + 1] = str(data)
        with pytest.raises(UserError) as error:
            forget.main(forget.parse_args(argv))
        assert "\n" not in str(error.value)
        return str(error.value)
    other_threshold = resume("--mask-path", mask, "--threshold", 2)
    assert "select the mask" in other_threshold and "fisher_2.0.pt" in other_threshold
    assert "resume with --mask-path" in resume()
    shutil.copytree(workdir / "data", tmp_path / "moved")
    assert "--data-path" in resume("--mask-path", mask, data=tmp_path / "moved")
    # the mask file changes under the same name: the run would silently go on with other weights frozen
    torch.save(load(mask / "1" / "fisher_2.0.pt"), mask / "1" / "fisher_1.0.pt")
    assert "has changed since the run started" in resume("--mask-path", mask)
    files = sorted(os.listdir(os.path.join(interrupted, "checkpoints")))
    assert files == ["0000002.pt"]  # the refused resumptions wrote nothing


def test_resume_refuses_changed_images(workdir, tmp_path):
    """The same --data-path holding other images than when the run started is refused."""
    import forget
    from sfron.utils import UserError
    shutil.copytree(workdir / "data", tmp_path / "data")
    args = ["--model", "DiT-T/2", "--data-path", str(tmp_path / "data"), "--batch-size", "2", "--ckpt",
            str(workdir / "tiny.pt"), "--n-iters", "2", "--ckpt-every", "1", "--snapshot-every", "0",
            "--forget-class", "1", "--results-dir", str(tmp_path / "r"), "--num-workers", "0"]
    forget.main(forget.parse_args(args))
    (run,) = experiment_dirs(tmp_path / "r")
    interrupted = interrupted_copy(run, 1)
    os.remove(tmp_path / "data" / "train" / "class2" / "0.png")
    with pytest.raises(UserError, match="images under --data-path differ"):
        forget.main(forget.parse_args(args + ["--resume", interrupted]))


def test_cached_latents_give_the_same_fisher(tmp_path):
    make_image_folder(tmp_path / "data", num_classes=3, per_class=3, size=(70, 80))
    make_checkpoint(tmp_path / "latent.pt", input_size=8, in_channels=4, num_classes=3)
    vae = make_vae_folder(tmp_path / "vae")
    common = ("--model", "DiT-T/2", "--data-path", tmp_path / "data", "--batch-size", 2, "--ckpt",
              tmp_path / "latent.pt", "--vae", vae, "--n-iters", 4, "--forget-class", 1, "--num-workers", 0,
              "--results-dir", tmp_path / "results")
    run_in_process("generate_fisher.py", *common, "--mask-path", tmp_path / "plain", cwd=tmp_path, check=True)
    proc = run_in_process("generate_fisher.py", *common, "--mask-path", tmp_path / "cached", "--cache-latents",
                          tmp_path / "latents", cwd=tmp_path, check=True)
    assert "Cached the VAE latents of 3 forget images x 2 flips" in proc.stdout
    assert os.listdir(tmp_path / "latents") == ["forget-1-64-vae.pt"]
    proc = run_in_process("generate_fisher.py", *common, "--mask-path", tmp_path / "reused", "--cache-latents",
                          tmp_path / "latents", cwd=tmp_path, check=True)
    assert "Loaded the VAE latents of 3 forget images x 2 flips" in proc.stdout  # the next script encodes nothing
    plain, cached, reused = (load(tmp_path / name / "1" / "forget_fisher.pt") for name in ("plain", "cached", "reused"))
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-3, atol=1e-12)
        torch.testing.assert_close(reused[k], cached[k], rtol=0, atol=0)


def test_bf16_vae_encode_is_close_to_float32(tmp_path):
    from diffusers.models import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(make_vae_folder(tmp_path / "vae")).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (mean32, std32), (mean16, std16) = encode_moments(vae, x), encode_moments(vae, x, torch.bfloat16)
    assert mean16.dtype == std16.dtype == torch.float32 and mean16.shape == (2, 4, 4, 4)
    assert not torch.equal(mean16, mean32)  # the encoder did run in bf16
    assert float((mean16 - mean32).norm() / mean32.norm()) < 0.05
    torch.testing.assert_close(std16, std32, rtol=0.05, atol=1e-4)


def test_official_unlearned_checkpoints_are_read_from_model_and_ours_from_ema(workdir, tmp_path):
    """The official forget.py saves a stale EMA (decay 0.9999) as "ema" and the unlearned weights, DataParallel's
    'module.' keys, as "model": --ckpt reads "model". Ours keep the unlearned weights in both."""
    import argparse
    original = load(workdir / "tiny.pt")
    unlearned = {k: v + 0.5 for k, v in original.items()}
    torch.save({"model": {f"module.{k}": v for k, v in unlearned.items()}, "ema": original, "opt": {},
                "args": argparse.Namespace(forget_class=1, unlearn_loss="ga", method="ron")}, tmp_path / "official.pt")
    weights, _ = find_checkpoint(str(tmp_path / "official.pt"))
    assert all(torch.equal(weights[k], unlearned[k]) for k in original)
    trained = {"model": unlearned, "ema": original, "args": argparse.Namespace(model="DiT-T/2", global_batch_size=2)}
    torch.save(trained, tmp_path / "train.pt")  # a DiT train.py checkpoint: its EMA is the model to sample
    assert all(torch.equal(find_checkpoint(str(tmp_path / "train.pt"))[0][k], original[k]) for k in original)
    args = ("--model", "DiT-T/2", "--data-path", workdir / "data", "--batch-size", 2, "--ckpt", workdir / "tiny.pt",
            "--n-iters", 4, "--snapshot-every", 0, "--forget-class", 1, "--lr", "1e-3", "--results-dir",
            workdir / "ours", "--num-workers", 0)
    run_in_process("forget.py", *args, cwd=workdir, check=True)
    (run,) = experiment_dirs(workdir / "ours")
    ckpt = load(os.path.join(run, "checkpoints", "0000004.pt"))
    assert all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert max(float((ckpt["model"][k] - original[k]).abs().max()) for k in original) > 1e-4
    final = find_model(os.path.join(run, "checkpoints", "0000004.pt"))  # the official loader's choice: "ema"
    assert all(torch.equal(final[k], v) for k, v in ckpt["model"].items())
