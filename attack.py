"""
Attacks an unlearned DiT to see whether the forgotten class is really gone: label inversion (a new label embedding
learned on a few forget-class images, the DiT frozen) and relearning (a few fine-tuning steps on them), run with the
same budgets and seeds on every --ckpt (the original, the unlearned models, the retrained one). After each budget
the attacked model draws --samples images and the classifier says how many show the forget class. Writes
report.json, report.md, attack.png (forget accuracy against budget; bars per model where each attack has one budget),
samples.png (a row per model: what it draws under the label the inversion learned, the same noise for every model, as
sample.py draws classes with the same --seed) and the measured samples (.npz) to --out.
"""
import argparse
import os
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from cli import (add_class_index_arg, add_model_args, add_sampling_args, description, model_request, run_main,
                sampler_config)
from diffusion import create_diffusion
from sfron.attack import ATTACKS, AttackImages, AttackSettings, label_inversion, relearning
from sfron.build import load_model_and_vae
from sfron.classifier import load_classifier
from sfron.data import ImageSet, class_folders
from sfron.files import atomic_json_dump, atomic_save_figure, atomic_save_image, atomic_write, atomic_write_text
from sfron.metrics import classify
from sfron.rng import generator
from sfron.sampling import StepNoise, generate, grid_image, per_sample_noise, stacked, to_uint8_nhwc, upscale
from sfron.utils import UserError, check_class_index

ROW_SAMPLES = 10   # images per model in samples.png, from the noise of sample.py's first 10 images (same --seed)
ROW_SIDE = 96      # samples.png's rows are enlarged (nearest neighbour) to at least this height
PLOT_DPI = 120


def attacker_images(folders, forget_class, image_size, count, seed):
    """`count` forget-class images (N, 3, S, S) in [-1, 1], a fixed random choice of the class folder's (folders: a
    ClassFolders)."""
    if count < 1:
        raise UserError(f"--images must be at least 1, got {count}")
    found = folders.samples([forget_class])
    order = torch.randperm(len(found), generator=generator(seed, "attack/images"))[:count].tolist()
    dataset = ImageSet([found[i] for i in sorted(order)], image_size, folders.names, folders.root)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


class ForgetRate:
    """Draws the measured samples of a label, saves them, and reports how many the classifier puts in the class."""

    def __init__(self, args, classifier, vae, out_dir):
        self.args, self.classifier, self.vae, self.out_dir = args, classifier, vae, out_dir
        self.config = sampler_config(args)

    def __call__(self, model, label, name):
        """{forget_acc, n, n_forget, samples} of args.samples images that `model` draws for `label`."""
        device = next(model.parameters()).device
        shape = (model.in_channels, model.input_size, model.input_size)
        z = per_sample_noise(self.args.seed, range(self.args.samples), shape, device, "attack/noise")
        with torch.no_grad():
            images = generate(model, self.vae, torch.full((self.args.samples,), label, device=device), z,
                              self.config)
        uint8 = to_uint8_nhwc(images)
        predicted = classify(self.classifier, uint8, 256, device).argmax(1)
        hits = int((predicted == self.args.forget_class).sum())
        path = os.path.join(self.out_dir, "samples", f"{name}.npz")
        labels = np.full(len(uint8), self.args.forget_class)
        atomic_write(path, lambda f: np.savez(f, arr_0=uint8, arr_1=labels))
        return {"forget_acc": hits / len(uint8), "n": len(uint8), "n_forget": hits, "samples": path}

    def row(self, model, label):
        """A PIL row of what `model` draws for `label` from the noise of sample.py's first ROW_SAMPLES images."""
        device = next(model.parameters()).device
        shape, indices = (model.in_channels, model.input_size, model.input_size), range(ROW_SAMPLES)
        z = per_sample_noise(self.args.seed, indices, shape, device)
        with torch.no_grad():
            images = generate(model, self.vae, torch.full((ROW_SAMPLES,), label, device=device), z, self.config,
                              noise_fn=StepNoise(self.args.seed, indices))
        return upscale(grid_image(images, nrow=ROW_SAMPLES), ROW_SIDE)


def attack_model(loaded, images, settings, forget_rate, name, attacks):
    """({attack: {budget: report}}, its row under the label of the last inversion budget or None) of one model."""
    diffusion = create_diffusion(timestep_respacing="")
    runs = {"inversion": label_inversion, "relearning": relearning}
    out, row = {}, {}
    last = max(settings.inversion_steps)

    def measure(attack):
        """The forget_rate callback of one attack; at the last inversion budget it also draws the row."""
        def rate(model, label, step):
            if attack == "inversion" and step == last:
                row["image"] = forget_rate.row(model, label)
            return forget_rate(model, label, f"{name}-{attack}-{step}")
        return rate
    for attack in [a for a in ATTACKS if a in attacks]:
        out[attack] = runs[attack](loaded.model, diffusion, images, settings, measure(attack))
    return out, row.get("image")


def markdown(reports, settings):
    """One row per model: forget accuracy after each budget of each attack."""
    lines = []
    for attack, budgets in (("inversion", settings.inversion_steps), ("relearning", settings.relearn_steps)):
        rows = [r for r in reports.values() if attack in r]
        if not rows:
            continue
        lines += [f"Forget accuracy after {attack} (steps):", "",
                  "| model | " + " | ".join(str(b) for b in sorted(set(budgets))) + " |",
                  "| --- |" + " --- |" * len(set(budgets))]
        lines += [f"| {name} | " + " | ".join(f"{r[attack][b]['forget_acc']:.3f}" for b in sorted(r[attack])) + " |"
                  for name, r in reports.items() if attack in r]
        lines.append("")
    return "\n".join(lines)


def curves(ax, reports, attack):
    """Forget accuracy against the budgets of one attack, a line per model."""
    for name, r in reports.items():
        if attack in r:
            steps = sorted(r[attack], key=int)
            ax.plot([int(s) for s in steps], [r[attack][s]["forget_acc"] for s in steps], marker="o", label=name)
    ax.set(xlabel=f"{attack} steps", ylabel="forget accuracy", ylim=(-0.03, 1.03))


def bars(ax, reports, attacks):
    """Forget accuracy after the one budget of each attack: a group of bars per attack, a bar per model."""
    names = list(reports)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next(iter(reports[name][a].values()))["forget_acc"] for a in attacks]
        drawn = ax.bar([k + (i - (len(names) - 1) / 2) * width for k in range(len(attacks))], values, width,
                       label=name)
        ax.bar_label(drawn, fmt="%.2f", fontsize=7)
    budgets = [next(iter(reports[names[0]][a])) for a in attacks]
    ax.set_xticks(range(len(attacks)), [f"after {b} {a} steps" for a, b in zip(attacks, budgets)])
    ax.set(ylabel="forget accuracy", ylim=(0, 1.1))


def one_budget(reports, attack):
    """Whether every model was measured after one budget of `attack`."""
    return all(len(r[attack]) == 1 for r in reports.values() if attack in r)


def plot_size(reports):
    """(the attacks of each panel, (width, height) in inches) of attack.png."""
    attacks = [a for a in ATTACKS if any(a in r for r in reports.values())]
    if all(one_budget(reports, a) for a in attacks):
        return [attacks], (3.0 + 2.0 * len(attacks), 3.6)
    return [[a] for a in attacks], (5.0 * len(attacks), 3.6)


def plot(reports, path):
    """attack.png: bars per model grouped per attack where each has one budget, else a panel of lines per attack."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels, size = plot_size(reports)
    fig, axes = plt.subplots(1, len(panels), figsize=size, dpi=PLOT_DPI, squeeze=False)
    for ax, attacks in zip(axes[0], panels):
        if all(one_budget(reports, a) for a in attacks):
            bars(ax, reports, attacks)
        else:
            curves(ax, reports, attacks[0])
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    atomic_save_figure(fig, path)


def save_rows(rows, last, path):
    """samples.png: each model's row (ForgetRate.row) under its name."""
    titles = [f"{name}: under the label learned in {last} inversion steps" for name in rows]
    atomic_save_image(stacked(list(rows.values()), titles=titles), path)


def main(args):
    """Attacks every --ckpt and writes the report to --out."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checkpoints = args.ckpt or [None]
    names = args.names or [os.path.splitext(os.path.basename(c or "released"))[0] for c in checkpoints]
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise UserError("--names needs one distinct name per --ckpt")
    settings = AttackSettings(forget_class=args.forget_class, inversion_steps=tuple(args.inversion_steps),
                              inversion_lr=args.inversion_lr, relearn_steps=tuple(args.relearn_steps),
                              relearn_lr=args.relearn_lr, batch_size=args.batch_size, seed=args.seed)
    if min(settings.inversion_steps + settings.relearn_steps) < 0 or args.samples < 1:
        raise UserError("attack steps must be 0 or more and --samples at least 1")
    first = load_model_and_vae(model_request(args, ckpt=checkpoints[0]), device)
    check_class_index(args.forget_class, first.spec.num_classes, "--forget-class", "the model")
    folders = class_folders(args.data_path, first.spec.num_classes, args.class_index_file)
    images = AttackImages(attacker_images(folders, args.forget_class, first.spec.image_size, args.images,
                                          args.seed).to(device), first.vae)
    classifier = load_classifier(args.classifier, args.classifier_weights, args.classifier_classes or
                                 first.spec.num_classes).to(device)
    forget_rate = ForgetRate(args, classifier, first.vae, args.out)
    same = replace(model_request(args), image_size=first.spec.image_size, num_classes=first.spec.num_classes,
                   vae=first.spec.vae)
    reports, rows = {}, {}
    for name, ckpt in tqdm(list(zip(names, checkpoints)), desc="models", disable=len(checkpoints) < 2):
        loaded = first if ckpt == checkpoints[0] else load_model_and_vae(replace(same, ckpt=ckpt), device,
                                                                         with_vae=False)
        reports[name], rows[name] = attack_model(loaded, images, settings, forget_rate, name, args.attacks)
        summary = ", ".join(f"{a} {max(r)} steps: {r[max(r)]['forget_acc']:.3f}" for a, r in reports[name].items())
        print(f"{name}: forget accuracy after {summary}", flush=True)
    about = {"forget_class": args.forget_class, "images": len(images), "settings": vars(args) | {"ckpt": checkpoints}}
    atomic_json_dump({"about": about, **reports}, os.path.join(args.out, "report.json"))
    atomic_write_text(markdown(reports, settings), os.path.join(args.out, "report.md"))
    plot(reports, os.path.join(args.out, "attack.png"))
    print(markdown(reports, settings), end="")
    if "inversion" in args.attacks:
        save_rows(rows, max(settings.inversion_steps), os.path.join(args.out, "samples.png"))
        print(f"Saved {args.out}/report.json, report.md, attack.png and samples.png")
    else:
        print(f"Saved {args.out}/report.json, report.md and attack.png (no samples.png: no label inversion)")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    add_model_args(parser, several_ckpts=True)
    add_sampling_args(parser, cfg_scale=4.0, num_steps=50, sampler="ddim")
    parser.add_argument("--names", type=str, nargs="+", default=None, help="a name per --ckpt")
    parser.add_argument("--data-path", type=str, required=True, help="ImageNet-style root holding the forget class")
    parser.add_argument("--forget-class", type=int, required=True)
    add_class_index_arg(parser)
    parser.add_argument("--attacks", type=str, nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--images", type=int, default=8, help="forget-class images the attacker holds")
    parser.add_argument("--inversion-steps", type=int, nargs="+", default=[0, 50, 100, 200],
                        help="label-inversion budgets (Adam steps) after which the new label is sampled")
    parser.add_argument("--inversion-lr", type=float, default=5e-3)
    parser.add_argument("--relearn-steps", type=int, nargs="+", default=[0, 10, 25, 50],
                        help="relearning budgets (AdamW steps) after which the forget class is sampled")
    parser.add_argument("--relearn-lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8, help="images per attack step")
    parser.add_argument("--samples", type=int, default=100, help="images drawn after each budget")
    parser.add_argument("--classifier", type=str, default="resnet50", help="'digits', 'mnist' or a torchvision model")
    parser.add_argument("--classifier-weights", type=str, default=None, help="local weights file of the classifier")
    parser.add_argument("--classifier-classes", type=int, default=None, help="default: the model's class count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default="attack_results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
