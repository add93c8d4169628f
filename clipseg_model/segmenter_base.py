"""The interface both architectures implement: encode images once, decode many prompts.

    features = model.encode_images(pixel_values)          # vision pass, once per image
    text = model.encode_text(["left player", "ball"])     # (P, D), cacheable per phrase
    logits = model.decode(features, text, image_index)    # (P, S, S), one map per prompt
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from clipseg_model.config import ModelConfig
from clipseg_model.visual_prompt import VisualPrompts, condition_with


@dataclass
class ImageFeatures:
    """Vision activations of a batch of images.

    `layers[i]` has shape (B, 1 + N, C): CLS token then N patch tokens, for the i-th layer the decoder reads.
    """

    layers: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.layers[0].shape[0]

    def to(self, device: torch.device | str) -> "ImageFeatures":
        return ImageFeatures([h.to(device) for h in self.layers])

    def split(self) -> list["ImageFeatures"]:
        """One `ImageFeatures` per image (views, no copy)."""
        return [ImageFeatures([h[i : i + 1] for h in self.layers]) for i in range(self.batch_size)]

    @staticmethod
    def cat(items: Sequence["ImageFeatures"]) -> "ImageFeatures":
        return ImageFeatures([torch.cat(parts, 0) for parts in zip(*(f.layers for f in items))])

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.layers)


def run_vision_layers(
    embeddings: nn.Module,
    pre_layernorm: nn.Module,
    layers: Sequence[nn.Module],
    pixel_values: torch.Tensor,
    wanted: Sequence[int],
) -> list[torch.Tensor]:
    """Run a CLIP vision tower only as deep as needed.

    Args:
        pixel_values: (B, 3, S, S) normalised images; S may differ from the pretraining size (position
            embeddings are interpolated).
        wanted: 1-based layer numbers whose outputs are returned; 0 means the embeddings themselves.
    Returns:
        One (B, 1 + N, C) tensor per entry of `wanted`, in that order. Layers after max(wanted) never run.
    """
    depth = max(wanted)
    if depth > len(layers):
        raise ValueError(f"layer {depth} requested but the vision tower has {len(layers)} layers")
    hidden = pre_layernorm(embeddings(pixel_values, interpolate_pos_encoding=True))
    outputs = {0: hidden}
    for number, layer in enumerate(layers[:depth], start=1):
        hidden = layer(hidden, None)
        if isinstance(hidden, tuple):  # older transformers return (hidden,)
            hidden = hidden[0]
        outputs[number] = hidden
    return [outputs[i] for i in wanted]


@dataclass
class TrainableState:
    """The trainable part of one model version (decoder, plus any unfrozen CLIP layers): what differs between two
    versions over the same backbone. `tensors` are the `trainable_state_dict()` entries, on the model's device."""

    version: str
    tensors: dict[str, torch.Tensor]
    threshold: float | None = None  # the mask threshold calibrated for this version (finetune.jobs), if any

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def check_image_index(n_images: int, n_prompts: int, image_index: torch.Tensor | None) -> None:
    """Raise ValueError unless P prompts fit B images: P == B without an index, else a (P,) index into [0, B)."""
    if image_index is None:
        if n_prompts != n_images:
            raise ValueError(f"{n_images} images but {n_prompts} prompts (and no image_index)")
        return
    if image_index.shape != (n_prompts,):
        raise ValueError(f"image_index has shape {tuple(image_index.shape)}, expected ({n_prompts},)")
    if n_prompts and not (0 <= int(image_index.min()) and int(image_index.max()) < n_images):
        raise ValueError(f"image_index must lie in [0, {n_images})")


class SegmentationModel(nn.Module):
    """Base class of the model family. Subclasses build `self.vision_layers` etc. and implement the hooks."""

    config: ModelConfig
    version: str = "untrained"
    calibrated_threshold: float | None = None  # the mask threshold chosen for this version, if any

    # ---- hooks -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) float → features of the B images."""
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """P phrases → (P, D) float text embeddings (truncated to the tokenizer's 77 tokens)."""
        raise NotImplementedError

    def decode(self, features: ImageFeatures, text: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (P, S_out, S_out) for P prompts; prompt p looks at image `image_index[p]` (default p)."""
        raise NotImplementedError

    def backbone_modules(self) -> list[nn.Module]:
        """The pretrained CLIP modules (frozen, eval mode, unless unfrozen)."""
        raise NotImplementedError

    def unfreezable_layers(self) -> list[nn.Module]:
        """Vision layers that `unfreeze_last=k` may train, shallowest first."""
        raise NotImplementedError

    def text_modules(self) -> list[nn.Module]:
        """The text tower and its projection (trained only with `config.train_text`)."""
        raise NotImplementedError

    def embedding_modules(self) -> list[nn.Module]:
        """The vision patch + position embeddings and pre-layer-norm (trained only with `config.train_embeddings`)."""
        raise NotImplementedError

    def vision_parts(self) -> tuple[nn.Module, nn.Module, Sequence[nn.Module]]:
        """(embeddings, pre-layer-norm, encoder layers) of the vision tower."""
        raise NotImplementedError

    def needs_pixels(self) -> bool:
        """Whether the decoder reads the input pixels too (the film-decoder's pixel branch)."""
        return False

    def vision_grad(self) -> bool:
        """Whether the vision tower needs autograd now (some part of it trains and grad mode is on)."""
        return torch.is_grad_enabled() and (self.config.unfreeze_last > 0 or self.config.train_embeddings)

    # ---- shared behaviour ----------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, prompts: Sequence[str], masks: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None,
                visual: VisualPrompts | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training path: B images and P phrases → logits (P, S_out, S_out). Phrase p refers to image
        `image_index[p]` ((P,) long); without it P == B, one phrase per image.

        With `masks` (P, H, W) (the targets): (logits, text-token alignment loss), for models that have the
        alignment head (see `forward_with_alignment`). With `visual`, the phrases it names are conditioned on
        example crops instead of (or mixed with) their text (`conditions`)."""
        check_image_index(pixel_values.shape[0], len(prompts), image_index)
        if masks is not None:
            return self.forward_with_alignment(pixel_values, prompts, masks, image_index, visual)
        return self.decode(self.encode_images(pixel_values), self.conditions(prompts, visual), image_index)

    def conditions(self, prompts: Sequence[str], visual: VisualPrompts | None = None) -> torch.Tensor:
        """What the decoder is conditioned on for P phrases: `encode_text`'s embeddings, with `visual`'s example
        crops mixed into the phrases it names (`visual_prompt.condition_with`; pooled embeddings only)."""
        text = self.encode_text(prompts)
        if visual is None or not len(visual):
            return text
        if getattr(self.config, "word_attention", False):
            raise ValueError("visual prompts with word_attention models are not supported yet")
        return condition_with(self, text, visual)

    def forward_with_alignment(self, pixel_values: torch.Tensor, prompts: Sequence[str], masks: torch.Tensor,
                               image_index: torch.Tensor | None = None,
                               visual: VisualPrompts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` with masks (prompts already checked against images): (logits, alignment loss); only the
        film-decoder built with `text_alignment` has it."""
        raise ValueError(f"{type(self).__name__} has no text-token alignment head (text_alignment)")

    # ---- the frozen boundary: what a fine-tune can compute once per image (clipseg_model.feature_cache) ----
    def frozen_depth(self) -> int:
        """Leading vision layers that never train: the boundary of what training must recompute.

        -1 when the embeddings train (nothing of the vision tower is frozen: the pixels are the boundary)."""
        if self.config.train_embeddings:
            return -1
        return max(0, max(self.read_layers) - self.config.unfreeze_last)

    def _frozen_slots(self) -> list[int]:
        """Layer numbers `encode_frozen` returns, in order: read layers at or below the boundary, and the boundary."""
        depth, b = max(self.read_layers), self.frozen_depth()
        if b < 0:
            return []
        return sorted({r for r in self.read_layers if r <= b} | ({b} if b < depth else set()))

    def encode_frozen(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) → the activations training never changes (no autograd): the read layers at or below
        `frozen_depth`, then the boundary layer's output when layers above it train, then the pixels when the
        decoder or the trained embeddings read them. `encode_from_frozen` finishes the pass."""
        pixel_values = pixel_values.to(self.device)
        slots = self._frozen_slots()
        layers: list[torch.Tensor] = []
        if slots:
            embeddings, pre_norm, blocks = self.vision_parts()
            with torch.no_grad():
                layers = run_vision_layers(embeddings, pre_norm, blocks, pixel_values, slots)
        if self.frozen_depth() < 0 or self.needs_pixels():
            layers.append(pixel_values)
        return ImageFeatures([h.detach() for h in layers])

    def encode_from_frozen(self, frozen: ImageFeatures) -> ImageFeatures:
        """`encode_frozen`'s output → what `encode_images` returns for the same pixels (the trained layers run
        here, with autograd when they train)."""
        b = self.frozen_depth()
        if b < 0:
            return self.encode_images(frozen.layers[-1])
        slots = self._frozen_slots()
        known = dict(zip(slots, frozen.layers))
        depth = max(self.read_layers)
        if b < depth:
            embeddings, pre_norm, blocks = self.vision_parts()
            hidden = known[b]
            with torch.set_grad_enabled(self.vision_grad()):
                for number in range(b + 1, depth + 1):
                    hidden = blocks[number - 1](hidden, None)
                    if isinstance(hidden, tuple):  # older transformers return (hidden,)
                        hidden = hidden[0]
                    known[number] = hidden
        layers = [known[r] for r in self.read_layers]
        if self.needs_pixels():
            layers.append(frozen.layers[-1].to(layers[0].dtype))
        return ImageFeatures(layers)

    def apply_freezing(self) -> None:
        """Freeze the backbone except its last `config.unfreeze_last` vision layers (and the text tower with
        `config.train_text`, and its vision embeddings with `config.train_embeddings`)."""
        for module in self.backbone_modules():
            module.requires_grad_(False)
        k = self.config.unfreeze_last
        if k:
            for layer in self.unfreezable_layers()[-k:]:
                layer.requires_grad_(True)
        if self.config.train_text:
            for module in self.text_modules():
                module.requires_grad_(True)
        if self.config.train_embeddings:
            for module in self.embedding_modules():
                module.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "SegmentationModel":
        """Like nn.Module.train, but frozen backbone parts stay in eval mode (no dropout, fixed statistics)."""
        super().train(mode)
        if mode:
            for module in self.backbone_modules():
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that receive gradients: the decoder, plus unfrozen CLIP layers."""
        return (p for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the trainable part only: what a checkpoint stores."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        buffers = {name for name, _ in self.decoder_named_buffers()}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in names or k in buffers}

    def decoder_named_buffers(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    # ---- one backbone, many trainable states (per-project models) ----------------------------------------
    def trainable_state(self) -> TrainableState:
        """A copy of the current trainable part, tagged with `self.version`."""
        return TrainableState(self.version, {k: v.detach().clone() for k, v in self.trainable_tensors().items()},
                              self.calibrated_threshold)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The live trainable tensors (parameters that train, decoder buffers) by state-dict name."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        names |= {name for name, _ in self.decoder_named_buffers()}
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if k in names}

    def load_trainable_state(self, state: TrainableState, live: dict[str, torch.Tensor] | None = None) -> None:
        """Copy `state` into the model's trainable tensors in place (shapes must match); sets `version`.
        `live`: `trainable_tensors()` computed once by the caller (it walks the whole state dict: ~1-5 ms)."""
        own = live if live is not None else self.trainable_tensors()
        if set(own) != set(state.tensors):
            raise ValueError(f"state {state.version} does not fit this model's trainable part")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state.tensors[name])
        self.version = state.version

    def features_depend_on_trainable(self) -> bool:
        """Whether image features change with the trainable state (unfrozen vision layers or embeddings); when
        not, one feature cache serves every state."""
        return self.config.unfreeze_last > 0 or self.config.train_embeddings

    def text_depends_on_trainable(self) -> bool:
        """Whether text embeddings change with the trainable state (a trained text tower)."""
        return bool(self.config.train_text)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
        """RGB PIL images → (B, 3, S, S) float32, resized (no crop: masks must cover the whole image) and
        normalised with the backbone's mean/std."""
        size = size or self.config.image_size
        arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return (batch - mean) / std
