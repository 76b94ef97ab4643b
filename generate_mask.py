"""
Step 2 of SFR-on: saliency masks from the Fisher diagonals. For each threshold gamma,
<mask-path>/<class>/fisher_<gamma>.pt holds S = ((F_f + 1e-15) / (F_r + 1e-15)) >= gamma, a boolean tensor per
parameter; the share of frozen (zero) weights is printed per threshold. Fisher files of the official script are
read too. --criterion gradient writes SalUn's masks instead (the baseline): gradient_<sparsity>.pt keeps the
1 - sparsity of all weights with the largest |forget gradient| (generate_fisher.py --gradient-saliency).
"""
import argparse
import os

from cli import description, run_main
from sfron.files import atomic_torch_save
from sfron.mask import (check_sparsity, class_dir, gradient_mask, load_fisher, mask_filename, read_provenance,
                        saliency_mask, sparsity, write_provenance)
from sfron.utils import UserError


def fisher_masks(folder, thresholds):
    """(what, file name, mask, provenance extras) for each threshold, from the folder's Fisher diagonals."""
    forget_fisher = load_fisher(os.path.join(folder, "forget_fisher.pt"))
    remain_fisher = load_fisher(os.path.join(folder, "remain_fisher.pt"))
    for th in thresholds:
        yield f"threshold {th}", mask_filename(th), saliency_mask(forget_fisher, remain_fisher, th), {"threshold": th}


def gradient_masks(folder, sparsities):
    """(what, file name, mask, provenance extras) for each sparsity, from the folder's summed forget gradient."""
    path = os.path.join(folder, "forget_gradient.pt")
    if not os.path.isfile(path):
        raise UserError(f"no {path}: run generate_fisher.py with --gradient-saliency first")
    gradient = load_fisher(path)
    for s in sparsities:
        yield f"sparsity {s}", mask_filename(sparsity=s), gradient_mask(gradient, s), {"sparsity": s}


def main(args):
    """Writes one mask per threshold (or sparsity) for each forget class."""
    if args.criterion == "fisher" and not args.thresholds:
        raise UserError("--thresholds needs at least one value")
    if args.criterion == "fisher" and min(args.thresholds) <= 0:
        raise UserError(f"--thresholds must be positive (a ratio of Fisher diagonals), got {min(args.thresholds)}")
    for s in args.sparsity:
        check_sparsity(s)
    for cls in args.forget_class:
        folder = class_dir(args.mask_path, cls)
        masks = fisher_masks(folder, args.thresholds) if args.criterion == "fisher" else \
            gradient_masks(folder, args.sparsity)
        source = read_provenance(os.path.join(folder, "forget_fisher.pt" if args.criterion == "fisher" else
                                              "forget_gradient.pt"))
        for what, name, mask, extras in masks:
            path = os.path.join(folder, name)
            atomic_torch_save(mask, path)
            if source is not None:  # the official scripts' Fisher files record none to pass on
                write_provenance(path, source, extras)
            print(f"class {cls} {what}: sparsity {100 * sparsity(mask):.2f}% of weights frozen -> {path}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--mask-path", type=str, default="mask", help="folder holding <class>/*_fisher.pt")
    parser.add_argument("--forget-class", nargs="+", type=int, required=True, help="class(es) to forget")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.5, 1, 3, 5, 10],
                        help="saliency thresholds gamma")
    parser.add_argument("--criterion", choices=["fisher", "gradient"], default="fisher",
                        help="fisher: SFR-on's Fisher ratio (default); gradient: SalUn's top |forget gradient|")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5],
                        help="with --criterion gradient: the share of weights frozen (SalUn's default 0.5)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
