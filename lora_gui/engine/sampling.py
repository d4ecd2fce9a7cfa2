"""Sample images during training: kohya prompt-line syntax, the usual samplers, PNG text chunks."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from lora_gui.atomic import atomic_path

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


class PromptLineError(ValueError):
    pass


_OPTION = re.compile(r"\s--([a-z]+)\s*")


def parse_prompt_line(line: str, defaults: SamplePrompt) -> SamplePrompt | None:
    """``prompt --n negative --w 512 --h 768 --d 42 --l 7 --s 28``; None for blank/# lines."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = _OPTION.split(" " + text)
    prompt = parts[0].strip()
    values: dict = {}
    for key, raw in zip(parts[1::2], parts[2::2]):
        raw = raw.strip()
        try:
            if key == "n":
                values["negative"] = raw
            elif key in ("w", "h"):
                size = int(raw)
                if size < 64 or size % 8:
                    raise PromptLineError(f"--{key} {raw}: image sides are multiples of 8, at least 64")
                values["width" if key == "w" else "height"] = size
            elif key == "d":
                values["seed"] = int(raw)
            elif key == "l":
                values["cfg_scale"] = float(raw)
            elif key == "s":
                values["steps"] = max(1, int(raw))
            elif key == "g":
                values["guidance"] = float(raw)
            else:
                raise PromptLineError(f"--{key} is not a sample option (use --n --w --h --d --l --s --g)")
        except ValueError as exc:
            if isinstance(exc, PromptLineError):
                raise
            raise PromptLineError(f"--{key} {raw!r} is not a number") from None
    return replace(defaults, prompt=prompt, **values)


def parse_prompts(text: str, defaults: SamplePrompt) -> list[SamplePrompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_prompt_line(line, defaults)
        except PromptLineError as exc:
            raise PromptLineError(f"samples.sample_prompts line {number}: {exc}") from None
        if parsed:
            prompts.append(parsed)
    return prompts


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
                     seed: int, out_dir: Path, stem: str, encode, device, dtype) -> list[tuple[Path, str]]:
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

    return render_samples(pipe, prompts, embeds, sampler=sampler, seed=seed, out_dir=out_dir, stem=stem)


def render_samples(pipe, prompts, embeds, *, sampler: str, seed: int, out_dir: Path,
                   stem: str) -> list[tuple[Path, str]]:
    """The sampling loop every family's pipeline shares: ``embeds(prompt)`` gives the pipeline's
    prompt-embedding arguments; size, steps, guidance and seed come from the prompt line."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    pipe.set_progress_bar_config(disable=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for index, p in enumerate(prompts):
        image_seed = p.seed if p.seed is not None else seed + index
        with torch.no_grad():
            generator = torch.Generator("cpu").manual_seed(image_seed)
            image = pipe(**embeds(p), width=p.width, height=p.height, num_inference_steps=p.steps,
                         guidance_scale=p.cfg_scale, generator=generator, output_type="pil").images[0]
        info = PngInfo()
        info.add_text("parameters", png_parameters(p, sampler, image_seed))
        path = out_dir / f"{stem}_{index:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
        written.append((path, p.prompt))
    return written
