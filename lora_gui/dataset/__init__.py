"""The torch-free dataset layer: folder scan, repeats, captions and tag rules, buckets, the summary.

Layer rule: ``settings, events <- dataset <- engine <- worker <- ui, cli``. Modules here import only
the standard library, Pillow, numpy, ``lora_gui.settings`` and ``lora_gui.atomic``; never torch and
never ``lora_gui.engine``, ``lora_gui.worker`` or ``lora_gui.ui``. The page's dataset preview and the
trainer both plan from these modules, so the preview shows what training will do.

- ``scan``: image folders, ``N_name`` repeats and class tokens, caption files (``scan_dataset``).
- ``images``: EXIF-upright reading and the training transform (cover, crop, flip, hue).
- ``buckets``: bucket sizes and the bucket of an image; ``BucketOptions.from_settings``.
- ``captions``: the caption a sample is trained with, tag counts and the tag report;
  ``CaptionOptions.from_settings``.
- ``summary``: planning shared with training (buckets of every image, validation split,
  regularisation cycling, batches per epoch) and the summary the page shows.
"""
