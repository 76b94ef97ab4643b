"""
The comparison at any scale as a SLURM job array (slurm/compare_array.sbatch): each array task runs one (method,
class, seed) of the grid with the repository's scripts and writes one evaluate.py report; this script names a task's
cell and method flags for the batch script, and gathers the reports into one table.

    python bench/gather.py --task 5 --methods sfron ga --classes 207 360 --seeds 0 1   # -> "ga 207 1"
    python bench/gather.py --flags salun --mask-path masks/seed0                        # -> forget.py flags
    python bench/gather.py --mask-args sfron-adversarial                                # -> "--thresholds 5.0"
    python bench/gather.py --reports results/compare/reports --out results/compare/table.md
"""
import argparse
import glob
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import description, run_main  # noqa: E402
from sfron.files import atomic_json_dump, atomic_write_text  # noqa: E402
from sfron.utils import UserError  # noqa: E402

COLUMNS = ("forget_acc", "remain_acc", "fid_remain", "fid_forget", "precision_remain", "recall_remain")


def protocol_method(name):
    """The Method of bench/protocol.py called name."""
    from protocol import METHODS
    if name not in METHODS:
        raise UserError(f"unknown method {name}; choose from {', '.join(METHODS)}")
    return METHODS[name]


def task_cell(task, methods, classes, seeds):
    """(method, class, seed) of array task `task`: methods vary slowest, seeds fastest."""
    cells = [(m, c, s) for m in methods for c in classes for s in seeds]
    if not 0 <= task < len(cells):
        raise UserError(f"--task {task} is outside the {len(cells)} cells of the grid (--array=0-{len(cells) - 1})")
    return cells[task]


def gather(paths):
    """{method: {metric: [mean, std]}, 'cells': n} over reports named <method>-<class>-seed<seed>.json."""
    rows = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        report = json.load(open(path))
        rows.setdefault(name.rsplit("-", 2)[0], []).append(report[name])  # method names hold dashes too
    summary = {}
    for method, reports in sorted(rows.items()):
        summary[method] = {"cells": len(reports)}
        for key in COLUMNS:
            values = [r[key] for r in reports if r.get(key) is not None]
            if values:
                summary[method][key] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
    return summary


def markdown(summary):
    """One row per method: mean ± std over its classes and seeds."""
    columns = [c for c in COLUMNS if any(c in s for s in summary.values())]
    lines = ["| method | cells | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for method, s in summary.items():
        cells = [f"{s[c][0]:.4f} ± {s[c][1]:.4f}" if c in s else "–" for c in columns]
        lines.append(f"| {method} | {s['cells']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(args):
    """Prints a task's cell or a method's flags, or writes the gathered table."""
    if args.task is not None:
        print(*task_cell(args.task, args.methods, args.classes, args.seeds))
    elif args.flags:
        print(*protocol_method(args.flags).mask_flags(args.mask_path))
    elif args.mask_args:
        print(*protocol_method(args.mask_args).mask_args())
    else:
        paths = sorted(glob.glob(os.path.join(args.reports, "*.json")))
        if not paths:
            raise UserError(f"no reports in {args.reports}")
        summary = gather(paths)
        atomic_json_dump(summary, os.path.splitext(args.out)[0] + ".json")
        atomic_write_text(markdown(summary), args.out)
        print(markdown(summary), end="")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--task", type=int, default=None, help="print the method, class and seed of this task")
    parser.add_argument("--methods", type=str, nargs="+", default=["sfron", "ga", "ft", "rl", "salun", "sa", "esd"])
    parser.add_argument("--classes", type=int, nargs="+", default=[207])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--flags", type=str, default=None, help="print the forget.py flags of this method")
    parser.add_argument("--mask-args", type=str, default=None,
                        help="print the generate_mask.py flags of this method's own mask")
    parser.add_argument("--mask-path", type=str, default="masks", help="the mask folder of --flags")
    parser.add_argument("--reports", type=str, default="results/compare/reports", help="the reports to gather")
    parser.add_argument("--out", type=str, default="results/compare/table.md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
