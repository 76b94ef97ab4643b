"""
The forget-remain balanced weight saliency mask of SFR-on: S = ((F_f + 1e-15) / (F_r + 1e-15)) >= gamma per
parameter element. Files: <mask-path>/<class>/forget_fisher.pt, remain_fisher.pt and fisher_<gamma>.pt.
"""
import os

import torch

from .utils import UserError, safe_torch_load, strip_module_prefix

EPS = 1e-15


def class_dir(mask_path, forget_class):
    return os.path.join(mask_path, str(forget_class))


def mask_filename(threshold):
    """fisher_<gamma>.pt with gamma written as a Python float, as the official script names it (fisher_1.0.pt)."""
    return f"fisher_{float(threshold)}.pt"


def saliency_mask(forget_fisher, remain_fisher, threshold):
    """{name: bool tensor}: where the forget Fisher is at least `threshold` times the remain Fisher."""
    if forget_fisher.keys() != remain_fisher.keys():
        raise UserError("the forget and remain Fisher files hold different parameters (from different models?)")
    mask = {}
    for name, f in forget_fisher.items():
        r = remain_fisher[name]
        if f.shape != r.shape:
            raise UserError(f"Fisher shapes differ for {name}: {tuple(f.shape)} vs {tuple(r.shape)}")
        mask[name] = ((f.float() + EPS) / (r.float() + EPS)) >= threshold
    return mask


def sparsity(mask):
    """Share of zeros (weights left frozen) over all masked elements."""
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return 1.0 - kept / max(total, 1)


def resolve_mask_file(mask_path, forget_class, threshold):
    """A mask file given directly, or <folder>/<class>/fisher_<threshold>.pt inside a mask folder."""
    if os.path.isdir(mask_path):
        path = os.path.join(class_dir(mask_path, forget_class), mask_filename(threshold))
        if not os.path.isfile(path):
            raise UserError(f"no mask {path}: run generate_mask.py --mask-path {mask_path} "
                            f"--forget-class {forget_class} --thresholds {float(threshold)} first")
        return path
    if not os.path.isfile(mask_path):
        raise UserError(f"--mask-path {mask_path} is neither a mask file nor a mask folder")
    return mask_path


def load_mask(path, model, device):
    """
    A saved mask checked against the model: {name: bool tensor on device} for every trainable parameter (a
    quarter of the memory of float 0/1 tensors: 0.7 GB instead of 2.7 GB for DiT-XL/2).
    """
    raw = safe_torch_load(path, what="mask")
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a mask file (expected a dict of boolean tensors)")
    raw = strip_module_prefix({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in params if n not in raw]
    unknown = [n for n in raw if n not in params and n != "pos_embed"]
    if missing or unknown:
        example = (missing or unknown)[0]
        raise UserError(f"mask {path} is for another model: {len(missing)} parameters missing, {len(unknown)} "
                        f"unknown (e.g. {example})")
    for n, p in params.items():
        if raw[n].shape != p.shape:
            raise UserError(f"mask {path} is for another model: {n} has shape {tuple(raw[n].shape)}, "
                            f"the model's is {tuple(p.shape)}")
        if raw[n].dtype != torch.bool and not ((raw[n] == 0) | (raw[n] == 1)).all():
            raise UserError(f"mask {path}: {n} holds values other than 0 and 1")
    return {n: raw[n].to(device=device, dtype=torch.bool) for n in params}
