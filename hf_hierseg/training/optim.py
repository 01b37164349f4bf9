"""Optimisers and schedules of the MoCo-v3 and DeiT recipes: AdamW or LARS with weight decay on weight matrices
only, linear warm-up then cosine learning rate, and MoCo's cosine momentum schedule."""

import math

import torch
from transformers import get_scheduler


# Parameters without weight decay besides biases and normalisation weights (all 1-D): the CLS token and the
# learned position embeddings.
NO_DECAY_NAMES = ("cls_token", "position_embeddings")


def parameter_groups(model, weight_decay):
    """Two groups of the trainable parameters: weight matrices / kernels with `weight_decay`, the rest (biases,
    norms, CLS token, position embeddings) without. The second group is flagged `lars_exclude` for LARS."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017).

    For every parameter not in a group with `lars_exclude=True`, the update `g + weight_decay * p` is rescaled by
    `trust_coefficient * ||p|| / ||g + weight_decay * p||` (when both norms are positive) before the momentum step.
    """

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Invalid LARS settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}.")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = parameter.grad
                if not group["lars_exclude"]:
                    update = update.add(parameter, alpha=group["weight_decay"])
                    parameter_norm, update_norm = torch.norm(parameter), torch.norm(update)
                    scale = torch.where(
                        (parameter_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * parameter_norm / update_norm,
                        torch.ones_like(parameter_norm),
                    )
                    update = update.mul(scale)
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                parameter.add_(buffer, alpha=-group["lr"])
        return loss


def create_optimizer(model, name, learning_rate, weight_decay, betas=(0.9, 0.999)):
    """`adamw` (torch.optim.AdamW) or `lars`, over `parameter_groups(model, weight_decay)`."""
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        for group in groups:
            group.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)
    if name == "lars":
        return LARS(groups, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; use 'adamw' or 'lars'.")


def create_scheduler(optimizer, name, num_warmup_steps, num_training_steps):
    """A transformers schedule stepped once per optimiser step; `cosine` is linear warm-up then half a cosine."""
    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps
    )


def cosine_momentum(step, total_steps, base_momentum=0.99, final_momentum=1.0):
    """MoCo-v3's momentum schedule: from `base_momentum` at step 0 to `final_momentum` at `total_steps`, along
    half a cosine."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final_momentum - (final_momentum - base_momentum) * (1.0 + math.cos(math.pi * progress)) / 2.0


__all__ = ["LARS", "cosine_momentum", "create_optimizer", "create_scheduler", "parameter_groups"]
