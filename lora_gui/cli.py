"""Headless entry points: `lora-gui config ...`, `lora-gui demo`, `lora-gui train`, `lora-gui tools ...`,
`lora-gui gui`.

Heavy modules (torch, gradio) are imported inside the commands that need them, so `config` stays
fast and light.
"""

from __future__ import annotations

import argparse
import json
import sys

from lora_gui.settings import SettingsError, io
from lora_gui.settings.foreign import convert, load_any, looks_foreign


def _print_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def cmd_config_validate(args: argparse.Namespace) -> int:
    doc = io.read_json(args.file)
    if looks_foreign(doc):
        _print_error(f"{args.file} is not a lora-gui settings file (it looks like a kohya_ss or "
                     f"older script config): convert it with 'lora-gui config convert {args.file} "
                     "-o settings.json'")
        return 2
    settings = io.load_document(doc)
    print(f"{args.file}: valid lora-gui settings (version {io.SETTINGS_VERSION}).")
    if args.verbose:
        print(io.dumps(settings, sparse=True), end="")
    return 0


def cmd_config_convert(args: argparse.Namespace) -> int:
    doc = io.read_json(args.file)
    settings, report = convert(doc)
    print(report.report())
    if args.output:
        io.save_settings(settings, args.output)
        print(f"Wrote {args.output}")
    else:
        print(io.dumps(settings), end="")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = io.load_preset(args.preset) if args.preset else io.defaults()
    print(io.dumps(settings, sparse=args.sparse), end="")
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    for name, path in io.list_presets().items():
        print(f"{name}\t{path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lora_gui.engine.demo import build_demo

    paths = build_demo(args.out, seed=args.seed)
    print(f"Demo model (diffusers folder): {paths.model_dir}")
    print(f"Demo model (single file):      {paths.single_file}")
    print(f"Demo dataset:                  {paths.dataset_dir}")
    print(f"Demo regularisation images:    {paths.reg_dir}")
    return 0


def load_run_settings(path: str | None, preset: str | None, assignments: list[str]):
    if path and preset:
        raise SettingsError([io.Issue("(command line)", "give a settings file or --preset, not both")])
    if path:
        settings = load_any(io.read_json(path))[0]
    elif preset:
        settings = io.load_preset(preset)
    else:
        raise SettingsError([io.Issue("(command line)", "give a settings file or --preset NAME")])
    return io.apply_overrides(settings, assignments) if assignments else settings


def cmd_train(args: argparse.Namespace) -> int:
    settings = load_run_settings(args.settings, args.preset, args.set or [])
    from lora_gui.cli_terminal import train_from_cli

    return train_from_cli(settings)


def cmd_queue(args: argparse.Namespace) -> int:
    from lora_gui.worker.queue import queue_main

    return queue_main(args.queue_args)


def cmd_tools(args: argparse.Namespace) -> int:
    from lora_gui.settings.tools import parse_job

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "runs_dir", "tool")}
    job = parse_job({"kind": args.tool, **{k: v for k, v in fields.items() if v is not None}})
    from lora_gui.cli_terminal import tool_from_cli

    return tool_from_cli(job, args.runs_dir)


def _add_tool_parsers(sub) -> None:
    """``lora-gui tools resize|merge|extract|inspect``: the options are the job's fields
    (settings/tools.py), with their descriptions as help."""
    from typing import Literal, get_args, get_origin

    from lora_gui.settings.tools import ExtractJob, InspectJob, MergeJob, ResizeJob, field_order

    tools = sub.add_parser("tools", help="resize, merge, extract and inspect LoRAs (in the background worker)")
    tsub = tools.add_subparsers(dest="tool", required=True)
    for model in (ResizeJob, MergeJob, ExtractJob, InspectJob):
        kind = model.model_fields["kind"].default
        p = tsub.add_parser(kind, help=(model.__doc__ or kind).splitlines()[0])
        for name in field_order(model):
            field = model.model_fields[name]
            types = [t for t in (get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
            types = [c for t in types for c in (get_args(t) if get_origin(t) is Literal else (t,))]
            kwargs: dict = {"help": field.description}
            if field.annotation is bool:
                kwargs.update(action="store_true", default=None)
            elif getattr(field.annotation, "__origin__", None) is list:
                kwargs.update(nargs="+", type=get_args(field.annotation)[0])
            elif types and types[0] in (int, float):
                kwargs["type"] = types[0]
            elif all(isinstance(t, str) for t in types):
                kwargs["choices"] = types
            if field.is_required():
                p.add_argument(name, **kwargs)
            else:
                p.add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)
        p.add_argument("--runs-dir", default="runs", help="where the tool's run folder goes (RUNS/tools/...)")
        p.set_defaults(func=cmd_tools)


def cmd_gui(args: argparse.Namespace) -> int:
    from lora_gui.ui.launch import main as gui_main

    return gui_main(args.gui_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-gui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="check, convert and show settings files")
    csub = config.add_subparsers(dest="config_command", required=True)
    p = csub.add_parser("validate", help="check a lora-gui settings JSON file")
    p.add_argument("file")
    p.add_argument("-v", "--verbose", action="store_true", help="print what differs from defaults")
    p.set_defaults(func=cmd_config_validate)
    p = csub.add_parser("convert", help="import a kohya_ss or older-script JSON config")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="write the converted settings here")
    p.set_defaults(func=cmd_config_convert)
    p = csub.add_parser("show", help="print the defaults or a preset")
    p.add_argument("--preset")
    p.add_argument("--sparse", action="store_true", help="only what differs from the defaults")
    p.set_defaults(func=cmd_config_show)
    p = csub.add_parser("presets", help="list the presets")
    p.set_defaults(func=cmd_config_presets)

    p = sub.add_parser("demo", help="build the tiny offline demo model and dataset")
    p.add_argument("--out", default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a LoRA headless")
    p.add_argument("settings", nargs="?", help="settings JSON (ours, or a kohya_ss config)")
    p.add_argument("--preset", help="start from a preset instead of a file")
    p.add_argument("--set", action="append", metavar="GROUP.FIELD=VALUE",
                   help="override a setting, e.g. --set training.learning_rate=0.0002")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("queue", help="train every settings file of a folder, one after another",
                       add_help=False)
    p.add_argument("queue_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_queue)

    _add_tool_parsers(sub)

    p = sub.add_parser("gui", help="open the browser GUI", add_help=False)
    p.add_argument("gui_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_gui)
    return parser


# Commands whose options are parsed by their own module (the GUI launcher, the queue runner).
PASS_THROUGH = {"gui": cmd_gui, "queue": cmd_queue}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:
        key = "gui_args" if argv[0] == "gui" else "queue_args"
        return PASS_THROUGH[argv[0]](argparse.Namespace(**{key: argv[1:]}))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as exc:
        _print_error(str(exc))
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        _print_error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())

