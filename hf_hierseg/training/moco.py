"""MoCo v3 (Chen, Xie & He, ICCV 2021) for CAST, written from the paper.

Base encoder f_q = CAST backbone + projector + predictor (`CastForSelfSupervisedPretraining`); momentum encoder
f_k = a copy of backbone + projector whose weights follow the base encoder's by exponential moving average. For two
views x1, x2 of each image, q_i = f_q(x_i), k_i = f_k(x_i), and

    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2 * tau * CrossEntropy(normalize(q) @ normalize(k).T / tau, diag)

with the keys of all processes as negatives. The momentum follows a cosine from `base_momentum` (0.99) to 1.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_cast import CastForSelfSupervisedPretraining
from .optim import cosine_momentum


def contrastive_loss(queries, keys, temperature, rank=0):
    """InfoNCE of queries [N, D] against keys [world_size * N, D] (this process's keys at rows rank*N ...),
    scaled by 2 * temperature as in the paper."""
    queries = F.normalize(queries.float(), dim=1)
    keys = F.normalize(keys.float(), dim=1)
    logits = queries @ keys.t() / temperature
    targets = torch.arange(queries.shape[0], device=queries.device) + rank * queries.shape[0]
    return F.cross_entropy(logits, targets) * (2.0 * temperature)


class CastMomentumEncoder(nn.Module):
    """Backbone + projector of the momentum branch (no predictor); never receives gradients."""

    def __init__(self, model: CastForSelfSupervisedPretraining):
        super().__init__()
        self.cast = copy.deepcopy(model.cast)
        self.projector = copy.deepcopy(model.projector)
        self.requires_grad_(False)

    def forward(self, pixel_values, superpixels):
        return self.projector(self.cast(pixel_values, superpixels, return_dict=True).pooler_output)


@dataclass
class MocoV3Output:
    predictions: tuple  # q1, q2: [B, D] base-encoder predictor outputs of view 1 and view 2
    keys: tuple  # k1, k2: [B, D] momentum-encoder projections of view 1 and view 2


class CastMocoV3(nn.Module):
    """The two MoCo-v3 branches around a `CastForSelfSupervisedPretraining` (`self.model`)."""

    def __init__(self, model: CastForSelfSupervisedPretraining, temperature=0.2):
        super().__init__()
        if not isinstance(model, CastForSelfSupervisedPretraining):
            raise TypeError(f"MoCo v3 needs a CastForSelfSupervisedPretraining, got {type(model).__name__}.")
        self.model = model
        self.momentum_encoder = CastMomentumEncoder(model)
        self.temperature = temperature

    def forward(self, pixel_values, superpixels):
        """pixel_values [B, 2, 3, H, W], superpixels [B, 2, H, W] (two views per image)."""
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"MoCo v3 expects two views per image: pixel_values [B, 2, 3, H, W], got {tuple(pixel_values.shape)}."
            )
        views = [(pixel_values[:, view], superpixels[:, view]) for view in range(2)]
        predictions = tuple(self.model(*view, return_dict=True).predictions for view in views)
        with torch.no_grad():
            keys = tuple(self.momentum_encoder(*view) for view in views)
        return MocoV3Output(predictions=predictions, keys=keys)

    @torch.no_grad()
    def update_momentum_encoder(self, momentum):
        """k <- momentum * k + (1 - momentum) * q for every parameter of backbone + projector."""
        base = list(self.model.cast.parameters()) + list(self.model.projector.parameters())
        target = list(self.momentum_encoder.cast.parameters()) + list(self.momentum_encoder.projector.parameters())
        for key_parameter, query_parameter in zip(target, base):
            key_parameter.mul_(momentum).add_(query_parameter.detach(), alpha=1.0 - momentum)

    def load_momentum_encoder(self, source: CastForSelfSupervisedPretraining):
        """Copy backbone + projector weights of `source` into the momentum encoder."""
        self.momentum_encoder.cast.load_state_dict(source.cast.state_dict())
        self.momentum_encoder.projector.load_state_dict(source.projector.state_dict())


class MocoObjective:
    """MoCo-v3 training objective for `hf_hierseg.training.loop.train`."""

    name = "MoCo v3 self-supervised pre-training"
    pipeline_tag = "image-feature-extraction"

    def __init__(self, model: CastForSelfSupervisedPretraining, temperature=0.2, base_momentum=0.99):
        self.module = CastMocoV3(model, temperature)
        self.base_momentum = base_momentum
        self.momentum = base_momentum

    def training_module(self):
        return self.module

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        """Loss of one micro-batch; the keys of every process are gathered as negatives."""
        output = module(batch["pixel_values"], batch["superpixels"])
        keys = [accelerator.gather(key.contiguous()) for key in output.keys]
        temperature, rank = self.module.temperature, accelerator.process_index
        loss = contrastive_loss(output.predictions[0], keys[1], temperature, rank) + contrastive_loss(
            output.predictions[1], keys[0], temperature, rank
        )
        return loss, {}

    def after_optimizer_step(self, module, step, total_steps, accelerator):
        """Momentum update with the schedule's value after `step` optimiser steps."""
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        self.module.update_momentum_encoder(self.momentum)
        return {"momentum": self.momentum}

    def pretrained_model(self, module, accelerator):
        """The `save_pretrained` model: backbone + projector + predictor of the base encoder."""
        return self.module.model

    def save_state(self, directory):
        pass

    def load_state(self, directory):
        pass

    def card_details(self):
        return {"temperature": self.module.temperature, "base momentum (cosine to 1)": self.base_momentum}


__all__ = ["CastMocoV3", "CastMomentumEncoder", "MocoObjective", "contrastive_loss"]
