"""``python -m lora_gui.worker RUN_DIR``: the trainer process (see child.py). Kept thin so that
``accelerate launch -m lora_gui.worker RUN_DIR`` can start it unchanged."""

import sys

from lora_gui.worker.child import main

if __name__ == "__main__":
    sys.exit(main())
