"""Loading models by name, offline first.

A name is a local directory or a Hugging Face hub id. `HF_HOME` and `HF_HUB_OFFLINE` are honoured by
huggingface_hub itself. What a name can be:

- a checkpoint directory of ours (`clipseg_config.json`): rebuild the architecture, then load trainable weights;
- a CLIPSeg checkpoint (`model_type: clipseg`, e.g. `CIDAS/clipseg-rd64-refined`): the `clipseg-rd64` family;
- a CLIP checkpoint (`model_type: clip`, e.g. `openai/clip-vit-base-patch16`): a `film-decoder` with the `seed`
  options and an untrained decoder (useful only as a starting point for training).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants

from clipseg_model.checkpoint import base_version_name, is_checkpoint, load_trainable_weights, read_checkpoint_config
from clipseg_model.config import CLIPSEG_RD64, FILM_DECODER, PRESETS, ModelConfig
from clipseg_model.errors import ModelNotAvailableError
from clipseg_model.segmenter_base import SegmentationModel

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" → CUDA when present, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _not_available(name: str, exc: Exception) -> ModelNotAvailableError:
    offline = hub_constants.HF_HUB_OFFLINE
    where = f"the Hugging Face cache ({hub_constants.HF_HUB_CACHE})"
    how = (
        "set MODEL to a local directory (e.g. one made by `clipseg model init` or `save_pretrained`), copy a cache "
        "that has it into HF_HOME, or allow network access (unset HF_HUB_OFFLINE)"
        if offline
        else "check the name, your network, and for gated models your HF token"
    )
    state = "offline, and it is not in " + where if offline else "it could not be downloaded or found in " + where
    return ModelNotAvailableError(f"model '{name}' is not available: {state}; {how}. ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle_only(name: str) -> None:
    """A local model directory with pickle weights and no safetensors: refuse with a clear message."""
    if not os.path.isdir(name):
        return
    files = [p.name for p in Path(name).iterdir() if p.is_file()]
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if pickles and not any(f.endswith(".safetensors") for f in files):
        raise ModelNotAvailableError(
            f"model directory '{name}' holds only pickle weights ({', '.join(sorted(pickles))}); loading pickle can "
            "run arbitrary code, so only safetensors are loaded: convert it (load it once where you trust it and "
            "`save_pretrained(dir, safe_serialization=True)`)"
        )


def _from_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained(name)`; models (not tokenizers) load safetensors weights only, never pickle."""
    from transformers import PreTrainedModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a loading bar per file is noise in server logs
    if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        _refuse_pickle_only(name)
        kwargs.setdefault("use_safetensors", True)  # from_pretrained would otherwise fall back to pytorch_model.bin
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:  # missing files offline surface as OSError (LocalEntryNotFoundError)
        if isinstance(exc, ValueError) and "connection" not in str(exc).lower() and "offline" not in str(exc).lower():
            raise
        raise _not_available(name, exc) from exc


def _read_json_file(name: str, filename: str) -> dict[str, Any] | None:
    """A JSON file of a local dir or hub repo, or None when it does not exist / cannot be fetched."""
    if os.path.isdir(name):
        path = Path(name) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, filename)).read_text())
    except Exception:  # noqa: BLE001 - optional file
        return None


def _looks_like_directory(name: str) -> bool:
    """A name meant as a local path, not a hub id ("org/model"): it starts like a path, has more than one
    separator, or its first part is an existing local folder (`runs/best` when runs/ is here)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and os.path.isdir(name.split("/", 1)[0])


def _model_type(name: str) -> str:
    if _looks_like_directory(name) and not os.path.isdir(name):
        raise ModelNotAvailableError(f"model directory '{name}' does not exist")
    config = _read_json_file(name, "config.json")
    if config is None:
        raise _not_available(name, FileNotFoundError("config.json"))
    return str(config.get("model_type", ""))


def build_model(config: ModelConfig, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None) -> SegmentationModel:
    """Instantiate `config.architecture` with pretrained weights from `config.base_model` (trainable part fresh
    for film-decoder, HF's decoder for clipseg-rd64)."""
    from transformers import CLIPTokenizer

    name = config.base_model
    tokenizer = _from_pretrained(CLIPTokenizer, name)
    if config.architecture == FILM_DECODER:
        from transformers import CLIPModel

        from clipseg_model.film_decoder import FilmDecoderModel

        model: SegmentationModel = FilmDecoderModel(config, _from_pretrained(CLIPModel, name), tokenizer)
    elif config.architecture == CLIPSEG_RD64:
        from transformers import CLIPSegForImageSegmentation

        from clipseg_model.clipseg_rd64 import ClipSegRd64Model

        model = ClipSegRd64Model(config, _from_pretrained(CLIPSegForImageSegmentation, name), tokenizer)
        model.version = base_version_name(name)
    else:  # ModelConfig validates, this is defensive
        raise ValueError(config.architecture)
    model.eval()
    return model.to(device=resolve_device(device), dtype=torch_dtype) if torch_dtype else model.to(resolve_device(device))


def _preprocessing_from_hub(name: str, config: ModelConfig) -> ModelConfig:
    pre = _read_json_file(name, "preprocessor_config.json") or {}
    changes: dict[str, Any] = {}
    size = pre.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if size:
        changes["image_size"] = changes["output_size"] = int(size)
    if pre.get("image_mean"):
        changes["image_mean"] = tuple(pre["image_mean"])
        changes["image_std"] = tuple(pre["image_std"])
    return config.replace(**changes)


def load_model(name: str | os.PathLike, device: str | torch.device = "auto") -> SegmentationModel:
    """Load a segmentation model by directory or hub id (see module docstring), in eval mode on `device`."""
    name = str(name)
    if is_checkpoint(name):
        config, _ = read_checkpoint_config(name)
        model = build_model(config, device)
        load_trainable_weights(model, name)
        model.eval()
        log.info("loaded checkpoint %s (%s, version %s)", name, config.architecture, model.version)
        return model
    kind = _model_type(name)
    if kind == "clipseg":
        config = _preprocessing_from_hub(name, PRESETS["clipseg-rd64"].config.replace(base_model=name))
    elif kind == "clip":
        log.warning("model %s is a plain CLIP: the film-decoder on top of it is untrained", name)
        config = PRESETS["seed"].config.replace(base_model=name)
    else:
        raise ModelNotAvailableError(f"model '{name}' has model_type {kind!r}; expected a clipseg or clip checkpoint")
    model = build_model(config, device)
    log.info("loaded %s (%s, version %s)", name, config.architecture, model.version)
    return model
