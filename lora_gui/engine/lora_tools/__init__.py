"""LoRA tools on kohya-format state dicts: resize, merge, extract, inspect.

Pure functions on ``{key: tensor}`` dicts (tested directly); ``runner.py`` wraps them as worker
jobs (progress events, Stop, never overwriting a file).

* ``modules.py``   split a file into modules (down, up, alpha); the update ``scale * up @ down``
* ``svd.py``       the low-rank factorisation and the rank rules of sd-scripts' ``resize_lora.py``
* ``resize.py``    a LoRA to a lower rank (fixed or dynamic)
* ``merge.py``     several LoRAs into one; LoRAs into a base model's weights
* ``checkpoint.py`` a base model's single file: which tensor a LoRA module changes
* ``extract.py``   a LoRA from (base, fine-tuned)
* ``inspection.py`` type, ranks, metadata card, block-weight chart

Only plain LoRA / LoCon (``lora_down`` / ``lora_up``) have an update here; other LyCORIS types
are recognised by their key names (``modules.network_kind``) and refused with a sentence: a type
is added by giving it an entry in ``modules.DELTA_BUILDERS``.
"""
