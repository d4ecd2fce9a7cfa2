"""Sample images during training: kohya prompt-line syntax, the usual samplers, PNG text chunks."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from lora_gui.atomic import atomic_path
from lora_gui.settings.schema import SAMPLERS, sampler_name

SAMPLER_CLASSES = {
    # The schema's samples.sample_sampler choices -> (diffusers scheduler class, extra config);
    # tests/test_engine_tables.py checks the keys against the schema.
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    cfg_scale: float = 7.0
    steps: int = 20
    guidance: float | None = None  # --g: FLUX.1-dev's embedded guidance (kohya's syntax); other families ignore it
    sampler: str | None = None  # --ss: this prompt's sampler instead of the run's
    notes: tuple[str, ...] = ()  # flags that were accepted but do not apply, as sentences


class PromptLineError(ValueError):
    pass


# sd-scripts train_util.line_to_prompt_dict splits on " --" and matches each flag case-insensitively.
_OPTION = re.compile(r"\s--([A-Za-z]+)\s*")
# Flags sd-scripts knows that do not apply to an SD 1.x/2.x sample here: what each one is for.
_NOT_HERE = {
    "cn": "a ControlNet image",
    "ctr": "the CFG truncation ratio of Lumina",
    "rcfg": "the renormalised CFG of Lumina",
    "fs": "the flow shift of flow-matching models",
}


def _side(key: str, raw: str) -> int:
    """sd-scripts sample_image_inference: max(64, side - side % 8), i.e. rounded down to 8."""
    size = int(raw)
    if size < 0:
        raise PromptLineError(f"--{key} {raw}: an image side cannot be negative")
    return max(64, size - size % 8)


def _option(key: str, raw: str, values: dict, notes: list[str]) -> None:
    """Read one flag of a prompt line into ``values`` (SamplePrompt fields) or ``notes``."""
    if key == "n":
        values["negative"] = raw
    elif key in ("w", "h"):
        values["width" if key == "w" else "height"] = _side(key, raw)
    elif key == "d":
        values["seed"] = int(raw)
        if not 0 <= values["seed"] < 2**32:
            raise PromptLineError(f"--d {raw}: a seed is a whole number from 0 to {2**32 - 1}")
    elif key == "l":
        values["cfg_scale"] = float(raw)
    elif key == "s":
        values["steps"] = max(1, min(1000, int(raw)))  # sd-scripts clamps to 1..1000
    elif key == "g":
        values["guidance"] = float(raw)  # FLUX.1-dev's embedded guidance; other families ignore it
    elif key == "ss":
        values["sampler"] = sampler_name(raw)
        if values["sampler"] is None:
            notes.append(f"--ss {raw}: not a sampler lora-gui has ({', '.join(SAMPLERS)}); the run's "
                         "sampler is used")
    elif key in _NOT_HERE:
        notes.append(f"--{key} {raw}: {_NOT_HERE[key]}, which does not apply here; ignored")
    else:
        raise PromptLineError(f"--{key} is not a sample option (use --n --w --h --d --l --s --g --ss)")


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt | None:
    """``prompt --n negative --w 512 --h 768 --d 42 --l 7 --s 28 --g 3.5 --ss euler``; None for blank/#
    lines. Follows sd-scripts train_util.line_to_prompt_dict (flags in any case)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _OPTION.split(" " + text)
    values: dict = {}
    notes: list[str] = []
    for key, raw in zip(parts[1::2], parts[2::2]):
        key, raw = key.lower(), raw.strip()
        try:
            _option(key, raw, values, notes)
        except PromptLineError:
            raise
        except ValueError:
            raise PromptLineError(f"--{key} {raw!r} is not a number") from None
    return replace(defaults, prompt=parts[0].strip(), notes=tuple(notes), **values)


def parse_prompts(text: str, defaults: SamplePrompt) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_prompt_line(line, defaults)
        except PromptLineError as exc:
            raise PromptLineError(f"samples.sample_prompts line {number}: {exc}") from None
        if parsed:
            notes = tuple(f"samples.sample_prompts line {number}: {n}" for n in parsed.notes)
            prompts.append(replace(parsed, notes=notes))
    return prompts


def image_seed(p: SamplePrompt, base_seed: int | None, index: int) -> int:
    """The seed of one sample image: --d, else the base seed + the prompt's index, else (no base
    seed, as sd-scripts without --d) a fresh random one drawn outside the training RNGs."""
    if p.seed is not None:
        return p.seed
    if base_seed is not None:
        return (base_seed + index) % 2**32
    return secrets.randbelow(2**32)


def make_sampler(name: str, scheduler_config):
    import diffusers

    cls_name, extra = SAMPLER_CLASSES[name]
    return getattr(diffusers, cls_name).from_config(scheduler_config, **extra)


def png_parameters(p: SamplePrompt, sampler: str, seed: int) -> str:
    """The A1111-style "parameters" text chunk, so the PNG shows its prompt in image viewers."""
    text = p.prompt
    if p.negative:
        text += f"\nNegative prompt: {p.negative}"
    return (f"{text}\nSteps: {p.steps}, Sampler: {sampler}, CFG scale: {p.cfg_scale}, Seed: {seed}, "
            f"Size: {p.width}x{p.height}")


def generate_samples(*, unet, vae, text_encoder, tokenizer, scheduler_config, prompts, sampler: str,
                     seed: int | None, out_dir: Path, stem: str, encode, device, dtype) -> list[tuple[Path, str]]:
    """Render each prompt and save it as ``{stem}_{index:02d}.png``; returns (path, prompt) pairs.

    ``encode(list_of_texts)`` gives the prompt embeddings exactly as training computes them
    (clip_skip, long prompts), passed to the pipeline as ``prompt_embeds``.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_sampler(sampler, scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)

    def embeds(p: SamplePrompt) -> dict:
        return {"prompt_embeds": encode([p.prompt]).to(device=device, dtype=dtype),
                "negative_prompt_embeds": encode([p.negative]).to(device=device, dtype=dtype)}

    return render_samples(pipe, prompts, embeds, sampler=sampler, scheduler_config=scheduler_config, seed=seed,
                          out_dir=out_dir, stem=stem)


def render_samples(pipe, prompts, embeds, *, sampler: str | None, scheduler_config, seed: int | None, out_dir: Path,
                   stem: str) -> list[tuple[Path, str]]:
    """The sampling loop every family's pipeline shares: ``embeds(prompt)`` gives the pipeline's
    prompt-embedding arguments; size, steps, guidance, sampler and seed come from the prompt line
    (the sampler made from ``scheduler_config``, the training schedule). ``scheduler_config=None``
    keeps the pipeline's own scheduler for every prompt (Flux: its pipeline takes only the
    flow-matching Euler scheduler; a prompt's sampler is ignored there)."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    pipe.set_progress_bar_config(disable=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, p in enumerate(prompts):
        used_sampler = sampler if scheduler_config is None else p.sampler or sampler
        if scheduler_config is not None:
            pipe.scheduler = make_sampler(used_sampler, scheduler_config)
        seed_used = image_seed(p, seed, index)
        with torch.no_grad():
            generator = torch.Generator("cpu").manual_seed(seed_used)
            image = pipe(**embeds(p), width=p.width, height=p.height, num_inference_steps=p.steps,
                         guidance_scale=p.cfg_scale, generator=generator, output_type="pil").images[0]
        info = PngInfo()
        info.add_text("parameters", png_parameters(p, used_sampler or type(pipe.scheduler).__name__, seed_used))
        path = out_dir / f"{stem}_{index:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        written.append((path, p.prompt))
    return written
