"""Serve the lora-gui browser GUI: `python app.py --preset demo-tiny-cpu` (see `--help`).

Kept thin on purpose: the trainer is its own process, and nothing here imports gradio until
`main()` runs.
"""

import sys

if __name__ == "__main__":
    from lora_gui.ui.launch import main

    sys.exit(main(sys.argv[1:]))
