"""
forget.py settings against the embedded case's targets, digit by digit.

Each named setting (a --recipe and forget.py flags over it) unlearns each of --digits with each of --seeds, and the
checkpoints at --steps are evaluated by the comparison's evaluator at the demo's protocol (batch 128, 100 samples
per digit, DDIM 25, guidance 2). A row passes when forget accuracy is at most 3 points above the retrained model's,
remain accuracy at most 1 point below the original's, the remain Frechet distance at most 1.2x the original's, and
(on the last checkpoint, unless --no-attacks) forget accuracy after 200 label-inversion and after 50 relearning
steps at most 0.10 above the retrained model's.

    python bench/sfron_variants.py --name official --lr 1.5e-4 --digits 2 5
    python bench/sfron_variants.py --name own-moments --lr 2e-3 --digits 2 5 \
        --flags="--mask-remain-step --threshold 5 --separate-forget-optimizer"
    python bench/sfron_variants.py --name gamma3 --recipe adversarial-esd-distill --lr 4e-3 --dataset mnist \
        --digits 0 --flags="--threshold 3 --remain-lr 1.2e-2"

Writes <out>/variants-<name>.md (every row measured so far) and keeps each run under <out> (a repeated command reads
its runs back). Uses bench/compare.py's units: the retrained references come from assets/ or --cache-dir.
"""
import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import compare  # noqa: E402
from cli import description, run_main  # noqa: E402
from protocol import METHODS, Setting  # noqa: E402
from sfron.files import atomic_json_dump, atomic_write_text  # noqa: E402
from sfron.recipes import RECIPES  # noqa: E402
from sfron.utils import UserError  # noqa: E402

COMPARED = tuple(METHODS)  # the comparison's own method names, which a setting must not take
def main(args):
    """Measures one named setting and writes its table."""
    if args.name in COMPARED:
        raise UserError(f"--name {args.name} is a method of bench/compare.py; choose another name")
    flags = ["--recipe", args.recipe, "--lr", str(args.lr), *shlex.split(args.flags)]
    setting = Setting(f"{args.name}-lr{args.lr}", tuple(flags), compare.mask_kind(flags))
    bench_args = compare.parse_args(["--all-digits", "--dataset", args.dataset, "--out", args.out, "--data-path",
                                     args.data_path, "--cache-dir",
                                     args.cache_dir, "--attacks" if args.attacks else "--no-attacks", "--batch-size",
                                     str(args.batch_size), "--samples-per-class", str(args.samples_per_class),
                                     "--sampling-steps", str(args.sampling_steps), "--fisher-iters",
                                     str(args.fisher_iters)])
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        compare.quiet(compare.call, compare.prepare_digits, ["--dataset", args.dataset, "--out", args.data_path])
    bench = compare.Benchmark(bench_args)
    rows = compare.setting_rows(bench, setting, args.digits, args.seeds, args.steps, label=args.name)
    command = "python bench/sfron_variants.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = compare.targets_table(rows, command, bench.attack_budgets())
    os.makedirs(args.out, exist_ok=True)
    atomic_json_dump({"name": args.name, "lr": args.lr, "flags": flags, "rows": rows},
                     os.path.join(args.out, f"variants-{args.name}.json"))
    atomic_write_text(table, os.path.join(args.out, f"variants-{args.name}.md"))
    print(table)


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--name", type=str, required=True, help="the setting's name (its runs are kept under it)")
    parser.add_argument("--lr", type=float, required=True, help="forget.py --lr")
    parser.add_argument("--recipe", type=str, choices=list(RECIPES), default="official",
                        help="the forget.py recipe the flags are given over")
    parser.add_argument("--flags", type=str, default="", help="forget.py flags over the recipe's, in one string")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to forget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of each digit")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100], help="steps evaluated (the last: the run's)")
    parser.add_argument("--out", type=str, default="bench_results/sfron_variants", help="output folder")
    parser.add_argument("--dataset", type=str, choices=list(compare.demo.CASES), default="digits",
                        help="the embedded case: digits, or mnist")
    parser.add_argument("--data-path", type=str, default=None,
                        help="the images' folder (default data/<dataset>; made if missing)")
    parser.add_argument("--cache-dir", type=str, default="retrained", help="retrained references not in assets/")
    parser.add_argument("--batch-size", type=int, default=128, help="forget and remain samples per step")
    parser.add_argument("--fisher-iters", type=int, default=8, help="generate_fisher.py --n-iters")
    parser.add_argument("--samples-per-class", type=int, default=100, help="generated images per digit evaluated")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    parser.add_argument("--attacks", action=argparse.BooleanOptionalAction, default=True,
                        help="label inversion (200 steps) and relearning (50 steps) on the last checkpoint and the "
                             "references, for the two attack targets (--no-attacks: the three targets only)")
    args = parser.parse_args(argv)
    args.steps = sorted(set(args.steps))
    args.data_path = args.data_path or compare.prepare_digits.data_folder(args.dataset)
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
