"""The optimizer of the unlearning steps and the EMA of weights."""
import torch


def make_optimizer(params, lr):
    """
    AdamW without weight decay, as the official script. The fused kernel makes one pass over each tensor where
    the default makes several: the two optimizer steps of each ron step are memory-bound on large models.
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0, fused=fused)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """Steps the EMA weights towards the model's: ema = decay * ema + (1 - decay) * model."""
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.mul_(decay).add_(p.detach(), alpha=1 - decay)
