"""Each bad input gets one clear line, a non-zero exit and no partial or temporary file."""
import json
import os

import pytest
import torch

from helpers import make_checkpoint, make_image_folder, run_in_process, run_script


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr  # progress bars may precede it
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_image_folder(root / "data", num_classes=3, per_class=2)
    make_checkpoint(root / "tiny.pt", num_classes=3)
    make_checkpoint(root / "two_classes.pt", num_classes=2)
    return root


@pytest.fixture(autouse=True)
def no_temporary_files(setup):
    """After each test: no temporary file of an interrupted atomic write is left anywhere in the folder."""
    yield
    assert [f for f in all_files(setup) if f.endswith(".tmp")] == []


def fisher(setup, *args, data=None, ckpt=None, cls=1, model="DiT-T/2", runner=run_in_process):
    return runner("generate_fisher.py", "--model", model, "--data-path", data or setup / "data", "--ckpt",
                  ckpt or setup / "tiny.pt", "--n-iters", 2, "--forget-class", cls, "--num-workers", 0,
                  "--mask-path", setup / "mask", "--results-dir", setup / "results", *args, cwd=setup)


def fisher_subprocess(setup, *args, **kw):
    """fisher() as its own process: for what only a fresh interpreter shows (worker processes, exit paths)."""
    return fisher(setup, *args, **kw, runner=lambda *a, cwd: run_script(*a, cwd=cwd, check=False))


def test_missing_and_empty_data_folders(setup):
    assert_one_line_error(fisher(setup, data=setup / "nowhere"), "does not exist")
    os.makedirs(setup / "no_train")
    assert_one_line_error(fisher(setup, data=setup / "no_train"), "no train/ folder")
    os.makedirs(setup / "no_classes" / "train")
    assert_one_line_error(fisher(setup, data=setup / "no_classes"), "no class folders")
    os.makedirs(setup / "empty_class" / "train" / "a")
    make_image_folder(setup / "empty_class", num_classes=2, per_class=1)  # a, class0, class1: the 3 classes
    assert_one_line_error(fisher(setup, data=setup / "empty_class", cls=0), "holds no images")


def test_forget_class_outside_the_data_or_the_model(setup):
    assert_one_line_error(fisher(setup, cls=3), "--forget-class 3 is outside the 3 classes")
    assert_one_line_error(fisher(setup, cls=-1), "--forget-class -1")
    assert_one_line_error(fisher(setup, ckpt=setup / "two_classes.pt"), "3 class folders but the model has 2")


def test_checkpoint_that_does_not_fit(setup):
    make_checkpoint(setup / "other.pt", num_classes=3, input_size=16)
    assert_one_line_error(fisher(setup, "--image-size", 8, ckpt=setup / "other.pt"), "does not fit", "pos_embed")
    (setup / "junk.pt").write_bytes(b"\x00" * 100)
    assert_one_line_error(fisher(setup, ckpt=setup / "junk.pt"), "junk.pt")


def test_corrupt_image_in_a_worker_process(setup):
    make_image_folder(setup / "corrupt", num_classes=2, per_class=2)
    (setup / "corrupt" / "train" / "class1" / "broken.png").write_bytes(b"this is no png")
    proc = fisher_subprocess(setup, "--num-workers", "2", "--n-iters", 3, data=setup / "corrupt",
                             ckpt=setup / "two_classes.pt")
    assert_one_line_error(proc, "cannot read image", "broken.png")


def test_mask_of_another_model(setup):
    other = {"blocks.0.attn.qkv.weight": torch.ones(3, 3, dtype=torch.bool)}
    torch.save(other, setup / "other_mask.pt")
    common = ("--model", "DiT-T/2", "--data-path", setup / "data", "--ckpt", setup / "tiny.pt", "--forget-class", 1,
              "--n-iters", 2, "--results-dir", setup / "results", "--num-workers", 0)
    proc = run_in_process("forget.py", *common, "--mask-path", setup / "other_mask.pt", cwd=setup)
    assert_one_line_error(proc, "is for another model")
    proc = run_in_process("forget.py", *common, "--mask-path", setup / "nomask", cwd=setup)
    assert_one_line_error(proc, "neither a mask file nor a mask folder")


def test_non_finite_losses_stop_cleanly_and_keep_the_last_good_checkpoint(setup):
    nan = torch.load(setup / "tiny.pt", weights_only=True)
    nan["final_layer.linear.bias"][0] = float("nan")
    torch.save(nan, setup / "nan.pt")
    assert_one_line_error(fisher(setup, "--mask-path", setup / "nan_mask", ckpt=setup / "nan.pt"), "non-finite")
    assert not os.path.exists(setup / "nan_mask")
    # a learning rate large enough to blow gradient ascent up after a few steps
    results = setup / "blowup"
    proc = run_script("forget.py", "--model", "DiT-T/2", "--data-path", setup / "data", "--ckpt", setup / "tiny.pt",
                      "--forget-class", 1, "--n-iters", 40, "--lr", "0.3", "--forget-alpha", 1, "--batch-size", 2,
                      "--ckpt-every", 1, "--snapshot-every", 0, "--results-dir", results, "--num-workers", 0,
                      cwd=setup, check=False)
    assert_one_line_error(proc, "non-finite", "lower --lr")
    (run,) = os.listdir(results)
    saved = sorted(os.listdir(results / run / "checkpoints"))
    assert saved and len(saved) < 40  # some steps were saved, and the run stopped before its end
    for name in saved:
        state = torch.load(results / run / "checkpoints" / name, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_settings_that_would_change_nothing_stop_before_any_folder_is_made(setup):
    """A mask-only flag without a mask, a threshold of 0, a mask made for another class or checkpoint, a mask that
    freezes every weight: one error line each, and no results folder."""
    assert fisher(setup, cls=1, data=setup / "data").returncode == 0  # Fisher files of class 1 in setup/mask
    run_in_process("generate_mask.py", "--mask-path", setup / "mask", "--forget-class", 1, "--thresholds", 1,
                   cwd=setup, check=True)
    mask = setup / "mask" / "1" / "fisher_1.0.pt"
    assert json.load(open(setup / "mask" / "1" / "fisher_1.0.json"))["forget_class"] == 1
    make_checkpoint(setup / "retrained.pt", num_classes=3, seed=7)  # the same model, other weights
    frozen = {k: torch.zeros_like(v) for k, v in torch.load(mask, weights_only=True).items()}
    torch.save(frozen, setup / "all_frozen.pt")  # no provenance: the official scripts' kind of file
    results = setup / "never"

    def forget(*args, ckpt="tiny.pt", cls=1):
        return run_in_process("forget.py", "--model", "DiT-T/2", "--data-path", setup / "data", "--ckpt", setup / ckpt,
                              "--forget-class", cls, "--n-iters", 1, "--results-dir", results, "--num-workers", 0,
                              *args, cwd=setup)
    assert_one_line_error(forget("--mask-remain-step"), "--mask-remain-step needs a saliency mask",
                          "--mask-path")
    assert_one_line_error(forget("--recipe", "masked-esd-distill"), "--mask-remain-step needs a saliency mask",
                          "recipe masked-esd-distill")
    assert_one_line_error(forget("--mask-path", setup / "mask", "--threshold", 0), "--threshold must be positive")
    assert_one_line_error(forget("--mask-path", mask, cls=2), "was made for class 1, this run's is 2")
    assert_one_line_error(forget("--mask-path", mask, ckpt="retrained.pt"), "was made for the checkpoint",
                          "retrained.pt")
    proc = forget("--mask-path", setup / "all_frozen.pt")
    assert_one_line_error(proc, "freezes every weight")
    assert "warning: " in proc.stderr and "records no provenance" in proc.stderr
    assert not results.exists()


SCRIPTS = ("attack.py", "demo.py", "evaluate.py", "export_diffusers.py", "forget.py", "generate_fisher.py",
           "generate_mask.py", "prepare_digits.py", "sample.py", "sample_ddp.py", "train.py", "train_classifier.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_script_in_whole_sentences(script, tmp_path):
    """--help opens with the first paragraph of the script's docstring, not its first line cut mid-sentence."""
    import importlib
    doc = importlib.import_module(script[:-3]).__doc__
    first_paragraph = "".join(doc.strip().split("\n\n")[0].split())  # argparse re-wraps, also at hyphens
    proc = run_in_process(script, "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert first_paragraph.endswith((".", ")")) and first_paragraph in "".join(proc.stdout.split())
