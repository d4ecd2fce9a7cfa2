"""Every setting, declared once. One class per tab group, composed into ``TrainingSettings``.

The description of each field is its tooltip and CLI help; the UI metadata sits next to it (see
``fields.setting``). Cross-field rules live in ``TrainingSettings``; each error names the field to
change and what to do. This module imports only pydantic and the standard library.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lora_gui.settings.fields import setting

# kohya_ss's scheduler dropdown (sd-scripts train_util.get_scheduler_fix).
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "adafactor", "piecewise_constant", "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay",
)
# kohya_ss's optimizer dropdown (sd-scripts train_util.get_optimizer), by its spelling. A dotted
# class path such as ``pytorch_optimizer.CAME`` is accepted as well (see ``_optimizer_name``).
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
    "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "Prodigy", "DAdaptation", "DAdaptAdamPreprint",
    "DAdaptAdam",
    "DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Adafactor",
    "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree", "CAME",
)
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
LOGGERS = ("tensorboard", "wandb", "all")
# sd-scripts networks/lora.py: 12 down blocks, 1 mid block, 12 up blocks (SD 1.x/2.x U-Net);
# block_dims/block_alphas list the 25 blocks IN0..IN11, MID, OUT0..OUT11.
NUM_BLOCKS = 12
SDXL_BLOCKS = 9  # SDXL: 9 input, 3 middle, 9 output blocks, and blocks 0 (embeddings) and 22 (out)
# network_type: "LoRA" is kohya's networks.lora (peft here); the others are LyCORIS algorithms.
NETWORK_TYPES = ("LoRA", "LoCon", "LoHa", "LoKr", "IA3", "GLoRA", "Full", "Diag-OFT", "BOFT")
# lycoris-lora's built-in presets (lycoris/config.py PRESET).
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only",
                   "unet-convblock-only", "ia3")
SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
)


def sampler_name(text: str) -> str | None:
    """One of SAMPLERS for a kohya sampler name (sd-scripts get_my_scheduler also takes k_euler,
    k_lms... and dpmsingle), or None when it is not one we have."""
    name = str(text).strip().lower().removeprefix("k_")
    name = {"dpmsingle": "dpmsolver"}.get(name, name)
    return name if name in SAMPLERS else None


# Keys that loading a settings file leaves alone: paths that only make sense on one machine, the
# run's name and comment. The skip-list itself is never taken from a file.
DEFAULT_SKIP_LIST = (
    "base_model", "img_folder", "reg_img_folder", "output_folder", "log_dir", "vae",
    "lora_model_for_resume", "output_name", "training_comment", "mask_folder", "log_tracker_config",
)


class Group(BaseModel):
    """A tab's worth of settings. Frozen: change settings with ``model_copy`` + revalidation."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    tab: ClassVar[str]
    title: ClassVar[str]


class ModelSettings(Group):
    tab: ClassVar[str] = "model"
    title: ClassVar[str] = "Model and folders"

    base_model: str = setting(
        "", "The Stable Diffusion 1.x, 2.x, SDXL or FLUX.1 model to train on: a local diffusers folder or a "
        "single .safetensors / .ckpt file (Flux: the transformer, with the AE, CLIP-L and T5-XXL fields below). "
        "It is read offline; nothing is downloaded.", widget="file")
    family: Literal["auto", "sd", "sdxl", "flux"] = setting(
        "auto", "The base model's family: auto detects it from the weights; sd = SD 1.x/2.x, sdxl = "
        "SDXL and its fine-tunes (Pony, Illustrious, NoobAI-XL), flux = FLUX.1 dev or schnell. A model that is not of the chosen "
        "family is refused with a sentence saying what it is.", widget="dropdown", label="Model family")
    v2: bool = setting(
        False, "The base model is SD 2.x (OpenCLIP text encoder, 1024-wide cross-attention). "
        "lora-gui detects this from the weights and tells you when this box disagrees. SD only.",
        widget="checkbox", label="SD 2.x base", family="sd")
    v_parameterization: bool = setting(
        False, "Train with the v-prediction objective (the target is the velocity, not the noise), "
        "as SD 2.x 768-v models were trained. Use it only with a v-prediction base model.",
        widget="checkbox", family=("sd", "sdxl"))
    vae: str = setting(
        "", "Optional path to a replacement VAE (diffusers folder or single file) used to encode "
        "images and decode samples instead of the base model's VAE. Empty = the base model's VAE.",
        widget="file", advanced=True, label="Replacement VAE")
    ae: str = setting(
        "", "FLUX.1's autoencoder file (ae.safetensors) when the base model is a single transformer file; "
        "empty = ae.safetensors beside it, or the folder's own VAE. Flux only.", widget="file",
        label="Flux AE (VAE)", family="flux")
    clip_l: str = setting(
        "", "The CLIP-L text encoder file (clip_l.safetensors) for a single-file FLUX.1 transformer; empty = "
        "clip_l.safetensors beside it, or the folder's own. Flux only.", widget="file", label="CLIP-L",
        family="flux")
    t5xxl: str = setting(
        "", "The T5-XXL text encoder file (t5xxl_fp16.safetensors or an fp8 one) for a single-file FLUX.1 "
        "transformer; empty = t5xxl*.safetensors beside it, or the folder's own. Flux only.", widget="file",
        label="T5-XXL", family="flux")
    flux_lora_format: Literal["kohya", "diffusers"] = setting(
        "kohya", "How a Flux LoRA file names its weights: kohya = sd-scripts' lora_unet_double_blocks_N_img_attn_qkv "
        "(fused q/k/v; ComfyUI, Forge, diffusers load it), diffusers = transformer.transformer_blocks.N.attn.to_q "
        "lora_A/lora_B (diffusers, ai-toolkit style). Flux only.", widget="dropdown", label="Flux LoRA format",
        family="flux")
    img_folder: str = setting(
        "", "Training images: a parent folder of 'N_name' subfolders (N = repeats, the rest = class "
        "tokens, e.g. 10_mychar), or one folder of images that then uses the Repeats setting.",
        widget="folder", label="Image folder")
    reg_img_folder: str = setting(
        "", "Optional regularisation images (prior preservation), in 'N_class' subfolders. Each epoch "
        "then holds as many regularisation samples as training samples, so it is twice as long.",
        widget="folder", label="Regularisation folder")
    output_folder: str = setting(
        "outputs", "Folder where the LoRA files, samples, the settings copy and the tag report are "
        "written. Existing files are never silently overwritten.", widget="folder")
    output_name: str = setting(
        "my-lora", "File name (without extension) of the LoRA. Intermediate saves are named "
        "NAME-000001 and so on.", widget="text", min_length=1, max_length=120)
    save_as: Literal["safetensors", "ckpt", "pt"] = setting(
        "safetensors", "File format of the LoRA: safetensors (safe, carries metadata; loads in "
        "AUTOMATIC1111, ComfyUI and diffusers), ckpt or pt (a plain torch state dict, no metadata).",
        widget="dropdown", advanced=True)
    save_precision: Literal["fp16", "bf16", "float"] = setting(
        "fp16", "Number format of the saved LoRA tensors: fp16 (half the size, what most LoRAs use), "
        "bf16, or float (32-bit).", widget="dropdown", advanced=True)
    training_comment: str = setting(
        "", "Free text stored in the LoRA's metadata (ss_training_comment).", widget="textarea",
        advanced=True)
    no_meta: bool = setting(
        False, "Save only the minimal metadata (network shape and base model version, plus the "
        "ModelSpec title/architecture keys and the file hashes) instead of the full training record.",
        widget="checkbox", advanced=True, label="Minimal metadata")
    metadata_title: str = setting(
        "", "Title written into the LoRA's ModelSpec metadata (modelspec.title). Empty = the output "
        "name.", widget="text", advanced=True)
    metadata_author: str = setting(
        "", "Author written into the ModelSpec metadata (modelspec.author). Empty = not written.",
        widget="text", advanced=True)
    metadata_description: str = setting(
        "", "Description written into the ModelSpec metadata (modelspec.description). Empty = not "
        "written.", widget="textarea", advanced=True)
    metadata_license: str = setting(
        "", "License written into the ModelSpec metadata (modelspec.license), e.g. "
        "creativeml-openrail-m. Empty = not written.", widget="text", advanced=True)
    metadata_tags: str = setting(
        "", "Comma-separated tags written into the ModelSpec metadata (modelspec.tags). Empty = not "
        "written.", widget="text", advanced=True)
    log_dir: str = setting(
        "", "Folder for TensorBoard logs (loss, learning rate, validation loss). Empty = 'logs' "
        "inside the output folder.", widget="folder", advanced=True, label="Log folder")
    log_with: Literal[LOGGERS] = setting(  # type: ignore[valid-type]
        "tensorboard", "Where the training curves are logged: TensorBoard (in the log folder), "
        "Weights & Biases (offline mode when there is no network; sync later with 'wandb sync'), "
        "or all = both.", widget="dropdown", advanced=True, label="Log with")
    log_tracker_name: str = setting(
        "", "Name of the run in the tracker (the TensorBoard sub-folder or the W&B project). Empty = "
        "the output name.", widget="text", advanced=True)
    log_tracker_config: str = setting(
        "", "Optional TOML file with the tracker's own options (as in sd-scripts: a table per "
        "tracker, e.g. [wandb] entity = ...). Empty = none.", widget="file", advanced=True)
    log_config: bool = setting(
        False, "Also log every setting of the run to the tracker (as its config / hyper-parameters).",
        widget="checkbox", advanced=True)
    lora_model_for_resume: str = setting(
        "", "Start from the weights of an existing LoRA file of the same rank (not its optimizer "
        "state). Empty = start from a fresh LoRA.", widget="file", advanced=True,
        label="Start from LoRA")
    save_state: bool = setting(
        False, "Next to each saved LoRA, also save the full training state (optimizer, scheduler, "
        "step, random states, data order) so the run can be resumed at that exact step.",
        widget="checkbox", advanced=True)
    save_state_on_train_end: bool = setting(
        False, "Save the full training state once, at the end of the run (NAME-state), even when "
        "'save state' is off, so the run can be continued later.", widget="checkbox",
        advanced=True)
    load_previous_save_state: str = setting(
        "", "Resume from a state folder written by 'save state' (NAME-state or NAME-000002-state): "
        "training continues at the exact step it was saved. Empty = start a new run.",
        widget="folder", advanced=True, label="Resume from state")

    @field_validator("output_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if re.search(r'[\\/:*?"<>|]', value) or value.strip() != value or value in {".", ".."}:
            raise PydanticCustomError(
                "file_name", "must be a plain file name without slashes, colons or surrounding "
                "spaces: use letters, digits, '-' or '_'")
        return value


class TriggerSettings(Group):
    tab: ClassVar[str] = "triggers"
    title: ClassVar[str] = "Trigger words"

    trigger_words: str = setting(
        "", "Comma-separated words put first in every caption (never shuffled or dropped), stored in "
        "the LoRA's metadata and shown with the result. Use them in prompts to call the LoRA.",
        widget="text")


MAX_STRENGTH = 2.0


def parse_strengths(text: str) -> list[float]:
    """The LoRA strengths of ``samples.strength_sweep`` ("0.5, 0.75, 1.0"), in order, each once."""
    out: list[float] = []
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        try:
            weight = float(item)
        except ValueError:
            raise PydanticCustomError("strength", "'{item}' is not a number: write strengths such "
                                      "as 0.5, 0.75, 1.0", {"item": item}) from None
        if not 0 <= weight <= MAX_STRENGTH:
            raise PydanticCustomError("strength", "{item} is outside 0 to {top}",
                                      {"item": item, "top": f"{MAX_STRENGTH:g}"})
        if weight not in out:
            out.append(weight)
    return out


class ImageSettings(Group):
    tab: ClassVar[str] = "images"
    title: ClassVar[str] = "Image processing"

    repeats: int = setting(
        10, "How many times each image is seen per epoch, for image folders without an 'N_' prefix "
        "(a prefix such as 10_name sets the repeats of its folder).", widget="number", ge=1, le=10000)
    epochs: int = setting(
        10, "Passes over the (repeated) dataset. Ignored when max steps is above 0.",
        widget="number", ge=1, le=100000)
    max_steps: int = setting(
        0, "Stop after this many optimizer steps. 0 = train for the number of epochs.",
        widget="number", ge=0)
    save_every_n_epochs: int = setting(
        0, "Also save an intermediate LoRA every N epochs (NAME-000002...). 0 = only the final one.",
        widget="number", ge=0)
    keep_best_checkpoints: int = setting(
        0, "Keep only the N intermediate LoRAs (save every N epochs) with the lowest validation "
        "loss; the others are deleted as better ones arrive (unless 'save last N epochs' still keeps them). The final LoRA is always kept. Needs "
        "a validation split above 0. 0 = keep every intermediate LoRA.", widget="number", ge=0)
    save_every_n_steps: int = setting(
        0, "Also save an intermediate LoRA every N optimizer steps (NAME-step000500...; not at the "
        "last step, which is the final LoRA). 0 = off.",
        widget="number", ge=0)
    save_last_n_epochs: int = setting(
        0, "Keep only the last N per-epoch saves: older NAME-0000XX files are deleted when a new "
        "one is written, unless 'keep best checkpoints' keeps them (the final LoRA is never deleted). 0 = keep all.", widget="number", ge=0,
        advanced=True)
    save_last_n_epochs_state: int = setting(
        0, "Keep only the last N per-epoch state folders (overrides 'save last N epochs' for the "
        "states). 0 = same as for the LoRA files.", widget="number", ge=0, advanced=True)
    save_last_n_steps: int = setting(
        0, "Keep the per-step saves of only the last N steps: a step save older than N steps is "
        "deleted (sd-scripts' rule; the final LoRA is never deleted). 0 = keep all.",
        widget="number", ge=0, advanced=True)
    save_last_n_steps_state: int = setting(
        0, "Like 'save last N steps' for the per-step state folders (overrides it for the states). "
        "0 = same as for the LoRA files.", widget="number", ge=0, advanced=True)
    resolution: str = setting(
        "512", "Training resolution: one number for a square (512) or 'width,height' (768,512). With "
        "buckets this is the training area; each image keeps roughly its aspect ratio.",
        widget="text")
    buckets: bool = setting(
        True, "Aspect-ratio bucketing: images are grouped by aspect ratio into buckets of about the "
        "training area, so wide and tall images are not squashed or cropped to a square.",
        widget="checkbox", label="Enable buckets")
    min_bucket_resolution: int = setting(
        256, "Smallest bucket side in pixels.", widget="number", ge=64, le=8192, advanced=True)
    max_bucket_resolution: int = setting(
        1024, "Largest bucket side in pixels.", widget="number", ge=64, le=8192, advanced=True)
    bucket_reso_steps: int = setting(
        64, "Bucket sides are multiples of this many pixels (a multiple of 64 for SD 1.x/2.x).",
        widget="number", ge=64, le=1024, advanced=True)
    bucket_no_upscale: bool = setting(
        False, "Never upscale: images smaller than the training area keep their size (floored to the "
        "bucket step); larger ones are scaled down to the area.", widget="checkbox", advanced=True)
    flip_aug: bool = setting(
        False, "Randomly mirror images left-right. Do not use it for subjects that are not symmetric "
        "(text, asymmetric characters).", widget="checkbox")
    color_aug: bool = setting(
        False, "Small random hue shift of each image. Changes pixels every time, so it cannot be used "
        "with cached latents.", widget="checkbox", advanced=True)
    random_crop: bool = setting(
        False, "Crop a random part of each image to its bucket instead of the centre. Cannot be used "
        "with cached latents.", widget="checkbox", advanced=True)
    cache_latents: bool = setting(
        True, "Encode every image with the VAE once before training and keep the result; training is "
        "faster and the VAE leaves the GPU.", widget="checkbox")
    strict_dataset: bool = setting(
        False, "Stop before training when an image cannot be read (cut short, damaged) or a caption "
        "file is not UTF-8. Off: such an image is skipped and such a caption is read as "
        "Windows-1252, each with a warning that names the file.", widget="checkbox", advanced=True)
    cache_latents_to_disk: bool = setting(
        False, "Also keep the cached latents on disk next to the images, so the next run skips "
        "encoding (recomputed when an image or the resolution changes).", widget="checkbox",
        advanced=True)

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: str) -> str:
        parts = [p.strip() for p in str(value).replace("x", ",").split(",")]
        if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
            raise PydanticCustomError(
                "resolution", "must be one number such as 512 or 'width,height' such as 768,512")
        sides = [int(p) for p in parts]
        if any(s < 64 or s > 8192 or s % 8 for s in sides):
            raise PydanticCustomError(
                "resolution", "each side must be a multiple of 8 between 64 and 8192 (e.g. 512)")
        return ",".join(str(s) for s in (sides * 2)[:2]) if len(sides) == 2 else str(sides[0])

    @field_validator("bucket_reso_steps")
    @classmethod
    def _step_multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise PydanticCustomError(
                "bucket_step", "must be a multiple of 64 for SD 1.x/2.x (64, 128, ...)")
        return value

    @property
    def resolution_wh(self) -> tuple[int, int]:
        sides = [int(p) for p in self.resolution.split(",")]
        return (sides[0], sides[-1])


class TrainingGroup(Group):
    tab: ClassVar[str] = "training"
    title: ClassVar[str] = "Training"

    seed: int = setting(
        42, "Random seed: the same settings and seed give the same LoRA.", widget="number", ge=0,
        le=2**32 - 1)
    clip_skip: int = setting(
        1, "Use the output of the N-th layer from the end of the CLIP text encoder, followed by its "
        "final layer norm (1 = last layer, 2 = penultimate, common for anime models). SD only: "
        "SDXL always uses the penultimate layers of both encoders, as it was trained.",
        widget="number", ge=1, le=12, family="sd")
    learning_rate: float = setting(
        1e-4, "Base learning rate; the U-Net and text encoder rates below override it when set.",
        widget="number", ge=0, le=10, step=1e-5)
    unet_lr: float | None = setting(
        None, "Learning rate of the U-Net LoRA. Empty = the base learning rate; 0 = do not train the "
        "U-Net.", widget="number", ge=0, le=10, label="U-Net learning rate", step=1e-5)
    text_encoder_lr: float | None = setting(
        None, "Learning rate of the text-encoder LoRA. Empty = the base learning rate; 0 = do not "
        "train the text encoder.", widget="number", ge=0, le=10, label="Text encoder learning rate",
        step=1e-5)
    unet_only: bool = setting(
        False, "Put the LoRA only on the U-Net; the text encoder is not trained (and its outputs can "
        "be cached).", widget="checkbox", label="Train U-Net only")
    text_only: bool = setting(
        False, "Put the LoRA only on the text encoder; the U-Net is not trained.",
        widget="checkbox", label="Train text encoder only", advanced=True)
    lr_scheduler: Literal[LR_SCHEDULERS] = setting(  # type: ignore[valid-type]
        "cosine", "How the learning rate changes over the run. 'adafactor' only with the Adafactor "
        "optimizer; piecewise_constant takes its step_rules from the scheduler arguments; "
        "cosine_with_min_lr ends at the min LR ratio; warmup_stable_decay decays over the decay "
        "steps at the end.", widget="dropdown", label="LR scheduler")
    lr_scheduler_type: str = setting(
        "", "Optional custom scheduler class, replacing the scheduler above: a torch.optim.lr_scheduler "
        "name such as CosineAnnealingLR, or a dotted path module.Class. Its arguments come from the "
        "scheduler arguments. Empty = use the scheduler above.", widget="text", advanced=True,
        label="Custom scheduler class")
    lr_scheduler_args: str = setting(
        "", "Extra scheduler arguments as key=value pairs separated by spaces, e.g. 'T_max=100' or "
        "'step_rules=\"1:10,0.1\"' (read like the optimizer arguments, never evaluated as code).",
        widget="text", advanced=True, label="Scheduler arguments")
    lr_scheduler_min_lr_ratio: float | None = setting(
        None, "Lowest learning rate of cosine_with_min_lr and warmup_stable_decay, as a fraction of "
        "the learning rate (0.1 = 10 %). Empty = 0.", widget="number", ge=0, le=1, advanced=True,
        label="Min LR ratio", step=0.01)
    lr_decay_steps: float = setting(
        0, "Decay phase of warmup_stable_decay: below 1 a fraction of the total steps, 1 or more a "
        "number of steps.", widget="number", ge=0, advanced=True)
    lr_scheduler_timescale: int | None = setting(
        None, "Timescale of the inverse_sqrt scheduler. Empty = the number of warm-up steps.",
        widget="number", ge=1, advanced=True)
    lr_scheduler_num_cycles: int = setting(
        1, "Number of hard restarts of cosine_with_restarts.", widget="number", ge=1, le=1000,
        advanced=True, label="Scheduler cycles")
    lr_scheduler_power: float = setting(
        1.0, "Power of the polynomial scheduler (1 = linear decay).", widget="number", gt=0, le=100,
        advanced=True, label="Scheduler power")
    lr_warmup_steps: float = setting(
        0, "Linear learning-rate warm-up: a value below 1 is a fraction of the total steps (0.1 = "
        "10 %), 1 or more is a number of steps. Needs a scheduler with warm-up (not 'constant').",
        widget="number", ge=0, label="Warm-up steps")
    optimizer: str = setting(
        "AdamW", "Optimizer, by kohya's names. The 8bit and Paged ones (bitsandbytes) save memory; "
        "Prodigy and the DAdapt ones set their own step size (use learning rate 1); the "
        "ScheduleFree ones need no scheduler (constant). Adafactor, as in sd-scripts, uses relative "
        "steps (its own step size and schedule, whatever the scheduler says) unless the arguments "
        "say relative_step=False. A dotted class path such as pytorch_optimizer.CAME is also "
        "accepted, with its arguments below.", widget="dropdown", choices=list(OPTIMIZERS), custom=True)
    optimizer_args: str = setting(
        "", "Extra optimizer arguments as key=value pairs separated by spaces or commas, e.g. "
        "'weight_decay=0.01 betas=0.9,0.99' (kohya's --optimizer_args). Values are numbers, "
        "true/false, None, tuples or text; nothing is evaluated as code.",
        widget="text", advanced=True)
    stop_text_encoder_training: float = setting(
        0, "Stop training the text encoder after this point: below 1 a fraction of the total steps "
        "(0.3 = after 30 %), 1 or more a number of steps; the U-Net goes on. 0 = train it to the "
        "end.", widget="number", ge=0, advanced=True, label="Stop text encoder training")
    network_dim: int = setting(
        16, "LoRA rank r: the size of the low-rank update. Higher = more capacity and a larger file.",
        widget="number", ge=1, le=1024, label="Network rank (dim)")
    network_alpha: float = setting(
        8, "Scales the LoRA update by alpha / rank (alpha = rank gives scale 1; lower alpha = "
        "smaller effective learning rate).", widget="number", gt=0, le=4096)
    batch_size: int = setting(
        1, "Images per step (all from one bucket).", widget="number", ge=1, le=1024)
    gradient_accumulation_steps: int = setting(
        1, "Add up the gradients of this many batches before each optimizer step: effective batch = "
        "batch size x accumulation x processes.", widget="number", ge=1, le=1024, advanced=True)
    num_workers: int = setting(
        0, "Data loader processes that prepare images in the background (0 = in the training "
        "process).", widget="number", ge=0, le=64, advanced=True)
    persistent_workers: bool = setting(
        False, "Keep the data loader processes alive between epochs (needs workers > 0).",
        widget="checkbox", advanced=True)
    mixed_precision: Literal["no", "fp16", "bf16"] = setting(
        "no", "Compute in 16-bit where safe: bf16 (recent GPUs, also CPU) or fp16 (CUDA only). "
        "The LoRA weights stay 32-bit while training.", widget="dropdown")
    gradient_checkpointing: bool = setting(
        False, "Recompute activations during the backward pass: much less memory, somewhat slower, "
        "same result.", widget="checkbox")
    max_grad_norm: float = setting(
        1.0, "Clip the gradient norm to this value; 0 = no clipping.", widget="number", ge=0,
        advanced=True)
    validation_split: float = setting(
        0.0, "Fraction of the training images held out (not trained on) to compute a validation "
        "loss, which shows over-fitting when it rises while the training loss falls. 0 = off.",
        widget="number", ge=0, le=0.5, step=0.05)
    validation_every_n_steps: int = setting(
        0, "Compute the validation loss every N steps (0 = only per epoch, see below).",
        widget="number", ge=0)
    validation_every_n_epochs: int = setting(
        1, "Compute the validation loss every N epochs (0 = not per epoch).", widget="number", ge=0,
        advanced=True)


    @field_validator("optimizer_args", "lr_scheduler_args")
    @classmethod
    def _optimizer_args(cls, value: str) -> str:
        try:
            parse_optimizer_args(value)
        except ValueError as exc:
            raise PydanticCustomError("optimizer_args", str(exc)) from None
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer_name(cls, value: str) -> str:
        """A kohya name (any case, as sd-scripts compares them lower-cased) or a dotted class path."""
        value = str(value).strip()
        known = {o.lower(): o for o in OPTIMIZERS}
        if value.lower() in known:
            return known[value.lower()]
        if _DOTTED.fullmatch(value):
            return value
        raise PydanticCustomError(
            "optimizer", "{value!r} is not an optimizer: choose one of {names}, or give a dotted "
            "class path such as pytorch_optimizer.CAME",
            {"value": value, "names": ", ".join(OPTIMIZERS)})

    @field_validator("lr_scheduler_type")
    @classmethod
    def _scheduler_class(cls, value: str) -> str:
        value = str(value).strip()
        if value and not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", value):
            raise PydanticCustomError(
                "scheduler_class", "must be a class name such as CosineAnnealingLR or a dotted "
                "path module.Class (or empty)")
        return value


class LabelSettings(Group):
    tab: ClassVar[str] = "labels"
    title: ClassVar[str] = "Labels"

    caption_extension: str = setting(
        ".txt", "Caption file = image name with this extension (photo.png -> photo.txt). Images "
        "without one are captioned with their folder's class tokens.", widget="text")
    shuffle_caption: bool = setting(
        False, "Shuffle the comma-separated tags of a caption each time it is used.",
        widget="checkbox")
    keep_tokens: int = setting(
        0, "The first N comma-separated tags stay in place when shuffling (tags, not CLIP tokens).",
        widget="number", ge=0, le=255)
    keep_tokens_separator: str = setting(
        "", "A separator such as '|||': the part of a caption before it stays fixed (never shuffled "
        "or dropped), only the part after it is shuffled; a second one marks a fixed end part "
        "('a, b ||| c, d ||| e'). Overrides 'keep tokens' for captions that "
        "contain it. Empty = off.", widget="text", advanced=True)
    secondary_separator: str = setting(
        "", "A separator such as ';;;' that joins tags into one unit for shuffling and dropping; it "
        "is replaced by ', ' afterwards (e.g. 'red hair;;;long hair' moves as one tag). Empty = off.",
        widget="text", advanced=True)
    caption_prefix: str = setting(
        "", "Text put before every caption (before shuffling; it is part of the kept tags when "
        "'keep tokens' > 0). Empty = none.", widget="text", advanced=True)
    caption_suffix: str = setting(
        "", "Text put after every caption. Empty = none.", widget="text", advanced=True)
    enable_wildcard: bool = setting(
        False, "Wildcards in captions: '{red|blue} dress' picks one of the choices at random each "
        "time the caption is used; a caption file with several lines uses one random line.",
        widget="checkbox", advanced=True)
    weighted_captions: bool = setting(
        False, "Read A1111 attention weights in captions: (word) = x1.1, [word] = /1.1, (word:1.3) "
        "= x1.3; the weight scales that word's text-encoder output. Do not put commas inside the "
        "brackets when shuffling or dropping tags.", widget="checkbox", advanced=True)
    token_warmup_min: int = setting(
        1, "Tag warm-up: start training with only the first N shuffle-able tags of each caption "
        "(after the kept ones) and add tags linearly until 'token warmup step'.", widget="number", ge=1, le=255, advanced=True)
    token_warmup_step: float = setting(
        0, "Tag warm-up length: the whole caption is used from this step on (below 1 a fraction of "
        "the total steps). 0 = no warm-up.", widget="number", ge=0, advanced=True)
    caption_dropout_rate: float = setting(
        0.0, "Probability that a sample's whole caption is replaced by an empty one (trains "
        "unconditional generation).", widget="number", ge=0, le=1, advanced=True, step=0.01)
    caption_dropout_every_n_epochs: int = setting(
        0, "Drop all captions in every N-th epoch (0 = never).", widget="number", ge=0,
        advanced=True)
    caption_tag_dropout_rate: float = setting(
        0.0, "Probability of dropping each tag that is not kept.", widget="number", ge=0, le=1,
        advanced=True, step=0.01)
    max_token_length: int = setting(
        75, "Longest caption in CLIP tokens: 75, 150 or 225. As sd-scripts trains, a long caption is "
        "encoded as 75-token chunks and joined into one BOS, 75 states per chunk and one EOS "
        "(75n+2). A1111 at inference concatenates whole 77-state chunks instead; the LoRA works "
        "with both.", widget="dropdown", choices=["75", "150", "225"])
    tag_occurrence_txt_file: bool = setting(
        True, "Write a text report of how often each tag occurs in the captions next to the LoRA.",
        widget="checkbox", label="Write tag report")
    sort_tag_occurrence_alphabetically: bool = setting(
        False, "Sort the tag report alphabetically instead of by count.", widget="checkbox",
        advanced=True)

    @field_validator("caption_extension")
    @classmethod
    def _extension(cls, value: str) -> str:
        if not re.fullmatch(r"\.[A-Za-z0-9_.-]{1,20}", value):
            raise PydanticCustomError("extension", "must start with a dot, e.g. .txt or .caption")
        return value

    @field_validator("max_token_length")
    @classmethod
    def _token_length(cls, value: int) -> int:
        if value not in (75, 150, 225):
            raise PydanticCustomError("token_length", "must be 75, 150 or 225")
        return value


class AdvancedSettings(Group):
    tab: ClassVar[str] = "advanced"
    title: ClassVar[str] = "Advanced"

    noise_offset: float = setting(
        0.0, "Add offset x N(0,1) per sample and channel to the noise, so the model can learn very "
        "dark or very bright images. Typical 0.05-0.1; 0 = off.", widget="number", ge=0, le=1,
        step=0.01, family=("sd", "sdxl"))
    noise_offset_random_strength: bool = setting(
        False, "Use a random noise offset between 0 and the noise offset for each sample instead of "
        "the fixed value.", widget="checkbox", advanced=True, family=("sd", "sdxl"))
    adaptive_noise_scale: float = setting(
        0.0, "Adds |mean of the latent| x this value to the noise offset of each sample and channel "
        "(needs a noise offset). Typical 0.01-0.05; 0 = off.", widget="number", ge=-1, le=1,
        advanced=True, step=0.001, family=("sd", "sdxl"))
    multires_noise_iterations: int = setting(
        0, "Pyramid (multi-resolution) noise: add this many levels of up-sampled lower-resolution "
        "noise. Typical 6-10; 0 = off.", widget="number", ge=0, le=16, family=("sd", "sdxl"))
    multires_noise_discount: float = setting(
        0.3, "Weight of each coarser pyramid-noise level (level i is weighted discount^i).",
        widget="number", ge=0, le=1, step=0.05, family=("sd", "sdxl"))
    min_snr_gamma: float = setting(
        0.0, "Min-SNR loss weighting (Hang et al. 2023): caps the weight of low-noise timesteps. "
        "Typical 5; 0 = off.", widget="number", ge=0, le=100, label="Min-SNR gamma", family=("sd", "sdxl"))
    ip_noise_gamma: float = setting(
        0.0, "Input perturbation (Ning et al. 2023): the noisy latent is made from noise + gamma x "
        "N(0,1) while the target stays the plain noise; regularises. Typical 0.1; 0 = off.",
        widget="number", ge=0, le=1, advanced=True, step=0.01, label="IP noise gamma")
    ip_noise_gamma_random_strength: bool = setting(
        False, "Use a random input-perturbation strength between 0 and the IP noise gamma for each "
        "sample.", widget="checkbox", advanced=True, label="IP noise gamma random strength")
    min_timestep: int = setting(
        0, "Smallest diffusion timestep sampled while training (0-999). Raise it to train only the "
        "noisier, composition-level steps.", widget="number", ge=0, le=999, advanced=True)
    max_timestep: int = setting(
        1000, "Timesteps are sampled below this value (1-1000; 1000 = all). Lower it to train only "
        "the detail-level steps. Equal to the min = always that one timestep.", widget="number",
        ge=1, le=1000, advanced=True)
    loss_type: Literal[LOSS_TYPES] = setting(  # type: ignore[valid-type]
        "l2", "Loss between prediction and target: l2 (mean squared error, the standard), l1, "
        "huber or smooth_l1 (robust to outliers, with the Huber settings below).",
        widget="dropdown", advanced=True)
    huber_schedule: Literal[HUBER_SCHEDULES] = setting(  # type: ignore[valid-type]
        "snr", "How the Huber parameter changes with the timestep: snr (from the noise level), "
        "exponential (decays from 1 to huber_c over the timesteps) or constant (= huber_c x huber "
        "scale). Only for huber and smooth_l1.", widget="dropdown", advanced=True)
    huber_c: float = setting(
        0.1, "The Huber loss parameter (the point where the loss turns from quadratic to linear). "
        "Only for huber and smooth_l1.", widget="number", gt=0, le=1, advanced=True, step=0.01,
        label="Huber c")
    huber_scale: float = setting(
        1.0, "Multiplies the Huber parameter (sd-scripts' --huber_scale). Only for huber and "
        "smooth_l1.", widget="number", gt=0, le=10, advanced=True, step=0.01)
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, "With v-prediction, weight the loss by SNR/(SNR+1) so that it scales like the noise-"
        "prediction loss over the timesteps.", widget="checkbox", advanced=True,
        label="Scale v-pred loss like noise pred")
    v_pred_like_loss: float = setting(
        0.0, "For noise prediction: add this much of a v-prediction-like loss (loss / (SNR+1) x "
        "value). 0 = off.", widget="number", ge=0, le=1, advanced=True, step=0.01,
        label="V-pred-like loss")
    debiased_estimation_loss: bool = setting(
        False, "Weight the loss by 1/sqrt(SNR) (debiased estimation, Yu et al. 2023): less weight "
        "on the low-noise timesteps.", widget="checkbox", advanced=True)
    masked_loss: bool = setting(
        False, "Compute the loss only where a mask is white (black = ignored, grey = partly): the "
        "mask is the image of the same name in the mask folder, or the image's alpha channel when "
        "no mask folder is set.", widget="checkbox", advanced=True)
    mask_folder: str = setting(
        "", "Masks for the masked loss, laid out like the image folder (same sub-folders, same "
        "file names, any image format). Empty = use each image's alpha channel.",
        widget="folder", advanced=True)
    conv_dim: int = setting(
        0, "LoCon: also put a LoRA of this rank on the 3x3 convolutions of the ResNet blocks and the "
        "down/up-samplers. 0 = off (plain LoRA).", widget="number", ge=0, le=1024,
        label="Conv rank (LoCon)", family=("sd", "sdxl"))
    conv_alpha: float = setting(
        1.0, "Alpha of the convolution LoRA (scale = conv alpha / conv rank).", widget="number",
        gt=0, le=4096, family=("sd", "sdxl"))
    network_dropout: float = setting(
        0.0, "Dropout of the LoRA's rank features (after the down projection) while training, as "
        "sd-scripts' dropout (regularises; 0 = off).", widget="number", ge=0, lt=1, step=0.05)
    rank_dropout: float = setting(
        0.0, "Drop this fraction of the rank dimensions of each LoRA update while training, and "
        "scale the rest up (kohya's rank_dropout). 0 = off.", widget="number", ge=0, lt=1,
        advanced=True, step=0.05)
    module_dropout: float = setting(
        0.0, "Skip a whole LoRA module with this probability at each training step (kohya's "
        "module_dropout). 0 = off.", widget="number", ge=0, lt=1, advanced=True, step=0.05)
    scale_weight_norms: float = setting(
        0.0, "Max-norm regularisation: after each step, scale down any LoRA pair whose update "
        "(up x down x alpha/rank) has a norm above this value. 1 is a good start; 0 = off.",
        widget="number", ge=0, le=100, advanced=True, step=0.1)
    loraplus_lr_ratio: float = setting(
        0.0, "LoRA+: the 'up' matrices learn this many times faster than the 'down' ones (Hayou et "
        "al. 2024 suggest 16). 0 = off.", widget="number", ge=0, le=128, advanced=True,
        label="LoRA+ LR ratio")
    loraplus_unet_lr_ratio: float = setting(
        0.0, "LoRA+ ratio for the U-Net only. 0 = the LoRA+ LR ratio.", widget="number", ge=0,
        le=128, advanced=True, label="LoRA+ U-Net LR ratio")
    loraplus_text_encoder_lr_ratio: float = setting(
        0.0, "LoRA+ ratio for the text encoder only. 0 = the LoRA+ LR ratio.", widget="number",
        ge=0, le=128, advanced=True, label="LoRA+ text encoder LR ratio")
    down_lr_weight: str = setting(
        "", "Block-wise learning rate: up to 12 comma-separated weights for the U-Net's down "
        "blocks IN0..IN11 (SDXL: 9, input blocks 0..8; extra ones are cut) (missing ones = 1), or a preset sine, cosine, linear, reverse_linear, "
        "zeros (with +number to shift, e.g. sine+0.5). Empty = 1 for every block.", widget="text", advanced=True, label="Down LR weights")
    mid_lr_weight: str = setting(
        "", "Block-wise learning rate weight of the U-Net's middle block (SDXL: up to 3 weights, one per "
        "middle block part). Empty = 1.",
        widget="text", advanced=True, label="Mid LR weight")
    up_lr_weight: str = setting(
        "", "Block-wise learning rate: 12 comma-separated weights for the U-Net's up blocks "
        "(OUT0..OUT11; SDXL: 9, output blocks 0..8), or a preset as for the down blocks. Empty = 1 for every block.",
        widget="text", advanced=True, label="Up LR weights")
    block_lr_zero_threshold: float = setting(
        0.0, "Blocks whose LR weight is at or below this value get no LoRA at all (not trained, "
        "not saved), as sd-scripts does. 0 = only blocks with weight 0 (or less) are left out.", widget="number", ge=0,
        advanced=True, label="Block LR zero threshold")
    block_dims: str = setting(
        "", "Rank per U-Net block: 25 comma-separated numbers for IN0..IN11, MID, OUT0..OUT11 "
        "of the SD 1.x/2.x U-Net; SDXL: 23 (0 embeddings, IN 1..9, MID 10..12, OUT 13..21, 22 out). "
        "Not for Flux. "
        "Empty = the network rank everywhere.", widget="text", advanced=True)
    block_alphas: str = setting(
        "", "Alpha per U-Net block (25 or, SDXL, 23 numbers as for the block dims). Empty = the network alpha.",
        widget="text", advanced=True)
    conv_block_dims: str = setting(
        "", "Convolution (LoCon) rank per U-Net block (25, SDXL 23 numbers; 0 = no conv LoRA there). Empty "
        "= the conv rank everywhere.", widget="text", advanced=True)
    conv_block_alphas: str = setting(
        "", "Convolution alpha per U-Net block (25, SDXL 23 numbers). Empty = the conv alpha.",
        widget="text", advanced=True)
    dim_from_weights: bool = setting(
        False, "Take the rank (and alpha) of each layer from the 'Start from LoRA' file instead of "
        "the network rank.", widget="checkbox", advanced=True)
    # --- the network type (LyCORIS; kohya_ss's LoRA_type and its LyCORIS options) ---------------
    network_type: Literal[NETWORK_TYPES] = setting(  # type: ignore[valid-type]
        "LoRA", "The kind of network. LoRA: kohya's LoRA (with conv rank > 0: kohya LoCon). The "
        "others are LyCORIS algorithms (the lycoris-lora package, as kohya_ss trains them): LoCon "
        "(LoRA on linear and conv layers), LoHa (Hadamard product of two low-rank pairs), LoKr "
        "(Kronecker product; see factor), IA3 (a learned scale per channel), GLoRA, Full (native "
        "fine-tuning: the full weight difference), Diag-OFT and BOFT (orthogonal fine-tuning). "
        "DoRA is the 'DoRA' switch on LoRA, LoCon, LoHa or LoKr.", widget="dropdown",
        label="Network type")
    lycoris_preset: Literal[LYCORIS_PRESETS] = setting(  # type: ignore[valid-type]
        "full", "LyCORIS: which layers get the network (lycoris-lora's presets): full = attention, "
        "MLP, ResNet and sampler layers of the U-Net and the text encoder's attention and MLP; "
        "full-lin without convolutions; attn-mlp / attn-only; unet-only; unet-transformer-only; "
        "unet-convblock-only; ia3 (k, v and the MLP output, for IA3).", widget="dropdown",
        advanced=True, label="LyCORIS preset")
    dora_wd: bool = setting(
        False, "DoRA (Liu et al. 2024): decompose each weight into magnitude and direction and "
        "train the magnitude too (LyCORIS 'dora_wd'). Works with LoRA, LoCon, LoHa and LoKr.",
        widget="checkbox", advanced=True, label="DoRA")
    factor: int = setting(
        -1, "LoKr: the Kronecker factor (the first matrix is factor x factor); -1 = the most "
        "balanced split.", widget="number", advanced=True, ge=-1, le=1024)
    decompose_both: bool = setting(
        False, "LoKr: also decompose the first (small) Kronecker factor into a low-rank pair.",
        widget="checkbox", advanced=True)
    use_tucker: bool = setting(
        False, "LyCORIS: Tucker decomposition of kxk convolutions (kohya_ss 'use_cp' / "
        "'use_tucker'): fewer parameters for 3x3 convs.", widget="checkbox", advanced=True)
    use_scalar: bool = setting(
        False, "LyCORIS: train an extra scalar per module (starts at 0, so both factors can start "
        "random).", widget="checkbox", advanced=True)
    rank_dropout_scale: bool = setting(
        False, "LyCORIS: rescale the kept ranks by 1/(1 - rank dropout) while training.",
        widget="checkbox", advanced=True)
    train_norm: bool = setting(
        False, "LyCORIS: also train the LayerNorm/GroupNorm weights of the targeted blocks.",
        widget="checkbox", advanced=True)
    bypass_mode: bool = setting(
        False, "LyCORIS: compute W x + delta(x) instead of (W + delta W) x (for quantised bases; "
        "the same result in float32).", widget="checkbox", advanced=True)
    constrain: float = setting(
        0.0, "Diag-OFT: bound the norm of the rotation (LyCORIS 'constraint'); 0 = unbounded.",
        widget="number", advanced=True, ge=0, le=100, step=0.01)
    rescaled: bool = setting(
        False, "Diag-OFT: learn a rescale per output channel besides the rotation.",
        widget="checkbox", advanced=True)
    prior_loss_weight: float = setting(
        1.0, "Loss weight of the regularisation images.", widget="number", ge=0, le=100)
    zero_terminal_snr: bool = setting(
        False, "Rescale the noise schedule so its last timestep is pure noise (Lin et al. 2024, as "
        "sd-scripts). For v-prediction models trained that way (NoobAI-XL v-pred, SD 2 768-v): use it "
        "with v_parameterization; with noise prediction the result is unexpected.",
        widget="checkbox", label="Zero terminal SNR", family=("sd", "sdxl"))
    fp8_base: bool = setting(
        False, "Store the frozen U-Net's weights in 8-bit floats and compute in the mixed precision "
        "(layer by layer): halves the U-Net's memory (SDXL: 5 GB -> 2.6 GB) at a small quality cost. "
        "The LoRA stays 32-bit.", widget="checkbox", label="fp8 U-Net storage")
    timestep_sampling: Literal["sigma", "uniform", "sigmoid", "logit_normal", "shift", "flux_shift"] = setting(
        "shift", "How Flux timesteps are drawn (sd-scripts' names): sigma = from the scheduler's shifted sigmas "
        "with the weighting scheme's density; uniform; sigmoid = sigmoid(sigmoid_scale * N(0,1)); logit_normal = "
        "sigmoid(N(logit_mean, logit_std)); shift = sigmoid sampling shifted by discrete_flow_shift; flux_shift = "
        "shifted by the image's resolution as Flux samples. The default is the timestep_sampling of the settings "
        "sd-scripts' Flux guide recommends (shift with discrete_flow_shift 3.1582, model_prediction_type raw, "
        "guidance_scale 1.0); its command-line default is sigma. Flux only.", widget="dropdown", family="flux")
    discrete_flow_shift: float = setting(
        3.1582, "The flow shift s for timestep_sampling shift and sigma: t' = s t / (1 + (s - 1) t). 3.1582 (about "
        "e^1.15, Flux's shift at 4096 tokens) is the value sd-scripts' Flux guide recommends with shift sampling; "
        "its command-line default is 3.0. Flux only.", widget="number", gt=0, le=100, step=0.1, family="flux")
    sigmoid_scale: float = setting(
        1.0, "Scale of the normal draw for sigmoid/shift/flux_shift sampling (larger = more uniform). Flux only.",
        widget="number", gt=0, le=100, step=0.1, family="flux")
    model_prediction_type: Literal["raw", "additive", "sigma_scaled"] = setting(
        "raw", "How the Flux prediction is read (sd-scripts' names): raw = the velocity, compared with noise - "
        "latents; additive = prediction + noisy input; sigma_scaled = noisy - sigma * prediction, an estimate of "
        "the clean latents compared with them (SD3's preconditioning, as diffusers' SD3/Flux scripts' "
        "precondition_outputs; sd-scripts compares it with noise - latents instead). raw is what sd-scripts' Flux "
        "guide recommends; its command-line default is sigma_scaled. Flux only.", widget="dropdown",
        family="flux")
    weighting_scheme: Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"] = setting(
        "none", "diffusers' SD3/Flux schemes: logit_normal and mode shape the density of timestep_sampling sigma; "
        "sigma_sqrt and cosmap weight the loss per sample, with every model_prediction_type (sd-scripts weights "
        "only with sigma_scaled). Default none, as sd-scripts. Flux only.", widget="dropdown", family="flux")
    logit_mean: float = setting(0.0, "Mean of the logit-normal draw. Flux only.", widget="number", ge=-10, le=10,
                                step=0.1, family="flux")
    logit_std: float = setting(1.0, "Standard deviation of the logit-normal draw. Flux only.", widget="number",
                               gt=0, le=10, step=0.1, family="flux")
    mode_scale: float = setting(1.29, "Scale of the mode weighting scheme. Flux only.", widget="number", ge=0,
                                le=10, step=0.01, family="flux")
    guidance_scale: float = setting(
        1.0, "The guidance value FLUX.1-dev's guidance embedding gets while training: 1.0, as sd-scripts' Flux "
        "guide says to set it for training (its command-line default is 3.5, the distilled model's inference "
        "value); schnell has no guidance embedding and ignores it. Flux only.", widget="number", ge=0, le=100,
        step=0.1, family="flux")
    t5xxl_max_token_length: int = setting(
        0, "T5-XXL tokens per caption; 0 = the model's own (512 for dev, 256 for schnell). Flux only.",
        widget="number", ge=0, le=512, family="flux")
    flux_train_blocks: Literal["all", "double", "single"] = setting(
        "all", "Which Flux blocks get the LoRA (sd-scripts' train_blocks). Flux only.", widget="dropdown",
        family="flux")
    flux_block_indices: str = setting(
        "", "Train only these blocks, e.g. 'double:0-9 single:10,12' (empty = every block of flux_train_blocks). "
        "Flux only.", widget="text", family="flux")
    flux_train_modulation: bool = setting(
        True, "Also put the LoRA on the blocks' modulation linears (img_mod, txt_mod, modulation), as sd-scripts' "
        "lora_flux does by default (304 modules on Flux-dev; 228 without). Flux only.", widget="checkbox",
        family="flux")
    nf4_base: bool = setting(
        False, "Store the frozen U-Net/transformer's linear weights in 4-bit NF4 with bitsandbytes (QLoRA): "
        "FLUX.1-dev's 12B transformer takes about 6.5 GB instead of 24 GB in bf16, at some quality cost. The "
        "LoRA stays 32-bit. Not together with fp8 storage.", widget="checkbox", label="NF4 (4-bit) base storage")
    blocks_to_swap: int = setting(
        0, "For 12-16 GB GPUs (sd-scripts' blocks_to_swap): keep the frozen weights of this many Flux transformer "
        "blocks in CPU memory and copy each to the GPU only while it computes, in the forward and the backward "
        "pass. N swaps the last N // 2 double blocks and 2 (N - N // 2) single blocks (FLUX.1 has 19 and 38; a "
        "double block holds 680 MB in bf16, a single block 280 MB; half that in fp8); each step copies them twice, "
        "so it is slower. 0 = off. Needs gradient checkpointing; not with NF4 storage. Flux only.", widget="number", ge=0, le=38, family="flux")
    attention: Literal["sdpa", "xformers"] = setting(
        "sdpa", "Attention kernel: sdpa (PyTorch's scaled-dot-product attention) or xformers if it "
        "is installed. Same result, different speed and memory.", widget="dropdown")

    @field_validator("block_dims", "conv_block_dims")
    @classmethod
    def _per_block_ints(cls, value: str) -> str:
        """sd-scripts networks/lora.py get_block_dims_and_alphas: exactly one int per block (25 for
        SD 1.x/2.x, 23 for SDXL; the engine checks the count against the model's family)."""
        return _block_counts(_number_list(value, 2 * NUM_BLOCKS + 1, integers=True))

    @field_validator("block_alphas", "conv_block_alphas")
    @classmethod
    def _per_block(cls, value: str) -> str:
        return _block_counts(_number_list(value, 2 * NUM_BLOCKS + 1))

    @field_validator("down_lr_weight", "up_lr_weight")
    @classmethod
    def _block_weights(cls, value: str) -> str:
        """sd-scripts networks/lora.py get_block_lr_weight: up to 12 numbers (missing ones = 1) or
        a named preset with an optional '+base'."""
        text = str(value).strip().replace(" ", "")
        name, _, base = text.partition("+")
        if name in LR_WEIGHT_PRESETS:
            if base and not _is_number(base):
                raise PydanticCustomError(
                    "block_lr", "a preset takes an optional '+number' after it, e.g. sine+0.5")
            return text
        return _number_list(value, NUM_BLOCKS)

    @field_validator("mid_lr_weight")
    @classmethod
    def _mid_weight(cls, value: str) -> str:
        """SD 1.x/2.x reads 1 number, SDXL 3 (sd-scripts SDXL_NUM_OF_MID_BLOCKS); extra ones are cut."""
        return _number_list(value, 3)


class SampleSettings(Group):
    tab: ClassVar[str] = "samples"
    title: ClassVar[str] = "Samples"

    sample_prompts: str = setting(
        "", "One prompt per line for sample images during training, in kohya's syntax: --n negative "
        "prompt, --w width, --h height (rounded down to a multiple of 8), --d seed, --l CFG scale, "
        "--s steps, --ss sampler; flags in any case. --g, --cn, --ctr, --rcfg and --fs are accepted "
        "and ignored with a note (other model families). Lines starting with # are skipped.",
        widget="textarea")
    sample_sampler: Literal[SAMPLERS] = setting(  # type: ignore[valid-type]
        "euler_a", "Sampler (noise scheduler) used for sample images.", widget="dropdown")
    sample_width: int = setting(
        512, "Default width of sample images (multiple of 8).", widget="number", ge=64, le=4096)
    sample_height: int = setting(
        512, "Default height of sample images (multiple of 8).", widget="number", ge=64, le=4096)
    sample_steps: int = setting(
        20, "Default number of denoising steps per sample image.", widget="number", ge=1, le=1000)
    sample_cfg_scale: float = setting(
        7.0, "Default classifier-free guidance scale: how strongly samples follow the prompt "
        "(1 = no guidance).", widget="number", ge=0, le=50, label="Sample CFG scale")
    test_seed: int | None = setting(
        None, "Seed for the sample images of prompts without --d: prompt N uses this seed + N, so "
        "samples from different epochs are comparable. Empty = a new random seed for every image, "
        "as sd-scripts does; the seed used is written into the PNG either way.",
        widget="number", ge=0, le=2**32 - 1)
    sample_every_n_epochs: int = setting(
        0, "Make sample images every N epochs (0 = not per epoch).", widget="number", ge=0)
    sample_every_n_steps: int = setting(
        0, "Make sample images every N steps (0 = not per step).", widget="number", ge=0)
    strength_sweep: str = setting(
        "", "LoRA strengths for a last round of samples when the run finishes, comma-separated "
        "(e.g. 0.5, 0.75, 1.0): each sample prompt is rendered at each strength, to see how strong "
        "the LoRA should be used. Empty = off.", widget="text")

    @field_validator("strength_sweep")
    @classmethod
    def _strengths(cls, value: str) -> str:
        return ", ".join(f"{w:g}" for w in parse_strengths(value))

    @field_validator("sample_width", "sample_height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise PydanticCustomError(
                "multiple_of_8", "must be a multiple of 8 (e.g. {suggestion})",
                {"suggestion": max(64, value // 8 * 8)})
        return value


class RunSettings(Group):
    tab: ClassVar[str] = "runs"
    title: ClassVar[str] = "Presets and runs"

    save_json_folder: str = setting(
        "", "Folder where a copy of the settings is saved when a run starts (every run also keeps its "
        "settings next to its outputs).", widget="folder", advanced=True)
    load_json_path: str = setting(
        "", "A settings JSON file to load (keys in the skip-list are not overwritten).",
        widget="file")
    json_load_skip_list: list[str] = setting(
        list(DEFAULT_SKIP_LIST), "Settings that loading a JSON file leaves unchanged (machine-"
        "specific paths, the run name). This list itself is never loaded from a file.",
        widget="list", label="Skip-list for loading")
    multi_run_folder: str = setting(
        "", "A folder of settings JSON files run one after another in sorted order; finished files "
        "move to complete/, failed ones to failed/, and the queue survives a restart.",
        widget="folder", advanced=True)
    save_json_only: bool = setting(
        False, "Only write the settings JSON; do not train.", widget="checkbox", advanced=True)

    @field_validator("json_load_skip_list")
    @classmethod
    def _known_keys(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if k.split(".")[-1] not in FIELD_GROUPS]
        if unknown:
            raise PydanticCustomError(
                "skip_list", "names unknown settings: {unknown}; use setting names such as "
                "base_model or img_folder", {"unknown": ", ".join(unknown)})
        return list(dict.fromkeys(k.split(".")[-1] for k in value))


# accelerate launch's flags that extra_accelerate_launch_args may carry (flag -> takes a value);
# anything else (a script, --config_file, a shell fragment) is refused.
LAUNCH_FLAGS: dict[str, bool] = {
    "--num_cpu_threads_per_process": True, "--dynamo_backend": True, "--rdzv_backend": True,
    "--rdzv_conf": True, "--same_network": False, "--debug": False, "--enable_cpu_affinity": False,
    "--tee": True, "--log_dir": True,
}


def parse_launch_args(text: str) -> list[str]:
    """``extra_accelerate_launch_args`` as an argv list (shlex, never a shell); ValueError names
    the first flag that is not allowed."""
    import shlex

    argv = shlex.split(text)
    i = 0
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag not in LAUNCH_FLAGS:
            raise ValueError(f"{argv[i]!r} is not an accelerate launch flag lora-gui passes on "
                             f"(allowed: {', '.join(sorted(LAUNCH_FLAGS))})")
        i += 2 if LAUNCH_FLAGS[flag] and not inline else 1
    if argv and LAUNCH_FLAGS.get(argv[-1].partition("=")[0]) and "=" not in argv[-1]:
        raise ValueError(f"{argv[-1]} needs a value")
    return argv


class LaunchSettings(Group):
    tab: ClassVar[str] = "launch"
    title: ClassVar[str] = "GPUs and machines"

    multi_gpu: bool = setting(
        False, "Train on several processes (GPUs) at once with accelerate launch: each trains a "
        "slice of every batch and their gradients are averaged (the global batch is batch size x "
        "processes).", widget="checkbox", label="Several GPUs")
    num_processes: int = setting(
        1, "Processes in all (all machines together): usually one per GPU.", widget="number",
        ge=1, le=1024)
    gpu_ids: str = setting(
        "", "The GPUs to use, e.g. 0,1 (empty = all). The Runs tab lists the GPUs found.",
        widget="text", label="GPU ids")
    gpu_per_run: bool = setting(
        False, "In the queue: this run trains on one GPU of its own (the first free one of GPU ids, "
        "or of all GPUs when that is empty, given to it alone as CUDA_VISIBLE_DEVICES), beside "
        "other queued runs with this on, each on another GPU. A run started with Start, or queued "
        "without this, has every GPU to itself. On a machine without a GPU the queued runs train "
        "one at a time.", widget="checkbox", label="One GPU per queued run")
    num_machines: int = setting(
        1, "Machines taking part. Each other machine starts the same settings with its own "
        "machine_rank (see the README).", widget="number", ge=1, le=1024, advanced=True)
    machine_rank: int = setting(
        0, "This machine's number (0 = the main machine).", widget="number", ge=0, advanced=True)
    main_process_ip: str = setting(
        "", "The main machine's address, which the others connect to (several machines only).",
        widget="text", advanced=True, label="Main process IP")
    main_process_port: int = setting(
        0, "The main machine's port for the processes to meet (0 = accelerate's default, 29500).",
        widget="number", ge=0, le=65535, advanced=True)
    extra_accelerate_launch_args: str = setting(
        "", "More accelerate launch flags, e.g. --num_cpu_threads_per_process 4 (only launch "
        "flags; never a shell command).", widget="text", advanced=True)

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _gpu_list(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):  # "gpu_ids": 1 in a file
            value = str(value)
        if not isinstance(value, str):
            return value
        parts = [p.strip() for p in value.replace(" ", "").split(",") if p.strip()]
        if any(not p.isdigit() for p in parts):
            raise PydanticCustomError("gpu_ids", "must be GPU numbers separated by commas, e.g. 0,1")
        return ",".join(parts)

    @field_validator("extra_accelerate_launch_args")
    @classmethod
    def _launch_args(cls, value: str) -> str:
        try:
            parse_launch_args(value)
        except ValueError as exc:
            raise PydanticCustomError("launch_args", "{why}", {"why": str(exc)}) from None
        return value.strip()

    @property
    def processes(self) -> int:
        """Processes the run is launched with (1: the plain trainer, no accelerate launch)."""
        return self.num_processes if (self.multi_gpu or self.num_machines > 1) else 1


GROUPS: dict[str, type[Group]] = {
    "model": ModelSettings,
    "triggers": TriggerSettings,
    "images": ImageSettings,
    "training": TrainingGroup,
    "labels": LabelSettings,
    "advanced": AdvancedSettings,
    "samples": SampleSettings,
    "runs": RunSettings,
    "launch": LaunchSettings,
}

# field name -> group name. Field names are unique across groups, so a bare name is enough to find
# a setting (the skip-list and foreign files use bare names).
FIELD_GROUPS: dict[str, str] = {
    name: group for group, cls in GROUPS.items() for name in cls.model_fields
}


@dataclass(frozen=True)
class StepPlan:
    """How long a run is, from the number of batches one epoch of the dataset makes."""

    batches_per_epoch: int
    steps_per_epoch: int
    epochs: int
    total_steps: int


class TrainingSettings(BaseModel):
    """All settings of one run. Build it with ``lora_gui.settings.io`` to get friendly errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSettings = Field(default_factory=ModelSettings)
    triggers: TriggerSettings = Field(default_factory=TriggerSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    training: TrainingGroup = Field(default_factory=TrainingGroup)
    labels: LabelSettings = Field(default_factory=LabelSettings)
    advanced: AdvancedSettings = Field(default_factory=AdvancedSettings)
    samples: SampleSettings = Field(default_factory=SampleSettings)
    runs: RunSettings = Field(default_factory=RunSettings)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainingSettings:
        issues = cross_field_issues(self)
        if issues:
            raise PydanticCustomError(
                "cross_field", "{summary}",
                {"summary": "; ".join(f"{p}: {m}" for p, m in issues), "issues": issues})
        return self

    def get(self, name: str):
        """The value of a setting by bare name or 'group.name'."""
        name = name.split(".")[-1]
        return getattr(getattr(self, FIELD_GROUPS[name]), name)

    @property
    def effective_unet_lr(self) -> float:
        t = self.training
        return 0.0 if t.text_only else (t.learning_rate if t.unet_lr is None else t.unet_lr)

    @property
    def effective_text_encoder_lr(self) -> float:
        t = self.training
        if t.unet_only:
            return 0.0
        return t.learning_rate if t.text_encoder_lr is None else t.text_encoder_lr

    @property
    def train_unet(self) -> bool:
        return self.effective_unet_lr > 0

    @property
    def train_text_encoder(self) -> bool:
        return self.effective_text_encoder_lr > 0

    def effective_batch_size(self, num_processes: int = 1) -> int:
        return self.training.batch_size * self.training.gradient_accumulation_steps * num_processes

    @cached_property
    def optimizer_kwargs(self) -> dict:
        return parse_optimizer_args(self.training.optimizer_args)

    def plan_steps(self, batches_per_epoch: int, num_processes: int = 1) -> StepPlan:
        """Optimizer steps per epoch and in total. ``max_steps`` > 0 overrides the epoch count."""
        per_process = math.ceil(batches_per_epoch / num_processes)
        steps_per_epoch = max(1, math.ceil(per_process / self.training.gradient_accumulation_steps))
        if self.images.max_steps > 0:
            total = self.images.max_steps
            epochs = math.ceil(total / steps_per_epoch)
        else:
            epochs = self.images.epochs
            total = epochs * steps_per_epoch
        return StepPlan(batches_per_epoch, steps_per_epoch, epochs, total)

    def warmup_steps(self, total_steps: int) -> int:
        w = self.training.lr_warmup_steps
        return int(round(w * total_steps)) if w < 1 else int(w)


LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _block_counts(text: str) -> str:
    """A per-block list: one number for each of the 25 SD 1.x/2.x or 23 SDXL U-Net blocks."""
    got = len(text.split(",")) if text else 0
    if got not in (0, 2 * NUM_BLOCKS + 1, 2 * SDXL_BLOCKS + 3 + 2):
        raise PydanticCustomError(
            "number_list", "must be 25 comma-separated numbers (SD 1.x/2.x) or 23 (SDXL), one per "
            "U-Net block (got {got}), or empty", {"got": f"{got}: {text}"})
    return text


def _number_list(value: str, count: int, *, exact: bool = False, integers: bool = False) -> str:
    """'' or comma-separated numbers, ``count`` of them (at most ``count`` unless ``exact``);
    returned without spaces. The counts are those of the SD 1.x/2.x U-Net (sd-scripts lora.py)."""
    text = str(value).strip()
    if not text:
        return ""
    parts = [p.strip() for p in text.split(",")]
    ok = all(p.lstrip("-").isdigit() if integers else _is_number(p) for p in parts)
    if not ok or len(parts) > count or (exact and len(parts) != count):
        what = "whole numbers" if integers else "numbers"
        amount = f"{count}" if exact else f"1 to {count}"
        raise PydanticCustomError(
            "number_list", "must be {amount} comma-separated {what} (got {got}), or empty",
            {"amount": amount if count > 1 else "1", "what": what if count > 1 else "number",
             "got": f"{len(parts)}: {text}"})
    return ",".join(parts)


def estimate_batches(num_train_items: int, batch_size: int, with_reg: bool) -> int:
    """Batches in one epoch for ``num_train_items`` (images x repeats, summed over folders).

    Regularisation doubles the epoch (as many reg samples as training samples). The engine counts
    exactly per bucket (a batch never mixes buckets); this is the estimate before images are read.
    """
    items = num_train_items * (2 if with_reg else 1)
    return math.ceil(items / batch_size) if items else 0


_ARG_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s]+)")


_QUOTED_PAIR = re.compile(r"""(["'])([A-Za-z_][A-Za-z0-9_]*\s*=[^"']*)\1""")


def parse_optimizer_args(text: str) -> dict:
    """Parse 'key=value key=value' safely (no eval): numbers, booleans, None, tuples, strings.

    Follows sd-scripts train_util.get_optimizer (``key, value = arg.split("=")`` then
    ``ast.literal_eval``, so 'betas=0.9,0.99' is a tuple), and accepts the quoted form kohya_ss
    writes ('"weight_decay=0.1" "betas=0.9,0.99"') and lower-case true/false.
    """
    import ast

    text = _QUOTED_PAIR.sub(lambda m: m.group(2), text.strip())
    out: dict = {}
    pos = 0
    for match in _ARG_RE.finditer(text):
        if text[pos:match.start()].strip(" ,;"):
            break
        key, raw = match.group(1), match.group(2)
        low = raw.lower()
        if low in ("true", "false"):
            value = low == "true"
        elif low == "none":
            value = None
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            if isinstance(value, list):
                value = tuple(value)
        out[key] = value
        pos = match.end()
    if text[pos:].strip(" ,;"):
        raise ValueError(
            f"cannot read {text[pos:].strip()!r}: write key=value pairs separated by spaces, "
            "e.g. weight_decay=0.01 betas=0.9,0.99")
    return out


def cross_field_issues(s: TrainingSettings) -> list[tuple[str, str]]:
    """Rules that involve more than one field: (field path to change, what to do)."""
    return _launch_issues(s) + _image_issues(s) + _training_issues(s)


def _launch_issues(s: TrainingSettings) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    la = s.launch
    if la.num_machines > 1 and la.machine_rank >= la.num_machines:
        issues.append(("launch.machine_rank", f"must be below num_machines ({la.num_machines})"))
    if la.num_machines > 1 and not la.main_process_ip.strip():
        issues.append(("launch.main_process_ip", "is needed with several machines: give the main "
                       "machine's address"))
    if la.gpu_per_run and la.processes > 1:
        issues.append(("launch.gpu_per_run", "gives a queued run one GPU, and this run has "
                       f"{la.processes} processes: turn off gpu_per_run or multi_gpu"))
    if la.num_processes < la.num_machines and (la.multi_gpu or la.num_machines > 1):
        issues.append(("launch.num_processes", "counts the processes of all machines: at least one "
                       "per machine"))
    return issues


def _image_issues(s: TrainingSettings) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    img = s.images
    if img.buckets:
        if img.min_bucket_resolution > img.max_bucket_resolution:
            issues.append(("images.min_bucket_resolution",
                           "is larger than the max bucket resolution: lower it or raise the max"))
        for side in img.resolution_wh:
            if not img.min_bucket_resolution <= side <= img.max_bucket_resolution:
                issues.append(("images.resolution",
                               f"side {side} is outside the bucket range {img.min_bucket_resolution}"
                               f"..{img.max_bucket_resolution}: change the resolution or the "
                               "min/max bucket resolution"))
                break
    if img.cache_latents:
        for name, what in (("color_aug", "colour augmentation"), ("random_crop", "random crop")):
            if getattr(img, name):
                issues.append((f"images.{name}",
                               f"{what} changes the pixels every epoch, so latents cannot be cached: "
                               f"turn off {name} or cache_latents"))
    return issues


def _training_issues(s: TrainingSettings) -> list[tuple[str, str]]:
    issues: list[tuple[str, str]] = []
    adv, tr = s.advanced, s.training
    if adv.dora_wd and adv.network_type not in ("LoRA", "LoCon", "LoHa", "LoKr"):
        issues.append(("advanced.dora_wd",
                       f"DoRA works with LoRA, LoCon, LoHa and LoKr, not {adv.network_type}: turn "
                       "DoRA off or choose one of those network types"))
    if tr.unet_only and tr.text_only:
        issues.append(("training.text_only",
                       "cannot be combined with 'train U-Net only': choose one of them (or neither "
                       "to train both)"))
    if tr.lr_warmup_steps > 0 and tr.lr_scheduler == "constant":
        issues.append(("training.lr_scheduler",
                       "'constant' has no warm-up: choose constant_with_warmup, or set warm-up "
                       "steps to 0"))
    if tr.lr_scheduler == "adafactor" and tr.optimizer != "Adafactor":
        issues.append(("training.lr_scheduler",
                       "'adafactor' is the Adafactor optimizer's own schedule: choose the Adafactor "
                       "optimizer or another scheduler"))
    if tr.unet_only and tr.unet_lr == 0:
        issues.append(("training.unet_lr",
                       "is 0 while only the U-Net is trained, so nothing would train: set a U-Net "
                       "learning rate or leave it empty"))
    if tr.text_only and tr.text_encoder_lr == 0:
        issues.append(("training.text_encoder_lr",
                       "is 0 while only the text encoder is trained, so nothing would train: set a "
                       "text encoder learning rate or leave it empty"))
    if not (tr.unet_only or tr.text_only) and s.effective_unet_lr == 0 \
            and s.effective_text_encoder_lr == 0:
        issues.append(("training.learning_rate",
                       "every learning rate is 0, so nothing would train: set a learning rate"))
    if tr.persistent_workers and tr.num_workers == 0:
        issues.append(("training.persistent_workers",
                       "needs data loader workers: set num_workers above 0 or turn this off"))
    issues += _parity_issues(s)
    return issues


def _parity_issues(s: TrainingSettings) -> list[tuple[str, str]]:
    """The rules sd-scripts checks for the kohya options (train_util.verify_training_args,
    get_scheduler_fix, train_network.py's dim_from_weights)."""
    issues: list[tuple[str, str]] = []
    adv, tr, v_pred = s.advanced, s.training, s.model.v_parameterization
    if adv.adaptive_noise_scale and not adv.noise_offset:
        issues.append(("advanced.adaptive_noise_scale",
                       "adds to the noise offset, which is 0: set a noise offset or set this to 0"))
    if adv.scale_v_pred_loss_like_noise_pred and not v_pred:
        issues.append(("advanced.scale_v_pred_loss_like_noise_pred",
                       "only applies to v-prediction: turn on v_parameterization or turn this off"))
    if adv.v_pred_like_loss and v_pred:
        issues.append(("advanced.v_pred_like_loss",
                       "is for noise prediction; with v_parameterization on set it to 0"))
    if adv.min_timestep > adv.max_timestep:
        issues.append(("advanced.min_timestep",
                       f"is above the max timestep ({adv.max_timestep}): lower it or raise the max"))
    if adv.dim_from_weights and not s.model.lora_model_for_resume.strip():
        issues.append(("advanced.dim_from_weights",
                       "reads the ranks from the 'Start from LoRA' file, which is empty: choose the "
                       "file or turn this off"))
    if tr.lr_scheduler_type and tr.lr_warmup_steps:
        issues.append(("training.lr_warmup_steps",
                       "a custom scheduler class has no warm-up (as in sd-scripts): set warm-up "
                       "steps to 0 or clear the custom scheduler class"))
    if tr.lr_scheduler == "piecewise_constant" and not tr.lr_scheduler_type and \
            "step_rules" not in parse_optimizer_args(tr.lr_scheduler_args):
        issues.append(("training.lr_scheduler_args",
                       "piecewise_constant needs its steps: add step_rules, e.g. "
                       "step_rules=\"1:10,0.1:20,0.01\" (factor 1 until step 10, ...)"))
    return issues
