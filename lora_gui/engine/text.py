"""Prompt encoding: clip_skip and long prompts in 75-token chunks.

Long prompts are split into chunks of 75 tokens; each chunk gets its own BOS and EOS (77 tokens)
and is encoded on its own. As kohya-ss/sd-scripts does when training (``SdTextEncodingStrategy.
encode_tokens``; its sample images use the same 75n+2 layout), the chunk outputs are joined into
75 n + 2 states: the first chunk's BOS state, the 75 inner states of every chunk (their own BOS and
EOS states dropped), and the last chunk's final (EOS or padding) state. AUTOMATIC1111 and ComfyUI
instead concatenate the whole 77-token chunks (77 n states) at inference, and A1111 moves a chunk
break back to the last comma within 20 tokens. Sampling here uses this same function.
"""

from __future__ import annotations

import re

import torch

CHUNK = 75  # CLIP's context is 77 = BOS + 75 tokens + EOS


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def _chunk_rows(bodies: list[list], n_chunks: int, bos, eos, pad) -> list[list[list]]:
    """Each body cut into ``n_chunks`` rows of 77: BOS, up to 75 items, EOS, padding. A chunk with
    text ends with EOS right after it (as the tokenizer does for one chunk); an empty chunk is BOS,
    EOS, padding (sd-scripts ``_get_input_ids`` gives the same rows)."""
    rows = []
    for body in bodies:
        body = list(body)[: n_chunks * CHUNK]
        parts = [body[c * CHUNK:(c + 1) * CHUNK] for c in range(n_chunks)]
        rows.append([[bos, *part, eos] + [pad] * (CHUNK - len(part)) for part in parts])
    return rows


def _special_ids(tokenizer) -> tuple[int, int, int]:
    eos = tokenizer.eos_token_id
    return tokenizer.bos_token_id, eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


def chunk_token_ids(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """Token ids [B, n_chunks, 77]: each chunk is BOS + 75 tokens (padded) + EOS."""
    n_chunks = max(1, max_token_length // CHUNK)
    body = tokenizer(captions, add_special_tokens=False, truncation=False).input_ids
    return torch.tensor(_chunk_rows(body, n_chunks, *_special_ids(tokenizer)), dtype=torch.long)


# A1111's attention syntax, as sd-scripts' TokenizeStrategy._re_attention reads it.
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:([+-]?[.\d]+)\)|\)|]|[^\\()\[\]:]+|:")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a caption in AUTOMATIC1111's attention syntax (sd-scripts
    ``parse_prompt_attention``): ``(a)`` x1.1, ``[a]`` /1.1, ``(a:1.3)`` x1.3, nested brackets
    multiply, an unclosed bracket reaches to the end, ``\\(`` etc. are literal; neighbouring runs of
    the same weight are merged."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token in ("(", "["):
            (round_open if token == "(" else square_open).append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            runs.append([token, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    merged: list[list] = []
    for text_part, weight in runs or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text_part
        else:
            merged.append([text_part, weight])
    return [(t, w) for t, w in merged]


def weighted_token_ids(tokenizer, captions: list[str], max_token_length: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights [B, n_chunks, 77] of captions with attention weights
    (sd-scripts ``_get_weighted_input_ids``): each run is tokenized on its own, its tokens carry
    its weight; BOS, EOS and padding weigh 1."""
    n_chunks = max(1, max_token_length // CHUNK)
    bodies, weights = [], []
    for caption in captions:
        ids: list[int] = []
        ws: list[float] = []
        for text_part, weight in parse_attention(caption):
            part = tokenizer(text_part, add_special_tokens=False).input_ids if text_part else []
            ids += part
            ws += [weight] * len(part)
        bodies.append(ids)
        weights.append(ws)
    ids = torch.tensor(_chunk_rows(bodies, n_chunks, *_special_ids(tokenizer)), dtype=torch.long)
    return ids, torch.tensor(_chunk_rows(weights, n_chunks, 1.0, 1.0, 1.0), dtype=torch.float32)


def join_chunks(states: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[B * n, 77, D] chunk states -> [B, 75 n + 2, D] (sd-scripts ``encode_tokens``): BOS of the
    first chunk, states 1..75 of each chunk, the last state of the last chunk. One chunk stays 77."""
    length, dim = states.shape[1], states.shape[2]
    states = states.reshape(-1, n_chunks, length, dim)
    if n_chunks == 1:
        return states[:, 0]
    inner = states[:, :, 1:length - 1].reshape(states.shape[0], n_chunks * (length - 2), dim)
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def encode_prompts(tokenizer, text_encoder, captions: list[str], *, max_token_length: int = 75,
                   clip_skip: int = 1, device=None, weighted: bool = False) -> torch.Tensor:
    """Hidden states [B, 75 * n_chunks + 2, D] used as the U-Net's cross-attention input.

    ``weighted`` (weighted_captions): the captions' attention weights multiply their tokens' hidden
    states (sd-scripts ``SdTextEncodingStrategy.encode_tokens_with_weights``, no renormalisation).

    clip_skip = N takes the output of the N-th layer from the end, followed by the final layer
    norm (N = 1 is the last layer's normed output, the standard conditioning).
    """
    weights = None
    if weighted:
        ids, weights = weighted_token_ids(tokenizer, captions, max_token_length)
    else:
        ids = chunk_token_ids(tokenizer, captions, max_token_length)
    b, n, length = ids.shape
    flat = ids.reshape(b * n, length).to(device or text_encoder.device)
    if clip_skip <= 1:
        states = text_encoder(flat).last_hidden_state
    else:
        out = text_encoder(flat, output_hidden_states=True)
        states = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    if weights is not None:
        states = states * weights.reshape(b * n, length, 1).to(states.device, states.dtype)
    return join_chunks(states, n)
