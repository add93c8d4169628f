"""`film-decoder`: the seed design. Frozen CLIP encodes image and phrase; FiLM conditions the image tokens on the
phrase (`gamma(t) * x + beta(t)`); a few post-norm transformer layers decode; a linear head gives one logit per
patch; upsampling gives the mask.

With `word_attention` the decoder layers also cross-attend to the phrase's per-token text states (CRIS and LAVT
fuse word-level text with the image; a pooled sentence vector blurs "left" / "bigger" into the noun). The text
representation `encode_text` returns is then one tensor per phrase that packs the pooled embedding and the token
states (see `pack_text`), so callers keep caching one row per phrase.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from clipseg_model.config import ModelConfig
from clipseg_model.segmenter_base import ImageFeatures, SegmentationModel, run_vision_layers
from clipseg_model.text import tokenize
from clipseg_model.visual_prompt import VisualPrompts


# Fixed offset of the alignment logits: with cosines near 0 at the start, every token begins well on the background
# side (most tokens are background).
ALIGN_BIAS = -5.0


class FiLM(nn.Module):
    """Feature-wise linear modulation: x * gamma(t) + beta(t), both linear in the text embedding."""

    def __init__(self, text_dim: int, d_model: int):
        super().__init__()
        self.gamma = nn.Linear(text_dim, d_model)
        self.beta = nn.Linear(text_dim, d_model)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x: (P, T, d_model) tokens, text: (P, text_dim) → (P, T, d_model)."""
        return self.gamma(text).unsqueeze(1) * x + self.beta(text).unsqueeze(1)

    def maps(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The same modulation on channel-first maps: x (P, d_model, H, W), text (P, text_dim) → (P, d_model, H, W)."""
        return self.gamma(text)[:, :, None, None] * x + self.beta(text)[:, :, None, None]


def pack_text(pooled: torch.Tensor, words: torch.Tensor, valid: torch.Tensor, length: int) -> torch.Tensor:
    """One tensor per phrase holding both text representations, padded to a fixed `length` so rows from different
    batches stack (the predictor caches one row per phrase).

    pooled (P, D), words (P, T, H), valid (P, T) bool → (P, 1 + length, max(D, H) + 1): row 0 holds the pooled
    embedding, rows 1.. the token states; the last channel is 1 where a row holds a real token, 0 for padding.
    """
    n, t, h = words.shape
    d = pooled.shape[1]
    if t > length:
        raise ValueError(f"{t} tokens do not fit a packed length of {length}")
    out = pooled.new_zeros(n, 1 + length, max(d, h) + 1)
    out[:, 0, :d] = pooled
    out[:, 0, -1] = 1
    out[:, 1 : 1 + t, :h] = words * valid[..., None].to(words.dtype)
    out[:, 1 : 1 + t, -1] = valid.to(out.dtype)
    return out


def unpack_text(text: torch.Tensor, pooled_dim: int, word_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_text`, cut to the longest phrase present: (P, 1 + L, C + 1) → pooled (P, pooled_dim),
    words (P, T, word_dim), valid (P, T) bool with T = the most real tokens of any phrase."""
    valid = text[:, 1:, -1] > 0.5  # (P, L)
    t = max(1, int(valid.sum(1).max()))  # padding is at the end of each row
    return text[:, 0, :pooled_dim], text[:, 1 : 1 + t, :word_dim], valid[:, :t]


def patch_centres(grid: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(x, y) of each patch's centre in [0, 1], row-major like the ViT's patch tokens → (grid * grid, 2) float32."""
    centres = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], -1)


class PositionFeatures(nn.Module):
    """Where each patch is: a learned projection of fixed Fourier features of its centre's (x, y) in [0, 1].

    Defined on normalised coordinates, so it works at any grid size (a model trained at 64 px runs at 96 px).
    """

    def __init__(self, d_model: int, frequencies: int = 6):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32) / 2,
                             persistent=False)
        self.proj = nn.Linear(4 * frequencies, d_model)

    def forward(self, grid: int) -> torch.Tensor:
        """→ (grid * grid, d_model), row-major like the ViT's patch tokens."""
        angles = patch_centres(grid, self.freqs.device)[..., None] * self.freqs  # (N, 2, F)
        features = torch.cat([angles.sin(), angles.cos()], -1).flatten(1)  # (N, 4F)
        return self.proj(features.to(self.proj.weight.dtype))


class RelativePositionBias(nn.Module):
    """A learned additive attention bias per head from each token pair's offset (continuous relative position bias,
    as Swin v2): an MLP of the normalised offset (dx, dy) = (key - query) in [-1, 1], so it works at any grid size.
    The last layer starts at zero: a new model attends as it would without it. CLS rows and columns get 0.
    """

    def __init__(self, n_heads: int, hidden: int = 32):
        super().__init__()
        self.n_heads = n_heads
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, n_heads))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, grid: int) -> torch.Tensor:
        """→ (n_heads, 1 + grid^2, 1 + grid^2) bias for tokens [CLS, row-major patches]."""
        xy = patch_centres(grid, self.mlp[0].weight.device)  # (N, 2)
        offsets = xy[None, :, :] - xy[:, None, :]  # (N query, N key, 2)
        bias = self.mlp(offsets.to(self.mlp[0].weight.dtype)).permute(2, 0, 1)  # (H, N, N)
        return F.pad(bias, (1, 0, 1, 0))  # CLS row and column: 0


class LearnedUpsampler(nn.Module):
    """Patch grid → pixels with transposed convolutions (x`scale`), in place of one bilinear step.

    With `head=False` there is no final 1x1 convolution: it returns `out_channels` maps at full resolution, for a
    pixel branch to turn into logits.
    """

    def __init__(self, d_model: int, scale: int, head: bool = True):
        super().__init__()
        if scale & (scale - 1):
            raise ValueError(f"learned upsampler needs a power-of-two patch size, got {scale}")
        hidden = max(16, d_model // 2)
        layers: list[nn.Module] = [nn.Conv2d(d_model, hidden, 3, padding=1), nn.GELU()]
        while scale > 1:
            step = 4 if scale % 4 == 0 else 2
            out = max(8, hidden // 2)
            layers += [nn.ConvTranspose2d(hidden, out, step, stride=step), nn.GELU()]
            hidden, scale = out, scale // step
        if head:
            layers.append(nn.Conv2d(hidden, 1, 1))
        self.net = nn.Sequential(*layers)
        self.out_channels = hidden

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(P, d_model, g, g) → (P, 1, g * scale, g * scale), or (P, out_channels, ...) without the head."""
        return self.net(grid)


class PixelBranch(nn.Module):
    """Pixel-level refinement: a small conv stem on the input pixels, FiLM-conditioned on the phrase, fused
    with the learned upsampler's maps, gives the logits. The patch grid says which object; the pixels say
    exactly where its edges are (a patch grid alone blurs them over `patch` pixels).

    With `stride` 2 the stem's first convolution has stride 2 and the branch works at half the input side R = S / 2
    (a quarter of the convolution work); else R = S.
    """

    def __init__(self, text_dim: int, channels: int, upsampler_channels: int, patch: int = 0, d_model: int = 0,
                 coordinates: bool = False, stride: int = 1, token_layers: int = 0):
        super().__init__()
        # With `coordinates`, two maps of each pixel's (x, y) in [-1, 1] join the stem's maps before the phrase's
        # FiLM: gelu(gamma(t) * x + beta(t)) is then a soft half-plane ("left of here"), one step from the logits.
        self.coordinates = coordinates
        film_channels = channels + (2 if coordinates else 0)
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=stride, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        # Optional: stride-2 convolutions from the stem down to the patch grid, giving d_model features per patch.
        self.to_tokens: nn.Sequential | None = None
        if patch:
            if patch % stride:
                raise ValueError(f"pixel_stride {stride} does not divide the patch size {patch}")
            patch //= stride
            if patch & (patch - 1):
                raise ValueError(f"pixel tokens need a power-of-two patch size, got {patch}")
            layers: list[nn.Module] = []
            width = channels
            while patch > 1:
                out = d_model if patch == 2 else min(2 * width, d_model)
                layers += [nn.GELU(), nn.Conv2d(width, out, 3, stride=2, padding=1)]
                width, patch = out, patch // 2
            for _ in range(token_layers):  # at the patch grid: each sees one more patch on every side
                layers += [nn.GELU(), nn.Conv2d(width, width, 3, padding=1)]
            self.to_tokens = nn.Sequential(*layers)
        self.film = FiLM(text_dim, film_channels)
        self.fuse = nn.Sequential(nn.Conv2d(film_channels + upsampler_channels, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, 1, 1))

    def tokens(self, stem: torch.Tensor) -> torch.Tensor:
        """Stem maps (B, C, R, R) → (B, (S/patch)^2, d_model) per-patch features, row-major like the ViT's tokens."""
        return self.to_tokens(stem).flatten(2).transpose(1, 2)

    def forward(self, stem: torch.Tensor, maps: torch.Tensor, text: torch.Tensor,
                image_index: torch.Tensor | None) -> torch.Tensor:
        """stem (B, C, R, R) = self.stem(pixels), maps (P, C_up, R, R), text (P, text_dim) → logits (P, 1, R, R)."""
        x = stem
        if image_index is not None:
            x = x.index_select(0, image_index.to(x.device))
        if self.coordinates:
            h, w = x.shape[-2:]
            ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x, then y
            x = torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], 1)
        x = F.gelu(self.film.maps(x, text))
        if maps.shape[-2:] != x.shape[-2:]:
            maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, maps], 1))


class FilmDecoderModel(SegmentationModel):
    """CLIP ViT + FiLM + transformer decoder. See `ModelConfig` for the options the `seed`/`improved` presets set."""

    def __init__(self, config: ModelConfig, clip: CLIPModel, tokenizer):
        super().__init__()
        self.config = config
        # One CLIPModel holds both towers (the same weights as CLIPVisionModelWithProjection +
        # CLIPTextModelWithProjection, read from the checkpoint once).
        self.clip = clip
        self.vision = clip.vision_model  # embeddings, pre_layrnorm, encoder
        self.tokenizer = tokenizer
        vision_cfg, text_cfg = clip.config.vision_config, clip.config.text_config
        width = vision_cfg.hidden_size
        self.patch_size = vision_cfg.patch_size
        self.text_max_positions = text_cfg.max_position_embeddings
        text_dim = clip.config.projection_dim
        n_vision_layers = vision_cfg.num_hidden_layers
        self.read_layers = config.extract_layers or (n_vision_layers,)
        if max(self.read_layers) > n_vision_layers:
            raise ValueError(f"extract_layers {config.extract_layers} exceed the {n_vision_layers} CLIP layers")

        # Several layers are projected and summed; the seed reads the last layer as is (width == d_model there).
        if len(self.read_layers) == 1 and width == config.d_model:
            self.reduces = nn.ModuleList([nn.Identity()])
        else:
            self.reduces = nn.ModuleList([nn.Linear(width, config.d_model) for _ in self.read_layers])
        self.text_dim = text_dim
        self.word_dim = text_cfg.hidden_size
        self.film = FiLM(text_dim, config.d_model)
        layer_options = dict(dim_feedforward=4 * config.d_model, dropout=config.dropout, activation="gelu",
                             batch_first=True, norm_first=False)
        self.word_proj: nn.Linear | None = None
        if config.word_attention:
            # Self-attention over image tokens, then cross-attention from image tokens to the phrase's words.
            self.word_proj = nn.Linear(self.word_dim, config.d_model)
            self.blocks: nn.Module = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(config.d_model, config.n_heads, **layer_options), config.n_layers)
        else:
            self.blocks = nn.TransformerEncoder(nn.TransformerEncoderLayer(config.d_model, config.n_heads, **layer_options),
                                                config.n_layers, enable_nested_tensor=False)
        self.positions = PositionFeatures(config.d_model) if config.decoder_positions else None
        self.relative_bias = RelativePositionBias(config.n_heads) if config.relative_positions else None
        if config.pixel_channels and self.patch_size % config.pixel_stride:
            raise ValueError(f"pixel_stride {config.pixel_stride} does not divide the patch size {self.patch_size}")
        if config.learned_upsampler:
            # With a pixel branch the upsampler stops at the branch's resolution (input side / pixel_stride).
            scale = self.patch_size // config.pixel_stride if config.pixel_channels else self.patch_size
            self.upsampler: LearnedUpsampler | None = LearnedUpsampler(config.d_model, scale,
                                                                       head=not config.pixel_channels)
            self.head = None
        else:
            self.upsampler = None
            self.head = nn.Linear(config.d_model, 1)
        self.pixel_branch = (PixelBranch(text_dim, config.pixel_channels, self.upsampler.out_channels,
                                         self.patch_size if config.pixel_tokens else 0, config.d_model,
                                         config.pixel_coordinates, config.pixel_stride, config.pixel_token_layers)
                             if config.pixel_channels else None)
        # Text-token alignment (training only): image tokens → text-embedding space, see `alignment_loss`.
        self.align_head = nn.Linear(config.d_model, text_dim) if config.text_alignment else None
        self.align_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if config.text_alignment else None
        self.apply_freezing()

    def backbone_modules(self) -> list[nn.Module]:
        return [self.clip]

    def embedding_modules(self) -> list[nn.Module]:
        return [self.vision.embeddings, self.vision.pre_layrnorm]

    def text_modules(self):
        return [self.clip.text_model, self.clip.text_projection]

    def vision_parts(self):
        return self.vision.embeddings, self.vision.pre_layrnorm, self.vision.encoder.layers

    def needs_pixels(self) -> bool:
        return self.pixel_branch is not None

    def unfreezable_layers(self) -> list[nn.Module]:
        return list(self.vision.encoder.layers[: max(self.read_layers)])

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """(B, 3, S, S) → features: one (B, 1 + (S/patch)^2, width) tensor per read layer, then (with a pixel
        branch) the (B, 3, S, S) pixels themselves."""
        grad = self.vision_grad()
        with torch.set_grad_enabled(grad):
            layers = run_vision_layers(
                self.vision.embeddings, self.vision.pre_layrnorm, self.vision.encoder.layers,
                pixel_values.to(self.device), self.read_layers,
            )
        if self.pixel_branch is not None:
            layers.append(pixel_values.to(self.device, layers[0].dtype))
        return ImageFeatures(layers)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """P phrases → (P, projection_dim) CLIP text embeddings; with `word_attention` the packed
        (P, 1 + max_positions, C + 1) pooled embedding + per-token states (`pack_text`)."""
        tokens = tokenize(self.tokenizer, prompts, self.text_max_positions, self.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_text):
            if not self.config.word_attention:
                return self.clip.get_text_features(**tokens).pooler_output
            out = self.clip.text_model(**tokens)
            pooled = self.clip.text_projection(out.pooler_output)  # (P, projection_dim)
            return pack_text(pooled, out.last_hidden_state, tokens["attention_mask"].bool(), self.text_max_positions)

    def pooled_text(self, text: torch.Tensor) -> torch.Tensor:
        """The sentence embedding (P, projection_dim) of what `encode_text` returned."""
        return text[:, 0, : self.text_dim] if self.config.word_attention else text

    def image_tokens(self, features: ImageFeatures) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's phrase-independent input, once per image: tokens (B, 1 + N, d_model) (CLS first) and,
        with a pixel branch, its stem maps (B, C, R, R) (R = S / pixel_stride; else None)."""
        tokens = features.layers[: len(self.reduces)]
        x = sum(reduce(h) for reduce, h in zip(self.reduces, tokens))  # (B, 1 + N, d_model)
        if self.positions is not None:
            position = self.positions(int(math.isqrt(x.shape[1] - 1))).to(x.dtype)  # (N, d_model)
            x = torch.cat([x[:, :1], x[:, 1:] + position], 1)
        stem = None
        if self.pixel_branch is not None:
            stem = self.pixel_branch.stem(features.layers[-1].to(x.dtype))  # (B, C, R, R)
            if self.pixel_branch.to_tokens is not None:
                x = torch.cat([x[:, :1], x[:, 1:] + self.pixel_branch.tokens(stem)], 1)
        return x, stem

    def decode(self, features: ImageFeatures, text: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Features of B images + (P, text_dim) embeddings → logits (P, output_size, output_size)."""
        return self.decode_tokens(*self.image_tokens(features), text, image_index)

    def alignment_loss(self, tokens: torch.Tensor, text: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Text-to-token alignment (CRIS's text-to-pixel alignment, on the patch grid): every image token,
        projected into the text-embedding space, should point towards its phrase's embedding where the target
        covers it and away from it elsewhere. It teaches the image features what phrases name (a shape, say)
        directly, at every token, instead of only through which mask the decoder picked.

        logit = exp(align_logit_scale) * cos(align_head(token), text) + ALIGN_BIAS, binary cross-entropy against
        the share of the token's patch that the mask covers.

        tokens (B, 1 + N, d_model) from `image_tokens` (CLS ignored), text (B, text_dim) (or what `encode_text`
        returned), masks (B, H, W) in [0, 1] → a scalar.
        """
        if self.align_head is None:
            raise ValueError(f"{type(self).__name__} has no text-token alignment head (text_alignment)")
        if text.dim() == 3:
            text = self.pooled_text(text)
        grid = int(math.isqrt(tokens.shape[1] - 1))
        covered = F.adaptive_avg_pool2d(masks.to(tokens.dtype)[:, None], grid).flatten(1)  # (B, N)
        projected = F.normalize(self.align_head(tokens[:, 1:]).float(), dim=-1)  # (B, N, text_dim)
        if not self.config.alignment_trains_text:
            text = text.detach()
        cosine = torch.einsum("bnd,bd->bn", projected, F.normalize(text.float(), dim=-1))  # (B, N)
        logits = self.align_logit_scale.clamp(max=math.log(100)).exp() * cosine + ALIGN_BIAS
        return F.binary_cross_entropy_with_logits(logits, covered.float())

    def forward_with_alignment(self, pixel_values: torch.Tensor, prompts: Sequence[str], masks: torch.Tensor,
                               image_index: torch.Tensor | None = None,
                               visual: VisualPrompts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training path with text-token alignment: B images, P phrases (phrase p on image `image_index[p]`,
        default p), (P, H, W) target masks → (logits (P, S_out, S_out), alignment loss scalar); tokens align
        with each phrase's condition (its visual prompt where `visual` gives one)."""
        if self.align_head is None:
            return super().forward_with_alignment(pixel_values, prompts, masks, image_index)  # raises: no head
        text = self.conditions(prompts, visual)
        x, stem = self.image_tokens(self.encode_images(pixel_values))
        rows = x if image_index is None else x.index_select(0, image_index.to(x.device))  # (P, 1 + N, d_model)
        return self.decode_tokens(x, stem, text, image_index), self.alignment_loss(rows, text, masks.to(x.device))

    def decode_tokens(self, x: torch.Tensor, stem: torch.Tensor | None, text: torch.Tensor,
                      image_index: torch.Tensor | None = None) -> torch.Tensor:
        """`image_tokens` of B images + (P, text_dim) embeddings → logits (P, output_size, output_size)."""
        if image_index is not None:
            x = x.index_select(0, image_index.to(x.device))  # (P, 1 + N, d_model)
        grid = int(math.isqrt(x.shape[1] - 1))
        bias = None
        if self.relative_bias is not None:  # (P * n_heads, 1 + N, 1 + N), what nn.MultiheadAttention adds per head
            bias = self.relative_bias(grid).to(x.dtype)
            bias = bias.unsqueeze(0).expand(x.shape[0], -1, -1, -1).reshape(-1, *bias.shape[1:])
        if self.word_proj is not None:
            text, words, valid = unpack_text(text, self.text_dim, self.word_dim)  # (P, D), (P, T, H), (P, T)
            x = self.film(x, text.to(x.dtype))
            memory = self.word_proj(words.to(x.dtype))  # (P, T, d_model)
            x = self.blocks(x, memory, tgt_mask=bias, memory_key_padding_mask=~valid)[:, 1:]  # drop CLS: (P, N, d_model)
        else:
            x = self.film(x, text.to(x.dtype))
            x = self.blocks(x, mask=bias)[:, 1:]  # drop CLS: (P, N, d_model)
        if self.upsampler is not None:
            # (P, 1, g*patch, g*patch); with a pixel branch (P, C, R, R) maps, which it turns into logits (P, 1, R, R)
            maps = self.upsampler(x.transpose(1, 2).reshape(x.shape[0], -1, grid, grid))
            if self.pixel_branch is not None:
                maps = self.pixel_branch(stem, maps, text.to(x.dtype), image_index)  # (P, 1, R, R)
        else:
            maps = self.head(x).transpose(1, 2).reshape(x.shape[0], 1, grid, grid)  # (P, 1, g, g)
        size = self.config.output_size
        if maps.shape[-1] != size:
            maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        return maps[:, 0]
