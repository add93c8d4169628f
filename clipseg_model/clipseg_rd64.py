"""`clipseg-rd64`: transformers' CLIPSegForImageSegmentation behind the encode-once / decode-many interface.

The ordinary HF call runs the whole vision tower once per prompt although the decoder reads only layers
`extract_layers` (3, 6, 9 of 12). Here the vision tower runs once per image and stops at the deepest layer read;
the decoder receives the activations expanded to one row per prompt, which gives the same logits.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import CLIPSegForImageSegmentation

from clipseg_model.config import ModelConfig
from clipseg_model.segmenter_base import ImageFeatures, SegmentationModel, run_vision_layers
from clipseg_model.text import tokenize


class ClipSegRd64Model(SegmentationModel):
    """CLIPSeg (frozen CLIP + reduce-dim FiLM decoder) with a single, truncated vision pass per image."""

    def __init__(self, config: ModelConfig, hf_model: CLIPSegForImageSegmentation, tokenizer):
        super().__init__()
        self.config = config
        self.hf = hf_model
        self.tokenizer = tokenizer
        # hidden_states[i + 1] in HF's forward is the output of (0-based) layer i, i.e. 1-based layer i + 1.
        self.read_layers = tuple(i + 1 for i in hf_model.config.extract_layers)
        self.text_max_positions = hf_model.config.text_config.max_position_embeddings
        self.apply_freezing()

    def backbone_modules(self) -> list[torch.nn.Module]:
        return [self.hf.clip]

    def embedding_modules(self) -> list[torch.nn.Module]:
        return [self.hf.clip.vision_model.embeddings, self.hf.clip.vision_model.pre_layrnorm]

    def text_modules(self):
        return [self.hf.clip.text_model, self.hf.clip.text_projection]

    def vision_parts(self):
        vision = self.hf.clip.vision_model
        return vision.embeddings, vision.pre_layrnorm, vision.encoder.layers

    def unfreezable_layers(self) -> list[torch.nn.Module]:
        return list(self.hf.clip.vision_model.encoder.layers[: max(self.read_layers)])

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) → the activations of layers `extract_layers`, each (B, 1 + N, 768)."""
        vision = self.hf.clip.vision_model
        grad = self.vision_grad()
        with torch.set_grad_enabled(grad):
            layers = run_vision_layers(
                vision.embeddings, vision.pre_layrnorm, vision.encoder.layers, pixel_values.to(self.device), self.read_layers
            )
        return ImageFeatures(layers)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """P phrases → (P, projection_dim) conditional embeddings."""
        tokens = tokenize(self.tokenizer, prompts, self.text_max_positions, self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_text):
            return self.hf.clip.get_text_features(**tokens).pooler_output

    def decode(self, features: ImageFeatures, text: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (P, S, S) for P prompts (S = input size: the decoder's transposed convolution undoes the patching).

        The same computation as HF's `CLIPSegDecoder.forward`, reordered: each layer's `reduce` projection
        (768 → reduce_dim) depends on the image only, so it runs once per image and only the reduced activations
        are expanded to one row per prompt (8 prompts: 30 % less decoder time, 12x less memory traffic).
        """
        dec = self.hf.decoder
        # HF walks the activations deepest first: reduces[0] belongs to the deepest layer read.
        reduced = [reduce(h) for reduce, h in zip(dec.reduces, features.layers[::-1])]  # (B, 1 + N, rd) each
        if image_index is not None:
            index = image_index.to(reduced[0].device)
            reduced = [r.index_select(0, index) for r in reduced]  # (P, 1 + N, rd) each
        text = text.to(reduced[0].dtype)
        output = None
        for i, (r, layer) in enumerate(zip(reduced, dec.layers)):
            output = r if output is None else r + output
            if i == dec.conditional_layer:  # FiLM: gamma(t) * x + beta(t)
                output = dec.film_mul(text)[:, None, :] * output + dec.film_add(text)[:, None, :]
            output = layer(output, None)
            if isinstance(output, tuple):  # older transformers return (hidden,)
                output = output[0]
        output = output[:, 1:, :].transpose(1, 2)  # drop CLS: (P, rd, N)
        grid = int(math.isqrt(output.shape[2]))
        logits = dec.transposed_convolution(output.reshape(output.shape[0], output.shape[1], grid, grid))[:, 0]
        size = self.config.output_size
        if logits.shape[-1] != size:
            logits = F.interpolate(logits.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        return logits

    def decoder_named_buffers(self):
        return ((f"hf.decoder.{n}", b) for n, b in self.hf.decoder.named_buffers())
