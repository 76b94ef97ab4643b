"""
The classifiers that judge generated images (the forget and remain accuracy of the SFR-on paper): a torchvision
ImageNet model read from a local weights file, or the small CNN of the embedded digits and MNIST cases. Both take
images in [-1, 1] and return logits; `features` gives the penultimate activations (the embedded cases' FID is
computed in that space).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import safe_torch_load
from .utils import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The small CNN's input size for each embedded case (--classifier digits / mnist).
SMALL_CNN_INPUT = {"digits": 8, "mnist": 28}


class DigitsClassifier(nn.Module):
    """A three-layer CNN for small digits, (N, 3, S, S) in [-1, 1] -> (N, num_classes) logits; S is input_size (8 for
    the digits, 28 for MNIST), other sizes are resized to it."""

    def __init__(self, num_classes=10, width=32, feature_dim=128, input_size=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.input_size = input_size

    def features(self, x):
        """Penultimate activations (N, feature_dim)."""
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = F.relu(self.conv1(x))                            # (N, w, S, S)
        if self.input_size > 8:
            x = F.max_pool2d(x, 2)                           # (N, w, S/2, S/2): MNIST's 28 -> 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)           # (N, 2w, 4, 4) for the digits; 7 for MNIST
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)           # (N, 4w, 2, 2); 3 for MNIST
        x = F.adaptive_avg_pool2d(x, 2)                      # (N, 4w, 2, 2); the identity for the digits
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision ImageNet classifier on images in [-1, 1]: resized to 224 and normalised as it expects."""

    def __init__(self, net, resolution=224):
        super().__init__()
        self.net = net
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _prepare(self, x):
        x = (x.clamp(-1, 1) + 1) / 2
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x):
        return self.net(self._prepare(x))


def load_classifier(kind, weights_path, num_classes):
    """'digits' or 'mnist' (this repository's small CNN) or a torchvision model name, with weights from a local
    file."""
    if not weights_path:
        raise UserError(f"--classifier {kind} needs --classifier-weights: a local weights file (nothing is downloaded)")
    state = safe_torch_load(weights_path, what="classifier weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if kind in SMALL_CNN_INPUT:
        net = model = DigitsClassifier(num_classes=num_classes, input_size=SMALL_CNN_INPUT[kind])
    else:
        import torchvision
        if kind not in torchvision.models.list_models(module=torchvision.models):
            raise UserError(f"--classifier {kind}: not {' or '.join(SMALL_CNN_INPUT)} (the small CNN) nor a "
                            f"torchvision classification model")
        net = torchvision.models.get_model(kind, weights=None, num_classes=num_classes)
        model = TorchvisionClassifier(net)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"classifier weights {weights_path} do not fit {kind}: {first_line(e)}") from None
    return model.eval()
