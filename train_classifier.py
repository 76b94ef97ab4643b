"""
Trains the small CNN that judges generated digits of an embedded case (forget accuracy, remain accuracy, and the
feature space of its FID): <data-path>/train for training with one-pixel random shifts, <data-path>/val for the
held-out accuracy. --classifier digits (8x8) or mnist (28x28).
"""
import argparse

import torch
import torch.nn.functional as F

from cli import description, run_main
from prepare_digits import data_folder
from sfron.classifier import SMALL_CNN_INPUT, DigitsClassifier
from sfron.data import ImageSet, find_class_folders, list_images
from sfron.files import atomic_torch_save


def load_split(data_path, split, size):
    """All images of a split as one tensor (N, 3, size, size) in [-1, 1] and labels (N,)."""
    root, classes = find_class_folders(data_path, split)
    dataset = ImageSet(list_images(root, classes, range(len(classes))), size, classes, root)
    x, y = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(x), torch.tensor(y)


def random_shift(x, generator):
    """Shifts each image by up to one pixel in each direction (zero padding at -1, the background)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def main(args):
    """Trains and saves the classifier; prints the held-out accuracy."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    size = SMALL_CNN_INPUT[args.classifier]
    data_path = args.data_path or data_folder(args.classifier)
    out = args.out or f"assets/{args.classifier}_classifier.pt"
    x_train, y_train = load_split(data_path, "train", size)
    x_val, y_val = load_split(data_path, "val", size)
    model = DigitsClassifier(num_classes=int(y_train.max()) + 1, input_size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}: train acc {accuracy(model, x_train, y_train):.4f}, "
                  f"held-out acc {accuracy(model, x_val, y_val):.4f}")
    atomic_torch_save({"model": model.state_dict(), "val_accuracy": accuracy(model, x_val, y_val)}, out)
    print(f"Saved {out}")


def parse_args(argv=None):
    """The command line (argv: a list of arguments instead of sys.argv)."""
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--classifier", type=str, choices=list(SMALL_CNN_INPUT), default="digits",
                        help="which embedded case: digits (8x8) or mnist (28x28)")
    parser.add_argument("--data-path", type=str, default=None, help="default: data/<classifier>")
    parser.add_argument("--out", type=str, default=None, help="default: assets/<classifier>_classifier.pt")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
