"""Resume state of a training run (no pickle: tensors in safetensors, everything else in JSON), written atomically,
so `train(..., resume=True)` continues exactly: weights, optimizer, scheduler, scaler and RNG states."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clipseg_model.atomic import atomic_directory
from clipseg_model.errors import ClipsegError
from clipseg_model.segmenter_base import SegmentationModel
from finetune.recipe import TrainConfig

STATE_FORMAT = 1
STATE_DIR = "state"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into flat tensors and a JSON-able remainder."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_from(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in info["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for group in info["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_train_state(path: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                     step: int, cfg: TrainConfig, extra: dict[str, Any]) -> Path:
    """Write everything `train(..., resume=True)` needs to continue exactly, atomically (temp dir + rename)."""
    with atomic_directory(path, replace=True) as tmp:
        save_file(model.trainable_state_dict(), str(tmp / "model.safetensors"))
        tensors, optim_info = _optimizer_tensors(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        info = {
            "format": STATE_FORMAT, "step": step, "config": cfg.to_dict(), "optimizer": optim_info,
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            **extra,
        }
        (tmp / "state.json").write_text(json.dumps(info, indent=2, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the training state")


def load_train_state(path: Path, model: SegmentationModel, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """Restore what `save_train_state` wrote into freshly built objects; returns state.json's content."""
    info = json.loads((path / "state.json").read_text())
    if info.get("format") != STATE_FORMAT:
        raise ClipsegError(f"{path}: training state format {info.get('format')!r}, this code reads {STATE_FORMAT}")
    weights = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        missing = [k for k, p in model.named_parameters() if p.requires_grad and k not in weights]
        if missing:
            raise ClipsegError(f"{path} does not hold this model's trainable weights (missing {missing[:3]})")
        model.load_state_dict(weights, strict=False)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_optimizer_state_from(tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return info
