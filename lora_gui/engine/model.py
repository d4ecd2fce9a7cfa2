"""Loading a Stable Diffusion base model offline, and writing one as an A1111 single file.

Two layouts exist for the same weights:

* a diffusers folder (``model_index.json`` + one sub-folder per component), and
* a single ``.safetensors``/``.ckpt`` file in the original CompVis/LDM naming that A1111 and
  ComfyUI use: ``model.diffusion_model.*`` (U-Net), ``first_stage_model.*`` (VAE) and
  ``cond_stage_model.transformer.text_model.*`` (SD 1.x CLIP) or ``cond_stage_model.model.*``
  (SD 2.x OpenCLIP).

Single files are read with diffusers' ``from_single_file`` given a local diffusers-format config
folder, so nothing is downloaded. A file carries no config, so one is chosen by shape (see
``load_base_model``).
"""

from __future__ import annotations

import functools
import json
import logging
import pickle
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# diffusers imports peft, which imports bitsandbytes; on a CPU-only machine its kernel probe logs a
# scary but harmless warning. Silence only that logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------
# diffusers -> LDM key conversion (the inverse of diffusers' single-file conversion).
# ---------------------------------------------------------------------------------------------

_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_ATTN_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename_prefix(rest: str, renames) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> LDM ``openaimodel.UNetModel`` keys (no prefix).

    LDM numbers the U-Net as flat lists: ``input_blocks[0]`` is conv_in, then per down block
    ``layers_per_block`` entries of (resnet, attention) and one downsampler entry (not after the
    last block); ``middle_block`` is resnet, attention, resnet; ``output_blocks`` has
    ``layers_per_block + 1`` entries per up block, the last holding the upsampler.
    """
    down_resnets = {int(k.split(".")[3]) for k in state_dict if k.startswith("down_blocks.0.resnets.")}
    per_down = len(down_resnets) + 1  # resnets + the downsampler slot
    up_has_attn = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        for old_prefix, new_prefix in _UNET_TOP_LEVEL.items():
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + block * per_down + layer
            if kind == "resnets":
                new = f"input_blocks.{index}.0.{_rename_prefix(rest, _UNET_RESNET_RENAMES)}"
            else:
                new = f"input_blocks.{index}.1.{rest}"
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            new = f"input_blocks.{1 + int(m[1]) * per_down + per_down - 1}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            if m[1] == "resnets":
                new = f"middle_block.{2 * int(m[2])}.{_rename_prefix(m[3], _UNET_RESNET_RENAMES)}"
            else:
                new = f"middle_block.1.{m[3]}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = block * per_down + layer
            if kind == "resnets":
                new = f"output_blocks.{index}.0.{_rename_prefix(rest, _UNET_RESNET_RENAMES)}"
            else:
                new = f"output_blocks.{index}.1.{rest}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)):
            block = int(m[1])
            slot = 2 if block in up_has_attn else 1
            new = f"output_blocks.{block * per_down + per_down - 1}.{slot}.conv.{m[2]}"
        if new is None:
            raise ValueError(f"Unexpected U-Net parameter {key!r}: not an SD 1.x/2.x U-Net.")
        out[new] = value
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM ``AutoencoderKL`` keys (no prefix).

    LDM numbers decoder levels from the lowest resolution up (``decoder.up.{N-1-i}``) and stores
    the mid-block attention projections as 1x1 convolutions.
    """
    n_up = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.up_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in ("encoder", "decoder"):
            out[key] = value  # quant_conv, post_quant_conv
            continue
        new = rest
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            new = f"down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
            new = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            new = f"up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
            new = f"up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            new = f"mid.block_{int(m[1]) + 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
            new = "mid.attn_1." + _rename_prefix(m[1], _VAE_ATTN_RENAMES.items())
            if value.ndim == 2:
                value = value[:, :, None, None]  # Linear -> 1x1 conv
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out.") :]
        new = new.replace("conv_shortcut.", "nin_shortcut.")
        out[f"{part}.{new}"] = value
    return out


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` keys -> ``transformer.text_model.*`` (no ``cond_stage_model.``).

    transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level); A1111 files keep it.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        out["transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def to_single_file_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One A1111/CompVis-layout state dict for an SD 1.x model (CLIP text encoder)."""
    sd: dict[str, torch.Tensor] = {}
    for prefix, part in (
        ("model.diffusion_model.", unet_to_ldm(unet.state_dict())),
        ("first_stage_model.", vae_to_ldm(vae.state_dict())),
        ("cond_stage_model.", clip_to_ldm(text_encoder.state_dict())),
    ):
        sd.update({prefix + k: v.detach().contiguous() for k, v in part.items()})
    return sd


# ---------------------------------------------------------------------------------------------
# Reading checkpoints without executing code
# ---------------------------------------------------------------------------------------------


class ModelLoadError(ValueError):
    """A base model or VAE could not be loaded; the message is one sentence for the user."""


class _Inert:
    """Stands in for any non-tensor object in a pickled checkpoint (callbacks, configs...)."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # pickle's SETITEMS on a stubbed dict subclass
        pass

    def append(self, item):  # pickle's APPENDS on a stubbed list subclass
        pass

    def extend(self, items):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()


_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float16"),
    ("torch", "float32"),
    ("torch", "bfloat16"),
    ("torch", "float64"),
}
_STORAGE_NAMES = {
    "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
    "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage", "TypedStorage",
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; every other global becomes an inert stub class,
    so nothing named in the file is ever called."""

    def find_class(self, module, name):
        if (module, name) in _PICKLE_ALLOWED or (
            module in ("torch", "torch.storage") and name in _STORAGE_NAMES
        ):
            return super().find_class(module, name)
        return type(f"Inert_{name}", (_Inert,), {"__module__": "lora_gui.inert"})


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# ``torch.load(pickle_module=...)`` needs a module-like object with ``Unpickler`` and ``load``.
_restricted_pickle = types.ModuleType("lora_gui_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_restricted_pickle.load = _restricted_load  # type: ignore[attr-defined]


def _damaged(path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(
        f"{path} could not be read ({exc.__class__.__name__}): the file is damaged or incomplete, download it again."
    )


def _read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A pickled ``.ckpt``: torch's weights-only loader first, then the restricted unpickler."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - weights_only refuses files holding non-tensor objects
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, exc) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{path} holds no weights dictionary: choose a Stable Diffusion checkpoint file."
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _is_safetensors(path: Path) -> bool:
    """Sniff the content (users rename files): safetensors starts with a u64 header length and '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return (
            len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
        )
    except OSError as exc:
        raise _damaged(path, exc) from exc


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".safetensors", ".sft", *_PICKLE_SUFFIXES):
        raise ModelLoadError(
            f"{path} is neither a .safetensors nor a .ckpt file: choose a diffusers folder or a single-file checkpoint."
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or pickled (``.ckpt``/``.pt``/``.pth``/``.bin``) file, on the CPU."""
    path = Path(path)
    _check_suffix(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, JSON errors
            raise _damaged(path, exc) from exc
    return _read_ckpt(path)


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape; for safetensors from the header only (no tensor data is read)."""
    _check_suffix(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise _damaged(path, exc) from exc
    return {k: tuple(v.shape) for k, v in _read_ckpt(path).items()}


# ---------------------------------------------------------------------------------------------
# What is this checkpoint?
# ---------------------------------------------------------------------------------------------

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


def _family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    keys = list(shapes)
    if any(marker in k or k.startswith(marker) for k in keys for marker in _LORA_MARKERS):
        return "lora"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    context = {shapes[k][-1] for k in keys if k.endswith("attn2.to_k.weight") and len(shapes[k]) >= 2}
    if 2048 in context or any(k.startswith("add_embedding.") or ".label_emb.0.0." in k for k in keys):
        return "sdxl" if 2048 in context else "unknown"
    if any(k.startswith("cond_stage_model.model.") for k in keys) or 1024 in context:
        return "sd2"
    if context or any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    return "unknown"


def _folder_family(path: Path) -> str:
    index = _read_json(path / "model_index.json")
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    unet_cfg = _read_json(path / "unet" / "config.json")
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
        return _family_from_shapes(shapes)
    path = Path(path_or_keys_shapes)
    if not path.exists():
        raise ModelLoadError(
            f"{path} does not exist: choose a diffusers folder or a .safetensors/.ckpt file."
        )
    if path.is_dir():
        return _folder_family(path) if (path / "model_index.json").is_file() else "unknown"
    return _family_from_shapes(_read_shapes(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path} could not be read ({exc.__class__.__name__}): repair or replace the file."
        ) from exc


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

CONFIGS_DIR = Path(__file__).parent / "configs"
SHIPPED_CONFIGS = {"sd1": CONFIGS_DIR / "sd15", "sd2": CONFIGS_DIR / "sd2-768-v"}


@dataclass
class LoadedModel:
    """The parts of a base model, ready for training, and what the loader noticed."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler with the base's betas and the chosen prediction_type
    version: str  # "sd_v1" | "sd_v2" | "sd_v2_v" (the ss_base_model_version metadata value)
    is_v2: bool
    prediction_type: str  # "epsilon" | "v_prediction"
    notes: list[str] = field(default_factory=list)  # sentences for the user
    config_dir: Path | None = None  # the diffusers-format folder whose configs were used


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:200]


def _refuse_family(path: Path, family: str) -> None:
    if family == "lora":
        raise ModelLoadError(
            f"{path} is a LoRA file, not a base model: choose a Stable Diffusion checkpoint as the base model "
            "(a LoRA can only be used to resume training)."
        )
    if family == "sdxl":
        raise ModelLoadError(
            f"{path} is an SDXL model and SDXL is not supported yet: choose an SD 1.x or 2.x model."
        )
    if family == "unknown":
        raise ModelLoadError(
            f"{path} does not look like a Stable Diffusion 1.x or 2.x model: choose an SD 1.x/2.x diffusers folder "
            "or .safetensors/.ckpt file."
        )


def _check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        files = sorted(
            p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", *_PICKLE_SUFFIXES)
        )
        hint = (
            f"choose the file {files[0]} inside it"
            if files
            else "choose a diffusers folder or a .safetensors/.ckpt file"
        )
        raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json): {hint}.")
    _refuse_family(path, _folder_family(path))
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is an incomplete diffusers model (missing {', '.join(missing)}): copy or download it again."
        )


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
    return _text_encoder_matches(_read_json(cfg / "text_encoder" / "config.json"), shapes)


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


def _tokenizer_from(folder: Path):
    from transformers import CLIPTokenizer

    from .tokenizer import clip_tokenizer

    tok_dir = folder / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    # Shipped configs hold no vocabulary: generate CLIP's from the bundled BPE merges.
    pad = _read_json(tok_dir / "tokenizer_config.json").get("pad_token", "<|endoftext|>")
    return clip_tokenizer(None, pad_token=pad)


def _no_meta(module: torch.nn.Module, what: str, path: Path) -> torch.nn.Module:
    if any(t.is_meta for t in module.state_dict().values()):
        raise ModelLoadError(f"{path} lacks some {what} weights: the file is incomplete, download it again.")
    return module


def _load_folder(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    component = "tokenizer"
    try:
        tokenizer = _tokenizer_from(path)
        component = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(
            str(path), subfolder="text_encoder", local_files_only=True, dtype=dtype
        )
        component = "unet"
        unet = UNet2DConditionModel.from_pretrained(
            str(path), subfolder="unet", local_files_only=True, torch_dtype=dtype
        )
        component = "vae"
        vae = AutoencoderKL.from_pretrained(
            str(path), subfolder="vae", local_files_only=True, torch_dtype=dtype
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any loader failure as one sentence
        raise ModelLoadError(
            f"{path} could not be loaded ({component}: {_short(exc)}): the folder is damaged or incomplete, copy it again."
        ) from exc
    return tokenizer, text_encoder, unet, vae


def _load_single_file(path: Path, state: dict[str, torch.Tensor], cfg: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    # torch_dtype=float32 (the default) would only add a casting warning.
    common = {
        "config": str(cfg),
        "local_files_only": True,
        "torch_dtype": None if dtype == torch.float32 else dtype,
    }
    component = "unet"
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        component = "vae"
        vae = None
        if any(k.startswith("first_stage_model.") for k in state):
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        component = "text_encoder"
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, state, subfolder="text_encoder", **common
        )
        component = "tokenizer"
        tokenizer = _tokenizer_from(cfg)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"{path} could not be converted ({component}: {_short(exc)}): the file is damaged or of an unsupported kind."
        ) from exc
    for module, what in ((unet, "U-Net"), (vae, "VAE"), (text_encoder, "text encoder")):
        if module is not None:
            _no_meta(module, what, path)
    return tokenizer, text_encoder, unet, vae


def _load_vae(vae_path: Path, cfg: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if not vae_path.exists():
        raise ModelLoadError(
            f"The VAE {vae_path} does not exist: choose a VAE folder or file, or leave the VAE empty."
        )
    try:
        if vae_path.is_dir():
            sub = "vae" if (vae_path / "model_index.json").is_file() else None
            if not ((vae_path / sub) if sub else vae_path).joinpath("config.json").is_file():
                raise ModelLoadError(
                    f"{vae_path} is not a diffusers VAE folder (no config.json): choose a VAE folder or file."
                )
            vae = AutoencoderKL.from_pretrained(
                str(vae_path), subfolder=sub, local_files_only=True, torch_dtype=dtype
            )
        else:
            state = read_state_dict(vae_path)
            if _family_from_shapes({k: tuple(v.shape) for k, v in state.items()}) == "lora":
                raise ModelLoadError(f"{vae_path} is a LoRA file, not a VAE: choose a VAE file.")
            if any(k.startswith("encoder.down_blocks.") for k in state):  # already in diffusers naming
                vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg), subfolder="vae"))
                vae.load_state_dict(state, strict=True)
                vae.to(dtype)
            else:  # LDM naming, bare or with the first_stage_model./vae. prefix
                vae = AutoencoderKL.from_single_file(
                    state, config=str(cfg), subfolder="vae", local_files_only=True
                )
                vae.to(dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"The VAE {vae_path} does not fit the base model ({_short(exc)}): choose a VAE made for this model."
        ) from exc
    return _no_meta(vae, "VAE", vae_path)


def _training_scheduler(cfg: Path, prediction_type: str):
    """DDPM with the base's noise schedule (its betas) and the chosen training objective."""
    from diffusers import DDPMScheduler

    sc = _read_json(cfg / "scheduler" / "scheduler_config.json")
    return DDPMScheduler(
        num_train_timesteps=sc.get("num_train_timesteps", 1000),
        beta_start=sc.get("beta_start", 0.00085),
        beta_end=sc.get("beta_end", 0.012),
        beta_schedule=sc.get("beta_schedule", "scaled_linear"),
        trained_betas=sc.get("trained_betas"),
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=sc.get("steps_offset", 0),
        timestep_spacing=sc.get("timestep_spacing", "leading"),
        rescale_betas_zero_snr=sc.get("rescale_betas_zero_snr", False),
    )


def load_base_model(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    v2: bool = False,
    v_parameterization: bool = False,
    dtype: torch.dtype = torch.float32,
    config_dir: str | Path | None = None,
) -> LoadedModel:
    """Load an SD 1.x/2.x base model offline from a diffusers folder or a single checkpoint file.

    The weights decide SD 1.x vs 2.x (a disagreeing ``v2`` flag is reported in ``notes``);
    ``v_parameterization`` decides the training objective (a disagreeing base scheduler config is
    reported). A single file carries no config; the diffusers-format config folder is, in order:
    ``config_dir`` if given; a diffusers folder next to the file with the file's stem
    (``model.safetensors`` -> ``model/``, which is how the demo is laid out); the shipped
    ``configs/sd15`` or ``configs/sd2-768-v`` for the detected family; any other diffusers folder
    beside the file. The first whose U-Net/VAE/text-encoder shapes equal the file's is used.
    Raises ``ModelLoadError`` with a one-sentence message naming the path on any failure.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"The base model {path} does not exist: choose a diffusers folder or a .safetensors/.ckpt file."
        )
    notes: list[str] = []
    if path.is_dir():
        _check_folder(path)
        family, cfg = _folder_family(path), path
        tokenizer, text_encoder, unet, vae = _load_folder(path, dtype)
        base_prediction = _read_json(path / "scheduler" / "scheduler_config.json").get(
            "prediction_type", "epsilon"
        )
    else:
        state = read_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        family = _family_from_shapes(shapes)
        _refuse_family(path, family)
        if not any(k.startswith("model.diffusion_model.") for k in state):
            _refuse_family(path, "unknown")
        cfg = select_config(path, shapes, family, config_dir)
        tokenizer, text_encoder, unet, vae = _load_single_file(path, state, cfg, dtype)
        del state
        # 768-v and 512-base SD 2 files have identical weights' shapes: the flag decides.
        base_prediction = (
            None
            if cfg == SHIPPED_CONFIGS["sd2"]
            else (_read_json(cfg / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon"))
        )
        if cfg != SHIPPED_CONFIGS.get(family):
            notes.append(f"Read {path.name} with the configuration of {cfg}.")
    if vae_path is not None:
        vae = _load_vae(Path(vae_path).expanduser(), cfg, dtype)
        notes.append(f"Using the VAE from {vae_path} instead of the base model's.")
    elif vae is None:
        raise ModelLoadError(f"{path} contains no VAE: choose a VAE file or folder in the VAE setting.")

    is_v2 = family == "sd2"
    if is_v2 and not v2:
        notes.append("The base model is SD 2.x although v2 was not set: using SD 2.x.")
    elif v2 and not is_v2:
        notes.append("The base model is SD 1.x although v2 was set: using SD 1.x.")
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    if base_prediction is None and is_v2 and not v_parameterization:
        notes.append(
            "SD 2.x 768-v and 512-base files cannot be told apart by their weights: training with epsilon "
            "prediction (512-base); set v_parameterization for a 768-v model."
        )
    elif base_prediction is not None and base_prediction != prediction_type:
        notes.append(
            f"The base model's scheduler uses {base_prediction} but v_parameterization is "
            f"{'on' if v_parameterization else 'off'}: training with {prediction_type} as set, which may not match the base."
        )
    version = "sd_v1" if not is_v2 else ("sd_v2_v" if v_parameterization else "sd_v2")
    return LoadedModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        noise_scheduler=_training_scheduler(cfg, prediction_type),
        version=version,
        is_v2=is_v2,
        prediction_type=prediction_type,
        notes=notes,
        config_dir=cfg,
    )
