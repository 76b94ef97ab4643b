"""
Step 2 of SFR-on: saliency masks from the Fisher diagonals. For each threshold gamma,
<mask-path>/<class>/fisher_<gamma>.pt holds S = ((F_f + 1e-15) / (F_r + 1e-15)) >= gamma, a boolean tensor per
parameter; the share of frozen (zero) weights is printed per threshold. Fisher files of the official script are
read too.
"""
import argparse
import os

from sfron.files import atomic_torch_save
from sfron.mask import class_dir, load_fisher, mask_filename, saliency_mask, sparsity
from sfron.utils import UserError, run_main


def main(args):
    """Writes one mask per threshold for each forget class."""
    if not args.thresholds:
        raise UserError("--thresholds needs at least one value")
    for cls in args.forget_class:
        folder = class_dir(args.mask_path, cls)
        forget_fisher = load_fisher(os.path.join(folder, "forget_fisher.pt"))
        remain_fisher = load_fisher(os.path.join(folder, "remain_fisher.pt"))
        for th in args.thresholds:
            mask = saliency_mask(forget_fisher, remain_fisher, th)
            path = os.path.join(folder, mask_filename(th))
            atomic_torch_save(mask, path)
            print(f"class {cls} threshold {th}: sparsity {100 * sparsity(mask):.2f}% of weights frozen -> {path}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--mask-path", type=str, default="mask", help="folder holding <class>/*_fisher.pt")
    parser.add_argument("--forget-class", nargs="+", type=int, required=True, help="class(es) to forget")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 1, 3, 5, 10],
                        help="saliency thresholds gamma")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
