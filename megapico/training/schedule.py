"""Learning-rate schedule: pico's linear warmup then linear (or cosine) decay to min_lr at max_steps.

As in pico-train (HF's get_linear_schedule_with_warmup), the multiplier at optimizer step s is s / warmup
during warmup, so the first update uses lr 0.
"""

import math

import torch

from megapico.config import TrainingConfig


def lr_at(step: int, train: TrainingConfig) -> float:
    if step < train.lr_warmup_steps:
        return train.lr * step / max(1, train.lr_warmup_steps)
    progress = min(1.0, (step - train.lr_warmup_steps) / max(1, train.max_steps - train.lr_warmup_steps))
    if train.lr_decay_style == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return train.min_lr + (train.lr - train.min_lr) * decay


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, train) / train.lr)
