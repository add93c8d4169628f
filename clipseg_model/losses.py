"""Training losses on mask logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.0) -> torch.Tensor:
    """BCE-with-logits, plus `dice_weight` * soft Dice loss.

    Args:
        logits: (B, H, W) raw scores.
        target: (B, H, W) masks in [0, 1]; resized (bilinear) to the logits' size when they differ.
    Returns:
        A scalar tensor.
    """
    target = target.to(logits.dtype)
    if target.shape[-2:] != logits.shape[-2:]:
        target = F.interpolate(target.unsqueeze(1), size=logits.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if dice_weight:
        prob = torch.sigmoid(logits.float()).flatten(1)
        flat = target.float().flatten(1)
        dice = (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
        loss = loss + dice_weight * (1 - dice).mean()
    return loss
