"""The identity of a model's frozen part: what image features and precision choices are keyed by."""
from __future__ import annotations

import hashlib

import torch

from clipseg_model.segmenter_base import SegmentationModel


def frozen_fingerprint(model: SegmentationModel, precision: str = "fp32") -> str:
    """Identity of what `encode_frozen` computes: architecture, input size, boundary, the frozen weights and the
    precision the features are computed in (bf16 features differ from fp32 ones: never served for each other).

    The weights enter through a sample (the first 64 values, the sum and the shape of every frozen tensor): enough
    to tell two base models apart at a cost of milliseconds, unlike hashing 600 MB of parameters.
    """
    h = hashlib.blake2b(digest_size=16)
    cfg = model.config
    h.update(f"{cfg.architecture}|{cfg.image_size}|{model.frozen_depth()}|{model.needs_pixels()}|{precision}".encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            flat = p.detach().flatten()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[:64].float().cpu().numpy().tobytes())
            h.update(flat.float().sum().cpu().numpy().tobytes())
    return h.hexdigest()
