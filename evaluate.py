"""
Evaluates generated samples as the paper does: forget accuracy (FA: share of forget-class samples a pretrained
classifier assigns to the forget class; also top-5, the mean forget-class probability and the prediction's
entropy), accuracy on the remaining classes (overall and per class), and FID of remain-class and forget-class
samples against real images of those classes, with KID, precision/recall and the Inception Score beside it
(torch-fidelity's formulas). Offline: every weight file is local. Writes a JSON report and a Markdown table.
"""
import argparse
import os
from typing import NamedTuple, Optional

import numpy as np
import torch

from cli import add_class_index_arg, description, run_main
from sfron.classifier import SMALL_CNN_INPUT, load_classifier
from sfron.data import ImageSet, class_folders
from sfron.files import atomic_json_dump, atomic_write_text
from sfron.metrics import (classification_report, classify, embed, feature_space, frechet_distance,
                           frechet_statistics, image_set_metrics, inception_score, load_samples, markdown_table,
                           nhwc_batches, reference_set)
from sfron.sampling import to_uint8
from sfron.utils import UserError


def real_image_batches(folders, class_indices, image_size, per_class, batch_size):
    """A function yielding uint8 (N, 3, S, S) batches of real images of the given classes of a ClassFolders (ADM
    center crop); per_class takes an evenly spaced subset of each class."""
    samples = []
    for c in class_indices:
        found = folders.samples([c])
        step = max(1, len(found) // per_class) if per_class else 1
        samples += found[::step][:per_class] if per_class else found
    dataset = ImageSet(samples, image_size, folders.names, folders.root)

    def batches():
        for i in range(0, len(dataset), batch_size):
            yield to_uint8(torch.stack([dataset[j][0] for j in range(i, min(i + batch_size, len(dataset)))]))
    return batches


def evaluate_models(samples, forget_class, classifier, fid=None, device="cpu"):
    """
    {name: report} for samples {name: (images uint8 NHWC, labels)}: the classification metrics, and with a
    FidSetup the FID, KID, precision and recall of remain-class and forget-class samples against the real images
    of those classes, the Inception Score of all samples, and the FID against the --ref-batch statistics.
    """
    reports = {}
    batch_size = fid.batch_size if fid is not None else 64
    for name, (images, labels) in samples.items():
        report = classification_report(classify(classifier, images, batch_size, device), torch.from_numpy(labels),
                                       forget_class)
        if fid is not None:
            report.update(fid_report(fid, images, labels == forget_class, device))
        reports[name] = report
    return reports


def fid_report(fid, images, forget, device):
    """The feature-space metrics of one model's samples (forget: the boolean mask of forget-class samples)."""
    report, features, logits = {}, [], []
    for which, chosen in (("remain", ~forget), ("forget", forget)):
        f, lg = embed(fid.space, nhwc_batches(images[chosen], fid.batch_size), device)
        features.append(f)
        logits += [lg] if lg is not None else []
        if which in fid.references:
            report.update({f"{k}_{which}": v for k, v in image_set_metrics(f, fid.references[which]).items()})
    report["inception_score"], report["inception_score_std"] = inception_score(torch.cat(logits) if logits else None)
    if fid.ref_batch is not None:  # the DiT paper's FID: every sample against the reference batch
        report["fid_ref_batch"] = frechet_distance(frechet_statistics(torch.cat([f for f in features if len(f)])),
                                                   fid.ref_batch)
    return report


class FidSetup(NamedTuple):
    space: torch.nn.Module      # the feature network
    references: dict            # {'remain', 'forget'}: reference_set of the real images of those classes
    ref_batch: Optional[dict]   # {'mu', 'sigma'} of --ref-batch, or None
    about: str                  # which features, for the report
    batch_size: int


def read_ref_batch(path, space, batch_size, device):
    """{'mu', 'sigma'} of an ADM-style reference batch .npz: its own statistics, else those of its images arr_0."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" in data and "sigma" in data:
                return {"mu": torch.from_numpy(data["mu"].astype(np.float64)),
                        "sigma": torch.from_numpy(data["sigma"].astype(np.float64))}
            images = data["arr_0"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--ref-batch {path} is not a reference batch .npz with mu/sigma or arr_0 ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"--ref-batch {path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    return frechet_statistics(embed(space, nhwc_batches(images, batch_size), device)[0])


def fid_setup(args, classifier, image_size, device):
    """The FidSetup of the flags: feature network, real-image references (with --data-path), --ref-batch."""
    if args.fid_features == "inception":
        about = "torch-fidelity InceptionV3 pool3 (2048-d), its TF-compatible resize to 299"
    else:
        about = (f"penultimate layer of the {args.classifier} classifier (not Inception: not comparable to published "
                 f"FIDs)")
    space = feature_space(args.fid_features, args.inception_weights, classifier).to(device)
    references = {}
    if args.data_path:
        folders = class_folders(args.data_path, index_file=args.class_index_file)
        folders.position(args.forget_class)
        groups = {"remain": [c for c in folders.indices if c != args.forget_class], "forget": [args.forget_class]}
        for which, class_indices in groups.items():
            batches = real_image_batches(folders, class_indices, image_size, args.real_per_class, args.batch_size)
            description = (f"{os.path.abspath(args.data_path)} classes {class_indices} size {image_size} per-class "
                           f"{args.real_per_class} features {about}")
            cache = os.path.join(args.fid_cache, f"fid_ref_{which}_{args.forget_class}.pt") if args.fid_cache else None
            references[which] = reference_set(space, batches, cache, description, device)
    ref_batch = read_ref_batch(args.ref_batch, space, args.batch_size, device) if args.ref_batch else None
    return FidSetup(space, references, ref_batch, about, args.batch_size)


def main(args):
    """Writes --out (JSON) and the Markdown table beside it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.samples]
    if len(names) != len(args.samples) or len(set(names)) != len(names) or "about" in names:
        raise UserError("--names needs one distinct name (not 'about') per --samples file")
    samples = {n: load_samples(p) for n, p in zip(names, args.samples)}
    image_size = next(iter(samples.values()))[0].shape[1]
    num_classes = args.num_classes or (10 if args.classifier in SMALL_CNN_INPUT else 1000)
    classifier = load_classifier(args.classifier, args.classifier_weights, num_classes).to(device)
    fid = fid_setup(args, classifier, image_size, device) if args.data_path or args.ref_batch else None
    reports = evaluate_models(samples, args.forget_class, classifier, fid, device)
    out = {"about": {"forget_class": args.forget_class, "classifier": args.classifier,
                     "fid_features": fid.about if fid else "not computed (no --data-path, no --ref-batch)",
                     "ref_batch": args.ref_batch, "samples": dict(zip(names, args.samples))}, **reports}
    atomic_json_dump(out, args.out)
    table = markdown_table(reports)
    atomic_write_text(table, os.path.splitext(args.out)[0] + ".md")
    print(table, end="")
    print(f"Saved {args.out} and its Markdown table")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--samples", type=str, nargs="+", required=True,
                        help=".npz files of sample_ddp.py (arr_0: uint8 images NHWC, arr_1: class labels)")
    parser.add_argument("--names", type=str, nargs="+", default=None, help="a name per samples file")
    parser.add_argument("--forget-class", type=int, required=True)
    add_class_index_arg(parser)
    parser.add_argument("--classifier", type=str, default="resnet50",
                        help="'digits' or 'mnist' (the embedded cases' CNN) or a torchvision classification model "
                             "(resnet50, vit_b_16, ...)")
    parser.add_argument("--classifier-weights", type=str, default=None, help="local weights file of the classifier")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the classifier (default: 10 for digits and mnist, 1000 for torchvision "
                             "models)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="ImageNet-style root of the real images for FID (none: no FID)")
    parser.add_argument("--fid-features", type=str, choices=["inception", "classifier"], default="inception")
    parser.add_argument("--inception-weights", type=str, default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (local file)")
    parser.add_argument("--real-per-class", type=int, default=None, help="real images per class for FID (default: all)")
    parser.add_argument("--fid-cache", type=str, default=None, help="folder caching the real-image FID statistics")
    parser.add_argument("--ref-batch", type=str, default=None,
                        help="an ADM-style reference batch .npz (mu/sigma, or images arr_0), e.g. the DiT paper's "
                             "VIRTUAL_imagenet256_labeled.npz: adds fid_ref_batch, the FID of all samples against it")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=str, default="report.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
