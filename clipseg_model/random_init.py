"""`clipseg model init`: build any preset with random weights on disk, in the same layout real models load from.

Tests, benchmarks and offline smoke runs then exercise the real `from_pretrained` path; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from clipseg_model.checkpoint import save_checkpoint
from clipseg_model.config import CLIPSEG_RD64, Preset, TinyBackbone, preset
from clipseg_model.loading import build_model
from clipseg_model.vocab import build_tokenizer

log = logging.getLogger(__name__)

FULL = TinyBackbone(hidden=768, layers=12, heads=12, patch=16, image=224, projection=512, text_layers=12, reduce_dim=64)
FULL_TEXT = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)


def _text_config(b: TinyBackbone, tokenizer, full: bool) -> dict:
    sizes = FULL_TEXT if full else dict(hidden_size=b.hidden, intermediate_size=4 * b.hidden,
                                        num_attention_heads=b.heads, num_hidden_layers=b.text_layers)
    return dict(
        **sizes,
        vocab_size=max(len(tokenizer), 49408 if full else len(tokenizer)),
        max_position_embeddings=77,
        projection_dim=b.projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vision_config(b: TinyBackbone) -> dict:
    return dict(hidden_size=b.hidden, intermediate_size=4 * b.hidden, num_attention_heads=b.heads,
                num_hidden_layers=b.layers, patch_size=b.patch, image_size=b.image, projection_dim=b.projection)


def write_backbone(p: Preset, out: Path, tokenizer, seed: int) -> None:
    """Random CLIP (film-decoder) or CLIPSeg (clipseg-rd64) weights + tokenizer + preprocessor config in `out`."""
    full = p.backbone is None
    b = p.backbone or FULL
    torch.manual_seed(seed)
    text_cfg, vision_cfg = _text_config(b, tokenizer, full), _vision_config(b)
    if p.config.architecture == CLIPSEG_RD64:
        from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

        depth = b.layers
        extract = [3, 6, 9] if full else [max(1, depth // 4), max(2, depth // 2), max(3, 3 * depth // 4)]
        config = CLIPSegConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=b.projection,
                               reduce_dim=b.reduce_dim, extract_layers=[i - 1 for i in extract] if not full else extract,
                               decoder_num_attention_heads=4 if full else 2, decoder_intermediate_size=2048 if full else 4 * b.reduce_dim,
                               conditional_layer=0, use_complex_transposed_convolution=True)
        model = CLIPSegForImageSegmentation(config)
    else:
        from transformers import CLIPConfig, CLIPModel

        model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=b.projection))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = p.config.image_size
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": size, "width": size}, "do_normalize": True,
        "image_mean": list(p.config.image_mean), "image_std": list(p.config.image_std),
    }, indent=2))


def init_model(preset_name: str, out_dir: str | Path, seed: int = 0, bpe_path: Path | None = None,
               config_changes: dict | None = None, tokenizer=None) -> Path:
    """Create `out_dir` holding preset `preset_name` with random weights (backbone in `out_dir/base`).

    `config_changes` override fields of the preset's ModelConfig (decoder options; the backbone keeps the preset's
    sizes); `tokenizer` replaces the default vocabulary (`build_tokenizer`), e.g. a word-level one built from the
    training phrases (`vocab.word_level_tokenizer`).
    """
    p = preset(preset_name)
    if config_changes:
        p = dataclasses.replace(p, config=p.config.replace(**config_changes))
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    if tokenizer is not None:
        vocab_kind = f"given ({len(tokenizer)} tokens)"
    else:
        tokenizer, vocab_kind = build_tokenizer(bpe_path)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        base = staging / "base"
        base.mkdir()
        write_backbone(p, base, tokenizer, seed)
        torch.manual_seed(seed + 1)
        model = build_model(p.config.replace(base_model=str(base)), "cpu")
        meta = {"version": f"init-{preset_name}-{seed}", "preset": preset_name, "random_weights": True,
                "vocabulary": vocab_kind, "parent": None, "config_changes": dict(config_changes or {})}
        save_checkpoint(model, out_dir, meta, base_dir=base, move_base=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s (preset %s, random weights, %s vocabulary)", out_dir, preset_name, vocab_kind)
    return out_dir
