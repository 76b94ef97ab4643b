"""
What the SFR-on paper reports (Huang et al., NeurIPS 2024): forget accuracy (FA), remain accuracy and FID, and
what the DiT paper's table adds (Inception Score, precision and recall) and KID, computed offline. The feature
statistics and every metric formula are torch-fidelity's, so the numbers equal its `calculate_metrics` on the
same images; the features come from its TF-compatible InceptionV3 (a local weights file) or from any feature
network (the small CNN's penultimate layer for the embedded digits and MNIST cases).
"""
import os

import numpy as np
import torch
import torch.nn as nn

from .files import atomic_torch_save, safe_torch_load
from .utils import UserError

KID_PR_MAX = 10000   # most images per set entering KID and precision/recall (all pairs); FID uses them all
PRC_NEIGHBOURS = 3   # the k of precision/recall (Kynkaanniemi et al., 2019), torch-fidelity's default


def classification_report(logits, labels, forget_class):
    """
    From classifier logits (N, K) of generated images and the classes they were generated for (N,):
    forget_acc (share of forget-class images classified as the forget class), forget_top5, forget_prob (mean
    probability of the forget class), forget_entropy (mean entropy of the classifier's prediction on them),
    remain_acc and remain_acc_per_class on the other classes.
    """
    logits, labels = logits.float(), labels.long()
    pred = logits.argmax(1)
    report = {}
    forget = labels == forget_class
    if forget.any():
        top5 = logits[forget].topk(min(5, logits.shape[1]), dim=1).indices
        report["forget_acc"] = (pred[forget] == forget_class).float().mean().item()
        report["forget_top5"] = (top5 == forget_class).any(1).float().mean().item()
        report["forget_prob"] = logits[forget].softmax(1)[:, forget_class].mean().item()
        log_p = logits[forget].log_softmax(1)
        report["forget_entropy"] = -(log_p.exp() * log_p).sum(1).mean().item()  # nats, as SA's evaluation prints
        report["n_forget"] = int(forget.sum())
    remain = ~forget
    if remain.any():
        report["remain_acc"] = (pred[remain] == labels[remain]).float().mean().item()
        report["remain_acc_per_class"] = {int(c): (pred[labels == c] == c).float().mean().item()
                                          for c in labels[remain].unique().tolist()}
        report["n_remain"] = int(remain.sum())
    return report


@torch.no_grad()
def classify(classifier, images_uint8, batch_size, device):
    """Logits (N, K) for uint8 images (N, H, W, 3)."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        x = torch.from_numpy(images_uint8[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(classifier(x).float().cpu())
    return torch.cat(out)


class FeatureNet(nn.Module):
    """A network with a .features(x in [-1, 1]) method and logits from forward, as a feature space on uint8 images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images_uint8):
        features = self.net.features(images_uint8.float() / 127.5 - 1.0)
        return features, self.net.head(features) if hasattr(self.net, "head") else None


class InceptionNet(nn.Module):
    """torch-fidelity's TF-compatible InceptionV3 (its own bilinear resize to 299): pool3 features and logits."""

    def __init__(self, weights_path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        safe_torch_load(weights_path, what="Inception weights")  # refuse anything but tensors before its own load
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights_path)

    def forward(self, images_uint8):
        return self.net(images_uint8)


def feature_space(kind, inception_weights=None, classifier=None):
    """The network FID, KID, precision/recall and IS are computed in: 'inception' (weights from a local file) or
    'classifier' (the penultimate layer of a classifier with .features)."""
    if kind == "inception":
        if not inception_weights:
            raise UserError("FID with InceptionV3 needs --inception-weights: torch-fidelity's "
                            "weights-inception-2015-12-05-6726825d.pth as a local file (nothing is downloaded)")
        return InceptionNet(inception_weights).eval()
    return FeatureNet(classifier).eval()


@torch.no_grad()
def embed(space, batches, device):
    """(features (N, D), logits (N, K) or None), float32 on the CPU, of uint8 (N, 3, H, W) batches."""
    features, logits = [], []
    for batch in batches:
        f, lg = space(batch.to(device))
        features.append(f.float().cpu())
        logits.append(lg.float().cpu() if lg is not None else None)
    if not features:
        return torch.zeros(0, 0), None
    return torch.cat(features), torch.cat(logits) if logits[0] is not None else None


def nhwc_batches(images_uint8_nhwc, batch_size):
    """uint8 (N, 3, H, W) tensor batches of an (N, H, W, 3) array."""
    for i in range(0, len(images_uint8_nhwc), batch_size):
        yield torch.from_numpy(images_uint8_nhwc[i:i + batch_size]).permute(0, 3, 1, 2)


def frechet_statistics(features):
    """{'mu', 'sigma'} (float64 tensors) of features (N, D), as torch-fidelity computes them."""
    f = features.double()
    return {"mu": f.mean(0), "sigma": torch.from_numpy(np.cov(f.numpy(), rowvar=False))}


def frechet_distance(stats_1, stats_2):
    """The Frechet distance of two {'mu', 'sigma'} (torch-fidelity's formula, in float64)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    as_numpy = [{k: np.asarray(s[k], dtype=np.float64) for k in ("mu", "sigma")} for s in (stats_1, stats_2)]
    if as_numpy[0]["mu"].shape != as_numpy[1]["mu"].shape:
        raise UserError(f"feature sizes differ: {as_numpy[0]['mu'].shape[0]} and {as_numpy[1]['mu'].shape[0]} "
                        f"(reference statistics of another feature network?)")
    return fid_statistics_to_metric(*as_numpy, verbose=False)["frechet_inception_distance"]


def kid_and_precision_recall(gen_features, real_features):
    """KID (torch-fidelity: 100 subsets of up to 1000) and precision/recall (3 neighbours) of two feature sets."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    out = {}
    subset = min(1000, len(gen_features), len(real_features))
    if subset >= 2:
        kid = kid_features_to_metric(gen_features, real_features, kid_subsets=100, kid_subset_size=subset,
                                     kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020, verbose=False)
        out["kid"], out["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    if min(len(gen_features), len(real_features)) > PRC_NEIGHBOURS:
        prc = prc_features_to_metric(gen_features, real_features, prc_neighborhood=PRC_NEIGHBOURS,
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        out["precision"], out["recall"] = prc["precision"], prc["recall"]
    return out


def inception_score(logits):
    """(mean, std) of the Inception Score over 10 splits (torch-fidelity's), or (None, None) under 10 images."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    if logits is None or len(logits) < 10:
        return None, None
    score = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    return score["inception_score_mean"], score["inception_score_std"]


def subset_for_kid_pr(features):
    """At most KID_PR_MAX rows of features (a fixed random choice): KID and precision/recall need all pairs."""
    if len(features) <= KID_PR_MAX:
        return features
    return features[torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:KID_PR_MAX].sort()[0]]


def reference_set(space, real_batches, cache_path, description, device):
    """
    The real images' {'mu', 'sigma', 'features'} (features: up to KID_PR_MAX rows, for KID and precision/recall):
    read from cache_path when it was made for the same description, else computed from real_batches() and
    written there.
    """
    if cache_path and os.path.isfile(cache_path):
        cached = safe_torch_load(cache_path, what="FID reference statistics")
        if isinstance(cached, dict) and cached.get("description") == description and "features" in cached:
            return cached
    features, _ = embed(space, real_batches(), device)
    if len(features) < 2:
        raise UserError(f"FID needs at least two real images ({description})")
    reference = {**frechet_statistics(features), "features": subset_for_kid_pr(features),
                 "description": description}
    if cache_path:
        atomic_torch_save(reference, cache_path)
    return reference


def image_set_metrics(features, reference):
    """FID, KID and precision/recall of generated images' features (N, D) against a reference_set."""
    if len(features) < 2:
        return {"fid": None}
    out = {"fid": frechet_distance(frechet_statistics(features), reference)}
    out.update(kid_and_precision_recall(subset_for_kid_pr(features), reference["features"]))
    return out


def load_samples(path):
    """Generated images (N, H, W, 3) uint8 and their class labels (N,) from an .npz (arr_0, arr_1)."""
    if not os.path.isfile(path):
        raise UserError(f"--samples {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a samples .npz with arr_0 (images) and arr_1 (labels): {e}") from None
    if labels is None:
        raise UserError(f"{path} has no arr_1 (class labels); make it with sample_ddp.py")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 must be uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images, labels


def markdown_table(reports, columns=("forget_acc", "forget_top5", "remain_acc", "fid_remain", "fid_forget"),
                   optional=("precision_remain", "recall_remain", "inception_score", "fid_ref_batch")):
    """A Markdown table of {model name: report} with one row per model (optional columns where computed)."""
    columns = list(columns) + [c for c in optional if any(r.get(c) is not None for r in reports.values())]
    def fmt(v):
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for name, r in reports.items()]
    return "\n".join(lines) + "\n"
