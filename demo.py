"""
The README's three steps on the embedded digits case, on a CPU in minutes: the shipped digits DiT forgets one digit
(--forget-class, default 0) with generate_fisher.py, generate_mask.py and forget.py --recipe (default
adversarial-esd-distill), then the original, the unlearned and the retrained-without-that-digit models are sampled and
evaluated with the shipped digits classifier. Writes <out>/report.json, <out>/report.md, <out>/samples.png
(original | unlearned | retrained, from the same noise) and <out>/losses.png; with --attacks also <out>/attacks/.
"""
import argparse
import json
import os
import shlex
import time

import attack
import evaluate
import forget
import generate_fisher
import generate_mask
import prepare_digits
import sample
import sample_ddp
import train
from cli import run_main
from sfron.files import atomic_json_dump, atomic_save_figure
from sfron.recipes import DEFAULT_RECIPE, RECIPES, recipe_help
from sfron.utils import UserError, check_class_index

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_DIT = os.path.join(ASSETS, "digits_dit.pt")
DIGITS_CLASSIFIER = os.path.join(ASSETS, "digits_classifier.pt")
# the recipe of the shipped digits DiT (README: the embedded digits case); a retrained reference leaves one digit out
TRAIN_FLAGS = ["--model", "DiT-T/2", "--image-size", 8, "--num-classes", 10, "--vae", "none", "--no-random-flip",
               "--global-batch-size", 128, "--max-steps", 6000, "--lr", "1e-3", "--ema-decay", 0.999,
               "--num-workers", 0]
# What the digits need beyond a recipe's own values: the official update at the official rate (1e-5) leaves a digit
# unforgotten in 100 steps; 1.5e-4 is the digits' rate for it (README: the embedded digits case).
DIGITS_VALUES = {"official": {"lr": 1.5e-4}, "masked-esd-distill": {}, "adversarial-esd-distill": {}}


def step(script, argv):
    """Prints the equivalent shell command, then runs the script's main() in this process."""
    print(f"\n$ python {script.__name__}.py {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)
    script.main(script.parse_args([str(a) for a in argv]))


def sample_npz(ckpt, name, args):
    """Evaluation samples of every digit from one model; returns the .npz path."""
    sample_dir = os.path.join(args.out, "samples", name)
    step(sample_ddp, ["--model", "DiT-T/2", "--ckpt", ckpt, "--sampler", "ddim", "--num-sampling-steps",
                      args.sampling_steps, "--cfg-scale", args.cfg_scale, "--samples-per-class", args.samples_per_class,
                      "--per-proc-batch-size", 10 * args.samples_per_class, "--sample-dir", sample_dir])
    (npz,) = [os.path.join(sample_dir, f) for f in os.listdir(sample_dir) if f.endswith(".npz")]
    return npz


def retrained_reference(forget_class, reference_dir, data_path, train_missing=True):
    """
    The digits DiT retrained without forget_class: shipped in assets/, or kept in reference_dir, or trained there
    now with train.py (about 10 minutes on 2 CPU cores) when train_missing; None when absent.
    """
    name = f"digits_dit_without_{forget_class}.pt"
    for folder in (ASSETS, reference_dir):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not train_missing:
        return None
    path = os.path.join(reference_dir, name)
    print(f"\nNo retrained reference for digit {forget_class}: training one (once; kept in {path})", flush=True)
    step(train, ["--data-path", data_path, *TRAIN_FLAGS, "--exclude-class", forget_class, "--results-dir",
                 os.path.join(reference_dir, "runs"), "--export", path])
    return path


def plot_losses(losses_json, path, forget_class):
    """The forget and remain terms' losses over the unlearning steps (diffusion losses, or the distances to ESD's
    and the distilled targets, as the recipe's --unlearn-loss and --remain-loss say)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = json.load(open(losses_json))["losses"]
    steps, forget_loss, remain_loss = zip(*rows)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, forget_loss, label=f"forget (digit {forget_class})")
    ax.plot(steps, remain_loss, label="remain (other digits)")
    ax.set_xlabel("unlearning step")
    ax.set_ylabel("loss of the term")
    ax.set_yscale("log")
    ax.legend()
    atomic_save_figure(fig, path)


def common_flags(args):
    """The flags the three steps share (as the README gives them)."""
    return ["--model", "DiT-T/2", "--data-path", args.data_path, "--batch-size", args.batch_size, "--ckpt",
            DIGITS_DIT, "--num-workers", 0]


def fisher_and_masks(args, mask_path, results):
    """Steps 1 and 2: the Fisher diagonals and the saliency masks (and the digits folder if missing)."""
    for path in (DIGITS_DIT, DIGITS_CLASSIFIER):
        if not os.path.isfile(path):
            raise UserError(f"missing shipped file {path}: see 'The embedded digits case' in the README")
    check_class_index(args.forget_class, 10, "--forget-class", "the digits")
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        step(prepare_digits, ["--out", args.data_path])
    step(generate_fisher, common_flags(args) + ["--n-iters", args.fisher_iters, "--forget-class", args.forget_class,
                                                "--mask-path", mask_path, "--results-dir", results])
    thresholds = sorted({float(t) for t in args.thresholds} | {recipe_value(args, "threshold")})
    step(generate_mask, ["--mask-path", mask_path, "--forget-class", args.forget_class, "--thresholds", *thresholds])


def recipe_value(args, key):
    """--lr or --threshold as given, else the digits' value for the recipe, else the recipe's."""
    given = getattr(args, key)
    if given is not None:
        return given
    return DIGITS_VALUES[args.recipe].get(key, RECIPES[args.recipe].values[key])


def forget_flags(args):
    """forget.py's flags of the demo's command line: the recipe, the learning rate and threshold (the digits' or
    given), then --forget-flags."""
    return ["--recipe", args.recipe, "--lr", recipe_value(args, "lr"), "--threshold", recipe_value(args, "threshold"),
            *shlex.split(args.forget_flags)]


def unlearn(args, mask_path, results, seed=0):
    """Step 3, forget.py with the recipe; returns the run folder."""
    step(forget, common_flags(args) + [
        "--n-iters", args.forget_iters, "--snapshot-every", 50, "--forget-class", args.forget_class,
        "--mask-path", mask_path, "--results-dir", results, "--log-every", 25, "--seed", seed, *forget_flags(args)])
    run = max((d for d in os.listdir(results) if "-forget-" in d), key=lambda d: int(d.split("-")[0]))
    return os.path.join(results, run)


def attack_models(args, models, report):
    """attack.py's label inversion and relearning on every model; adds each model's forget accuracy after them to
    the report (inversion_fa, relearn_fa) and prints them."""
    out = os.path.join(args.out, "attacks")
    step(attack, ["--model", "DiT-T/2", "--ckpt", *models.values(), "--names", *models.keys(), "--data-path",
                  args.data_path, "--forget-class", args.forget_class, "--classifier", "digits",
                  "--classifier-weights", DIGITS_CLASSIFIER, "--num-sampling-steps", args.sampling_steps,
                  "--cfg-scale", args.cfg_scale, "--inversion-steps", args.inversion_steps, "--relearn-steps",
                  args.relearn_steps, "--samples", args.samples_per_class, "--out", out])
    attacked = json.load(open(os.path.join(out, "report.json")))
    print(f"\nForget accuracy of digit {args.forget_class} after the attacks (8 images, seed 0):")
    for name in models:
        inversion, relearning = (attacked[name][a][str(s)]["forget_acc"] for a, s in
                                 (("inversion", args.inversion_steps), ("relearning", args.relearn_steps)))
        report[name].update(inversion_fa=inversion, relearn_fa=relearning)
        print(f"  {name:10s} {args.inversion_steps} label-inversion steps: {inversion:.2f}   "
              f"{args.relearn_steps} relearning steps: {relearning:.2f}")
    report["about"]["attacks"] = {"inversion_steps": args.inversion_steps, "relearn_steps": args.relearn_steps,
                                  "report": os.path.join(out, "report.json")}


def main(args):
    """Runs the pipeline and writes the report."""
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    mask_path, results = os.path.join(args.out, "mask"), os.path.join(args.out, "results")
    fisher_and_masks(args, mask_path, results)
    retrained = retrained_reference(args.forget_class, args.reference_dir, args.data_path, args.train_reference)
    run = unlearn(args, mask_path, results, args.seed)
    models = {"original": DIGITS_DIT, "unlearned": os.path.join(run, "checkpoints", f"{args.forget_iters:07d}.pt")}
    if retrained is not None:
        models["retrained"] = retrained
    npz = {name: sample_npz(ckpt, name, args) for name, ckpt in models.items()}
    report_path = os.path.join(args.out, "report.json")
    step(evaluate, ["--samples", *npz.values(), "--names", *npz.keys(), "--forget-class", args.forget_class,
                    "--classifier", "digits", "--classifier-weights", DIGITS_CLASSIFIER, "--data-path",
                    args.data_path, "--fid-features", "classifier", "--fid-cache", os.path.join(args.out, "fid_cache"),
                    "--out", report_path])
    step(sample, ["--model", "DiT-T/2", "--ckpt", *models.values(), "--sampler", "ddim", "--num-sampling-steps",
                  args.sampling_steps, "--cfg-scale", args.cfg_scale, "--class-labels", *range(10), "--nrow", 5,
                  "--min-side", 96, "--titles", *models.keys(), "--out", os.path.join(args.out, "samples.png")])
    plot_losses(os.path.join(run, "losses.json"), os.path.join(args.out, "losses.png"), args.forget_class)

    report = json.load(open(report_path))
    if args.attacks:
        attack_models(args, models, report)
    report["about"].update(forget_run=run, seconds=round(time.time() - start, 1), retrained=retrained or
                           f"absent: no digits_dit_without_{args.forget_class}.pt in assets/ or {args.reference_dir}",
                           figure=f"samples.png: {' | '.join(models)}, digits 0-9, same noise")
    atomic_json_dump(report, report_path)
    print(f"\nDigit {args.forget_class} forgotten in {report['about']['seconds']} s; FID in the digits classifier's "
          f"feature space. Results in {args.out}/")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=str, default="demo_results", help="output folder")
    parser.add_argument("--data-path", type=str, default="data/digits",
                        help="the digits as an ImageNet-style folder (written by prepare_digits.py if missing)")
    parser.add_argument("--forget-class", type=int, default=0, help="the digit to forget (0-9)")
    parser.add_argument("--reference-dir", type=str, default="retrained",
                        help="where retrained references not shipped in assets/ are kept (trained once)")
    parser.add_argument("--train-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="train a missing retrained reference with train.py (about 10 minutes on 2 CPU cores); "
                             "--no-train-reference reports it as absent")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step of the three scripts")
    parser.add_argument("--fisher-iters", type=int, default=8, help="generate_fisher.py --n-iters")
    parser.add_argument("--thresholds", type=str, nargs="+", default=["0.5", "1", "3", "5", "10"],
                        help="generate_mask.py --thresholds")
    parser.add_argument("--recipe", type=str, choices=list(RECIPES), default=DEFAULT_RECIPE,
                        help=f"forget.py --recipe (default {DEFAULT_RECIPE}; official runs at the digits' lr 1.5e-4). "
                             f"{recipe_help()}")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the mask threshold forget.py uses (default: the recipe's)")
    parser.add_argument("--forget-iters", type=int, default=100, help="forget.py --n-iters")
    parser.add_argument("--lr", type=float, default=None, help="forget.py --lr (default: the digits' for the recipe)")
    parser.add_argument("--seed", type=int, default=0, help="forget.py --seed (the unlearning run's batch draws)")
    parser.add_argument("--forget-flags", type=str, default="",
                        help="more forget.py flags, in one string, after the recipe's (a repeated flag wins), "
                             "e.g. --forget-flags=\"--remain-lr 1e-3\"")
    parser.add_argument("--attacks", action="store_true",
                        help="also attack every model with attack.py's label inversion and relearning (8 images) and "
                             "report the forget accuracy after them")
    parser.add_argument("--inversion-steps", type=int, default=200, help="--attacks: the label-inversion budget")
    parser.add_argument("--relearn-steps", type=int, default=50, help="--attacks: the relearning budget")
    parser.add_argument("--samples-per-class", type=int, default=100, help="generated images per digit to evaluate")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale of the evaluation samples")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
