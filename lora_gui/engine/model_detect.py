"""What a base model is: its family from its keys and shapes, and the config folder that fits it.

Detection is a pure function of (keys, shapes) (:func:`family_from_shapes`) or of a diffusers
folder's JSON configs (:func:`folder_family`), so a new family adds its rule here. A single file
carries no config; :func:`select_config` picks the diffusers-format config folder whose U-Net, VAE
and text-encoder shapes equal the file's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_gui.engine.ldm_keys import unet_to_ldm, vae_to_ldm
from lora_gui.engine.model_files import ModelLoadError, read_json, read_shapes

CONFIGS_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {"sd1": CONFIGS_DIR / "sd15", "sd2": CONFIGS_DIR / "sd2-768-v"}

_LORA_MARKERS = (
    "lora_unet_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    ".lora_down.",
    ".lora_up.",
    ".lora_A.",
    ".lora_B.",
)


def family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"lora"`` or ``"unknown"`` from key names and shapes only.

    LoRA marker keys first; SDXL by ``conditioner.embedders.*`` or 2048-wide cross-attention; SD 2
    by OpenCLIP keys (``cond_stage_model.model.*``) or 1024-wide cross-attention; SD 1 by CLIP keys
    or any other cross-attention width.
    """
    keys = list(shapes)
    if any(marker in k or k.startswith(marker) for k in keys for marker in _LORA_MARKERS):
        return "lora"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.", "transformer_blocks."))
           for k in keys) and any("single_blocks." in k or k.startswith("single_transformer_blocks.") for k in keys):
        return "flux"  # FLUX.1's original layout (ComfyUI's flux1-dev.safetensors) or diffusers' names
    context = {shapes[k][-1] for k in keys if k.endswith("attn2.to_k.weight") and len(shapes[k]) >= 2}
    if 2048 in context or any(k.startswith("add_embedding.") or ".label_emb.0.0." in k for k in keys):
        return "sdxl" if 2048 in context else "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys) or 1024 in context:
        return "sd2"
    if context or any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return "unknown"


def folder_family(path: Path) -> str:
    """The family of a diffusers folder from its ``model_index.json`` and U-Net config."""
    index = read_json(path / "model_index.json")
    if "Flux" in str(index.get("_class_name", "")) or (path / "transformer" / "config.json").is_file() and \
            "Flux" in str(read_json(path / "transformer" / "config.json").get("_class_name", "")):
        return "flux"
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    unet_cfg = read_json(path / "unet" / "config.json")
    if unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(unet_cfg.get("cross_attention_dim"), "sd1")


def inspect_checkpoint(path_or_keys_shapes) -> str:
    """Classify a checkpoint: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"lora"`` or ``"unknown"``.

    Accepts a file path, a diffusers folder, or a mapping of key -> shape (or tensor). SD 2.x has
    OpenCLIP text-encoder keys (``cond_stage_model.model.*``) and 1024-wide cross-attention; SDXL
    has ``conditioner.embedders.*`` keys and 2048-wide cross-attention; LoRA files have
    ``lora_unet_``/``lora_te_`` or ``lora_down``/``lora_up`` keys.
    """
    if isinstance(path_or_keys_shapes, Mapping):
        shapes = {k: tuple(getattr(v, "shape", v)) for k, v in path_or_keys_shapes.items()}
        return family_from_shapes(shapes)
    path = Path(path_or_keys_shapes)
    if not path.exists():
        raise ModelLoadError(
            f"{path} does not exist: choose a diffusers folder or a .safetensors/.ckpt file."
        )
    if path.is_dir():
        return folder_family(path) if (path / "model_index.json").is_file() else "unknown"
    return family_from_shapes(read_shapes(path))


@functools.lru_cache(maxsize=8)
def _expected_ldm_shapes(cfg: str) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape of the U-Net and VAE that the configs in ``cfg`` describe (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in unet_to_ldm(unet.state_dict()).items()}
    shapes.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae_to_ldm(vae.state_dict()).items()})
    return shapes


def _text_encoder_matches(te: dict, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    embedding = (te.get("vocab_size"), te.get("hidden_size"))
    clip_key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    if clip_key in shapes:
        layers = {
            k.split(".")[5]
            for k in shapes
            if k.startswith("cond_stage_model.transformer.text_model.encoder.layers.")
        }
        return shapes[clip_key] == embedding and len(layers) == te.get("num_hidden_layers")
    if "cond_stage_model.model.token_embedding.weight" in shapes:
        layers = {
            k.split(".")[4] for k in shapes if k.startswith("cond_stage_model.model.transformer.resblocks.")
        }
        n = te.get("num_hidden_layers")
        # SD 2 drops OpenCLIP's last layer (it uses the penultimate output), so the file may have one more.
        return shapes["cond_stage_model.model.token_embedding.weight"] == embedding and len(layers) in (
            n,
            n + 1,
        )
    return False


def config_matches(cfg: Path, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether the diffusers configs in ``cfg`` describe exactly the weights in ``shapes`` (LDM keys)."""
    try:
        expected = _expected_ldm_shapes(str(cfg))
    except Exception:  # noqa: BLE001 - a folder with unreadable configs is simply not a match
        return False
    unet_keys = {k for k in shapes if k.startswith("model.diffusion_model.")}
    if unet_keys != {k for k in expected if k.startswith("model.diffusion_model.")}:
        return False
    if any(shapes[k] != v for k, v in expected.items() if k in shapes):
        return False
    if any(k.startswith("first_stage_model.") for k in shapes):  # files without a VAE need vae_path
        if any(k not in shapes for k in expected if k.startswith("first_stage_model.")):
            return False
    return _text_encoder_matches(read_json(cfg / "text_encoder" / "config.json"), shapes)


def _config_candidates(path: Path, family: str) -> list[Path]:
    same_stem = path.with_suffix("")
    siblings = sorted(p for p in path.parent.iterdir() if p.is_dir() and (p / "model_index.json").is_file())
    ordered = [same_stem, SHIPPED_CONFIGS.get(family), *siblings]
    out: list[Path] = []
    for p in ordered:
        if p is not None and (p / "model_index.json").is_file() and p not in out:
            out.append(p)
    return out


def select_config(path: Path, shapes: Mapping[str, tuple[int, ...]], family: str, config_dir=None) -> Path:
    """The diffusers-format config folder for a single file (see ``load_base_model``)."""
    if config_dir is not None:
        config_dir = Path(config_dir)
        if not config_matches(config_dir, shapes):
            raise ModelLoadError(
                f"The config folder {config_dir} does not match the weights in {path}: choose the diffusers folder "
                "of the same architecture, or leave the config folder empty."
            )
        return config_dir
    for candidate in _config_candidates(path, family):
        if config_matches(candidate, shapes):
            return candidate
    raise ModelLoadError(
        f"{path} has the layout of SD {'2.x' if family == 'sd2' else '1.x'} but not the shapes of a known model: "
        "pass a diffusers folder of the same architecture as config_dir."
    )
