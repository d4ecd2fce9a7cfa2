"""What SDXL's U-Net is conditioned on, computed as SDXL was trained (Podell et al. 2023, "SDXL").

* Text (section 2.1): the penultimate hidden states of CLIP ViT-L (768) and of OpenCLIP ViT-bigG
  (1280), concatenated along the channel axis (2048), for cross-attention; and bigG's pooled,
  projected output at the EOS token (1280) for the addition embedding.
* Size and crop (section 2.2): six numbers per image, ``(original height, original width, crop
  top, crop left, target height, target width)``, each embedded with Fourier features and added to
  the time embedding (diffusers' ``added_cond_kwargs["time_ids"]``).

Long captions: like the SD path here (``engine/text.py``), a caption of up to 75/150/225 tokens is
encoded in 77-token chunks (BOS + 75 + EOS) by both encoders and the chunks are concatenated, which
is what A1111 and ComfyUI do at inference. sd-scripts encodes the same chunks and takes the pooled
output of the first chunk, as done here; it additionally drops the inner BOS/EOS of each chunk.
"""

from __future__ import annotations

import torch

from lora_gui.engine.text import chunk_token_ids, join_chunks


def _eos_pooled(text_encoder_2, last_hidden_state: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """bigG's pooled output: the (final-normed) state at the first EOS token, projected.

    sd-scripts does the same explicitly (``_pool_workaround``); transformers' CLIP pools at the
    largest token id for the legacy ``eos_token_id == 2`` configs, which is the EOS token too.
    """
    index = (ids == eos_id).int().argmax(dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=index.device), index]
    projection = text_encoder_2.text_projection
    return projection(pooled.to(projection.weight.dtype))


def encode_sdxl(tokenizers, text_encoders, captions: list[str], *, max_token_length: int = 75,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(states [B, 77 or 75 * chunks + 2, 768 + 1280], pooled [B, 1280]) for ``captions``: long
    captions joined as sd-scripts' ``get_hidden_states_sdxl`` (the first BOS, 75 states of each
    chunk, the last EOS/pad), the pooled vector from the first chunk."""
    (tok1, tok2), (te1, te2) = tokenizers, text_encoders
    ids1 = chunk_token_ids(tok1, captions, max_token_length)
    ids2 = chunk_token_ids(tok2, captions, max_token_length)
    b, n, length = ids1.shape
    flat1 = ids1.reshape(b * n, length).to(device or te1.device)
    flat2 = ids2.reshape(b * n, length).to(device or te2.device)
    states1 = te1(flat1, output_hidden_states=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True)
    states2 = out2.hidden_states[-2]
    pooled = _eos_pooled(te2, out2.last_hidden_state, flat2, tok2.eos_token_id)
    states = torch.cat([states1, states2.to(states1.dtype)], dim=-1)
    first_chunk = torch.arange(b, device=pooled.device) * n
    return join_chunks(states, n), pooled[first_chunk]


def time_ids(original_sizes, crop_top_lefts, bucket) -> torch.Tensor:
    """The six size/crop numbers per sample, [B, 6] float32; ``bucket`` is (width, height)."""
    target_hw = (bucket[1], bucket[0])
    rows = [(*orig, *crop, *target_hw) for orig, crop in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, dtype=torch.float32)
