"""The background trainer: a run folder per run (protocol.py), the trainer process (child.py),
the web process's handle on runs (client.py) and queues of settings files (queue.py).

Import the submodules directly; this package imports nothing heavy (no torch, no gradio)."""
