"""lora-gui: a browser GUI and headless engine for training Stable Diffusion LoRAs."""

__version__ = "0.1.0"
