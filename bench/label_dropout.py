"""
The digits benchmark behind forget.py's --forget-label-dropout default.

The official recipe on the embedded digits case (demo.py --recipe official) with DiT's label dropout on the forget
step too (the official behaviour) or on the remain step only, over several seeds, each evaluated like demo.py
(forget accuracy, remain accuracy, remain FID in the digits classifier's feature space). Prints a table and the
mean of each metric per setting.

    python bench/label_dropout.py --seeds 0 1 2
"""
import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
import evaluate  # noqa: E402
from cli import description, run_main  # noqa: E402


def main(args):
    """Runs every (setting, seed) and prints the comparison."""
    base = demo.parse_args(["--out", args.out, "--samples-per-class", str(args.samples_per_class), "--recipe", "official",
                            *shlex.split(args.demo_flags)])
    mask_path, results = os.path.join(args.out, "mask"), os.path.join(args.out, "results")
    demo.check_case(base)
    with contextlib.redirect_stdout(io.StringIO()):
        demo.fisher_and_masks(base, mask_path, results)
    eval_args = evaluate.parse_args(["--samples", "x", "--forget-class", str(base.forget_class), "--classifier",
                                     "digits", "--classifier-weights", demo.CASES["digits"].classifier, "--data-path",
                                     base.data_path, "--fid-features", "classifier",
                                     "--fid-cache", os.path.join(args.out, "fid_cache")])
    from sfron.classifier import load_classifier
    from sfron.metrics import load_samples
    classifier = load_classifier("digits", demo.CASES["digits"].classifier, 10)
    rows, given_flags = [], base.forget_flags
    for dropout in (True, False):
        for seed in args.seeds:
            switch = "--forget-label-dropout" if dropout else "--no-forget-label-dropout"
            base.forget_flags = f"{given_flags} {switch}"  # a repeated flag: the last wins
            name = f"{'both' if dropout else 'remain-only'}-seed{seed}"
            with contextlib.redirect_stdout(io.StringIO()):
                run = demo.unlearn(base, mask_path, os.path.join(results, name), seed=seed)
                npz = demo.sample_npz(os.path.join(run, "checkpoints", f"{base.forget_iters:07d}.pt"), name, base)
                fid = evaluate.fid_setup(eval_args, classifier, 8, "cpu")
                report = evaluate.evaluate_models({name: load_samples(npz)}, base.forget_class, classifier, fid)[name]
            rows.append((dropout, seed, report["forget_acc"], report["remain_acc"], report["fid_remain"]))
            print(f"label dropout on {'forget and remain' if dropout else 'remain only':17s} seed {seed}: "
                  f"forget_acc {rows[-1][2]:.4f}  remain_acc {rows[-1][3]:.4f}  fid_remain {rows[-1][4]:.2f}",
                  flush=True)
    for dropout in (True, False):
        chosen = [r for r in rows if r[0] == dropout]
        means = [statistics.mean(r[i] for r in chosen) for i in (2, 3, 4)]
        print(f"mean, label dropout on {'forget and remain' if dropout else 'remain only':17s}: forget_acc "
              f"{means[0]:.4f}  remain_acc {means[1]:.4f}  fid_remain {means[2]:.2f}")


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--out", type=str, default="bench_results/label_dropout", help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="unlearning seeds of each setting")
    parser.add_argument("--samples-per-class", type=int, default=100, help="generated images per digit to evaluate")
    parser.add_argument("--demo-flags", type=str, default="",
                        help='more demo.py flags for every run, e.g. "--forget-class 3 --forget-iters 50"')
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
