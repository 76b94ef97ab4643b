"""
The Fisher diagonal of SFR-on (Huang et al., NeurIPS 2024): F = E_x[(dL(x)/dtheta)^2], the mean of per-sample
squared gradients of the diffusion loss. The official script squares each batch's mean gradient, which is this
quantity at its default batch of 1 only; here a batch of any size gives the same quantity.

Per-sample gradients cost no more than one backward pass: a linear layer's weight gradient for sample i is
G_i = sum_tokens g_i^T a_i (output gradients g, inputs a), so hooks on each layer see a_i in forward and g_i
in backward and add sum_i G_i^2 to a buffer. The whole-batch gradient is never formed.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .loss import check_finite, diffusion_loss
from .progress import LoopProgress
from .utils import UserError

# per-sample weight gradients (B, out, in) are formed for at most this many elements at once
_MAX_CHUNK_ELEMENTS = 1 << 26


def _sum_sq_outer(g, a, batched=None):
    """sum_i (g_i^T a_i)^2 for g (B, T, out), a (B, T, in): (out, in). batched: chunked bmm (default on GPUs)."""
    out = torch.zeros(g.shape[-1], a.shape[-1], dtype=torch.float32, device=g.device)
    g, a = g.float(), a.float()
    if not (g.is_cuda if batched is None else batched):
        # on CPUs a loop of matmuls with in-place accumulation beats a batched matmul
        for g_i, a_i in zip(g, a):
            per_sample = g_i.t() @ a_i
            out.addcmul_(per_sample, per_sample)
        return out
    chunk = max(1, _MAX_CHUNK_ELEMENTS // (g.shape[-1] * a.shape[-1]))  # bounds the (b, out, in) buffer
    for s in range(0, g.shape[0], chunk):
        out += torch.bmm(g[s:s + chunk].transpose(1, 2), a[s:s + chunk]).square().sum(0)
    return out


class PerSampleSquaredGrads:
    """
    Hooks on every Linear, patch-Conv2d and Embedding of a model that add each sample's squared parameter
    gradient into `sums` during backward. Use as a context manager; every trainable parameter must belong to a
    supported layer. The loss to backpropagate is the SUM of per-sample losses (each sample's own gradient).
    """

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.sums = {}
        self.outputs = []  # the hooked layers' outputs of the current forward pass
        covered = set()
        for module_name, module in model.named_modules():
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or \
                    (isinstance(module, nn.Conv2d) and (module.kernel_size != module.stride or module.padding != (0, 0)
                                                        or module.groups != 1 or module.dilation != (1, 1))):
                raise UserError(f"per-sample Fisher: unsupported layer {module_name} ({type(module).__name__})")
            prefix = f"{module_name}." if module_name else ""
            for n, p in params:
                self.sums[prefix + n] = torch.zeros_like(p, dtype=torch.float32)
                covered.add(id(p))
            self.handles.append(module.register_forward_hook(self._forward_hook(prefix)))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise UserError(f"per-sample Fisher: parameters outside supported layers: {missing[:3]}")

    def _forward_hook(self, prefix):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            a = inputs[0].detach()
            output.register_hook(lambda g: self._accumulate(module, prefix, a, g.detach()))
            self.outputs.append(output)
        return hook

    def backward(self, loss):
        """
        Backpropagates loss only as far as the hooked layers' outputs: the hooks get every output gradient,
        and the usual batch weight gradients, which the Fisher does not need, are never computed.
        """
        outputs, self.outputs = self.outputs, []
        torch.autograd.backward(loss, inputs=outputs)
        for out in outputs:
            out.grad = None

    @torch.no_grad()
    def _accumulate(self, module, prefix, a, g):
        sums = self.sums
        if isinstance(module, nn.Embedding):
            # sample i touches only row a_i: its squared gradient there is g_i^2
            rows = a.reshape(-1)
            sums[prefix + "weight"].index_add_(0, rows, g.reshape(rows.numel(), -1).float().square())
            return
        if isinstance(module, nn.Conv2d):
            # a patchifying convolution is a linear layer on flattened patches
            a = F.unfold(a, kernel_size=module.kernel_size, stride=module.stride).transpose(1, 2)  # (B, T, C*p*p)
            g = g.flatten(2).transpose(1, 2)                                                      # (B, T, D)
        if a.ndim == 2:
            # one token per sample: (g_i a_i^T)^2 = g_i^2 (a_i^2)^T, summed over i in one matmul
            w = g.float().square().t() @ a.float().square()
            b = g.float().square().sum(0)
        else:
            a, g = a.reshape(a.shape[0], -1, a.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
            w = _sum_sq_outer(g, a)
            b = g.float().sum(1).square().sum(0)
        sums[prefix + "weight"] += w.view_as(sums[prefix + "weight"])
        if prefix + "bias" in sums:
            sums[prefix + "bias"] += b

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def fisher_diagonal(model, diffusion, batches, dist, desc="Fisher", autocast_dtype=None, progress=None):
    """
    Mean over every sample of every batch (all processes together) of the squared per-sample gradient of the
    full diffusion loss, as {parameter name: float32 tensor}. The model runs in eval mode (no label dropout),
    as in the official script. progress: a LoopProgress to continue from its saved sums (batches must then
    start at its position) and to save them along the way.
    """
    progress = progress or LoopProgress()
    was_training = model.training
    model.eval()
    count = torch.zeros((), dtype=torch.float64, device=dist.device)
    total = progress.position + len(batches)
    with PerSampleSquaredGrads(model) as grads:
        progress.restore_into("sums", grads.sums)
        if progress.state is not None:
            count.copy_(progress.state["count"])
        iterator = tqdm(batches, desc=desc, disable=not dist.is_main, dynamic_ncols=True, initial=progress.position,
                        total=total)
        for batch in iterator:
            with torch.autocast(dist.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                losses = diffusion_loss(model, diffusion, batch)
            check_finite(losses, f"loss in {desc}", batch.step, hint="check the checkpoint and the data")
            grads.backward(losses.float().sum())
            count += losses.shape[0]
            progress.after_batch(batch.step + 1, total, lambda: {"sums": grads.sums, "count": count}, dist, desc)
    model.train(was_training)
    dist.all_reduce_sum_(count)
    fisher = {}
    for name, summed in grads.sums.items():
        fisher[name] = (dist.all_reduce_sum_(summed) / count).float().cpu()
    return fisher


def forget_gradient(model, diffusion, batches, dist, clip=1.0, desc="Forget gradient", progress=None):
    """
    SalUn's saliency statistic (Fan et al., ICLR 2024, as in the SFR-on authors' DDPM baseline): the sum over
    forget batches of the gradient of the epsilon-MSE loss, each batch's gradient (over the global batch) clipped
    to global norm `clip` before it is added. Returns {parameter name: float32 tensor} (signed; the mask uses |.|).
    Unlike the Fisher, this depends on the batch size (the clip acts per batch). The model runs in eval mode.
    progress: a LoopProgress, as for fisher_diagonal.
    """
    progress = progress or LoopProgress()
    was_training = model.training
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    progress.restore_into("total", total)
    n_batches = progress.position + len(batches)
    for batch in tqdm(batches, desc=desc, disable=not dist.is_main, dynamic_ncols=True, initial=progress.position,
                      total=n_batches):
        model.zero_grad(set_to_none=True)
        losses = diffusion.training_losses(model, batch.x, batch.t, dict(y=batch.y), noise=batch.noise)["mse"]
        check_finite(losses, f"loss in {desc}", batch.step, hint="check the checkpoint and the data")
        (losses.sum() / batches.config.global_batch).backward()  # this rank's part of the global-batch mean
        for _, p in named:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce_sum_(p.grad)
        if clip is not None and clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], clip)
        for n, p in named:
            total[n] += p.grad.float()
        progress.after_batch(batch.step + 1, n_batches, lambda: {"total": total}, dist, desc)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: v.cpu() for n, v in total.items()}
