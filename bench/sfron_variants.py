"""
SFR-on settings against the embedded case's three targets, digit by digit: each named setting (forget.py flags
on top of SFR-on's) unlearns each of --digits with each of --seeds through forget.py, and the checkpoints at
--steps are evaluated by the comparison's evaluator at the demo's protocol (batch 128, 100 samples per digit,
DDIM 25, guidance 2). A row passes when forget accuracy is at most 3 points above the retrained model's, remain
accuracy at most 1 point below the original's, and the remain Frechet distance at most 1.2x the original's.

    python bench/sfron_variants.py --name paper --lr 1.5e-4 --digits 2 5
    python bench/sfron_variants.py --name own-moments --lr 2e-3 --digits 2 5 \
        --flags "--mask-remain-step --threshold 5 --forget-loss-ceiling 2 --separate-forget-optimizer"

Writes <out>/variants.md (every row measured so far) and keeps each run under <out> (a repeated command reads
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
import generate_mask  # noqa: E402
from cli import run_main  # noqa: E402
from sfron.files import atomic_json_dump, atomic_write_text  # noqa: E402
from sfron.utils import UserError  # noqa: E402

COMPARED = tuple(compare.METHODS)  # the comparison's own method names, which a setting must not take
TARGETS = "forget acc <= retrained + 0.03, remain acc >= original - 0.01, remain FD <= 1.2x original"


def targets_missed(report, reference):
    """The targets a checkpoint misses: F (forget accuracy), R (remain accuracy), D (remain distance)."""
    original, retrained = reference["original"], reference["retrained"]
    return "".join(letter for letter, ok in (
        ("F", report["forget_acc"] <= retrained["forget_acc"] + compare.FORGOTTEN_MARGIN),
        ("R", report["remain_acc"] >= original["remain_acc"] - 0.01),
        ("D", report["fd_remain"] <= 1.2 * original["fd_remain"])) if not ok)


def threshold_of(flags):
    """The --threshold the flags end with (SFR-on's default 1.0 otherwise)."""
    return float(flags[len(flags) - 1 - flags[::-1].index("--threshold") + 1])


def measure(bench, args, flags):
    """Runs (or reads back) every digit and seed; returns the table's rows."""
    rows = []
    for digit in args.digits:
        reference = bench.reference(digit)
        for seed in args.seeds:
            folder = bench.masks(digit, seed)
            if not os.path.isfile(os.path.join(folder, str(digit), f"fisher_{threshold_of(flags)}.pt")):
                compare.quiet(compare.call, generate_mask, ["--mask-path", folder, "--forget-class", digit,
                                                            "--thresholds", threshold_of(flags)])
            run = bench.run(args.name, digit, seed, args.lr, args.steps)
            for step in args.steps:
                report = run["steps"][str(step)]
                rows.append({"name": args.name, "digit": digit, "seed": seed, "step": step, **report,
                             "fd_ratio": report["fd_remain"] / reference["original"]["fd_remain"],
                             "retrained_fa": reference["retrained"]["forget_acc"],
                             "original_ra": reference["original"]["remain_acc"],
                             "missed": targets_missed(report, reference), "seconds": run["seconds"]})
    return rows


def markdown(rows, command):
    """One line per digit, seed and step."""
    lines = [f"`{command}`", "", f"Targets: {TARGETS}.", "",
             "| digit | seed | step | forget acc (retrained) | remain acc (original) | remain FD (x original) | "
             "targets |", "| --- |" + " --- |" * 6]
    for r in rows:
        lines.append(f"| {r['digit']} | {r['seed']} | {r['step']} | {r['forget_acc']:.3f} ({r['retrained_fa']:.3f}) "
                     f"| {r['remain_acc']:.3f} ({r['original_ra']:.3f}) | {r['fd_ratio']:.2f} "
                     f"| {'pass' if not r['missed'] else 'misses ' + r['missed']} |")
    last = max(r["step"] for r in rows)
    finals = [r for r in rows if r["step"] == last]
    passed = sum(not r["missed"] for r in finals)
    return "\n".join(lines) + f"\n\nAt the last step: {passed} of {len(finals)} runs meet all three targets.\n"


def main(args):
    """Measures one named setting and writes its table."""
    if args.name in COMPARED:
        raise UserError(f"--name {args.name} is a method of bench/compare.py; choose another name")
    flags = [*compare.METHODS["sfron"], *shlex.split(args.flags)]
    compare.METHODS[args.name] = flags
    bench_args = compare.parse_args(["--out", args.out, "--data-path", args.data_path, "--cache-dir", args.cache_dir,
                                     "--no-attacks", "--batch-size", str(args.batch_size), "--samples-per-class",
                                     str(args.samples_per_class), "--sampling-steps", str(args.sampling_steps),
                                     "--fisher-iters", str(args.fisher_iters)])
    if not os.path.isdir(os.path.join(args.data_path, "train")):
        compare.quiet(compare.call, compare.prepare_digits, ["--out", args.data_path])
    rows = measure(compare.Benchmark(bench_args), args, flags)
    command = "python bench/sfron_variants.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = markdown(rows, command)
    os.makedirs(args.out, exist_ok=True)
    atomic_json_dump({"name": args.name, "lr": args.lr, "flags": flags, "rows": rows},
                     os.path.join(args.out, f"variants-{args.name}.json"))
    atomic_write_text(table, os.path.join(args.out, f"variants-{args.name}.md"))
    print(table)


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--name", type=str, required=True, help="the setting's name (its runs are kept under it)")
    parser.add_argument("--lr", type=float, required=True, help="forget.py --lr")
    parser.add_argument("--flags", type=str, default="", help="forget.py flags added to SFR-on's, in one string")
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="digits to forget")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of each digit")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100], help="steps evaluated (the last: the run's)")
    parser.add_argument("--out", type=str, default="bench_results/sfron_variants", help="output folder")
    parser.add_argument("--data-path", type=str, default="data/digits", help="the digits folder (made if missing)")
    parser.add_argument("--cache-dir", type=str, default="retrained", help="retrained references not in assets/")
    parser.add_argument("--batch-size", type=int, default=128, help="forget and remain samples per step")
    parser.add_argument("--fisher-iters", type=int, default=8, help="generate_fisher.py --n-iters")
    parser.add_argument("--samples-per-class", type=int, default=100, help="generated images per digit evaluated")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    args = parser.parse_args(argv)
    args.steps = sorted(set(args.steps))
    return args


if __name__ == "__main__":
    run_main(main, parse_args())
