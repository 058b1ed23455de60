"""Losses, optimiser and schedule of the reference recipe (docs/design.md, section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Distillation loss: cross-entropy of the student against the teacher's softened distribution.

    ``T^2 * mean_batch( -sum_c softmax(t / T)_c * log_softmax(s / T)_c )``; with ``T = 1`` this is the
    reference's soft-target cross-entropy.
    """
    t = float(temperature)
    targets = F.softmax(teacher_logits.float() / t, dim=-1)
    log_probs = F.log_softmax(student_logits.float() / t, dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean() * (t * t)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    label_weight: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Soft cross-entropy to the teacher plus ``label_weight`` times cross-entropy on the labels."""
    loss = soft_cross_entropy(student_logits, teacher_logits, temperature)
    if label_weight:
        loss = loss + label_weight * F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    return loss


def inplace_distillation_loss(
    student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """In-place distillation loss (BigNAS): ``T^2 * mean_batch KL(softmax(l / T) || softmax(s / T))`` of a sampled
    subnet's logits ``s`` against the largest subnet's ``l``, which are detached: no gradient reaches the largest
    subnet through its role as a target.

    Its gradient equals ``soft_cross_entropy``'s; the value is that minus the target's entropy, so 0 means the
    subnet predicts what the largest subnet does.
    """
    t = float(temperature)
    log_targets = F.log_softmax(target_logits.detach().float() / t, dim=-1)
    log_probs = F.log_softmax(student_logits.float() / t, dim=-1)
    return (log_targets.exp() * (log_targets - log_probs)).sum(dim=-1).mean() * (t * t)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the reference: no weight decay on norms, biases, tokens and position embeddings.

    1-D parameters (norm scales, biases) and the names timm's ``no_weight_decay()`` lists (``pos_embed``,
    ``cls_token``, ``dist_token``, Swin's relative position tables...) get none.
    """
    base = model
    while hasattr(base, "module") or (hasattr(base, "model") and isinstance(base.model, nn.Module)):
        base = base.module if hasattr(base, "module") else base.model  # unwrap DDP and Supernet
    skip = set(base.no_weight_decay()) if hasattr(base, "no_weight_decay") else set()
    no_decay_ids = {
        id(p) for name, p in base.named_parameters() if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip
    }
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel where PyTorch has one (CPU and CUDA, float parameters).

    The supernet's factors are stored at full rank, so its optimiser state is larger than a subnet's; the fused
    kernel keeps that update at a few milliseconds (it is 3x the foreach time otherwise, see
    ``experiments/benchmarks/supernet_step.py``).
    """
    groups = param_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> CosineLRScheduler:
    """timm's cosine schedule with linear warm-up, stepped per optimisation step (``step_update``)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr if warmup_steps else 0.0,
        warmup_prefix=False,
        t_in_epochs=False,
    )
