"""SDXL (Podell et al. 2023) and its fine-tunes (Pony, Illustrious, NoobAI-XL, v-prediction ones).

What differs from SD 1.x/2.x: two text encoders (CLIP-L and OpenCLIP bigG, see
``sdxl_condition``), six size/crop numbers per image, the original U-Net's module paths in the
LoRA file (``sdxl_convert``), the SDXL pipeline for samples and the SDXL version strings. The
objective (DDPM noise, epsilon or v-prediction) is SD's, inherited.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_gui.engine.families.sd import StableDiffusion
from lora_gui.engine.families.sdxl_condition import encode_sdxl, time_ids
from lora_gui.engine.families.sdxl_convert import to_sdxl_single_file_state_dict, unet_module_map
from lora_gui.engine.model_detect import CONFIGS_DIR, family_from_shapes
from lora_gui.engine.model_files import ModelLoadError, read_json, read_state_dict

SHIPPED = CONFIGS_DIR / "sdxl"
VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL base and its fine-tunes
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # ModelSpec (sai_model_spec 1.0.1)
_NAMES = {"sd1": "an SD 1.x model", "sd2": "an SD 2.x model", "lora": "a LoRA file, not a base model"}


@dataclass
class SDXLModel:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    noise_scheduler: object
    prediction_type: str
    notes: list[str] = field(default_factory=list)
    config_dir: Path | None = None
    version: str = VERSION


# --- what is this file? ---------------------------------------------------------------------------


def unsupported_kind(keys_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What an SDXL-layout single file is when it is not a trainable SDXL base (None if it is)."""
    keys = keys_shapes.keys()
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "the SDXL refiner (it has only the OpenCLIP bigG text encoder)"
    conv_in = keys_shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] == 9:
        return "an SDXL inpainting model (its U-Net takes 9 input channels)"
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        return f"an SDXL edit or inpainting model (its U-Net takes {conv_in[1]} input channels)"
    return None


def _folder_kind(path: Path) -> str | None:
    index = read_json(path / "model_index.json")
    unet = read_json(path / "unet" / "config.json")
    no_clip_l = "text_encoder_2" in index and (index.get("text_encoder") or [None])[0] is None
    if no_clip_l or index.get("requires_aesthetics_score"):  # what the refiner's folder says
        return "the SDXL refiner (it has only the OpenCLIP bigG text encoder)"
    if unet.get("in_channels", 4) != 4:
        return f"an SDXL edit or inpainting model (its U-Net takes {unet['in_channels']} input channels)"
    return None


def _refuse(path: Path, detected: str, kind: str | None) -> None:
    if kind:
        raise ModelLoadError(f"{path} is {kind}, which cannot be trained here: choose an SDXL base model "
                             "(SDXL base 1.0 or a fine-tune of it).")
    if detected != "sdxl":
        what = _NAMES.get(detected, "not a model lora-gui knows")
        raise ModelLoadError(f"{path} is {what} but model.family is sdxl: set model.family to auto"
                             + (" or sd." if detected in ("sd1", "sd2") else " and choose an SDXL model."))


# --- configs for single files ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _expected_shapes(cfg: str) -> dict[str, tuple[int, ...]]:
    """SGM key -> shape of the model the configs in ``cfg`` describe (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg, subfolder="vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(Path(cfg) / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(Path(cfg) / "text_encoder_2")))
    return {k: tuple(v.shape) for k, v in to_sdxl_single_file_state_dict(unet, vae, te1, te2).items()}


def config_matches(cfg: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """The configs in ``cfg`` describe the file: the same U-Net keys, and every text-encoder (and,
    if the file has one, VAE) tensor with the same shape."""
    try:
        expected = _expected_shapes(str(cfg))
    except Exception:  # noqa: BLE001 - unreadable configs are simply no match
        return False
    unet = "model.diffusion_model."
    if {k for k in shapes if k.startswith(unet)} != {k for k in expected if k.startswith(unet)}:
        return False
    has_vae = any(k.startswith("first_stage_model.") for k in shapes)
    return all(shapes.get(k) == v for k, v in expected.items()
               if has_vae or not k.startswith("first_stage_model."))


def select_config(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A diffusers folder beside the file with its stem, the shipped SDXL configs, or any
    diffusers folder beside the file: the first whose shapes are the file's."""
    siblings = sorted(p for p in path.parent.iterdir() if (p / "model_index.json").is_file())
    for candidate in dict.fromkeys([path.with_suffix(""), SHIPPED, *siblings]):
        if (candidate / "model_index.json").is_file() and config_matches(candidate, shapes):
            return candidate
    raise ModelLoadError(f"{path} has the layout of SDXL but not the shapes of SDXL base 1.0: put the "
                         "diffusers folder of its architecture beside it, named like the file.")


# --- loading --------------------------------------------------------------------------------------


def _tokenizers(folder: Path):
    from transformers import CLIPTokenizer

    from lora_gui.engine.tokenizer import clip_tokenizer

    out = []
    for sub in ("tokenizer", "tokenizer_2"):
        tok_dir = folder / sub
        if (tok_dir / "tokenizer.json").is_file() or (tok_dir / "vocab.json").is_file():
            out.append(CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True))
        else:  # the shipped configs hold no vocabulary: CLIP's is generated from the bundled merges
            pad = read_json(tok_dir / "tokenizer_config.json").get("pad_token", "<|endoftext|>")
            out.append(clip_tokenizer(None, pad_token=pad))
    return out


def _load_folder(path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
             "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    missing = [p for p in (*parts, "tokenizer", "tokenizer_2") if not (path / p).is_dir()]
    if missing:
        raise ModelLoadError(f"{path} is an incomplete SDXL diffusers model (missing {', '.join(missing)}): "
                             "copy or download it again.")
    loaded = {}
    for name, cls in parts.items():
        try:
            loaded[name] = cls.from_pretrained(str(path), subfolder=name, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one sentence
            raise ModelLoadError(f"{path} could not be loaded ({name}: {str(exc)[:200]}): the folder is "
                                 "damaged or incomplete, copy it again.") from exc
    return (*_tokenizers(path), loaded["text_encoder"], loaded["text_encoder_2"], loaded["unet"], loaded["vae"])


def _load_single_file(path: Path, state: dict[str, torch.Tensor], cfg: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = {"config": str(cfg), "local_files_only": True}
    component = "unet"
    try:
        unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
        component = "vae"
        vae = (AutoencoderKL.from_single_file(state, subfolder="vae", **common)
               if any(k.startswith("first_stage_model.") for k in state) else None)
        component = "text encoders"
        te1 = create_diffusers_clip_model_from_ldm(CLIPTextModel, state, subfolder="text_encoder", **common)
        te2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, state,
                                                   subfolder="text_encoder_2", **common)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path} could not be converted ({component}: {str(exc)[:200]}): the file is "
                             "damaged or of an unsupported kind.") from exc
    for module in (unet, vae, te1, te2):
        if module is not None and any(t.is_meta for t in module.state_dict().values()):
            raise ModelLoadError(f"{path} lacks some weights: the file is incomplete, download it again.")
    return (*_tokenizers(cfg), te1, te2, unet, vae)


def load_sdxl(settings) -> SDXLModel:
    """An SDXL base from a diffusers folder or a single file, offline; the VAE may be replaced."""
    from lora_gui.engine.model_detect import folder_family
    from lora_gui.engine.model_load import _load_vae, _training_scheduler

    m = settings.model
    path = Path(m.base_model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"The base model {path} does not exist: choose an SDXL diffusers folder or "
                             ".safetensors file.")
    notes: list[str] = []
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder (it has no model_index.json): choose "
                                 "the model file inside it or a diffusers folder.")
        _refuse(path, folder_family(path), _folder_kind(path))
        cfg, parts = path, _load_folder(path)
    else:
        state = read_state_dict(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        _refuse(path, family_from_shapes(shapes), unsupported_kind(shapes))
        cfg = select_config(path, shapes)
        parts = _load_single_file(path, state, cfg)
        del state
        if cfg != SHIPPED and cfg != path.with_suffix(""):
            notes.append(f"Read {path.name} with the configuration of {cfg}.")
    tok1, tok2, te1, te2, unet, vae = parts
    if m.vae.strip():
        vae = _load_vae(Path(m.vae).expanduser(), cfg, torch.float32)
        notes.append(f"Using the VAE from {m.vae} instead of the base model's.")
    elif vae is None:
        raise ModelLoadError(f"{path} contains no VAE: choose an SDXL VAE file or folder in the VAE setting.")
    prediction = "v_prediction" if m.v_parameterization else "epsilon"
    base_prediction = read_json(cfg / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
    if base_prediction != prediction:
        notes.append(f"The base model's scheduler uses {base_prediction} but v_parameterization is "
                     f"{'on' if m.v_parameterization else 'off'}: training with {prediction} as set.")
    notes += _setting_notes(settings)
    return SDXLModel(tok1, tok2, te1, te2, unet, vae, _training_scheduler(cfg, prediction), prediction,
                     notes, cfg)


def _setting_notes(settings) -> list[str]:
    """Sentences for settings that do not apply to SDXL as set."""
    notes = []
    if settings.training.clip_skip != 1:
        notes.append("training.clip_skip is for SD 1.x/2.x: SDXL uses the penultimate layers of both text "
                     "encoders, as it was trained, whatever clip_skip says.")
    if settings.model.v2:
        notes.append("model.v2 is for SD 2.x models and is ignored for SDXL.")
    if settings.training.mixed_precision == "fp16":
        notes.append("The VAE stays in float32: the stock SDXL VAE overflows in fp16 (an fp16-fixed VAE would "
                     "not, but float32 is always safe).")
    return notes


# --- the family -----------------------------------------------------------------------------------


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"

    def load(self, settings):
        return self._with_schedule(load_sdxl(settings), settings)

    def text_encoders(self, model) -> list[torch.nn.Module]:
        return [model.text_encoder, model.text_encoder_2]

    def encode_text(self, model, captions, settings, device):
        return encode_sdxl((model.tokenizer, model.tokenizer_2), (model.text_encoder, model.text_encoder_2),
                           captions, max_token_length=settings.labels.max_token_length, device=device)

    def batch_conditioning(self, model, batch, device):
        return time_ids(batch.original_sizes, batch.crop_top_lefts, batch.bucket).to(device)

    def meta_extra(self, batch_size: int):
        return torch.empty(batch_size, 6, device="meta")

    def predict(self, model, noisy, timesteps, text, extra, dtype):
        states, pooled = text
        added = {"text_embeds": pooled.to(dtype), "time_ids": extra.to(dtype)}
        return model.unet(noisy.to(dtype), timesteps, states.to(dtype), added_cond_kwargs=added).sample

    def apply_network(self, model, spec):
        from lora_gui.engine.network import LoraNetwork
        from lora_gui.engine.network_lycoris import LycorisNetwork, LycorisSpec

        names = unet_module_map(model.unet.state_dict().keys())
        if isinstance(spec, LycorisSpec):
            # named as lycoris-lora names them under sd-scripts' SDXL U-Net (the original module paths)
            return LycorisNetwork.apply(model.unet if spec.train_unet else None,
                                        [model.text_encoder, model.text_encoder_2], spec, unet_module_names=names)
        encoders = [("lora_te1_", model.text_encoder), ("lora_te2_", model.text_encoder_2)]
        return LoraNetwork.apply(model.unet if spec.train_unet else None, None, spec, unet_module_names=names,
                                 text_encoders=encoders if spec.train_text_encoder else [])

    def generate_samples(self, model, prompts, settings, *, encode, out_dir: Path, stem: str, device,
                         dtype) -> list[tuple[Path, str]]:
        from diffusers import StableDiffusionXLPipeline

        from lora_gui.engine.sampling import make_sampler, render_samples

        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
            scheduler=make_sampler(settings.samples.sample_sampler, model.noise_scheduler.config),
            add_watermarker=False)

        def embeds(p) -> dict:
            (cond, pooled), (uncond, upooled) = encode([p.prompt]), encode([p.negative])
            cast = {"device": device, "dtype": dtype}
            return {"prompt_embeds": cond.to(**cast), "pooled_prompt_embeds": pooled.to(**cast),
                    "negative_prompt_embeds": uncond.to(**cast), "negative_pooled_prompt_embeds": upooled.to(**cast)}

        return render_samples(pipe, prompts, embeds, sampler=settings.samples.sample_sampler,
                              scheduler_config=model.noise_scheduler.config, seed=settings.samples.test_seed,
                              out_dir=out_dir, stem=stem)

    def write_demo_model(self, model_dir: Path, single_file: Path, seed: int) -> None:
        from lora_gui.engine.families.sdxl_demo import write_tiny_sdxl

        write_tiny_sdxl(model_dir, single_file, seed)

    def metadata_versions(self, model, settings) -> dict[str, str]:
        return {"ss_v2": "False", "ss_base_model_version": VERSION, "modelspec.architecture": ARCHITECTURE}
