"""DeiT-style supervised training of `CastForImageClassification`: cross-entropy with label smoothing, Mixup /
CutMix on the batch, optional EMA of the weights.

Mixup and CutMix mix the *images* of a batch (sample i with sample B-1-i) and their smoothed one-hot targets, but
not the superpixels: every sample keeps the superpixels of its own, unmixed image, as the original CAST DeiT
training does (the superpixels are computed in the data pipeline, before the batch is mixed).
"""

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..modeling_cast import soft_target_cross_entropy


def smooth_one_hot(labels, num_labels, smoothing=0.0):
    """int64 [B] -> float [B, num_labels]: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off_value = smoothing / num_labels
    targets = torch.full((labels.shape[0], num_labels), off_value, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off_value)


def cutmix_box(height, width, lam, rng):
    """A box covering a fraction 1 - lam of the image, centred uniformly, clipped at the borders.
    Returns (top, bottom, left, right)."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_height, cut_width = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, bottom = np.clip([centre_y - cut_height // 2, centre_y + cut_height // 2], 0, height)
    left, right = np.clip([centre_x - cut_width // 2, centre_x + cut_width // 2], 0, width)
    return int(top), int(bottom), int(left), int(right)


def mixup_cutmix(
    pixel_values,
    labels,
    num_labels,
    rng,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    probability=1.0,
    switch_probability=0.5,
    label_smoothing=0.1,
):
    """DeiT's batch Mixup / CutMix. Returns (mixed pixel_values, soft targets [B, K], lam, mode).

    With probability `probability` the batch is mixed with its reverse: CutMix (with probability
    `switch_probability` when both are on) pastes a box of the partner image, lam ~ Beta(cutmix_alpha) corrected
    to the box's true area; Mixup blends the images with lam ~ Beta(mixup_alpha). Targets mix the same way.
    Superpixels are not touched (see the module docstring)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0.")
    targets = smooth_one_hot(labels, num_labels, label_smoothing)
    if rng.random() >= probability:
        return pixel_values, targets, 1.0, "none"
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_probability)
    partner_pixels, partner_targets = pixel_values.flip(0), targets.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        height, width = pixel_values.shape[-2:]
        top, bottom, left, right = cutmix_box(height, width, lam, rng)
        mixed = pixel_values.clone()
        mixed[..., top:bottom, left:right] = partner_pixels[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
        mode = "cutmix"
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        mixed = pixel_values * lam + partner_pixels * (1.0 - lam)
        mode = "mixup"
    return mixed, targets * lam + partner_targets * (1.0 - lam), lam, mode


class ModelEma:
    """Exponential moving average of a model's weights (floating-point tensors; integer buffers are copied)."""

    def __init__(self, model, decay=0.99996):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        device = next(model.parameters()).device
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        for average, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.mul_(self.decay).add_(current.detach().to(average.dtype), alpha=1.0 - self.decay)
            else:
                average.copy_(current)

    def save(self, path):
        save_file({key: value.contiguous() for key, value in self.module.state_dict().items()}, str(path))

    def load(self, path):
        self.module.load_state_dict(load_file(str(path)))


class SupervisedObjective:
    """DeiT-style classification objective for `hf_hierseg.training.loop.train`."""

    name = "supervised image classification (DeiT recipe)"
    pipeline_tag = "image-classification"
    EMA_FILE = "ema.safetensors"

    def __init__(
        self,
        model,
        label_smoothing=0.1,
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        mix_probability=1.0,
        switch_probability=0.5,
        ema_decay=None,
        seed=0,
    ):
        self.module = model
        self.num_labels = model.config.num_labels
        self.label_smoothing = label_smoothing
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_probability, self.switch_probability = mix_probability, switch_probability
        self.mixing = mix_probability > 0 and (mixup_alpha > 0 or cutmix_alpha > 0)
        self.seed = seed
        self.ema = ModelEma(model, ema_decay) if ema_decay else None

    def training_module(self):
        return self.module

    def compute_loss(self, module, batch, step, micro_step, accelerator):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if self.mixing:
            # One generator per (step, micro-batch, rank): a resumed run mixes exactly as the interrupted one.
            rng = np.random.default_rng([self.seed, step, micro_step, accelerator.process_index])
            pixel_values, targets, lam, _ = mixup_cutmix(
                pixel_values,
                labels,
                self.num_labels,
                rng,
                self.mixup_alpha,
                self.cutmix_alpha,
                self.mix_probability,
                self.switch_probability,
                self.label_smoothing,
            )
            logits = module(pixel_values=pixel_values, superpixels=batch["superpixels"]).logits
            return soft_target_cross_entropy(logits, targets), {"mix_lambda": lam}
        logits = module(pixel_values=pixel_values, superpixels=batch["superpixels"]).logits
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).float().mean().item()
        return loss, {"train_accuracy": accuracy}

    def after_optimizer_step(self, module, step, total_steps, accelerator):
        if self.ema is not None:
            self.ema.update(self.module)
        return {}

    def pretrained_model(self, module, accelerator):
        return self.module

    def save_state(self, directory):
        if self.ema is not None:
            self.ema.save(directory / self.EMA_FILE)

    def load_state(self, directory):
        if self.ema is not None:
            path = directory / self.EMA_FILE
            if path.is_file():
                self.ema.load(path)

    def card_details(self):
        details = {"label smoothing": self.label_smoothing}
        if self.mixing:
            details.update(
                {
                    "mixup alpha": self.mixup_alpha,
                    "cutmix alpha": self.cutmix_alpha,
                    "mix probability": self.mix_probability,
                }
            )
        if self.ema is not None:
            details["EMA decay"] = self.ema.decay
        return details


@torch.no_grad()
def evaluate_classifier(model, batches, accelerator):
    """Top-1 accuracy and mean cross-entropy over (batch, skipped) pairs, summed over all processes.

    `model` must be the unwrapped model: processes may hold different numbers of batches, and a DDP forward would
    wait for the others."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, device=accelerator.device)  # correct, count, summed loss, skipped
    for batch, skipped in batches:
        totals[3] += skipped
        if "pixel_values" not in batch:
            continue
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        logits = model(pixel_values=batch["pixel_values"], superpixels=batch["superpixels"]).logits.float()
        totals[0] += (logits.argmax(-1) == batch["labels"]).sum()
        totals[1] += batch["labels"].numel()
        totals[2] += F.cross_entropy(logits, batch["labels"], reduction="sum")
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    count = max(totals[1].item(), 1.0)
    return {
        "eval_accuracy": totals[0].item() / count,
        "eval_loss": totals[2].item() / count,
        "eval_samples": int(totals[1].item()),
        "eval_skipped_images": int(totals[3].item()),
    }


__all__ = [
    "ModelEma",
    "SupervisedObjective",
    "cutmix_box",
    "evaluate_classifier",
    "mixup_cutmix",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]
