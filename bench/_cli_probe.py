"""``lora-gui train`` exactly (``lora_gui.cli.main``), plus one line of JSON per event, with its
wall-clock time, appended to the file named by ``BENCH_EVENTS``.

The probe wraps the CLI's terminal sink, so it imports nothing the CLI would not import itself.
Used by :mod:`bench.startup`: ``python -m bench._cli_probe train --preset ... --set ...``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    path = os.environ["BENCH_EVENTS"]
    from lora_gui import cli_terminal

    original = cli_terminal.TerminalSink.__call__

    def call(self, event) -> None:
        line = {"t": time.time(), "kind": event.kind, "phase": getattr(event, "phase", None),
                "step": getattr(event, "step", None), "message": getattr(event, "message", None)}
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        original(self, event)

    cli_terminal.TerminalSink.__call__ = call
    from lora_gui.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
