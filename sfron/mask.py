"""
Weight saliency masks. SFR-on's forget-remain balanced mask: S = ((F_f + 1e-15) / (F_r + 1e-15)) >= gamma per
parameter element. SalUn's gradient mask (a baseline): the share 1 - sparsity of all weights with the largest
|summed forget gradient|, ranked globally. Files: <mask-path>/<class>/forget_fisher.pt, remain_fisher.pt,
fisher_<gamma>.pt, and forget_gradient.pt, gradient_<sparsity>.pt.
"""
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from .files import atomic_json_dump, file_sha256, safe_torch_load, strip_module_prefix
from .utils import UserError

EPS = 1e-15


@dataclass(frozen=True)
class MaskChoice:
    """--mask-path (a mask file, or the folder of generate_mask.py; None: no mask), and which mask of a folder:
    fisher_<threshold>.pt, or with a sparsity SalUn's gradient_<sparsity>.pt."""
    mask_path: Optional[str] = None
    threshold: float = 1.0
    sparsity: Optional[float] = None


@dataclass(frozen=True)
class MaskRecord:
    """The mask file a run used and the SHA-256 of its bytes (a resumed run must use the very same mask)."""
    file: Optional[str] = None
    sha256: Optional[str] = None


@dataclass(frozen=True)
class Provenance:
    """What a Fisher or mask file was made from: the forget class, the checkpoint (its path and the SHA-256 of its
    bytes), the model and the number of samples of each set. Kept beside the file as <file stem>.json."""
    forget_class: int
    checkpoint: str
    checkpoint_sha256: Optional[str]
    model: str
    image_size: int
    num_classes: int
    samples: int

    def differs_from(self, other):
        """A phrase naming the first of class, model and checkpoint where two provenances differ (None: alike)."""
        if self.forget_class != other.forget_class:
            return f"class {self.forget_class}, this run's is {other.forget_class}"
        for name in ("model", "image_size", "num_classes"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} {getattr(self, name)}, this run's is {getattr(other, name)}"
        if None not in (self.checkpoint_sha256, other.checkpoint_sha256) and \
                self.checkpoint_sha256 != other.checkpoint_sha256:
            return (f"the checkpoint {self.checkpoint} (SHA-256 {self.checkpoint_sha256[:12]}), this run's is "
                    f"{other.checkpoint} ({other.checkpoint_sha256[:12]})")
        return None


def provenance_path(path):
    """The provenance file beside a Fisher or mask file: <stem>.json."""
    return os.path.splitext(path)[0] + ".json"


def write_provenance(path, provenance, extra=None):
    """Writes the provenance of the file at `path` (and the entries of `extra`, such as the threshold) beside it."""
    atomic_json_dump({**asdict(provenance), **(extra or {})}, provenance_path(path))


def read_provenance(path):
    """The Provenance of a Fisher or mask file, or None for a file without one (the official scripts')."""
    side = provenance_path(path)
    if not os.path.isfile(side):
        return None
    try:
        recorded = json.load(open(side))
        return Provenance(**{f.name: recorded[f.name] for f in fields(Provenance)})
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{side} is not a provenance file ({e}): remove it or make the file again") from None


def check_provenance(path, expected, warn):
    """Refuses a mask made for another class, model or checkpoint than expected() (a Provenance, built only when
    the mask records one to compare with), in one line naming both; a mask without provenance (the official
    scripts') is used after one warning line (warn)."""
    recorded = read_provenance(path)
    if recorded is None:
        warn(f"warning: {path} records no provenance (written by the official scripts or an earlier version): "
             f"nothing checks that it was made for this class, model and checkpoint")
        return
    difference = recorded.differs_from(expected())
    if difference is not None:
        raise UserError(f"mask {path} was made for {difference}: make one for this run with generate_fisher.py and "
                        f"generate_mask.py")


def class_dir(mask_path, forget_class):
    return os.path.join(mask_path, str(forget_class))


def mask_filename(threshold=None, sparsity=None):
    """fisher_<gamma>.pt with gamma written as a Python float, as the official script names it (fisher_1.0.pt), or
    SalUn's gradient_<sparsity>.pt."""
    if sparsity is not None:
        return f"gradient_{float(sparsity)}.pt"
    return f"fisher_{float(threshold)}.pt"


def check_sparsity(sparsity):
    """A sparsity (share of weights frozen) must lie strictly between 0 and 1."""
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity must be in (0, 1), got {sparsity}")


def load_fisher(path, logger=print):
    """
    A Fisher file as {name: float tensor}. Files of the official script are read too: their keys carry
    DataParallel's 'module.' prefix and the frozen position embedding is stored as the integer 0; entries that are
    not tensors are skipped, and the log says which.
    """
    fisher = safe_torch_load(path, what="Fisher file")
    if not isinstance(fisher, dict) or not fisher:
        raise UserError(f"{path} is not a Fisher file (expected a dict of tensors from generate_fisher.py)")
    fisher = strip_module_prefix(fisher)
    skipped = sorted(k for k, v in fisher.items() if not isinstance(v, torch.Tensor))
    if skipped:
        logger(f"{path}: skipped {len(skipped)} entries that are not tensors ({', '.join(skipped[:5])})")
    fisher = {k: v for k, v in fisher.items() if isinstance(v, torch.Tensor)}
    if not fisher:
        raise UserError(f"{path} holds no tensors: not a Fisher file")
    return fisher


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


def gradient_mask(gradient, sparsity):
    """
    {name: bool tensor}: the top 1 - sparsity of all weights by |gradient|, ranked over every parameter at once
    (ties at the cut taken in parameter order, so that exactly round((1 - sparsity) N) weights are kept).
    """
    check_sparsity(sparsity)
    names = list(gradient)
    scores = torch.cat([gradient[n].abs().flatten().float() for n in names])   # (N,)
    keep = round((1 - sparsity) * scores.numel())
    if keep == 0:
        flat = torch.zeros_like(scores, dtype=torch.bool)
    else:
        cut = torch.kthvalue(scores, scores.numel() - keep + 1).values         # the keep-th largest score
        flat = scores > cut
        ties = (scores == cut).nonzero().flatten()[:keep - int(flat.sum())]
        flat[ties] = True
    mask, start = {}, 0
    for n in names:
        count = gradient[n].numel()
        mask[n] = flat[start:start + count].view(gradient[n].shape)
        start += count
    return mask


def sparsity(mask):
    """Share of zeros (weights left frozen) over all masked elements."""
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return 1.0 - kept / max(total, 1)


def resolve_mask_file(choice, forget_class):
    """A mask file given directly, or the file of a mask folder that the MaskChoice selects."""
    mask_path = choice.mask_path
    if os.path.isdir(mask_path):
        path = os.path.join(class_dir(mask_path, forget_class), mask_filename(choice.threshold, choice.sparsity))
        if not os.path.isfile(path):
            how = (f"--criterion gradient --sparsity {float(choice.sparsity)}" if choice.sparsity is not None
                   else f"--thresholds {float(choice.threshold)}")
            raise UserError(f"no mask {path}: run generate_mask.py --mask-path {mask_path} "
                            f"--forget-class {forget_class} {how} first")
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


def saliency_mask_for(choice, forget_class, model, device):
    """(mask or None, MaskRecord) for a MaskChoice: the file it selects, loaded and checked against the model."""
    if not choice.mask_path:
        return None, MaskRecord()
    path = resolve_mask_file(choice, forget_class)
    return load_mask(path, model, device), MaskRecord(file=os.path.abspath(path), sha256=file_sha256(path))


def check_mask_frees_some(path, sparse_expected):
    """A mask file that would leave the forget step nothing to move (every weight frozen), or, where the update
    expects a sparse mask (sparse_expected: the flag that does), nothing to freeze, is one error line."""
    raw = safe_torch_load(path, what="mask")
    tensors = [v for v in raw.values() if isinstance(v, torch.Tensor)] if isinstance(raw, dict) else []
    total = sum(v.numel() for v in tensors)
    kept = sum(int((v != 0).sum()) for v in tensors)
    if total and kept == 0:
        raise UserError(f"mask {path} freezes every weight: the forget step would change nothing; use a lower "
                        f"threshold (generate_mask.py prints the share each threshold freezes)")
    if total and kept == total and sparse_expected:
        raise UserError(f"mask {path} frees every weight, but {sparse_expected} expects a sparse mask; use a higher "
                        f"threshold")


def kept_share(mask):
    """Share of weights a mask lets the forget step update."""
    return sum(float(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
