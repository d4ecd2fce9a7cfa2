"""The training engine: torch, diffusers, transformers, accelerate. Never imports gradio."""
