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

import torch

CHUNK = 75  # CLIP's context is 77 = BOS + 75 tokens + EOS


def _final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def chunk_token_ids(tokenizer, captions: list[str], max_token_length: int) -> torch.Tensor:
    """Token ids [B, n_chunks, 77]: each chunk is BOS + 75 tokens (padded) + EOS."""
    n_chunks = max(1, max_token_length // CHUNK)
    body = tokenizer(captions, add_special_tokens=False, truncation=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for ids in body:
        ids = list(ids)[: n_chunks * CHUNK]
        chunks = []
        for c in range(n_chunks):
            part = ids[c * CHUNK:(c + 1) * CHUNK]
            # A chunk with text ends with EOS right after the text, then padding (as the tokenizer
            # does for one chunk); an empty chunk is BOS, EOS, padding.
            row = [bos, *part, eos] + [pad] * (CHUNK - len(part))
            chunks.append(row)
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


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
                   clip_skip: int = 1, device=None) -> torch.Tensor:
    """Hidden states [B, 75 * n_chunks + 2, D] used as the U-Net's cross-attention input.

    clip_skip = N takes the output of the N-th layer from the end, followed by the final layer
    norm (N = 1 is the last layer's normed output, the standard conditioning).
    """
    ids = chunk_token_ids(tokenizer, captions, max_token_length)
    b, n, length = ids.shape
    flat = ids.reshape(b * n, length).to(device or text_encoder.device)
    if clip_skip <= 1:
        states = text_encoder(flat).last_hidden_state
    else:
        out = text_encoder(flat, output_hidden_states=True)
        states = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return join_chunks(states, n)
