"""Checkpoint I/O: trainable weights in safetensors plus a JSON file holding the architecture, base model and
version metadata. Never pickle. Directories are written atomically (temp dir + rename).

Layout of a checkpoint directory:

    clipseg_config.json   {"format": 1, "config": ModelConfig, "metadata": {"version": ..., "parent": ...,
                          "weights_sha256": ..., ...}}
    trainable.safetensors the decoder (and any unfrozen CLIP layers)
    base/                 optional: the pretrained backbone, when it is not a hub id (e.g. `clipseg model init`)

`weights_sha256` is the SHA-256 of trainable.safetensors as written; loading recomputes it, so a file damaged
later (truncated, or bytes overwritten with the header intact, which safetensors itself cannot notice) is refused
instead of serving garbage. Checkpoints written before the checksum existed load unchecked.

A base model that is a local directory is recorded relative to the checkpoint directory ("base", or e.g.
"../init/base" for a training run's best/ and last/): a run directory moved or copied whole, to another folder or
machine, still loads. The absolute path at save time is kept too (`base_model_absolute`), the fallback for a
checkpoint copied alone to another place on the same machine (what `VersionRegistry.materialize` does).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipseg_model.atomic import atomic_directory
from clipseg_model.config import ModelConfig
from clipseg_model.errors import CheckpointMismatchError, ModelNotAvailableError
from clipseg_model.segmenter_base import SegmentationModel, TrainableState

CONFIG_FILE = "clipseg_config.json"
WEIGHTS_FILE = "trainable.safetensors"
FORMAT = 1
CHECKSUM_KEY = "weights_sha256"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_version(config: ModelConfig, metadata: dict[str, Any]) -> str:
    """The version name a checkpoint carries: its metadata's `version`, else the architecture and the weights'
    checksum. Never the folder's name: `runs/x/last` is not a name."""
    name = metadata.get("version")
    if name:
        return str(name)
    digest = str(metadata.get(CHECKSUM_KEY) or "")[:10] or "unversioned"
    return f"{config.architecture}-{digest}"


def base_version_name(model: str) -> str:
    """The version MODEL is served as where no version is active: a checkpoint of ours names itself
    (`checkpoint_version`); a hub model used as it is is `base:<hub id>`, or `base:<folder name>` for a local
    folder. The one home of this rule: the loaded model, /setup, /metrics and `clipseg status` all use it."""
    path = Path(model)
    if is_checkpoint(path):
        try:
            return checkpoint_version(*read_checkpoint_config(path))
        except CheckpointMismatchError:
            pass  # not loadable either; the name still has to say which folder
    return f"base:{path.name if path.is_dir() else model}"


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_checkpoint_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, metadata) of a checkpoint directory; `config.base_model` resolved against the directory."""
    path = Path(path)
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
        config = ModelConfig.from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatchError(f"{path / CONFIG_FILE} is not a valid checkpoint config: {exc}") from exc
    if data.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path}: checkpoint format {data.get('format')!r}, this code reads {FORMAT}")
    base, fallback = config.base_model, data.get("base_model_absolute")
    if base and not os.path.isabs(base) and (path / base).exists():
        config = config.replace(base_model=str((path / base).resolve()))
    elif is_local_path(base) and (not os.path.isabs(base) or not os.path.isdir(base)):
        if fallback and os.path.isdir(fallback):
            return config.replace(base_model=fallback), dict(data.get("metadata") or {})
        where = (path / base).resolve() if not os.path.isabs(base) else Path(base)
        raise ModelNotAvailableError(
            f"checkpoint {path} is built on the base model directory {base!r}, which does not exist ({where}"
            f"{', nor does ' + fallback if fallback and fallback != str(where) else ''}); a checkpoint whose base is a "
            "local directory must be moved together with it (copy the whole run directory)")
    return config, dict(data.get("metadata") or {})


def is_local_path(name: str) -> bool:
    """Whether a base-model name is a filesystem path rather than a hub id: absolute, or relative in the form this
    module writes ("base", "./x", "../x")."""
    return bool(name) and (os.path.isabs(name) or name == "base" or name.startswith(("./", "../", "~")))


def _relative_base(base: str, out_dir: Path) -> str:
    """`base` as this checkpoint should record it: a local directory relative to `out_dir`, hub ids unchanged."""
    if not base or not os.path.isdir(base):
        return base
    rel = os.path.relpath(Path(base).resolve(), out_dir.resolve())
    return rel if rel.startswith("..") else f"./{rel}"


def save_checkpoint(model: SegmentationModel, out_dir: str | os.PathLike, metadata: dict[str, Any] | None = None,
                    base_dir: str | os.PathLike | None = None, move_base: bool = False, *, replace: bool = False) -> Path:
    """Write `model`'s trainable weights and config to `out_dir` atomically; refuse to overwrite unless `replace`.

    `base_dir`, when given, is copied (moved with `move_base`) to `out_dir/base` and the config points there,
    which makes the directory self-contained.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, replace=replace) as tmp:
        config = model.config
        if base_dir is not None:
            (shutil.move if move_base else shutil.copytree)(str(base_dir), str(tmp / "base"))
            config = config.replace(base_model="base")
            absolute = None
        else:
            absolute = str(Path(config.base_model).resolve()) if os.path.isdir(config.base_model) else None
            config = config.replace(base_model=_relative_base(config.base_model, out_dir))
        meta = {"created": time.time(), **(metadata or {})}
        state = model.trainable_state_dict()
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"architecture": config.architecture})
        meta[CHECKSUM_KEY] = file_sha256(tmp / WEIGHTS_FILE)
        record = {"format": FORMAT, "config": config.to_dict(), "metadata": meta}
        if absolute:
            record["base_model_absolute"] = absolute
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return out_dir


def verify_checksum(checkpoint_dir: str | os.PathLike, expected: str | None = None) -> str | None:
    """Check trainable.safetensors against the checksum in the checkpoint's config (and `expected`, e.g. the one
    recorded with the version, when given). Returns the checksum, None for an old checkpoint without one.

    Raises CheckpointMismatchError for a missing file or a mismatch."""
    checkpoint_dir = Path(checkpoint_dir)
    _, metadata = read_checkpoint_config(checkpoint_dir)
    recorded = {c for c in (metadata.get(CHECKSUM_KEY), expected) if c}
    if not recorded:
        return None
    try:
        actual = file_sha256(checkpoint_dir / WEIGHTS_FILE)
    except OSError as exc:
        raise CheckpointMismatchError(f"{checkpoint_dir / WEIGHTS_FILE} is unreadable ({exc})") from exc
    if recorded != {actual}:
        raise CheckpointMismatchError(
            f"{checkpoint_dir / WEIGHTS_FILE} is damaged (truncated, unreadable or altered): its SHA-256 is "
            f"{actual[:12]}..., the checkpoint recorded {', '.join(sorted(c[:12] + '...' for c in recorded))}")
    return actual


def load_trainable_weights(model: SegmentationModel, checkpoint_dir: str | os.PathLike,
                           expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint's trainable weights into `model` after checking they belong to it. Returns the metadata.

    Raises CheckpointMismatchError naming the mismatch (architecture, missing/unexpected tensors, shapes), and for a
    corrupt, truncated or altered weights file (checksum, see `verify_checksum`).
    """
    checkpoint_dir = Path(checkpoint_dir)
    config, metadata = read_checkpoint_config(checkpoint_dir)
    if config.architecture != model.config.architecture:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_dir} is a {config.architecture!r} model; it cannot be loaded into a "
            f"{model.config.architecture!r} model"
        )
    state = _checked_state(model, checkpoint_dir, config, expected_sha256)
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    model.version = checkpoint_version(config, metadata)
    # A fine-tuned version carries the mask threshold calibrated on its held-out corrections (finetune.jobs).
    model.calibrated_threshold = metadata.get("threshold")
    return metadata


def _checked_state(model: SegmentationModel, checkpoint_dir: Path, config: ModelConfig,
                   expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors after checking checksum, names and shapes against `model`."""
    verify_checksum(checkpoint_dir, expected_sha256)
    try:
        state = load_file(str(checkpoint_dir / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointMismatchError(f"{checkpoint_dir / WEIGHTS_FILE} is unreadable ({exc})") from exc
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_dir} does not fit this {config.architecture} model: unexpected tensors "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointMismatchError(f"checkpoint {checkpoint_dir} has tensors of other shapes: {wrong[:5]}")
    missing = sorted(k for k, p in model.named_parameters() if p.requires_grad and k not in state)
    if missing:
        raise CheckpointMismatchError(f"checkpoint {checkpoint_dir} lacks trainable tensors {missing[:5]}")
    return state


def read_trainable_state(model: SegmentationModel, checkpoint_dir: str | os.PathLike,
                         expected_sha256: str | None = None) -> TrainableState:
    """A checkpoint's trainable part as a `TrainableState` for `model`'s backbone, without touching `model`.

    The checkpoint must have been trained over the same backbone: the same config (architecture, base model,
    sizes, which layers train); raises CheckpointMismatchError otherwise, and for damaged weights."""
    checkpoint_dir = Path(checkpoint_dir)
    config, metadata = read_checkpoint_config(checkpoint_dir)
    if config.to_dict() != model.config.to_dict():
        raise CheckpointMismatchError(f"checkpoint {checkpoint_dir} was not trained over this backbone (config differs)")
    state = _checked_state(model, checkpoint_dir, config, expected_sha256)
    own = model.trainable_tensors()
    missing = sorted(set(own) - set(state))
    if missing:
        raise CheckpointMismatchError(f"checkpoint {checkpoint_dir} lacks trainable tensors {missing[:5]}")
    device = model.device
    tensors = {k: state[k].to(device=device, dtype=own[k].dtype) for k in own}
    return TrainableState(checkpoint_version(config, metadata), tensors, metadata.get("threshold"))
