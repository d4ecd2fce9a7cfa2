"""LoRA / LoCon on Stable Diffusion, with kohya-format save and load.

The adapter layers come from peft (one adapter per model, injected in place); this module only
chooses the targets the way kohya-ss/sd-scripts does and maps them to and from the file format
that A1111, ComfyUI and diffusers load (REFERENCE.md, section 2):

* ``lora_unet_<module path, dots as underscores>`` and ``lora_te_text_model_<...>`` keys, each with
  ``.lora_down.weight`` [r, in(, k, k)], ``.lora_up.weight`` [out, r(, 1, 1)] and a scalar ``.alpha``;
* forward ``W x + up(down(x)) * alpha / r`` (Hu et al. 2021, "LoRA", eq. 3 with the alpha / r scale);
  peft's default init (down Kaiming-uniform with a = sqrt(5), up zeros) is kohya's init.

Dropout follows kohya (``networks/lora.py`` ``LoRAModule.forward``), not peft's ``lora_dropout``
(which drops the *input* of the down projection): a forward hook on each down projection drops its
output features (``network_dropout``), whole rank channels per sample (``rank_dropout``, rescaled by
1 / (1 - p)) or, with probability ``module_dropout``, the module's whole update. All three act only in
train mode and change neither the weights nor the file format.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from peft import LoraConfig, inject_adapter_in_model  # noqa: E402  (after the logging tweak)
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

from lora_gui.atomic import atomic_open  # noqa: E402
from lora_gui.engine.blocks import SD_BLOCKS, BlockLayout, block_lr_weights  # noqa: E402

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
SAVE_FORMATS = ("safetensors", "ckpt", "pt")

# kohya-ss/sd-scripts networks/lora.py targets: every Linear / 1x1 conv inside these U-Net blocks...
_UNET_ATTENTION_BLOCKS = ("Transformer2DModel",)
# ...and, with conv_dim ("LoCon"), every Linear / conv inside these.
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# CLIP text encoder: attention q/k/v/out projections and the MLP (12 layers x 6 = 72 in SD 1.x).
_TE_TARGET = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass
class NetworkSpec:
    """What to inject: rank/alpha for Linear and 1x1 conv, conv_rank/conv_alpha for kxk convs."""

    rank: int
    alpha: float
    conv_rank: int = 0
    conv_alpha: float | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = True
    # sd-scripts block_dims/block_alphas (one per U-Net block of ``blocks``: SD 25, SDXL 23; Linear
    # and 1x1 conv modules) and conv_block_dims/_alphas (kxk convs; None = no conv LoRA); a rank of
    # 0 leaves a block out.
    blocks: BlockLayout = SD_BLOCKS
    block_ranks: tuple[tuple[int, float], ...] | None = None
    conv_block_ranks: tuple[tuple[int, float], ...] | None = None
    # dim_from_weights: kohya name -> (rank, alpha) read from a LoRA file; other modules get none.
    module_ranks: dict[str, tuple[int, float]] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"The LoRA rank (network_dim) must be at least 1, got {self.rank}.")
        if self.alpha <= 0:
            raise ValueError(f"The LoRA alpha (network_alpha) must be positive, got {self.alpha}.")
        if self.conv_rank < 0:
            raise ValueError(f"The conv rank (conv_dim) must be 0 (off) or positive, got {self.conv_rank}.")
        if self.conv_alpha is not None and self.conv_alpha <= 0:
            raise ValueError(f"The conv alpha must be positive, got {self.conv_alpha}.")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"The network {name} is a probability in [0, 1), got {getattr(self, name)}.")
        if not (self.train_unet or self.train_text_encoder):
            raise ValueError("Train at least one of the U-Net and the text encoder.")

    @classmethod
    def from_settings(cls, settings, blocks: BlockLayout = SD_BLOCKS) -> NetworkSpec:
        """The network a run trains, read from its (already validated) settings; ``blocks`` is the
        family's U-Net block numbering (``blocks.block_layout``)."""
        tr, adv = settings.training, settings.advanced
        spec = cls(rank=tr.network_dim, alpha=tr.network_alpha, conv_rank=adv.conv_dim,
                   conv_alpha=adv.conv_alpha, dropout=adv.network_dropout,
                   rank_dropout=adv.rank_dropout, module_dropout=adv.module_dropout,
                   train_unet=settings.train_unet, train_text_encoder=settings.train_text_encoder,
                   blocks=blocks)
        spec.block_ranks, spec.conv_block_ranks = spec.per_block(adv)
        return spec

    def per_block(self, adv) -> tuple[tuple | None, tuple | None]:
        """(block ranks, conv block ranks) as sd-scripts ``create_network`` builds them
        (``get_block_dims_and_alphas``, ``remove_block_dims_and_alphas``): only when block dims or
        block-wise LR weights are given; missing lists are the network's rank/alpha (conv: the conv
        rank/alpha, or none); blocks whose LR weight is 0 get no LoRA at all."""
        lr_weights = block_lr_weights(adv.down_lr_weight, adv.mid_lr_weight, adv.up_lr_weight,
                                      adv.block_lr_zero_threshold, self.blocks)
        if not adv.block_dims.strip() and lr_weights is None:
            return None, None

        def table(dims: str, alphas: str, rank: int, alpha: float) -> list[tuple[int, float]]:
            n = self.blocks.total
            d = [int(v) for v in dims.split(",")] if dims.strip() else [rank] * n
            a = [float(v) for v in alphas.split(",")] if alphas.strip() else [alpha] * n
            return [(r if lr_weights is None or lr_weights[i] else 0, a[i]) for i, r in enumerate(d)]

        blocks = table(adv.block_dims, adv.block_alphas, self.rank, self.alpha)
        conv = None
        if adv.conv_block_dims.strip() or self.conv_rank:
            conv = table(adv.conv_block_dims, adv.conv_block_alphas, self.conv_rank, self.effective_conv_alpha)
        return tuple(blocks), tuple(conv) if conv else None

    def rank_of(self, target: _Target) -> tuple[int, float]:
        """(rank, alpha) of one target module; rank 0 = no LoRA there (sd-scripts ``create_modules``)."""
        if self.module_ranks is not None:
            return self.module_ranks.get(target.kohya_name, (0, 0.0))
        if target.part == "unet" and self.block_ranks is not None:
            table = self.conv_block_ranks if target.is_conv else self.block_ranks
            index = self.blocks.index(target.kohya_name)
            return table[index] if table is not None and index >= 0 else (0, 0.0)
        return (self.conv_rank, self.effective_conv_alpha) if target.is_conv else (self.rank, self.alpha)

    @property
    def locon(self) -> bool:
        """Whether the kxk convolutions are targets at all."""
        return bool(self.conv_rank or self.conv_block_ranks or self.module_ranks)

    @property
    def effective_conv_alpha(self) -> float:
        """kohya's default: conv_alpha falls back to 1.0 when only conv_dim is given."""
        return 1.0 if self.conv_alpha is None else float(self.conv_alpha)


@dataclass(frozen=True)
class _Target:
    part: str  # "unet" or "text_encoder"
    path: str  # module path inside the model
    kohya_name: str
    is_conv: bool  # kxk conv with k > 1: gets the conv rank/alpha


def _is_1x1_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _unet_targets(unet: nn.Module, locon: bool, module_names: Mapping[str, str] | None = None) -> list[_Target]:
    """kohya's U-Net targets; ``module_names`` maps a module path to the path the file names it by
    (SDXL files use the original U-Net's paths; SD 1.x/2.x files diffusers' own)."""
    blocks = _UNET_ATTENTION_BLOCKS + (_UNET_CONV_BLOCKS if locon else ())
    found: dict[str, _Target] = {}
    for block_path, block in unet.named_modules():
        if type(block).__name__ not in blocks:
            continue
        for sub_path, module in block.named_modules():
            path = f"{block_path}.{sub_path}" if block_path else sub_path
            if isinstance(module, nn.Linear) or _is_1x1_conv(module):
                is_conv = False
            elif isinstance(module, nn.Conv2d) and type(block).__name__ in _UNET_CONV_BLOCKS:
                is_conv = True
            else:
                continue
            name = UNET_PREFIX + (module_names[path] if module_names else path).replace(".", "_")
            found.setdefault(path, _Target("unet", path, name, is_conv))
    return list(found.values())


def _te_targets(text_encoder: nn.Module, prefix: str = TE_PREFIX) -> list[_Target]:
    targets = []
    for path, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear) and _TE_TARGET.search(path):
            # transformers 5 flattened CLIPTextModel (no `text_model.` level); A1111/ComfyUI expect it.
            kohya_path = path if path.startswith("text_model.") else f"text_model.{path}"
            targets.append(_Target("text_encoder", path, prefix + kohya_path.replace(".", "_"), False))
    return targets


def _inject(model: nn.Module, targets: list[_Target], spec: NetworkSpec) -> dict[str, LoraLayer]:
    """Inject one peft adapter covering `targets`; return {kohya_name: peft layer}."""
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already has LoRA adapters; apply the network to a fresh model."
        )
    ranks = {t.path: spec.rank_of(t) for t in targets}
    targets = [t for t in targets if ranks[t.path][0] > 0]
    if not targets:
        return {}
    # Full module paths as peft patterns: each target gets exactly its own rank and alpha.
    differing = [t.path for t in targets if ranks[t.path] != (spec.rank, spec.alpha)]
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=[t.path for t in targets],
        rank_pattern={re.escape(p): ranks[p][0] for p in differing},
        alpha_pattern={re.escape(p): ranks[p][1] for p in differing},
        lora_dropout=0.0,  # kohya's dropouts act after lora_down: see kohya_dropout_hook
        init_lora_weights=True,  # A: kaiming_uniform_(a=sqrt(5)), B: zeros == kohya
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    layers: dict[str, LoraLayer] = {}
    for t in targets:
        layer = model.get_submodule(t.path)
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            raise RuntimeError(f"peft did not wrap {t.path} ({type(layer).__name__}) with a LoRA layer.")
        expected_r = ranks[t.path][0]
        if layer.r[ADAPTER_NAME] != expected_r:
            raise RuntimeError(f"peft gave {t.path} rank {layer.r[ADAPTER_NAME]} instead of {expected_r}.")
        layers[t.kohya_name] = layer
        if spec.dropout or spec.rank_dropout or spec.module_dropout:
            layer.lora_A[ADAPTER_NAME].register_forward_hook(kohya_dropout_hook(spec))
    return layers


def kohya_dropout_hook(spec: NetworkSpec):
    """A forward hook for a LoRA down projection that applies kohya's three dropouts to its output
    ``lx`` (sd-scripts ``LoRAModule.forward``), in kohya's order and with kohya's random draws:

    * module dropout: with probability p (one draw per call) the update is 0 (lx * 0; up(0) = 0);
    * network dropout: ``F.dropout(lx, p)`` (elements, scaled by 1 / (1 - p));
    * rank dropout: a [batch, rank] keep-mask (broadcast over tokens or pixels) times 1 / (1 - p).
    """
    def hook(module: nn.Module, args, lx: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return lx
        if spec.module_dropout and torch.rand(1) < spec.module_dropout:
            return lx * 0
        if spec.dropout:
            lx = nn.functional.dropout(lx, p=spec.dropout)
        if spec.rank_dropout:
            mask = torch.rand((lx.size(0), lx.size(1 if lx.ndim == 4 else -1)), device=lx.device) \
                > spec.rank_dropout
            if lx.ndim == 3:
                mask = mask.unsqueeze(1)  # [B, tokens, r]
            elif lx.ndim == 4:
                mask = mask[..., None, None]  # conv: [B, r, h, w]
            lx = lx * mask.to(lx.dtype) / (1.0 - spec.rank_dropout)
        return lx

    return hook


def _lora_params(layers: dict[str, LoraLayer]) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for layer in layers.values():
        params += list(layer.lora_A[ADAPTER_NAME].parameters())
        params += list(layer.lora_B[ADAPTER_NAME].parameters())
    return params


class LoraNetwork:
    """The LoRA adapters injected into a U-Net and a CLIP text encoder, addressed by kohya name."""

    def __init__(self, spec: NetworkSpec, unet_layers: dict[str, LoraLayer], te_layers: dict[str, LoraLayer]):
        self.spec = spec
        self._layers = {"unet": unet_layers, "text_encoder": te_layers}

    @classmethod
    def apply(cls, unet: nn.Module | None, text_encoder: nn.Module | None, spec: NetworkSpec, *,
              unet_module_names: Mapping[str, str] | None = None,
              text_encoders: Sequence[tuple[str, nn.Module]] | None = None) -> LoraNetwork:
        """Inject adapters in place, freeze the models, and make only the (float32) LoRA weights trainable.

        ``text_encoders`` = [(key prefix, encoder), ...] for a family with several (SDXL:
        ``lora_te1_``, ``lora_te2_``); otherwise ``text_encoder`` is named ``lora_te_``.
        """
        if text_encoders is None:
            text_encoders = [(TE_PREFIX, text_encoder)] if text_encoder is not None else []
        for model in (unet, *(m for _, m in text_encoders)):
            if model is not None:
                model.requires_grad_(False)
        unet_layers: dict[str, LoraLayer] = {}
        te_layers: dict[str, LoraLayer] = {}
        if spec.train_unet:
            if unet is None:
                raise ValueError("train_unet is set but no U-Net was given.")
            targets = _unet_targets(unet, locon=spec.locon, module_names=unet_module_names)
            if not targets:
                raise ValueError("The U-Net has no Transformer2DModel (or ResNet) blocks to put LoRA on.")
            unet_layers = _inject(unet, targets, spec)
            if not unet_layers and spec.module_ranks is None:
                raise ValueError("advanced.block_dims: every U-Net block has rank 0 (from the block dims or "
                                 "block-wise LR weights of 0): give some blocks a rank.")
        if spec.train_text_encoder:
            if not text_encoders:
                raise ValueError("train_text_encoder is set but no text encoder was given.")
            for prefix, encoder in text_encoders:
                targets = _te_targets(encoder, prefix)
                if not targets:
                    raise ValueError("The text encoder has no CLIP attention/MLP layers to put LoRA on.")
                te_layers.update(_inject(encoder, targets, spec))
        network = cls(spec, unet_layers, te_layers)
        for layer in network._all_layers().values():
            # Keep LoRA weights in float32 even on an fp16/bf16 base; peft casts activations per layer.
            for module in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                module.to(torch.float32).requires_grad_(True)
        return network

    def unet_parameters(self) -> list[nn.Parameter]:
        return _lora_params(self._layers["unet"])

    def text_encoder_parameters(self) -> list[nn.Parameter]:
        return _lora_params(self._layers["text_encoder"])

    def module_parameters(self, part: str) -> dict[str, tuple[list[nn.Parameter], list[nn.Parameter]]]:
        """kohya name -> (lora_down parameters, lora_up parameters) of one part ("unet" or
        "text_encoder"), for per-module optimizer groups (LoRA+, block-wise learning rates)."""
        return {name: (list(layer.lora_A[ADAPTER_NAME].parameters()), list(layer.lora_B[ADAPTER_NAME].parameters()))
                for name, layer in self._layers[part].items()}

    def module_names(self) -> dict[str, list[str]]:
        """Kohya module names (keys without .lora_down.weight / .lora_up.weight / .alpha) per part."""
        return {part: list(layers) for part, layers in self._layers.items()}

    def _all_layers(self) -> dict[str, LoraLayer]:
        # kohya writes the text encoder's modules first.
        return {**self._layers["text_encoder"], **self._layers["unet"]}

    def state_dict_kohya(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """kohya keys -> CPU tensors in `dtype` (alpha included, as a 0-d tensor, like sd-scripts)."""
        sd: dict[str, torch.Tensor] = {}
        for name, layer in self._all_layers().items():
            down = layer.lora_A[ADAPTER_NAME].weight
            up = layer.lora_B[ADAPTER_NAME].weight
            sd[f"{name}.lora_down.weight"] = (
                down.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
            )
            sd[f"{name}.lora_up.weight"] = up.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
            sd[f"{name}.alpha"] = torch.tensor(float(layer.lora_alpha[ADAPTER_NAME]), dtype=dtype)
        return sd

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's output by ``multiplier`` (a LoRA's "strength" or weight in A1111):
        peft's ``set_scale`` makes scaling = multiplier * alpha / r. 1.0 is training's scale."""
        for layer in self._all_layers().values():
            layer.set_scale(ADAPTER_NAME, multiplier)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """Max-norm regularisation of each module's update (sd-scripts
        ``LoRANetwork.apply_max_norm_regularization``): where ||up @ down * alpha / r|| (Frobenius,
        the conv update for conv modules) exceeds ``max_norm``, scale up and down by
        sqrt(max_norm / norm). Returns (modules scaled, mean and max of the norms afterwards)."""
        layers = list(self._all_layers().values())
        if not layers:
            return 0, 0.0, 0.0
        pairs = [(layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight) for layer in layers]
        norms = torch.stack([update_weight(down, up).norm() * (layer.lora_alpha[ADAPTER_NAME] / layer.r[ADAPTER_NAME])
                             for (down, up), layer in zip(pairs, layers)])
        # 1 where the norm is within the limit (x * 1.0 == x: those weights stay bit for bit).
        ratios = torch.clamp(max_norm / norms, max=1.0)
        for (down, up), ratio in zip(pairs, ratios.sqrt()):
            down.mul_(ratio)
            up.mul_(ratio)
        after = norms * ratios
        # One read of the device for the three figures, not one per module.
        scaled, mean, largest = torch.stack([(ratios < 1).sum().float(), after.mean(), after.max()]).tolist()
        return int(scaled), mean, largest

    def load_state_dict_kohya(self, sd: dict[str, torch.Tensor]) -> None:
        """Load weights of an existing kohya LoRA (lora_model_for_resume).

        The file must have exactly this network's modules and ranks. A module's alpha comes from the
        file (a missing alpha means alpha = rank, as in A1111 and diffusers), so the loaded network
        computes exactly what the file computes elsewhere; a differing alpha is logged.
        """
        layers = self._all_layers()
        expected = {f"{n}.lora_{d}.weight" for n in layers for d in ("down", "up")}
        allowed = expected | {f"{n}.alpha" for n in layers}
        missing = sorted(expected - sd.keys())
        unexpected = sorted(k for k in sd if k not in allowed)
        if missing or unexpected:
            raise ValueError(_key_mismatch_sentence(missing, unexpected))
        mismatches = []
        for name, layer in layers.items():
            for direction, module in (
                ("down", layer.lora_A[ADAPTER_NAME]),
                ("up", layer.lora_B[ADAPTER_NAME]),
            ):
                key = f"{name}.lora_{direction}.weight"
                if tuple(sd[key].shape) != tuple(module.weight.shape):
                    mismatches.append((key, tuple(sd[key].shape), tuple(module.weight.shape)))
        if mismatches:
            key, got, want = mismatches[0]
            rank_at = 0 if key.endswith("lora_down.weight") else 1
            raise ValueError(
                f"The LoRA file does not fit this network: {key} has shape {list(got)} where the network expects "
                f"{list(want)} (rank {got[rank_at]} in the file, {want[rank_at]} here)"
                + (f", and {len(mismatches) - 1} more tensors differ" if len(mismatches) > 1 else "")
                + "; set network_dim / conv_dim to the file's ranks."
            )
        with torch.no_grad():
            for name, layer in layers.items():
                down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
                down.copy_(sd[f"{name}.lora_down.weight"].to(down.dtype))
                up.copy_(sd[f"{name}.lora_up.weight"].to(up.dtype))
                r = layer.r[ADAPTER_NAME]
                alpha = float(sd[f"{name}.alpha"].item()) if f"{name}.alpha" in sd else float(r)
                if not math.isclose(alpha, layer.lora_alpha[ADAPTER_NAME], rel_tol=1e-3):
                    logger.warning(
                        "%s: alpha %g from the file replaces %g", name, alpha, layer.lora_alpha[ADAPTER_NAME]
                    )
                layer.lora_alpha[ADAPTER_NAME] = alpha
                layer.set_scale(ADAPTER_NAME, 1.0)  # scaling = alpha / r


def ranks_in_file(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """kohya name -> (rank, alpha) of every module of a LoRA file (sd-scripts
    ``create_network_from_weights``: the rank is lora_down's first dimension, a missing alpha is the
    rank)."""
    ranks = {k[: -len(".lora_down.weight")]: int(v.shape[0]) for k, v in tensors.items()
             if k.endswith(".lora_down.weight")}
    return {name: (r, float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(r))
            for name, r in ranks.items()}


def update_weight(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """up @ down as a weight of the base layer's shape (without alpha / r): a matrix product for
    Linear and 1x1 conv modules, the composed convolution for a kxk down with a 1x1 up."""
    if down.ndim == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[..., None, None]
    return nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)


def _key_mismatch_sentence(missing: list[str], unexpected: list[str]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys of this network are missing from the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} keys in the file are not in this network ({some(unexpected)})")
    keys = missing + unexpected
    hint = ""
    if all(k.startswith("lora_te") for k in keys):
        hint = " (was the file trained with a different text-encoder setting?)"
    elif all(k.startswith(UNET_PREFIX) and ("resnets" in k or "samplers" in k) for k in keys):
        hint = " (was the file trained with a different conv_dim, LoCon on or off?)"
    elif all(k.startswith(UNET_PREFIX) for k in keys):
        hint = " (was the file trained with a different U-Net setting?)"
    return "The LoRA file does not match this network: " + " and ".join(parts) + hint + "."


# --- files -------------------------------------------------------------------------------------


def _final_path(path: str | os.PathLike, fmt: str) -> Path:
    if fmt not in SAVE_FORMATS:
        raise ValueError(f"Unknown LoRA file format {fmt!r}; use one of {', '.join(SAVE_FORMATS)}.")
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix in SAVE_FORMATS and suffix != fmt:
        raise ValueError(f"The file name {path.name} ends in .{suffix} but the format is {fmt}.")
    return path if suffix == fmt else path.with_name(f"{path.name}.{fmt}")


def save_lora(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None,
    fmt: str,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a LoRA file atomically (temp file in the same folder, then os.replace); return its path.

    ``.{fmt}`` is appended when the name has no LoRA suffix. safetensors stores `metadata` (all values
    must be strings); ckpt and pt are ``torch.save`` of the plain tensor dict and carry no metadata.
    """
    final = _final_path(path, fmt)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output name or allow overwriting.")
    bad = [k for k, v in (metadata or {}).items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings, but {', '.join(bad)} are not.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_open(final, "wb") as f:
        if fmt == "safetensors":
            f.write(safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None))
        else:
            torch.save(tensors, f)
    return final


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file: (tensors on CPU, metadata). ckpt/pt files have no metadata ({})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"The LoRA file {path} does not exist.")
    with open(path, "rb") as f:
        is_zip = f.read(2) == b"PK"  # torch.save's zip container
    if path.suffix.lower() == ".safetensors" or not is_zip:
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:
            raise ValueError(f"{path.name} is not a readable safetensors file ({e}).") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path.name} is not a readable torch checkpoint ({e}).") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path.name} does not contain a plain dictionary of tensors.")
    return dict(obj), {}


def _body_after_header(data: bytes) -> bytes:
    header_len = int.from_bytes(data[:8], "little")
    return data[8 + header_len :]


def _serialise_for_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    # sd-scripts hashes the file as written with only the ss_* (training) metadata, so that user
    # metadata edits do not change the hash.
    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(tensors, metadata=ss_only)


def addnet_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> str:
    """``sshs_model_hash``: sha256 (hex) of the safetensors body after the header."""
    return hashlib.sha256(_body_after_header(_serialise_for_hash(tensors, metadata))).hexdigest()


def addnet_legacy_hash(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> str:
    """``sshs_legacy_hash``: first 8 hex digits of sha256 of bytes 0x100000..0x110000 of the file."""
    data = _serialise_for_hash(tensors, metadata)
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
