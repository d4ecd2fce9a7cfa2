"""lora-gui benchmarks: ``python -m bench`` runs 1-5 and appends them to BENCHMARKS.md; see
bench/__main__.py. ``bench/gpu_sd15.py`` (6) is for a CUDA machine."""
