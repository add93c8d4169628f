"""Tokenising phrases for a CLIP text tower (shared by both architectures)."""
from __future__ import annotations

from typing import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str], max_positions: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Phrases → `input_ids` and `attention_mask`, both (P, T) long, T <= max_positions.

    Phrases longer than the text tower's context (77 tokens for CLIP) are truncated, never rejected.
    """
    encoded = tokenizer(
        [str(p) for p in prompts],
        padding=True,
        truncation=True,
        max_length=max_positions,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}
