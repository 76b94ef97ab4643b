"""
Breakages whose symptoms the other tests do not see: relearning that never learns, resumed runs that redo their
work, a Fisher sum left undivided, a classifier saved untrained, and crossed pathways in bench/pathways.py.
"""
import glob
import os

import numpy as np
import torch
from PIL import Image

from diffusion import create_diffusion
from helpers import (ROOT, experiment_dirs, make_checkpoint, make_tiny_run_folder, naive_fisher_sum, run_in_process,
                     tiny_dit)
from sfron.attack import AttackImages, AttackSettings, relearning
from sfron.data import Batch
from sfron.dist import Dist
from sfron.fisher import fisher_diagonal
from sfron.loss import diffusion_loss

TABLE = "y_embedder.embedding_table.weight"


def test_relearning_moves_the_copy_through_the_forget_label():
    """Relearning that takes no optimizer step, or fine-tunes under the null label, leaves the forget row as it was."""
    model = tiny_dit(num_classes=4)
    images = AttackImages(torch.rand(4, 3, 8, 8) * 2 - 1, None)
    diffusion = create_diffusion("")
    seen = {}

    def rate(net, label, step):  # the copy's weights and the label it is sampled with, at each budget
        seen[step] = (label, {k: v.detach().clone() for k, v in net.state_dict().items()})
        return step

    settings = AttackSettings(forget_class=2, relearn_steps=(0, 6), relearn_lr=1e-2, batch_size=4)
    assert relearning(model, diffusion, images, settings, rate) == {0: 0, 6: 6}
    (label0, before), (label6, after) = seen[0], seen[6]
    assert label0 == label6 == 2
    # labels 0, 1, 3 and the null label 4 never enter the loss: their rows get zero gradients, which AdamW
    # (no weight decay) leaves bit-identical; the forget label's row is the one that moves
    moved = [row for row in range(5) if not torch.equal(before[TABLE][row], after[TABLE][row])]
    assert moved == [2], moved
    assert not torch.equal(before["final_layer.linear.weight"], after["final_layer.linear.weight"])
    # the fine-tuned copy fits the images under the forget label better than it did
    g = torch.Generator().manual_seed(7)
    x = images.mean.repeat(4, 1, 1, 1)
    check = Batch(x=x, y=torch.full((16,), 2), t=torch.randint(0, 1000, (16,), generator=g),
                  noise=torch.randn(x.shape, generator=g), drop=torch.zeros(16, dtype=torch.long))
    losses = []
    for state in (before, after):
        net = tiny_dit(num_classes=4).eval()
        net.load_state_dict(state)
        with torch.no_grad():
            losses.append(float(diffusion_loss(net, diffusion, check).mean()))
    assert losses[1] < 0.9 * losses[0], losses


def test_a_continued_sample_ddp_keeps_the_images_already_written(tmp_path, monkeypatch):
    """A continuation that draws every image again overwrites the PNGs a stopped run had already written."""
    import sample_ddp
    ckpt = make_checkpoint(tmp_path / "tiny.pt", num_classes=3)
    argv = ["--model", "DiT-T/2", "--ckpt", ckpt, "--num-classes", 3, "--image-size", 8, "--samples-per-class", 2,
            "--per-proc-batch-size", 2, "--num-sampling-steps", 4, "--sample-dir", tmp_path / "samples",
            "--global-seed", 1]
    run_in_process("sample_ddp.py", *argv, cwd=tmp_path, check=True)
    (folder,) = [p for p in glob.glob(str(tmp_path / "samples" / "*")) if os.path.isdir(p)]
    png = lambda i: os.path.join(folder, f"{i:06d}.png")  # noqa: E731
    first = [np.asarray(Image.open(png(i))) for i in range(6)]
    # a stopped run: images 0-3 written (0 and 1 replaced by markers no draw gives), 4 and 5 missing, no .npz
    marker = np.full((8, 8, 3), 7, dtype=np.uint8)
    for i in (0, 1):
        Image.fromarray(marker).save(png(i))
    for i in (4, 5):
        os.remove(png(i))
    os.remove(folder + ".npz")
    drawn = []
    generate = sample_ddp.generate

    def counting(model, vae, y, *args, **kwargs):
        drawn.append(len(y))
        return generate(model, vae, y, *args, **kwargs)
    monkeypatch.setattr(sample_ddp, "generate", counting)
    proc = run_in_process("sample_ddp.py", *argv, cwd=tmp_path, check=True)
    assert "(4 already there)" in proc.stdout
    assert drawn == [2]  # the one missing batch of two images
    for i in (0, 1):
        assert np.array_equal(np.asarray(Image.open(png(i))), marker)
    for i in (2, 3, 4, 5):
        assert np.array_equal(np.asarray(Image.open(png(i))), first[i])
    with np.load(folder + ".npz") as saved:
        assert np.array_equal(saved["arr_0"][:2], np.stack([marker, marker]))
        assert np.array_equal(saved["arr_0"][2:], np.stack(first[2:]))


def test_a_resumed_forget_run_takes_only_the_steps_left(tmp_path, monkeypatch):
    """A resumed forget.py run that starts again from step 0 takes all 6 steps instead of the 3 left after step 3."""
    from sfron.unlearn import Unlearner
    make_tiny_run_folder(tmp_path)
    results = tmp_path / "runs"
    args = ("--model", "DiT-T/2", "--data-path", tmp_path / "data", "--batch-size", 2, "--ckpt", tmp_path / "tiny.pt",
            "--n-iters", 6, "--ckpt-every", 3, "--snapshot-every", 0, "--forget-class", 0, "--lr", "1e-3",
            "--log-every", 1, "--results-dir", results, "--num-workers", 0)
    run_in_process("forget.py", *args, cwd=tmp_path, check=True)
    (full,) = experiment_dirs(results)
    interrupted = full + "-interrupted"  # what a run killed after step 3 leaves: its checkpoint of step 3
    os.makedirs(os.path.join(interrupted, "checkpoints"))
    os.link(os.path.join(full, "checkpoints", "0000003.pt"), os.path.join(interrupted, "checkpoints", "0000003.pt"))
    steps = []
    step = Unlearner.step

    def counting(self, *a, **kw):
        steps.append(1)
        return step(self, *a, **kw)
    monkeypatch.setattr(Unlearner, "step", counting)
    proc = run_in_process("forget.py", *args, "--resume", interrupted, cwd=tmp_path, check=True)
    assert len(steps) == 3
    logged = [line.split("(step=")[1][:7] for line in proc.stdout.splitlines() if "(step=" in line]
    assert logged == ["0000004", "0000005", "0000006"], logged
    a = torch.load(os.path.join(full, "checkpoints", "0000006.pt"), weights_only=True)
    b = torch.load(os.path.join(interrupted, "checkpoints", "0000006.pt"), weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fisher_is_the_mean_of_per_sample_squared_gradients():
    """A Fisher left as the sum over samples (not divided by the 6 samples) is 6 times the hand-computed mean."""
    model, diffusion = tiny_dit(num_classes=4).eval(), create_diffusion("")
    g = torch.Generator().manual_seed(3)
    batches = [Batch(x=torch.randn(2, 3, 8, 8, generator=g), y=torch.tensor([k, 4 - k]),
                     t=torch.randint(0, 1000, (2,), generator=g), noise=torch.randn(2, 3, 8, 8, generator=g),
                     drop=torch.zeros(2, dtype=torch.long), step=k) for k in range(3)]
    sums = [naive_fisher_sum(model, diffusion, b) for b in batches]  # one sample at a time, by plain autograd
    expected = {n: sum(s[n] for s in sums) / 6 for n in sums[0]}
    model.zero_grad(set_to_none=True)
    fisher = fisher_diagonal(model, diffusion, batches, Dist())
    assert fisher.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")


def test_the_saved_classifier_is_the_trained_one(tmp_path):
    """A classifier saved before training draws near chance on the held-out digits, whatever accuracy it records."""
    from sfron.classifier import load_classifier
    run_in_process("prepare_digits.py", "--out", tmp_path / "digits", cwd=tmp_path, check=True)
    run_in_process("train_classifier.py", "--data-path", tmp_path / "digits", "--out", tmp_path / "clf.pt",
                   "--epochs", 2, cwd=tmp_path, check=True)
    classifier = load_classifier("digits", str(tmp_path / "clf.pt"), 10)
    images, labels = [], []
    for c in range(10):
        for path in sorted(glob.glob(str(tmp_path / "digits" / "val" / str(c) / "*.png"))):
            images.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32))
            labels.append(c)
    assert len(labels) == 355  # the held-out fifth of the 1,797 digits
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        hits = int((classifier(x).argmax(1) == torch.tensor(labels)).sum())
    assert hits / 355 > 0.6, hits  # ten classes: chance is 0.1


def test_pathways_take_each_half_from_the_model_it_names(tmp_path, capsys, monkeypatch):
    """Swapped conditional and unconditional models, or an ignored --ckpt, put the low remain accuracy elsewhere."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import pathways
    # the "unlearned" model: the original with every class row of the label table set to the null label's, so its
    # conditional prediction is its unconditional one, and that is the original's, bit for bit
    ckpt = torch.load(os.path.join(ROOT, "assets", "digits_dit.pt"), weights_only=True)
    table = ckpt["ema"][TABLE].clone()
    table[:10] = table[10]
    ckpt["ema"] = {**ckpt["ema"], TABLE: table}
    torch.save(ckpt, tmp_path / "unconditional.pt")
    pathways.main(pathways.parse_args(["--ckpt", str(tmp_path / "unconditional.pt"), "--forget-class", "3",
                                       "--samples-per-class", "4", "--sampling-steps", "10"]))
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:4] for line in lines] == [
        ["conditional", "original", "unconditional", "original"],
        ["conditional", "original", "unconditional", "unlearned"],
        ["conditional", "unlearned", "unconditional", "original"],
        ["conditional", "unlearned", "unconditional", "unlearned"]]
    values = [float(line.split()[-1]) for line in lines]
    # the original's own labels draw the remain classes; the unlearned conditional half guides nowhere, so its
    # images are the original's unconditional draws, of a random class each
    assert values[0] == values[1] and values[2] == values[3], values
    assert values[0] >= 0.8 and values[2] <= 0.4, values
