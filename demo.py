"""
The README's three steps on an embedded case, on a CPU in minutes.

The shipped DiT of --dataset (digits: scikit-learn's 8x8 digits; mnist: 5,000 real MNIST digits) forgets one digit
(--forget-class, default 0) with generate_fisher.py, generate_mask.py and forget.py --recipe (default salun-distill),
then the original, the unlearned and the retrained-without-that-digit models are sampled
and evaluated with the case's shipped classifier.
Writes <out>/report.json, <out>/report.md, <out>/samples.png (original | unlearned | retrained, from the same noise)
and <out>/losses.png; with --attacks also <out>/attacks/, and samples.png gains a row per model: what it draws under
the label the inversion attack learned, from the noise of digits 0-9 above.
"""
import argparse
import json
import os
import shlex
import time
from dataclasses import dataclass

import attack
import evaluate
import forget
import generate_fisher
import generate_mask
import prepare_digits
import sample
import sample_ddp
import train
from cli import description, run_main
from sfron.files import atomic_json_dump, atomic_save_figure, atomic_save_image
from sfron.recipes import DEFAULT_RECIPE, RECIPES, mask_setting, recipe_help
from sfron.sampling import stacked
from sfron.targets import target_checks, targets_missed
from sfron.utils import UserError, check_class_index

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@dataclass(frozen=True)
class EmbeddedCase:
    """An embedded case (README: the embedded digits case, MNIST included): the images prepare_digits.py writes, and
    the DiT, the classifier and the retrained references shipped for it in assets/, all named after it; the train.py
    flags of its DiTs are fields here so that a missing reference is trained exactly as the shipped ones were."""
    name: str                     # prepare_digits.py --dataset, train_classifier.py --classifier, the prefix in assets/
    model: str
    image_size: int
    train_steps: int              # train.py --max-steps
    batch_size: int = 128         # train.py --global-batch-size
    lr: float = 1e-3              # train.py --lr
    lr_schedule: str = "constant"  # train.py --lr-schedule
    warmup_steps: int = 0         # train.py --warmup-steps

    @property
    def dit(self):
        return os.path.join(ASSETS, f"{self.name}_dit.pt")

    @property
    def classifier(self):
        return os.path.join(ASSETS, f"{self.name}_classifier.pt")

    def reference_name(self, forget_class, seed=0):
        """The file name of the DiT retrained without forget_class (train.py --global-seed seed)."""
        return f"{self.name}_dit_without_{forget_class}{f'_seed{seed}' if seed else ''}.pt"

    def more_references(self, forget_class):
        """Paths of the references retrained with other seeds that assets/ ships for forget_class (the yardstick's
        own spread: bench/compare.py judges against the mean of all of them)."""
        names = (self.reference_name(forget_class, seed) for seed in range(1, 10))
        return [os.path.join(ASSETS, n) for n in names if os.path.isfile(os.path.join(ASSETS, n))]

    def train_flags(self):
        """train.py's flags of the shipped DiT; a retrained reference adds --exclude-class N."""
        return ["--model", self.model, "--image-size", self.image_size, "--num-classes", 10, "--vae", "none",
                "--no-random-flip", "--global-batch-size", self.batch_size, "--max-steps", self.train_steps,
                "--lr", f"{self.lr:g}", "--lr-schedule", self.lr_schedule, "--warmup-steps", self.warmup_steps,
                "--ema-decay", 0.999, "--num-workers", 0]


# The digits' DiTs train at the official constant rate; MNIST's need more, smaller steps with a decaying rate
# (README: MNIST, a second case).
CASES = {case.name: case for case in (
    EmbeddedCase("digits", "DiT-T/2", 8, 6000),
    EmbeddedCase("mnist", "DiT-T/4", 28, 36000, batch_size=32, lr=2e-3, lr_schedule="cosine", warmup_steps=1000))}
# What the embedded cases need beyond a recipe's own values: the official update at the official rate (1e-5) leaves a
# digit unforgotten in 100 steps; 1.5e-4 is the digits' rate for it (README: the embedded digits case), used
# unchanged on MNIST.
DIGITS_VALUES = {"official": {"lr": 1.5e-4}, "masked-esd-distill": {}, "adversarial-esd-distill": {},
                 "salun-distill": {}}


def step(script, argv):
    """Prints the equivalent shell command, then runs the script's main() in this process; returns what it returns."""
    print(f"\n$ python {script.__name__}.py {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)
    return script.main(script.parse_args([str(a) for a in argv]))


def case_of(args):
    """The EmbeddedCase of --dataset."""
    return CASES[args.dataset]


def sample_npz(ckpt, name, run, args):
    """Evaluation samples of every digit from one model, kept in the forget run's folder (each demo run draws its
    own: an earlier run's, with other settings or another dataset, stays apart); returns the .npz path."""
    sample_dir = os.path.join(run, "samples", name)
    return step(sample_ddp, ["--model", case_of(args).model, "--ckpt", ckpt, "--sampler", "ddim",
                             "--num-sampling-steps", args.sampling_steps, "--cfg-scale", args.cfg_scale,
                             "--samples-per-class", args.samples_per_class,
                             "--per-proc-batch-size", 10 * args.samples_per_class, "--sample-dir", sample_dir])


def retrained_reference(case, forget_class, reference_dir, data_path, train_missing=True):
    """
    The case's DiT retrained without forget_class: shipped in assets/, or kept in reference_dir, or trained there
    now with train.py (digits: about 13 minutes on 2 CPU cores; MNIST: 80 minutes on one) when train_missing; None
    when absent.
    """
    name = case.reference_name(forget_class)
    for folder in (ASSETS, reference_dir):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not train_missing:
        return None
    path = os.path.join(reference_dir, name)
    print(f"\nNo retrained reference for digit {forget_class}: training one (once; kept in {path})", flush=True)
    step(train, ["--data-path", data_path, *case.train_flags(), "--exclude-class", forget_class, "--results-dir",
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
    return ["--model", case_of(args).model, "--data-path", args.data_path, "--batch-size", args.batch_size,
            "--ckpt", case_of(args).dit, "--num-workers", 0]


def check_case(args):
    """One error line, before any folder is made, for a missing shipped file or a digit out of range."""
    case = case_of(args)
    for path in (case.dit, case.classifier):
        if not os.path.isfile(path):
            raise UserError(f"missing shipped file {path}: see 'The embedded digits case' in the README")
    check_class_index(args.forget_class, 10, "--forget-class", f"the {case.name} digits")


def fisher_and_masks(args, mask_path, results):
    """Steps 1 and 2: the Fisher diagonals and the saliency masks, with SalUn's forget gradient and gradient mask where
    the recipe trains inside it (and the images' folder if missing)."""
    case = case_of(args)
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        step(prepare_digits, ["--dataset", case.name, "--out", args.data_path])
    sparsity = mask_setting([str(f) for f in forget_flags(args)], "sparsity")  # SalUn's mask needs its gradient
    step(generate_fisher, common_flags(args) + ["--n-iters", args.fisher_iters, "--forget-class", args.forget_class,
                                                "--mask-path", mask_path, "--results-dir", results] +
         (["--gradient-saliency"] if sparsity is not None else []))
    thresholds = sorted({float(t) for t in args.thresholds} | {recipe_value(args, "threshold")})
    step(generate_mask, ["--mask-path", mask_path, "--forget-class", args.forget_class, "--thresholds", *thresholds])
    if sparsity is not None:
        step(generate_mask, ["--mask-path", mask_path, "--forget-class", args.forget_class, "--criterion", "gradient",
                             "--sparsity", sparsity])


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
    case = case_of(args)
    step(attack, ["--model", case.model, "--ckpt", *models.values(), "--names", *models.keys(), "--data-path",
                  args.data_path, "--forget-class", args.forget_class, "--classifier", case.name,
                  "--classifier-weights", case.classifier, "--num-sampling-steps", args.sampling_steps,
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


TARGET_NAMES = {"F": "forget accuracy", "R": "remain accuracy", "D": "remain FID", "I": "FA after inversion",
                "L": "FA after relearning"}


def report_targets(report):
    """Prints the unlearned model's figures against the README's targets (the retrained model's and the original's)
    and adds the letters it misses to its report ("targets_missed")."""
    checks = target_checks(report["unlearned"], report, distance="fid_remain")
    print(f"\nThe unlearned model against the {len(checks)} targets (README: the embedded digits case):")
    for letter, value, bound, met in checks:
        relation = ">=" if letter == "R" else "<="
        verdict = "met" if met else "MISSED"
        print(f"  {letter} {TARGET_NAMES[letter]:20s} {value:7.3f} {relation} {bound:7.3f}  {verdict}")
    missed = targets_missed(report["unlearned"], report, distance="fid_remain")
    report["unlearned"]["targets_missed"] = missed
    print(f"Misses {', '.join(missed)}" if missed else f"Meets all {len(checks)}")


def add_inversion_rows(args):
    """Adds attack.py's rows (each model under its learned label, the noise of digits 0-9) below samples.png."""
    from PIL import Image
    path = os.path.join(args.out, "samples.png")
    with Image.open(path) as grids, Image.open(os.path.join(args.out, "attacks", "samples.png")) as rows:
        atomic_save_image(stacked([grids.convert("RGB"), rows.convert("RGB")]), path)


def main(args):
    """Runs the pipeline and writes the report."""
    start, case, data_path = time.time(), case_of(args), args.data_path
    check_case(args)
    os.makedirs(args.out, exist_ok=True)
    mask_path, results = os.path.join(args.out, "mask"), os.path.join(args.out, "results")
    fisher_and_masks(args, mask_path, results)
    retrained = retrained_reference(case, args.forget_class, args.reference_dir, data_path, args.train_reference)
    run = unlearn(args, mask_path, results, args.seed)
    models = {"original": case.dit, "unlearned": os.path.join(run, "checkpoints", f"{args.forget_iters:07d}.pt")}
    if retrained is not None:
        models["retrained"] = retrained
    npz = {name: sample_npz(ckpt, name, run, args) for name, ckpt in models.items()}
    report_path = os.path.join(args.out, "report.json")
    step(evaluate, ["--samples", *npz.values(), "--names", *npz.keys(), "--forget-class", args.forget_class,
                    "--classifier", case.name, "--classifier-weights", case.classifier, "--data-path",
                    data_path, "--fid-features", "classifier", "--fid-cache", os.path.join(args.out, "fid_cache"),
                    "--out", report_path])
    step(sample, ["--model", case.model, "--ckpt", *models.values(), "--sampler", "ddim", "--num-sampling-steps",
                  args.sampling_steps, "--cfg-scale", args.cfg_scale, "--class-labels", *range(10), "--nrow", 5,
                  "--min-side", 96, "--titles", *models.keys(), "--out", os.path.join(args.out, "samples.png")])
    plot_losses(os.path.join(run, "losses.json"), os.path.join(args.out, "losses.png"), args.forget_class)

    report = json.load(open(report_path))
    figure = f"samples.png: {' | '.join(models)}, digits 0-9, same noise"
    if args.attacks:
        attack_models(args, models, report)
        add_inversion_rows(args)
        figure += f"; below, each model under the label learned in {args.inversion_steps} inversion steps"
    if retrained is not None:
        report_targets(report)
    report["about"].update(forget_run=run, seconds=round(time.time() - start, 1), retrained=retrained or
                           f"absent: no {case.reference_name(args.forget_class)} in assets/ or {args.reference_dir}",
                           figure=figure)
    atomic_json_dump(report, report_path)
    print(f"\nDigit {args.forget_class} forgotten in {report['about']['seconds']} s; FID in the {case.name} "
          f"classifier's feature space. Results in {args.out}/")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--out", type=str, default="demo_results", help="output folder")
    parser.add_argument("--dataset", type=str, choices=list(CASES), default="digits",
                        help="the embedded case: digits (8x8, DiT-T/2) or mnist (28x28, DiT-T/4)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="the images as an ImageNet-style folder (default data/<dataset>; written by "
                             "prepare_digits.py if missing)")
    parser.add_argument("--forget-class", type=int, default=0, help="the digit to forget (0-9)")
    parser.add_argument("--reference-dir", type=str, default="retrained",
                        help="where retrained references not shipped in assets/ are kept (trained once)")
    parser.add_argument("--train-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="train a missing retrained reference with train.py (digits: about 13 minutes on 2 CPU "
                             "cores; MNIST: 80 minutes on one); "
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
    args = parser.parse_args(argv)
    args.data_path = args.data_path or prepare_digits.data_folder(args.dataset)
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
