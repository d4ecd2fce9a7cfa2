"""A kohya LoRA file as modules: ``<name>.lora_down.weight``, ``<name>.lora_up.weight``, ``<name>.alpha``.

The update a module adds to its layer's weight (Hu et al. 2021, eq. 3, with kohya's alpha / r
scale; REFERENCE.md section 2)::

    delta W = (alpha / r) * up @ down        Linear: up [out, r], down [r, in]
    conv:   up [out, r, 1, 1], down [r, in, k, k]  ->  (up.flat @ down.flat).reshape(out, in, k, k)

A missing alpha means alpha = r (scale 1), as in A1111 and diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

# Key suffixes of the LyCORIS types (KohakuBlueleaf/LyCORIS key format), to name a file's type.
_KIND_MARKERS = (
    ("LoHa", (".hada_w1_a",)),
    ("LoKr", (".lokr_w1", ".lokr_w1_a")),
    ("GLoRA", (".a1.weight",)),
    ("(IA)^3", (".on_input",)),
    ("full/diff", (".diff",)),
)


class LoraFormatError(ValueError):
    """The file is not a LoRA this tool can work on; the message is a sentence for the user."""


@dataclass
class LoraModule:
    name: str  # kohya module name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """A k x k convolution with k > 1 (the LoCon part); 1x1 convs count as linear layers."""
        return self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        out = int(self.up.shape[0])
        return (out, *self.down.shape[1:])


def network_kind(sd: Mapping[str, torch.Tensor]) -> str:
    """"LoRA", "LoCon" (some k x k conv module), a LyCORIS type name, or "unknown"."""
    if any(k.endswith(".dora_scale") for k in sd):
        base = "DoRA"
    else:
        base = None
    for kind, markers in _KIND_MARKERS:
        if any(k.endswith(m) for k in sd for m in markers):
            return kind if base is None else f"{kind} + DoRA"
    downs = [v for k, v in sd.items() if k.endswith(DOWN)]
    if not downs:
        return "unknown"
    locon = any(v.ndim == 4 and tuple(v.shape[2:]) != (1, 1) for v in downs)
    kind = "LoCon" if locon else "LoRA"
    return kind if base is None else f"{kind} + DoRA"


def split_modules(sd: Mapping[str, torch.Tensor], *, what: str = "The file") -> dict[str, LoraModule]:
    """{name: LoraModule} in file order; tensors as float32. Refuses other network types with a sentence."""
    kind = network_kind(sd)
    if kind not in DELTA_BUILDERS:
        if kind == "unknown":
            raise LoraFormatError(f"{what} holds no LoRA modules (no .lora_down.weight keys): choose a LoRA file.")
        raise LoraFormatError(
            f"{what} is a {kind} network; this tool works on plain LoRA and LoCon files only."
        )
    modules: dict[str, LoraModule] = {}
    for key, down in sd.items():
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        up = sd.get(name + UP)
        if up is None:
            raise LoraFormatError(f"{what} has {key} but no {name + UP}: the file is damaged.")
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{what}: {name} has a down rank {down.shape[0]} and an up rank {up.shape[1]}: the file is damaged."
            )
        rank = int(down.shape[0])
        alpha = float(sd[name + ALPHA].item()) if name + ALPHA in sd else float(rank)
        modules[name] = LoraModule(name, down.float(), up.float(), alpha)
    return modules


def lora_delta(module: LoraModule) -> torch.Tensor:
    """The weight update ``scale * up @ down`` in the layer's weight shape (float32)."""
    flat = module.up.reshape(module.up.shape[0], -1) @ module.down.reshape(module.rank, -1)
    return (flat * module.scale).reshape(module.weight_shape)


# kind -> the function giving a module's weight update. LyCORIS types join here.
DELTA_BUILDERS: dict[str, Callable[[LoraModule], torch.Tensor]] = {"LoRA": lora_delta, "LoCon": lora_delta}


def module_tensors(name: str, up: torch.Tensor, down: torch.Tensor, alpha: float,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The three kohya keys of one module."""
    return {
        name + DOWN: down.to(dtype).contiguous(),
        name + UP: up.to(dtype).contiguous(),
        name + ALPHA: torch.tensor(float(alpha), dtype=dtype),
    }
