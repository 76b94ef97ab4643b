"""
Where an unlearned DiT's cost to the other classes lies: in its conditional predictions or in its unconditional one.
Classifier-free guidance mixes the two, eps = eps(x, null) + s (eps(x, c) - eps(x, null)); here each comes from either
model, the original's or the unlearned one's, and the remain classes are drawn from the same noise under all four
pairings and classified. If the pairing with the unlearned model's conditional predictions and the original's
unconditional one loses what the unlearned model loses, the cost lies in the other classes' own labels, which a
repair of the null label cannot reach.

    python bench/pathways.py --dataset mnist --forget-class 0 --ckpt results/.../checkpoints/0000100.pt
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
from cli import description, run_main  # noqa: E402
from sfron.build import ModelRequest, load_model_and_vae  # noqa: E402
from sfron.classifier import load_classifier  # noqa: E402
from sfron.metrics import classification_report, classify  # noqa: E402
from sfron.sampling import SamplerConfig, generate, per_sample_noise, to_uint8_nhwc  # noqa: E402
from sfron.utils import UserError, check_class_index  # noqa: E402


class MixedGuidance(torch.nn.Module):
    """A DiT for sfron.sampling.generate whose guided prediction takes the conditional half from `cond` and the
    unconditional half from `uncond` (two DiTs of one architecture)."""

    def __init__(self, cond, uncond):
        super().__init__()
        self.cond, self.uncond = cond, uncond
        self.num_classes, self.in_channels = cond.num_classes, cond.in_channels

    def forward_with_cfg(self, x, t, y, cfg_scale, all_channels=False):
        """DiT.forward_with_cfg's output for x = [z, z] and labels [y, null], each half from its own model."""
        half = len(x) // 2
        cond = self.cond(x[:half], t[:half], y[:half])          # (N, C', H, W)
        uncond = self.uncond(x[half:], t[half:], y[half:])      # (N, C', H, W)
        n = self.in_channels if all_channels else 3
        guided = uncond[:, :n] + cfg_scale * (cond[:, :n] - uncond[:, :n])
        return torch.cat([torch.cat([guided, guided]), torch.cat([cond[:, n:], uncond[:, n:]])], dim=1)


def remain_accuracy(model, classifier, labels, z, config, forget_class):
    """The comparison's remain accuracy of the images model draws for labels (N,) from noise z."""
    labels = torch.from_numpy(labels)
    images = to_uint8_nhwc(generate(model, None, labels, z, config))
    logits = classify(classifier, images, 500, z.device)
    return classification_report(logits, labels, forget_class)["remain_acc"]


def main(args):
    """Prints the remain accuracy of the four pairings of conditional and unconditional predictions."""
    case, device = demo.CASES[args.dataset], torch.device("cpu")
    if not os.path.isfile(args.ckpt):
        raise UserError(f"--ckpt {args.ckpt} is not a file")
    load = lambda ckpt: load_model_and_vae(ModelRequest(model=case.model, ckpt=ckpt), device).model.eval()  # noqa
    models = {"original": load(case.dit), "unlearned": load(args.ckpt)}
    check_class_index(args.forget_class, models["original"].num_classes, "--forget-class", "the model")
    classifier = load_classifier(case.name, case.classifier, models["original"].num_classes)
    labels = np.repeat([c for c in range(models["original"].num_classes) if c != args.forget_class],
                       args.samples_per_class)
    z = per_sample_noise(args.seed, range(len(labels)), (3, case.image_size, case.image_size), device)
    config = SamplerConfig("ddim", args.sampling_steps, args.cfg_scale)
    print(f"remain accuracy of {len(labels)} images (DDIM {args.sampling_steps}, guidance {args.cfg_scale}), "
          f"forget class {args.forget_class}:")
    for cond in models:
        for uncond in models:
            mixed = MixedGuidance(models[cond], models[uncond])
            accuracy = remain_accuracy(mixed, classifier, labels, z, config, args.forget_class)
            print(f"conditional {cond:9s} unconditional {uncond:9s} {accuracy:.3f}", flush=True)


def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--dataset", type=str, choices=list(demo.CASES), default="digits",
                        help="the embedded case: its DiT is the original, its classifier judges the images")
    parser.add_argument("--ckpt", type=str, required=True, help="the unlearned model's checkpoint (forget.py's)")
    parser.add_argument("--forget-class", type=int, required=True, help="the class it forgot (left out of the draws)")
    parser.add_argument("--samples-per-class", type=int, default=50, help="images drawn per remain class")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps (the comparison's)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="guidance scale (the comparison's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
