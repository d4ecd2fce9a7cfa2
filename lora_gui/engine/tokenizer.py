"""CLIP's BPE tokenizer, built offline from the merges file shipped in ``assets/``.

CLIP (Radford et al. 2021) and OpenCLIP use the same byte-level BPE vocabulary. Its merges file
(``bpe_simple_vocab_16e6.txt.gz``, from the MIT-licensed open_clip project, see
``assets/LICENSE-open_clip.txt``) is all we need: CLIP derives its vocabulary from it as

1. the 256 byte characters (GPT-2's printable byte-to-unicode mapping), in that mapping's order,
2. the same 256 characters with the end-of-word marker ``</w>``,
3. one token per merge, the two halves joined, for the first ``49152 - 256 - 2`` merges,
4. ``<|startoftext|>`` and ``<|endoftext|>``,

49408 tokens in all. A prefix of the merge list is again a valid (smaller) BPE tokenizer, which
the tiny demo model uses so that its text encoder's embedding table stays small.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses (lines 1..48894 after the header)
CLIP_VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context: 75 tokens + BOS + EOS


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping (bytes that print keep their code)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _all_merges() -> tuple[tuple[str, str], ...]:
    raw = resources.files("lora_gui.engine").joinpath("assets", BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the next CLIP_NUM_MERGES lines.
    return tuple(tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1])  # type: ignore[misc]


def clip_vocab_and_merges(
    max_merges: int | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id) and merge list, optionally truncated to ``max_merges``."""
    merges = list(_all_merges())
    if max_merges is not None:
        if not 0 <= max_merges <= len(merges):
            raise ValueError(f"max_merges must be between 0 and {len(merges)}, got {max_merges}.")
        merges = merges[:max_merges]
    chars = list(_byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def clip_tokenizer(max_merges: int | None = None, pad_token: str = EOS):
    """A ``CLIPTokenizer`` (fast, tokenizers-backed) built with no download.

    ``max_merges=None`` gives CLIP's full 49408-token tokenizer (SD 1.x; SD 2.x uses the same with
    ``pad_token="!"``). A smaller value gives a valid tokenizer with ``512 + max_merges + 2`` tokens.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(max_merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )
