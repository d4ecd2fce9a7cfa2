"""Loading a Stable Diffusion 1.x/2.x base model offline, from a diffusers folder or a single file.

Two layouts exist for the same weights:

* a diffusers folder (``model_index.json`` + one sub-folder per component), and
* a single ``.safetensors``/``.ckpt`` file in the original CompVis/LDM naming that A1111 and
  ComfyUI use (see :mod:`lora_gui.engine.ldm_keys`).

Single files are read (:mod:`lora_gui.engine.model_files`, never executing pickled code) and given
to diffusers' ``from_single_file`` with a local diffusers-format config folder chosen by shape
(:mod:`lora_gui.engine.model_detect`), so nothing is downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_gui.engine.model_detect import SHIPPED_CONFIGS, family_from_shapes, folder_family, select_config
from lora_gui.engine.model_files import PICKLE_SUFFIXES, ModelLoadError, read_json, read_state_dict

# diffusers imports peft, which imports bitsandbytes; on a CPU-only machine its kernel probe logs a
# scary but harmless warning. Silence only that logger.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


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
            f"{path} is an SDXL model but model.family is sd: set model.family to auto or sdxl."
        )
    if family == "unknown":
        raise ModelLoadError(
            f"{path} does not look like a Stable Diffusion 1.x or 2.x model: choose an SD 1.x/2.x diffusers folder "
            "or .safetensors/.ckpt file."
        )


def _check_folder(path: Path) -> None:
    if not (path / "model_index.json").is_file():
        files = sorted(
            p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
        )
        hint = (
            f"choose the file {files[0]} inside it"
            if files
            else "choose a diffusers folder or a .safetensors/.ckpt file"
        )
        raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json): {hint}.")
    _refuse_family(path, folder_family(path))
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path} is an incomplete diffusers model (missing {', '.join(missing)}): copy or download it again."
        )


def _tokenizer_from(folder: Path):
    from transformers import CLIPTokenizer

    from .tokenizer import clip_tokenizer

    tok_dir = folder / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    # Shipped configs hold no vocabulary: generate CLIP's from the bundled BPE merges.
    pad = read_json(tok_dir / "tokenizer_config.json").get("pad_token", "<|endoftext|>")
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
            if family_from_shapes({k: tuple(v.shape) for k, v in state.items()}) == "lora":
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

    sc = read_json(cfg / "scheduler" / "scheduler_config.json")
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
    family, cfg, (tokenizer, text_encoder, unet, vae), base_prediction = _read_base(
        path, config_dir, dtype, notes
    )
    if vae_path is not None:
        vae = _load_vae(Path(vae_path).expanduser(), cfg, dtype)
        notes.append(f"Using the VAE from {vae_path} instead of the base model's.")
    elif vae is None:
        raise ModelLoadError(f"{path} contains no VAE: choose a VAE file or folder in the VAE setting.")
    is_v2 = family == "sd2"
    prediction_type = "v_prediction" if v_parameterization else "epsilon"
    notes += _objective_notes(is_v2, v2, v_parameterization, base_prediction)
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


def _read_base(path: Path, config_dir, dtype: torch.dtype, notes: list[str]):
    """(family, config folder, (tokenizer, text encoder, U-Net, VAE or None), the base's prediction
    type or None when the weights cannot tell) for a diffusers folder or a single file."""
    if path.is_dir():
        _check_folder(path)
        family = folder_family(path)
        parts = _load_folder(path, dtype)
        prediction = read_json(path / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        return family, path, parts, prediction
    state = read_state_dict(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    family = family_from_shapes(shapes)
    _refuse_family(path, family)
    if not any(k.startswith("model.diffusion_model.") for k in state):
        _refuse_family(path, "unknown")
    cfg = select_config(path, shapes, family, config_dir)
    parts = _load_single_file(path, state, cfg, dtype)
    del state
    # 768-v and 512-base SD 2 files have identical weights' shapes: the flag decides.
    prediction = (
        None
        if cfg == SHIPPED_CONFIGS["sd2"]
        else read_json(cfg / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    )
    if cfg != SHIPPED_CONFIGS.get(family):
        notes.append(f"Read {path.name} with the configuration of {cfg}.")
    return family, cfg, parts, prediction


def _objective_notes(is_v2: bool, v2: bool, v_parameterization: bool, base_prediction: str | None) -> list[str]:
    """Sentences where the v2 / v_parameterization flags disagree with what the base model says."""
    notes = []
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
    return notes
