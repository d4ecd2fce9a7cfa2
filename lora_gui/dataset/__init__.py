"""The torch-free dataset layer: folder scan, repeats, captions and tag rules, buckets, the summary.

Layer rule (docs/architecture): ``settings, events <- dataset <- engine <- worker <- ui, cli``.
Modules here import only the standard library, Pillow, numpy and ``lora_gui.settings``; never torch
and never ``lora_gui.engine``, ``lora_gui.worker`` or ``lora_gui.ui``. The web page's dataset
preview and the trainer both plan from these modules, so the preview shows what training will do.
"""
