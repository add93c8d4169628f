"""CLIP tokenizer files without network access.

transformers ships no CLIP vocabulary. `clipseg model init` therefore derives the real one from OpenAI's
`bpe_simple_vocab_16e6.txt.gz` (found in an installed `open_clip` package or given as a path) and falls back to a
byte-level vocabulary (every UTF-8 byte, no merges) that tokenises any text, for tests and benchmarks.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # merges used by CLIP (vocabulary 49,408)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_clip_bpe() -> Path | None:
    """The OpenAI BPE file inside an installed open_clip package, without importing it (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / CLIP_BPE_FILE
        if candidate.is_file():
            return candidate
    return None


def tokenizer_from_bpe(path: Path, n_merges: int = CLIP_MERGES) -> CLIPTokenizer:
    """Build the CLIP tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (vocabulary 49,408)."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : n_merges + 1]]
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab_list)}, merges=merges)


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP-compatible tokenizer with only byte tokens (514 entries): any text, longer sequences than CLIP's."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab_list)}, merges=[])


def build_tokenizer(bpe_path: Path | None = None) -> tuple[CLIPTokenizer, str]:
    """The best tokenizer available offline and a word saying which ("clip-bpe" or "byte-level")."""
    path = bpe_path or find_clip_bpe()
    if path is not None:
        return tokenizer_from_bpe(Path(path)), "clip-bpe"
    return byte_level_tokenizer(), "byte-level"


def word_level_tokenizer(words: list[str]) -> CLIPTokenizer:
    """A CLIP-compatible BPE tokenizer whose merges make each of `words` ONE token (other text falls back to bytes).

    Merges are added word by word: a word that does not yet come out as a single token gets merges that join
    the tokens it currently splits into. New merges rank after all earlier ones, so they cannot change how an
    already single-token word is split; the loop ends when every word is one token.
    """
    chars = list(bytes_to_unicode().values())
    base = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []

    def make() -> CLIPTokenizer:
        vocab = list(dict.fromkeys(base + [a + b for a, b in merges] + [BOS, EOS]))
        return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges))

    tokenizer = make()
    for _ in range(len(words) + 1):
        split = [tokenizer.tokenize(w) for w in sorted(set(words))]
        split = [t for t in split if len(t) > 1]
        if not split:
            return tokenizer
        for tokens in split:
            current = tokens[0]
            for nxt in tokens[1:]:
                if (current, nxt) not in merges:
                    merges.append((current, nxt))
                current += nxt
        tokenizer = make()
    raise RuntimeError("word-level merges did not converge")
