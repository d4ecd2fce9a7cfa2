"""What the parts of the page share: the config, the run controller (the page's side of the worker),
the registry of settings components, the other components by name, and the per-page state. Built once per app by
``build_app``; nothing here is module-level state."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_gui.settings import TrainingSettings, io
from lora_gui.settings.errors import SettingsError
from lora_gui.settings.schema import FIELD_GROUPS
from lora_gui.ui.config import UIConfig
from lora_gui.ui.fields import values_to_document
from lora_gui.ui.form import Registry
from lora_gui.ui.run_control import RunController
from lora_gui.ui.runview import RunView


class PageState:
    """Per-page state kept on the server in a ``gr.State``. Handlers mutate it in place and never
    return it, so a slow poll cannot write an old view back over a newer one."""

    def __init__(self) -> None:
        self.view = RunView()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo):  # gr.State copies its default value for each page
        return PageState()


@dataclass
class Ctx:
    config: UIConfig
    runs: RunController
    registry: Registry = field(default_factory=Registry)
    components: dict[str, Any] = field(default_factory=dict)  # the other components, by name
    blocks: Any = None
    stage: Any = None  # a ServedFiles, made by build_app

    def __getitem__(self, name: str):
        return self.components[name]

    def servable(self, path: str | Path | None) -> str | None:
        """The path to hand to a component for a file the page shows (a sample, the LoRA, a saved
        settings file), or None when it is not a file inside the configured roots. The folders
        gradio serves are fixed at launch: this never adds one (see ``ui.files.ServedFiles``)."""
        if not path or self.stage is None:
            return None
        return self.stage.servable(path)


def keep_current(values: dict[str, Any]) -> TrainingSettings | None:
    """Settings that carry only the current skip-list and the values it names, for loading a file or
    a preset over the form even while some other field is invalid."""
    skip = values.get("runs.json_load_skip_list") or []
    keys = [k for k in skip if k in FIELD_GROUPS]
    doc = values_to_document({f"{FIELD_GROUPS[k]}.{k}": values.get(f"{FIELD_GROUPS[k]}.{k}")
                              for k in keys if f"{FIELD_GROUPS[k]}.{k}" in values})
    doc.setdefault("runs", {})["json_load_skip_list"] = keys
    try:
        return io.validate_document(copy.deepcopy(doc))
    except SettingsError:
        return None
