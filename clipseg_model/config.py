"""Model configuration: one dataclass for both architectures, and the named presets.

A `ModelConfig` is everything needed to rebuild a model: it is stored (as JSON) next to every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

FILM_DECODER = "film-decoder"
CLIPSEG_RD64 = "clipseg-rd64"
ARCHITECTURES = (FILM_DECODER, CLIPSEG_RD64)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and preprocessing of a segmentation model.

    `base_model` names the pretrained part: a CLIP checkpoint for `film-decoder`, a CLIPSeg checkpoint for
    `clipseg-rd64` (hub id or local directory; relative paths are resolved against the checkpoint directory).
    """

    architecture: str = FILM_DECODER
    base_model: str = "openai/clip-vit-base-patch16"
    image_size: int = 224  # square network input, pixels
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # --- film-decoder only ---
    d_model: int = 768  # decoder width
    n_layers: int = 3  # decoder transformer layers (self-attention + 4x FFN, post-norm)
    n_heads: int = 12
    dropout: float = 0.1
    extract_layers: tuple[int, ...] = ()  # CLIP layers (1-based) whose tokens feed the decoder; () = last hidden state
    learned_upsampler: bool = False  # transposed convolutions instead of one bilinear step
    pixel_channels: int = 0  # >0: a full-resolution pixel branch of this width, FiLM'd by the phrase, refines the
    # learned upsampler's output (sharper boundaries than a patch grid allows); 0: off (the seed and CLIPSeg)
    pixel_coordinates: bool = False  # the pixel branch's phrase FiLM also sees each pixel's (x, y) (CoordConv): a
    # direction word ("left", "top") gets a one-step path to the logits, as a colour word has through the stem
    pixel_stride: int = 1  # 1: the pixel branch works at the input resolution; 2: its stem is a stride-2 conv and it
    # works at half the side (a quarter of the convolution work; its logits are resized to `output_size`)
    pixel_token_layers: int = 0  # with pixel_tokens: 3x3 convolutions at the patch grid after the strided ones;
    # each widens what a pixel token sees by a patch on every side (0: 19 px at patch 8, less than a large object)
    pixel_tokens: bool = False  # the pixel branch also feeds the decoder: strided convs down to the patch grid,
    # added to the image tokens before FiLM (local shape evidence a ViT trained from scratch learns slowly)
    text_alignment: bool = False  # a head for text-token alignment training (`align_weight` of the recipe)
    alignment_trains_text: bool = True  # the alignment loss's gradient also reaches the text tower; False: it trains
    # the image side only (text detached), so it cannot pull phrases the image tokens cannot tell apart ("the
    # leftmost shape" / "the rightmost shape": a token cannot see that it is leftmost) onto one embedding
    word_attention: bool = False  # decoder layers also cross-attend to the text tower's per-token states (padding
    # masked), not only FiLM on the pooled sentence: "the LEFT one", "the BIGGER dog" stay words the decoder reads
    decoder_positions: bool = False  # add a learned projection of each patch's (x, y) (Fourier features, any grid
    # size) to the decoder's image tokens: where a token is, for "left", "top", "middle"
    relative_positions: bool = False  # the decoder's self-attention adds a learned bias per head from each token
    # pair's offset (dx, dy) (an MLP of the normalised offset, any grid size): "is there one of them to my left?" is
    # then one attention hop, what "leftmost" and "second from the right" need
    output_size: int = 224  # side of the logit map the model returns (seed: 224)
    # --- both ---
    unfreeze_last: int = 0  # train the last k CLIP vision layers too (0: CLIP frozen)
    train_text: bool = False  # train the CLIP text tower too (for models trained from scratch; off for real CLIP)
    train_embeddings: bool = False  # train the vision patch/position embeddings + pre-norm too (from-scratch models)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.pixel_channels and not (self.learned_upsampler and self.architecture == FILM_DECODER):
            raise ValueError("pixel_channels needs the film-decoder with learned_upsampler")
        if self.pixel_tokens and not self.pixel_channels:
            raise ValueError("pixel_tokens needs a pixel branch (pixel_channels > 0)")
        if self.pixel_coordinates and not self.pixel_channels:
            raise ValueError("pixel_coordinates needs a pixel branch (pixel_channels > 0)")
        if self.pixel_token_layers < 0 or (self.pixel_token_layers and not self.pixel_tokens):
            raise ValueError("pixel_token_layers needs pixel_tokens and must be >= 0")
        if self.pixel_stride not in (1, 2):
            raise ValueError(f"pixel_stride must be 1 or 2, got {self.pixel_stride}")
        if self.pixel_stride != 1 and not self.pixel_channels:
            raise ValueError("pixel_stride needs a pixel branch (pixel_channels > 0)")
        for option in ("text_alignment", "word_attention", "decoder_positions", "relative_positions"):
            if getattr(self, option) and self.architecture != FILM_DECODER:
                raise ValueError(f"{option} needs the film-decoder")
        object.__setattr__(self, "extract_layers", tuple(int(i) for i in self.extract_layers))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class TinyBackbone:
    """Sizes of a random-weight CLIP/CLIPSeg backbone that `clipseg model init` builds for tests and benchmarks."""

    hidden: int = 32
    layers: int = 4
    heads: int = 2
    patch: int = 16
    image: int = 64
    projection: int = 32
    text_layers: int = 2
    reduce_dim: int = 16  # CLIPSeg decoder width


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    description: str
    backbone: TinyBackbone | None = None  # None: full-size (ViT-B/16 shapes)
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "seed": Preset(
        ModelConfig(),
        "the seed design: frozen CLIP ViT-B/16 at 224 px, last hidden state, FiLM, 3 post-norm layers, bilinear x16",
    ),
    "improved": Preset(
        ModelConfig(
            image_size=352,
            d_model=256,
            n_heads=8,
            extract_layers=(3, 6, 9),
            learned_upsampler=True,
            output_size=352,
            word_attention=True,
            decoder_positions=True,
        ),
        "CLIP layers 3/6/9, 352 px with interpolated position embeddings, learned upsampler, word-level "
        "cross-attention to the phrase's tokens, decoder position features",
    ),
    "clipseg-rd64": Preset(
        ModelConfig(
            architecture=CLIPSEG_RD64,
            base_model="CIDAS/clipseg-rd64-refined",
            image_size=352,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            output_size=352,
        ),
        "transformers' CLIPSegForImageSegmentation (CIDAS/clipseg-rd64-refined): the zero-shot default",
    ),
    "tiny-seed": Preset(
        ModelConfig(image_size=64, d_model=32, n_heads=2, n_layers=1, output_size=64),
        "tests: the seed design on a tiny random CLIP",
        TinyBackbone(),
    ),
    "tiny-improved": Preset(
        ModelConfig(image_size=96, d_model=32, n_heads=2, n_layers=1, extract_layers=(1, 2, 3),
                    learned_upsampler=True, output_size=96),
        "tests: the improved options on a tiny random CLIP (trained at 64 px, run at 96 px)",
        TinyBackbone(),
    ),
    "tiny-pixel": Preset(
        ModelConfig(image_size=64, d_model=32, n_heads=2, n_layers=1, extract_layers=(2, 4), learned_upsampler=True,
                    output_size=64, pixel_channels=4, pixel_tokens=True, pixel_coordinates=True, text_alignment=True),
        "tests: the film-decoder's pixel branch (full-resolution refinement + pixel tokens + coordinates) and "
        "text-token alignment head on a tiny random CLIP",
        TinyBackbone(),
    ),
    "tiny-words": Preset(
        ModelConfig(image_size=64, d_model=32, n_heads=2, n_layers=2, extract_layers=(2, 4), learned_upsampler=True,
                    output_size=64, word_attention=True, decoder_positions=True, relative_positions=True,
                    text_alignment=True),
        "tests: the film-decoder's word-level cross-attention, decoder positions and relative-position attention "
        "bias on a tiny random CLIP",
        TinyBackbone(),
    ),
    "tiny-clipseg": Preset(
        ModelConfig(architecture=CLIPSEG_RD64, base_model="", image_size=64, image_mean=IMAGENET_MEAN,
                    image_std=IMAGENET_STD, output_size=64),
        "tests: CLIPSegForImageSegmentation with a tiny random backbone",
        TinyBackbone(),
    ),
    # The CPU learning benchmark's model (benchmarks/learning_cpu.py; training preset of the same name): everything
    # random and trained, 64 px, 8 x 8 patch grid, pixel branch, alignment head, word attention, decoder positions,
    # pixel coordinates + relative-position bias (together: position phrases 0.42 -> 0.77, docs/training.md).
    "cpu-scratch": Preset(
        ModelConfig(image_size=64, d_model=64, n_heads=4, n_layers=2, dropout=0.0, extract_layers=(2, 4),
                    learned_upsampler=True, output_size=64, pixel_channels=32, pixel_tokens=True, pixel_stride=2,
                    pixel_token_layers=2, pixel_coordinates=True, relative_positions=True,
                    text_alignment=True, word_attention=True, decoder_positions=True, unfreeze_last=4,
                    train_text=True, train_embeddings=True),
        "CPU learning benchmark: small random CLIP (patch 8, 64 px) trained from scratch, pixel branch (stride 2, "
        "2 token layers) with coordinates, text-token alignment, word attention, decoder positions, relative-position bias "
        "(train with --preset cpu-scratch)",
        TinyBackbone(hidden=64, layers=4, heads=4, patch=8, image=64, projection=64, text_layers=2),
    ),
    "small-film": Preset(
        ModelConfig(image_size=96, d_model=64, n_heads=4, n_layers=2, extract_layers=(2, 4),
                    learned_upsampler=True, output_size=96, unfreeze_last=4, train_text=True),
        "CPU learning benchmark: small random CLIP (patch 8), everything trained from scratch",
        TinyBackbone(hidden=64, layers=4, heads=4, patch=8, image=96, projection=64, text_layers=2),
    ),
}


def preset(name: str) -> Preset:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
