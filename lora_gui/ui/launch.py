"""``lora-gui gui`` / ``app.py``: parse the launch options, build the page, serve it.

Safety first: serving on a non-loopback address or through a share link needs a login, so both are
refused without ``--auth``/``--auth-file``/``LORA_GUI_AUTH`` (exit code 2). gradio is imported only
after the telemetry switches are set.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_USAGE = 2
# gradio keeps a SessionState per session id (every page, every API client), holding a copy of the
# config of every component: about 0.4 MB each here, up to 10000 sessions by default (4 GB). The
# oldest are dropped beyond this; a dropped page that still polls gets a fresh state and attaches to
# the active run again (run_panel's tick).
SESSION_CAPACITY = 64
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-gui gui", description="Serve the lora-gui browser GUI.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); any other "
                        "address needs --auth")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--share", action="store_true",
                   help="also make a public gradio share link (needs --auth and internet access)")
    p.add_argument("--auth", metavar="USER:PASSWORD",
                   help="require this login (or set LORA_GUI_AUTH=user:password)")
    p.add_argument("--auth-file", metavar="FILE", help="a file of user:password lines")
    p.add_argument("--root-path", default=None,
                   help="the URL prefix when served behind a reverse proxy, e.g. /lora")
    p.add_argument("--preset", default=None, help="preset to show when there are no last settings")
    p.add_argument("--runs-dir", default="runs", help="where run folders are kept (default ./runs)")
    p.add_argument("--data-dir", default=None,
                   help="GUI data folder: last settings, user presets, uploaded datasets (default "
                        "$LORA_GUI_HOME or ./.lora-gui)")
    p.add_argument("--browse-root", action="append", default=[], metavar="FOLDER",
                   help="a folder the file browser may show (repeatable; default: the working "
                        "folder, plus the data and runs folders)")
    p.add_argument("--no-queue", action="store_true", help="do not run queued settings automatically")
    return p


def parse_auth(args: argparse.Namespace) -> list[tuple[str, str]] | str:
    """The logins, or a sentence saying what is wrong with them."""
    entries: list[str] = []
    if args.auth:
        entries.append(args.auth)
    elif os.environ.get("LORA_GUI_AUTH"):
        entries.append(os.environ["LORA_GUI_AUTH"])
    if args.auth_file:
        try:
            text = Path(args.auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            return f"cannot read the auth file {args.auth_file}: {exc.strerror or exc}"
        entries += [line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    logins = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            return "a login must be written user:password (both parts non-empty)"
        logins.append((user, password))
    return logins


def check_exposure(args: argparse.Namespace, logins: list) -> str | None:
    """A sentence when the options would expose the GUI without a login, else None."""
    if logins:
        return None
    if args.share:
        return ("Refusing --share without a login: a share link makes this GUI, which can read and "
                "write files on this machine, reachable from the internet. Add --auth user:password "
                "(or --auth-file, or set LORA_GUI_AUTH).")
    if not is_loopback(args.host):
        return (f"Refusing to listen on {args.host} without a login: anyone who can reach this "
                "machine could read and write its files through the GUI. Add --auth user:password "
                "(or --auth-file, or set LORA_GUI_AUTH), or use an SSH tunnel to 127.0.0.1.")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logins = parse_auth(args)
    if isinstance(logins, str):
        print(f"error: {logins}", file=sys.stderr)
        return EXIT_USAGE
    refusal = check_exposure(args, logins)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # gradio's queue keeps a record of every event for its monitoring page, 10000 by default
    # (about 1 KB each): bounded like the sessions (SESSION_CAPACITY).
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "200")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return serve(args, logins)


def serve(args: argparse.Namespace, logins: list[tuple[str, str]]) -> int:
    from lora_gui.settings import SettingsError
    from lora_gui.ui.app import build_app, make_client
    from lora_gui.ui.config import UIConfig, default_data_dir

    config = UIConfig(data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(),
                      runs_dir=Path(args.runs_dir), preset=args.preset,
                      browse_roots=[Path(r) for r in args.browse_root])
    if args.preset and args.preset not in config.presets():
        print(f"error: there is no preset named {args.preset!r}: choose one of "
              f"{', '.join(sorted(config.presets()))}", file=sys.stderr)
        return EXIT_USAGE
    client = make_client(config)
    client.reconcile()
    try:
        blocks = build_app(config, client)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ctx = blocks.lora_gui
    if ctx.runs.prebuild_demo(config.initial_settings()[0]):
        print("Building the tiny demo model and dataset in the background (first use).", flush=True)
    runner = None
    if not args.no_queue:
        from lora_gui.worker.queue import QueueRunner

        runner = QueueRunner(client)
        runner.start(1.0)

    done = threading.Event()

    def on_signal(signum, _frame):
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        _launch(blocks, args, logins)
        _announce(blocks, args, config)
        while not done.wait(0.5):
            pass
        print("lora-gui: shutting down (running trainers keep going; the next start reattaches).",
              flush=True)
    finally:
        if runner is not None:
            runner.stop()
        blocks.close()
        ctx.runs.close()
        ctx.stage.close()
        client.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class IdleSessions(dict):
    """A dict of gradio's queue keyed by session id that drops its oldest idle sessions once it
    holds twice ``capacity``: gradio adds one entry per session that sends an event and keeps it
    after the event (see ``bound_queue_sessions``). ``busy(key, value)`` says an entry is in use
    (an event pending or a message not yet read): those are never dropped. Used from the server's
    event loop alone, like the dicts it replaces."""

    def __init__(self, capacity: int, busy) -> None:
        super().__init__()
        self.capacity, self.busy = capacity, busy

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if len(self) > 2 * self.capacity:  # amortised: one scan per ``capacity`` new sessions
            idle = [k for k, v in self.items() if k != key and not self.busy(k, v)]
            for k in idle[: len(self) - self.capacity]:
                del self[k]


def bound_queue_sessions(blocks, capacity: int = SESSION_CAPACITY) -> None:
    """Bound what gradio 6.31's queue keeps per session id, which grew the web process by ~2.5 KB
    per API call of a client with a new session (each curl or script call), without end: a set of
    pending event ids (an empty set stays once its events are done; never removed) and a message
    queue (kept for up to 2000 sessions). A dropped idle session gets fresh ones at its next event,
    as a new one does. Call after ``blocks.queue()``, which makes the queue."""
    queue = blocks._queue
    ids = IdleSessions(capacity, busy=lambda _key, pending: bool(pending))
    ids.update(queue.pending_event_ids_session)
    messages = IdleSessions(capacity, busy=lambda key, q: not q.empty() or bool(ids.get(key)))
    messages.update(queue.pending_messages_per_session)
    queue.pending_event_ids_session, queue.pending_messages_per_session = ids, messages


def _launch(blocks, args: argparse.Namespace, logins: list[tuple[str, str]]) -> None:
    from lora_gui.ui.app import CSS

    auth = (logins[0] if len(logins) == 1 else logins) if logins else None
    blocks.queue(default_concurrency_limit=4)
    bound_queue_sessions(blocks)
    blocks.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                  root_path=args.root_path,  # no allowed_paths: see ui.files.ServedFiles
                  state_session_capacity=SESSION_CAPACITY,
                  prevent_thread_lock=True, quiet=True, css=CSS, footer_links=["gradio"],
                  show_error=True, inbrowser=False)


def _announce(blocks, args: argparse.Namespace, config) -> None:
    url = blocks.local_url
    print(f"lora-gui is serving at {url} (data folder {config.data_dir}, runs in "
          f"{config.runs_dir}). Stop it with Ctrl+C.", flush=True)
    if args.share:
        if blocks.share_url:
            print(f"Share link: {blocks.share_url}", flush=True)
        else:
            print("No share link: this machine cannot reach the internet (gradio could not fetch "
                  f"its tunnel); the GUI is still served locally at {url}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
