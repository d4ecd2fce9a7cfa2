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

The dataset workbench (the page's Dataset tab and ``lora-gui dataset ...``):

- ``workbench``: the one entry point: folders and options from the settings, bulk ops by name.
- ``browse``: every image as a row (folder, repeats, caption, size, bucket), filters, pages.
- ``edit``: caption edits in place (atomic, only the caption line), bulk tag ops, undo journal.
- ``checks`` and ``dedupe``: checks before training, exact and perceptual-hash duplicates.
- ``kohya_toml``: sd-scripts' dataset_config TOML, read, written, mapped to ``N_name`` folders.
- ``autocaption``: auto-caption jobs without the model (tag choice, skip/prepend/append/overwrite);
  the tagger runs in ``lora_gui.engine.tagger`` inside ``lora_gui.worker.caption_job``.
"""
