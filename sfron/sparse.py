"""
The state of a run whose every update stays inside the saliency mask (`ron` with a mask and --mask-remain-step):
only the mask's free entries ever move, so the optimizers keep moments for those entries alone (MaskedAdamW), and
the frozen original differs from the trained model in those entries alone (MaskedOriginal: their original values,
swapped into the trained model for the frozen model's forward passes and out again). On DiT-XL/2 with 2% of the
weights free this replaces two AdamWs' 10.8 GB and a second model's 2.7 GB by about 0.3 GB (docs/scale.md).
"""
from contextlib import contextmanager

import torch


def free_entries(named_params, mask):
    """The flat indices of each parameter's free (True) mask entries, in the order of named_params."""
    return [mask[name].reshape(-1).nonzero().squeeze(1) for name, _ in named_params]


def gather(tensor, index):
    """tensor's entries at the flat indices index (n,)."""
    return tensor.reshape(-1).index_select(0, index)


def scatter_(tensor, index, values):
    """Writes values (n,) into tensor at the flat indices index, in place."""
    tensor.view(-1).index_copy_(0, index, values)


class MaskedAdamW(torch.optim.Optimizer):
    """
    AdamW without weight decay (make_optimizer's) whose moments hold only the free entries of a mask. On gradients
    that are 0 outside the mask it takes the dense AdamW's steps, to float rounding: there the dense moments stay 0
    and the weights do not move. `free`: the flat indices of each parameter's free entries, in params' order.
    """

    def __init__(self, params, free, lr, betas=(0.9, 0.999), eps=1e-8):
        params = list(params)
        if len(free) != len(params):
            raise ValueError(f"{len(free)} index tensors for {len(params)} parameters")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.free = {p: index for p, index in zip(params, free)}

    def _state(self, p):
        """The moments of p's free entries (zeros at the first step)."""
        state = self.state[p]
        if not state:
            n = self.free[p].numel()
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(n, dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(n, dtype=p.dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self):
        """One AdamW step of the free entries of every parameter that has a gradient."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                index, state = self.free[p], self._state(p)
                grad = gather(p.grad, index)                                  # (n,)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
                values = gather(p, index).addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))
                scatter_(p, index, values)

    def load_state_dict(self, state_dict):
        """Loads a state as copies of its tensors (torch would share them with the given state); moments of whole
        tensors (a checkpoint of the dense optimizer) keep their free entries."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key, value in state.items():
                whole = key != "step" and value.numel() == p.numel() != self.free[p].numel()
                state[key] = gather(value, self.free[p]).clone() if whole else value.clone()


class MaskedOriginal:
    """
    The frozen original model as the original values of the free entries, where the trained model is the only
    model: `with original.swapped_in(): ...` runs the trained model with those values, and puts its own back.
    """

    def __init__(self, params, free, original_params):
        self.params, self.free = list(params), list(free)
        self.values = [gather(o.detach(), index).clone() for o, index in zip(original_params, self.free)]

    @contextmanager
    def swapped_in(self):
        """The trained model's free entries replaced by the original's, for forward passes without gradient (the
        in-place writes come before any forward pass whose gradient is taken, so autograd sees none of them)."""
        with torch.no_grad():
            own = [gather(p, index) for p, index in zip(self.params, self.free)]
            for p, index, values in zip(self.params, self.free, self.values):
                scatter_(p, index, values)
            try:
                yield
            finally:
                for p, index, values in zip(self.params, self.free, own):
                    scatter_(p, index, values)
