"""
Evaluates generated samples as the paper does: forget accuracy (FA: share of forget-class samples a pretrained
classifier assigns to the forget class; also top-5 and the mean forget-class probability), accuracy on the
remaining classes (overall and per class), and FID of remain-class and forget-class samples against real images
of those classes. Offline: every weight file is local. Writes a JSON report and a Markdown table.
"""
import argparse
import os

import torch

from cli import run_main
from sfron.classifier import load_classifier
from sfron.data import ImageSet, find_class_folders, list_images
from sfron.files import atomic_json_dump, atomic_write_text
from sfron.metrics import (FeatureNet, classification_report, classify, fid_against, load_samples, make_fid,
                           markdown_table, reference_statistics)
from sfron.sampling import to_uint8
from sfron.utils import UserError, check_class_index


def real_image_batches(data_path, class_indices, image_size, per_class, batch_size):
    """A function yielding uint8 (N, 3, S, S) batches of real images of the given classes (ADM center crop);
    per_class takes an evenly spaced subset of each class."""
    root, classes = find_class_folders(data_path)
    samples = []
    for c in class_indices:
        found = list_images(root, classes, [c])
        step = max(1, len(found) // per_class) if per_class else 1
        samples += found[::step][:per_class] if per_class else found
    dataset = ImageSet(samples, image_size, classes, root)

    def batches():
        for i in range(0, len(dataset), batch_size):
            yield to_uint8(torch.stack([dataset[j][0] for j in range(i, min(i + batch_size, len(dataset)))]))
    return batches


def evaluate_models(samples, forget_class, classifier, fid_metric=None, references=None, batch_size=64,
                    device="cpu"):
    """
    {name: report} for samples {name: (images uint8 NHWC, labels)}: classification metrics, and with a FID metric
    and references {'remain': stats, 'forget': stats} the FID of remain-class and forget-class samples.
    """
    reports = {}
    for name, (images, labels) in samples.items():
        report = classification_report(classify(classifier, images, batch_size, device), torch.from_numpy(labels),
                                       forget_class)
        if fid_metric is not None:
            forget = labels == forget_class
            report["fid_remain"] = fid_against(fid_metric, references["remain"], images[~forget], batch_size)
            report["fid_forget"] = fid_against(fid_metric, references["forget"], images[forget], batch_size)
        reports[name] = report
    return reports


def fid_setup(args, classifier, image_size, device):
    """(FID metric, {'remain', 'forget'} real-image statistics, description of the feature space)."""
    root, classes = find_class_folders(args.data_path)
    check_class_index(args.forget_class, len(classes), "--forget-class", root)
    if args.fid_features == "inception":
        metric, about = make_fid("inception", args.inception_weights), "InceptionV3 pool3 (2048-d)"
    else:
        metric = make_fid(FeatureNet(classifier))
        about = f"penultimate layer of the {args.classifier} classifier (not Inception: not comparable to published FIDs)"
    metric = metric.to(device)
    groups = {"remain": [c for c in range(len(classes)) if c != args.forget_class], "forget": [args.forget_class]}
    references = {}
    for which, class_indices in groups.items():
        batches = real_image_batches(args.data_path, class_indices, image_size, args.real_per_class, args.batch_size)
        description = (f"{os.path.abspath(args.data_path)} classes {class_indices} size {image_size} per-class "
                       f"{args.real_per_class} features {about}")
        cache = os.path.join(args.fid_cache, f"fid_ref_{which}_{args.forget_class}.pt") if args.fid_cache else None
        references[which] = reference_statistics(metric, batches, cache, description)
    return metric, references, about


def main(args):
    """Writes --out (JSON) and the Markdown table beside it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = args.names or [os.path.splitext(os.path.basename(p))[0] for p in args.samples]
    if len(names) != len(args.samples) or len(set(names)) != len(names) or "about" in names:
        raise UserError("--names needs one distinct name (not 'about') per --samples file")
    samples = {n: load_samples(p) for n, p in zip(names, args.samples)}
    image_size = next(iter(samples.values()))[0].shape[1]
    num_classes = args.num_classes or (10 if args.classifier == "digits" else 1000)
    classifier = load_classifier(args.classifier, args.classifier_weights, num_classes).to(device)
    fid_metric, references, about_fid = None, None, "not computed (no --data-path)"
    if args.data_path:
        fid_metric, references, about_fid = fid_setup(args, classifier, image_size, device)
    reports = evaluate_models(samples, args.forget_class, classifier, fid_metric, references, args.batch_size, device)
    out = {"about": {"forget_class": args.forget_class, "classifier": args.classifier, "fid_features": about_fid,
                     "samples": dict(zip(names, args.samples))}, **reports}
    atomic_json_dump(out, args.out)
    table = markdown_table(reports)
    atomic_write_text(table, os.path.splitext(args.out)[0] + ".md")
    print(table, end="")
    print(f"Saved {args.out} and its Markdown table")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--samples", type=str, nargs="+", required=True,
                        help=".npz files of sample_ddp.py (arr_0: uint8 images NHWC, arr_1: class labels)")
    parser.add_argument("--names", type=str, nargs="+", default=None, help="a name per samples file")
    parser.add_argument("--forget-class", type=int, required=True)
    parser.add_argument("--classifier", type=str, default="resnet50",
                        help="'digits' or a torchvision classification model (resnet50, vit_b_16, ...)")
    parser.add_argument("--classifier-weights", type=str, default=None, help="local weights file of the classifier")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the classifier (default: 10 for digits, 1000 for torchvision models)")
    parser.add_argument("--data-path", type=str, default=None,
                        help="ImageNet-style root of the real images for FID (none: no FID)")
    parser.add_argument("--fid-features", type=str, choices=["inception", "classifier"], default="inception")
    parser.add_argument("--inception-weights", type=str, default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (local file)")
    parser.add_argument("--real-per-class", type=int, default=None, help="real images per class for FID (default: all)")
    parser.add_argument("--fid-cache", type=str, default=None, help="folder caching the real-image FID statistics")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=str, default="report.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
