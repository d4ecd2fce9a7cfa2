"""Loading FLUX.1 offline: a diffusers folder, or the separate files ComfyUI users keep (the
transformer in the original layout, ``ae.safetensors``, ``clip_l.safetensors``, a T5-XXL file),
read with the shipped configs (``configs/flux-dev``, ``configs/flux-schnell``) or a diffusers
folder beside the file. dev and schnell are told apart by the guidance embedding; Fill,
Depth/Canny, Kontext and Chroma files get a sentence naming what they are."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_gui.engine.families.flux_convert import to_diffusers, to_original
from lora_gui.engine.model_detect import CONFIGS_DIR
from lora_gui.engine.model_files import ModelLoadError, read_json, read_state_dict

SHIPPED = {"dev": CONFIGS_DIR / "flux-dev", "schnell": CONFIGS_DIR / "flux-schnell"}
_PREFIX = "model.diffusion_model."
VERSION = "flux1"  # sd-scripts' ss_base_model_version for Flux.1 LoRAs
_PIPELINES = {"FluxFillPipeline": "FLUX.1 Fill (an inpainting/outpainting model)",
              "FluxKontextPipeline": "FLUX.1 Kontext (an image-editing model)",
              "FluxControlPipeline": "FLUX.1 Depth or Canny (a structure-conditioned model)"}


def variant_of(shapes: dict) -> str:
    return "dev" if any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in shapes) \
        else "schnell"


def unsupported_file(shapes: dict, name: str = "", metadata: dict | None = None) -> str | None:
    """What an original-layout Flux file is when it is not a trainable FLUX.1 dev/schnell base."""
    if any("distilled_guidance_layer" in k for k in shapes):
        return "Chroma (a Flux-derived model with a distilled guidance layer)"
    img_in = shapes.get("img_in.weight")
    if img_in is not None and img_in[1] == 384:
        return "FLUX.1 Fill (an inpainting/outpainting model; its transformer takes 384 input features)"
    if img_in is not None and img_in[1] == 128:
        return "FLUX.1 Depth or Canny (a structure-conditioned model; its transformer takes 128 input features)"
    if img_in is not None and img_in[1] != 64:
        return f"a Flux edit or control model (its transformer takes {img_in[1]} input features)"
    text = (name + " " + " ".join(str(v) for v in (metadata or {}).values())).lower()
    if "kontext" in text:
        return "FLUX.1 Kontext (an image-editing model)"
    return None


def unsupported_folder(path: Path) -> str | None:
    kind = _PIPELINES.get(read_json(path / "model_index.json").get("_class_name", ""))
    channels = read_json(path / "transformer" / "config.json").get("in_channels", 64)
    if kind is None and channels != 64:
        kind = f"a Flux edit or control model (its transformer takes {channels} input features)"
    return kind


def _refuse(path: Path, kind: str | None) -> None:
    if kind:
        raise ModelLoadError(f"{path} is {kind}, which cannot be trained here: choose FLUX.1 dev or schnell "
                             "(or a fine-tune of them).")


@dataclass
class FluxModel:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module  # the FluxTransformer2DModel (the seam's name for the denoiser)
    vae: torch.nn.Module
    noise_scheduler: object
    variant: str  # dev | schnell
    guidance_scale: float = 1.0
    prediction_type: str = "raw"
    lora_options: object = None  # settings.advanced: which blocks and linears the LoRA trains
    block_swap: object = None  # engine.block_swap.BlockSwap when advanced.blocks_to_swap > 0
    notes: list[str] = field(default_factory=list)
    config_dir: Path | None = None
    version: str = VERSION


# --- configs for separate files --------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _expected_shapes(cfg: str) -> dict[str, tuple[int, ...]]:
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(cfg, subfolder="transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    state = to_original(model.state_dict(), config["num_layers"], config["num_single_layers"])
    return {k: tuple(v.shape) for k, v in state.items()}


def select_config(path: Path, shapes: dict) -> Path:
    """A diffusers folder beside the file with its stem, any diffusers folder beside it, or the
    shipped dev/schnell configs: the first whose transformer has the file's shapes."""
    siblings = sorted(p for p in path.parent.iterdir() if (p / "transformer" / "config.json").is_file())
    for candidate in dict.fromkeys([path.with_suffix(""), *siblings, SHIPPED[variant_of(shapes)]]):
        if (candidate / "transformer" / "config.json").is_file():
            try:
                if _expected_shapes(str(candidate)) == shapes:
                    return candidate
            except Exception:  # noqa: BLE001 - an unreadable config is simply no match
                continue
    raise ModelLoadError(f"{path} has the layout of FLUX.1 but not the shapes of FLUX.1 dev or schnell: put the "
                         "diffusers folder of its architecture beside it, named like the file.")


# --- parts ---------------------------------------------------------------------------------------


def load_dtype(settings) -> torch.dtype:
    """Frozen weights are read in the precision they will be used in (a 12B transformer in float32
    would need 48 GB): bf16/fp16 on a GPU with mixed precision, float32 on the CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.training.mixed_precision, torch.float32)


def _file_transformer(path: Path, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    state = {k.removeprefix(_PREFIX): v for k, v in read_state_dict(path).items()
             if k.startswith(_PREFIX) or not k.startswith(("vae.", "text_encoders.", "first_stage_model."))}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    _refuse(path, unsupported_file(shapes, path.name))
    cfg = select_config(path, shapes)
    config = FluxTransformer2DModel.load_config(str(cfg), subfolder="transformer")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    converted = {k: v.to(dtype) for k, v in to_diffusers(state, config).items()}
    transformer.load_state_dict(converted, strict=True, assign=True)
    return transformer, cfg


def _beside(path: Path, setting: str, patterns: tuple[str, ...], what: str, name: str) -> Path:
    if setting.strip():
        chosen = Path(setting).expanduser()
        if not chosen.is_file():
            raise ModelLoadError(f"model.{name}: {chosen} does not exist: choose the {what} file.")
        return chosen
    for pattern in patterns:
        found = sorted(path.parent.glob(pattern))
        if found:
            return found[0]
    raise ModelLoadError(f"model.{name} is empty and no {patterns[0]} lies beside {path.name}: choose the {what} "
                         "file (a single Flux transformer file holds neither VAE nor text encoders).")


def _vae(file: Path, cfg: Path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = AutoencoderKL.load_config(str(cfg), subfolder="vae")
    vae = AutoencoderKL.from_config(config)
    state = read_state_dict(file)
    try:
        vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"model.ae: {file} is not a FLUX.1 autoencoder ({str(exc)[:160]}): choose ae.safetensors."
                             ) from None
    return vae


def _clip(file: Path, cfg: Path, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder")))
    wanted = model.state_dict().keys()
    state = {}
    for k, v in read_state_dict(file).items():
        k = k if k in wanted else k.removeprefix("text_model.")
        if k in wanted:
            state[k] = v.to(dtype)
    missing = [k for k in wanted if k not in state and not k.endswith("position_ids")]
    if missing:
        raise ModelLoadError(f"model.clip_l: {file} is not a CLIP-L text encoder ({len(missing)} tensors missing, "
                             f"e.g. {missing[0]}): choose clip_l.safetensors.")
    model.load_state_dict(state, strict=False)
    return model.to(dtype)


def _t5(file: Path, cfg: Path, dtype):
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config.from_pretrained(str(cfg / "text_encoder_2")))
    state = {k: v.to(dtype) for k, v in read_state_dict(file).items()}
    state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
    missing = [k for k in model.state_dict() if k not in state or state[k] is None]
    if missing:
        raise ModelLoadError(f"model.t5xxl: {file} is not a T5-XXL encoder ({len(missing)} tensors missing, e.g. "
                             f"{missing[0]}): choose t5xxl_fp16.safetensors or an fp8 T5-XXL file.")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return model.to(dtype)


def _tokenizers(cfg: Path, t5_file: Path | None):
    from transformers import AutoTokenizer, CLIPTokenizer

    from lora_gui.engine.tokenizer import clip_tokenizer

    tok_dir = cfg / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file():
        clip = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    else:  # the shipped configs hold no vocabulary: CLIP's is generated from the bundled merges
        clip = clip_tokenizer(None)
    for folder in (cfg / "tokenizer_2", *([t5_file.parent / "tokenizer_2"] if t5_file else [])):
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            return clip, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise ModelLoadError("The T5 tokenizer was not found (a T5-XXL weights file does not contain it): put the "
                         "tokenizer_2 folder of FLUX.1-dev (spiece.model or tokenizer.json) beside the T5 file.")


# --- the whole model ---------------------------------------------------------------------------------


def _from_folder(path: Path, dtype):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    parts = {"transformer": FluxTransformer2DModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
             "text_encoder_2": T5EncoderModel}
    missing = [p for p in parts if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is an incomplete FLUX.1 diffusers model (missing {', '.join(missing)}): copy or "
                             "download it again.")
    loaded = {}
    for name, cls in parts.items():
        try:
            loaded[name] = cls.from_pretrained(str(path), subfolder=name, local_files_only=True,
                                               torch_dtype=torch.float32 if name == "vae" else dtype)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one sentence
            raise ModelLoadError(f"{path} could not be loaded ({name}: {str(exc)[:200]}): the folder is damaged or "
                                 "incomplete, copy it again.") from exc
    return loaded


def load_flux(settings):
    """A FLUX.1 dev/schnell base from a diffusers folder or separate files, offline. Building the
    separate files' modules initialises them randomly before their weights are read: that must not
    move the global generator (the LoRA's initialisation draws from it next), so it runs forked."""
    with torch.random.fork_rng(devices=[]):
        return _load_flux(settings)


def _load_flux(settings):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = settings.model
    path = Path(m.base_model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"The base model {path} does not exist: choose a FLUX.1 diffusers folder or the "
                             "flux1-dev/flux1-schnell .safetensors transformer file.")
    dtype, notes = load_dtype(settings), []
    if path.is_dir():
        if not (path / "transformer" / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a FLUX.1 diffusers folder (it has no transformer/config.json).")
        _refuse(path, unsupported_folder(path))
        cfg, parts = path, _from_folder(path, dtype)
        t5_file = None
        for name, setting, loader in (("vae", m.ae, lambda f: _vae(f, cfg)), ("text_encoder", m.clip_l,
                                      lambda f: _clip(f, cfg, dtype)), ("text_encoder_2", m.t5xxl,
                                      lambda f: _t5(f, cfg, dtype))):
            if setting.strip():
                parts[name] = loader(_beside(path / "x", setting, ("",), name, _SETTING[name]))
                notes.append(f"Using {setting} instead of the folder's {name}.")
    else:
        transformer, cfg = _file_transformer(path, dtype)
        ae = _beside(path, m.ae, ("ae.safetensors", "ae.sft"), "FLUX.1 autoencoder (ae.safetensors)", "ae")
        clip = _beside(path, m.clip_l, ("clip_l*.safetensors",), "CLIP-L (clip_l.safetensors)", "clip_l")
        t5_file = _beside(path, m.t5xxl, ("t5xxl*.safetensors",), "T5-XXL (t5xxl_fp16.safetensors)", "t5xxl")
        parts = {"transformer": transformer, "vae": _vae(ae, cfg), "text_encoder": _clip(clip, cfg, dtype),
                 "text_encoder_2": _t5(t5_file, cfg, dtype)}
        if cfg not in SHIPPED.values():
            notes.append(f"Read {path.name} with the configuration of {cfg}.")
    tok1, tok2 = _tokenizers(cfg, t5_file)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(cfg), subfolder="scheduler", local_files_only=True)
    variant = "dev" if parts["transformer"].config.guidance_embeds else "schnell"
    return FluxModel(tok1, tok2, parts["text_encoder"], parts["text_encoder_2"], parts["transformer"], parts["vae"],
                     scheduler, variant, notes=notes, config_dir=cfg)


_SETTING = {"vae": "ae", "text_encoder": "clip_l", "text_encoder_2": "t5xxl"}
