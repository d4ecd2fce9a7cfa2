"""Headless entry points: `lora-gui config ...`, `lora-gui demo`, `lora-gui train`, `lora-gui tools ...`,
`lora-gui dataset ...`, `lora-gui gui`.

Heavy modules (torch, gradio) are imported inside the commands that need them, so `config` stays
fast and light.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing

from lora_gui.dataset.scan import DatasetError
from lora_gui.settings import SettingsError, io
from lora_gui.settings.foreign import convert, load_any, looks_foreign
from lora_gui.settings.schema import ModelSettings


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

    paths = build_demo(args.out, seed=args.seed, family=args.family)
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
    overrides = list(args.set or [])
    if args.machine_rank is not None:  # another machine of a multi-machine run (README)
        overrides.append(f"launch.machine_rank={args.machine_rank}")
    settings = load_run_settings(args.settings, args.preset, overrides)
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


# --- lora-gui dataset ... (the Dataset tab's code: lora_gui.dataset.workbench) --------------------


def _dataset_settings(args: argparse.Namespace):
    """The settings a dataset command works with: a settings file or preset (or the defaults), with
    the folder arguments and --set overrides on top."""
    settings = (load_any(io.read_json(args.settings))[0] if args.settings
                else io.load_preset(args.preset) if args.preset else io.defaults())
    assignments = list(args.set or [])
    if getattr(args, "folder", None):
        assignments.append(f"model.img_folder={args.folder}")
    if getattr(args, "reg", None):
        assignments.append(f"model.reg_img_folder={args.reg}")
    return io.apply_overrides(settings, assignments) if assignments else settings


def _workbench(args: argparse.Namespace):
    from lora_gui.dataset.workbench import Workbench

    return Workbench.from_settings(_dataset_settings(args))


def cmd_dataset_check(args: argparse.Namespace) -> int:
    report = _workbench(args).check()
    print(report.to_markdown())
    return 1 if report.errors else 0


def cmd_dataset_edit(args: argparse.Namespace) -> int:
    from lora_gui.dataset.browse import RowFilter

    bench = _workbench(args)
    if args.undo:
        print(bench.editor().undo().message)
        return 0
    if args.caption is not None:
        if not args.image:
            raise DatasetError("--caption needs --image IMAGE: the image whose caption to write.")
        print(bench.editor().set_caption(args.image, args.caption).message)
        return 0
    if not args.op:
        raise DatasetError("Say what to do: --op NAME (see --help), --caption TEXT or --undo.")
    row_filter = RowFilter(tag=args.tag_filter or "", no_caption=args.no_caption,
                           bucket=args.bucket or "", folder=args.in_folder or "")
    result = bench.bulk(args.op, row_filter, args.tag or "", args.new or "")
    print(result.message)
    for path in result.changed:
        print(f"  {path}")
    return 0


def cmd_dataset_caption(args: argparse.Namespace) -> int:
    from lora_gui.dataset.browse import RowFilter
    from lora_gui.worker.caption_job import start_caption_job
    from lora_gui.worker.client import WorkerClient

    job = _workbench(args).caption_job(
        RowFilter(tag=args.tag_filter or "", no_caption=args.no_caption, folder=args.in_folder or ""),
        args.tagger, rule=args.rule, general_threshold=args.general, character_threshold=args.character,
        exclude=[t.strip() for t in (args.exclude or "").split(",") if t.strip()],
        underscores_to_spaces=not args.keep_underscores, batch_size=args.batch_size,
        captioner=args.captioner, prompt=args.prompt or "", max_new_tokens=args.max_new_tokens)
    paths, popen = start_caption_job(args.jobs_dir, job)
    print(f"Captioning {len(job.images)} images in the background: job {paths.root}")
    if args.no_wait:
        return 0
    client = WorkerClient(args.jobs_dir)
    run = client.attach(paths.run_id)
    info = run.info()
    try:
        info = run.wait(args.timeout)
        if not info.final:
            run.force_stop()
            raise DatasetError(f"The captioning job did not end within {args.timeout} s and was "
                               "stopped; the captions written so far are kept.")
        for event in run.poll()[0]:
            if event.kind == "log":
                print(event.message)
    finally:
        client.close()
        if popen.poll() is None and info.final:
            popen.wait(30)  # it has reported its end: only the exit is left
    print(f"{info.state.value}: {info.message or ''}")
    return 0 if info.state.value == "finished" else 1


def cmd_dataset_tags(args: argparse.Namespace) -> int:
    from lora_gui.dataset.browse import tag_counts

    for tag, count in tag_counts(_workbench(args).rows()).most_common(args.top or None):
        print(f"{count}\t{tag}")
    return 0


def cmd_dataset_toml_import(args: argparse.Namespace) -> int:
    from lora_gui.dataset.kohya_toml import load_dataset_config, to_folder_layout

    layout = to_folder_layout(load_dataset_config(args.file), args.out)
    settings = layout.apply(_dataset_settings(args))
    print(f"Image folder: {layout.img_folder}")
    if layout.reg_folder:
        print(f"Regularisation folder: {layout.reg_folder}")
    for note in layout.notes:
        print(f"note: {note}")
    if args.output:
        io.save_settings(settings, args.output)
        print(f"Wrote {args.output}")
    return 0


def cmd_dataset_toml_export(args: argparse.Namespace) -> int:
    from lora_gui.dataset.kohya_toml import config_from_settings, dumps_dataset_config, save_dataset_config
    from lora_gui.dataset.workbench import Workbench

    settings = _dataset_settings(args)
    config = config_from_settings(Workbench.from_settings(settings).scan(), settings)
    if args.output:
        save_dataset_config(config, args.output)
        print(f"Wrote {args.output}")
    else:
        print(dumps_dataset_config(config), end="")
    return 0


def _dataset_source_args(p: argparse.ArgumentParser, folder: bool = True) -> None:
    if folder:
        p.add_argument("folder", nargs="?", help="image folder (default: the settings' img_folder)")
        p.add_argument("--reg", help="regularisation folder")
    p.add_argument("--settings", help="settings JSON (ours or kohya_ss) for folders and options")
    p.add_argument("--preset", help="start from a preset instead of a settings file")
    p.add_argument("--set", action="append", metavar="GROUP.FIELD=VALUE", help="override a setting")


def add_dataset_parser(sub) -> None:
    dataset = sub.add_parser("dataset", help="check, caption-edit and convert a dataset")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    p = dsub.add_parser("check", help="checks before training (exit 1 when there are errors)")
    _dataset_source_args(p)
    p.set_defaults(func=cmd_dataset_check)
    _add_dataset_edit_parser(dsub)
    _add_dataset_caption_parser(dsub)
    p = dsub.add_parser("tags", help="tag frequency over the caption files")
    _dataset_source_args(p)
    p.add_argument("--top", type=int, default=0, help="only the N most frequent")
    p.set_defaults(func=cmd_dataset_tags)
    _add_dataset_toml_parser(dsub)


def _add_dataset_edit_parser(dsub) -> None:
    from lora_gui.dataset.workbench import BULK_OPS

    p = dsub.add_parser("edit", help="edit captions: one caption, a bulk operation, or undo")
    _dataset_source_args(p)
    p.add_argument("--op", choices=list(BULK_OPS), help="; ".join(f"{k}: {v}" for k, v in BULK_OPS.items()))
    p.add_argument("--tag", help="the tag the operation adds, removes or replaces")
    p.add_argument("--new", help="the new tag (replace, rename)")
    p.add_argument("--tag-filter", help="only images whose caption has this tag")
    p.add_argument("--no-caption", action="store_true", help="only images without a caption")
    p.add_argument("--bucket", help="only images in this bucket, e.g. 512x512")
    p.add_argument("--in-folder", help="only images of this folder, e.g. 10_cat")
    p.add_argument("--image", help="the image whose caption --caption writes")
    p.add_argument("--caption", help="write this caption for --image")
    p.add_argument("--undo", action="store_true", help="undo the last caption change")
    p.set_defaults(func=cmd_dataset_edit)


def _add_dataset_caption_parser(dsub) -> None:
    from lora_gui.dataset.autocaption import CAPTIONERS

    p = dsub.add_parser("caption", help="auto-caption images with a local WD14 tagger, BLIP, Florence-2 or "
                                        "Qwen2-VL model (background job)")
    _dataset_source_args(p)
    p.add_argument("--tagger", "--model", dest="tagger", required=True,
                   help="the model folder: model.onnx and selected_tags.csv (wd14), or a save_pretrained folder")
    p.add_argument("--captioner", default="wd14", choices=list(CAPTIONERS),
                   help="; ".join(f"{k}: {v[0]}" for k, v in CAPTIONERS.items()))
    p.add_argument("--prompt", help="Florence-2 task (<CAPTION>...), Qwen2-VL instruction, BLIP sentence start")
    p.add_argument("--max-new-tokens", type=int, default=60, help="longest sentence, in tokens")
    p.add_argument("--rule", default="skip", choices=["skip", "prepend", "append", "overwrite"],
                   help="what to do with an existing caption (default: skip the image)")
    p.add_argument("--general", type=float, default=0.35, help="general tag threshold")
    p.add_argument("--character", type=float, default=0.85, help="character tag threshold")
    p.add_argument("--exclude", help="comma-separated tags never written")
    p.add_argument("--keep-underscores", action="store_true", help="keep long_hair, not long hair")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tag-filter", help="only images whose caption has this tag")
    p.add_argument("--no-caption", action="store_true", help="only images without a caption")
    p.add_argument("--in-folder", help="only images of this folder, e.g. 10_cat")
    p.add_argument("--jobs-dir", default="caption-jobs", help="where job folders go")
    p.add_argument("--no-wait", action="store_true", help="start the job and return")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    p.set_defaults(func=cmd_dataset_caption)


def _add_dataset_toml_parser(dsub) -> None:
    toml = dsub.add_parser("toml", help="sd-scripts dataset_config TOML")
    tsub = toml.add_subparsers(dest="toml_command", required=True)
    p = tsub.add_parser("import", help="make N_name folders (links) and settings from a TOML")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="new folder for the img/ and reg/ folders")
    p.add_argument("-o", "--output", help="write the settings (with the folders) here")
    _dataset_source_args(p, folder=False)
    p.set_defaults(func=cmd_dataset_toml_import)
    p = tsub.add_parser("export", help="write the TOML of the folders and settings")
    _dataset_source_args(p)
    p.add_argument("-o", "--output", help="write the TOML here (default: print it)")
    p.set_defaults(func=cmd_dataset_toml_export)


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
    families = [f for f in typing.get_args(ModelSettings.model_fields["family"].annotation) if f != "auto"]
    p.add_argument("--family", choices=families, default="sd", help="the tiny model's family")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a LoRA headless")
    p.add_argument("settings", nargs="?", help="settings JSON (ours, or a kohya_ss config)")
    p.add_argument("--preset", help="start from a preset instead of a file")
    p.add_argument("--set", action="append", metavar="GROUP.FIELD=VALUE",
                   help="override a setting, e.g. --set training.learning_rate=0.0002")
    p.add_argument("--machine-rank", type=int, help="this machine's number in a run on several "
                   "machines (launch.num_machines); the main machine is 0")
    p.set_defaults(func=cmd_train)

    add_dataset_parser(sub)

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
    except (SettingsError, DatasetError) as exc:
        _print_error(str(exc))
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        _print_error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())

