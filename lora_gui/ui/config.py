"""Where the GUI keeps its things: the data folder (last settings, user presets, uploaded datasets),
the runs folder, and the roots the server-side file browser may show. No gradio here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_gui.settings import SettingsError, TrainingSettings, io

LAST_SETTINGS = "last-settings.json"


def default_data_dir() -> Path:
    home = os.environ.get("LORA_GUI_HOME")
    return Path(home).expanduser() if home else Path.cwd() / ".lora-gui"


@dataclass
class UIConfig:
    """What the app is built with (parsed from the command line by ``launch``)."""

    data_dir: Path = field(default_factory=default_data_dir)
    runs_dir: Path = field(default_factory=lambda: Path.cwd() / "runs")
    preset: str | None = None
    browse_roots: list[Path] = field(default_factory=list)
    demo_dir: Path = field(default_factory=lambda: Path.cwd() / "demo")

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.runs_dir = Path(self.runs_dir).resolve()
        self.demo_dir = Path(self.demo_dir).resolve()
        roots = [Path(r).resolve() for r in self.browse_roots] or [Path.cwd().resolve()]
        for extra in (self.data_dir, self.runs_dir):
            if not any(extra == r or r in extra.parents for r in roots):
                roots.append(extra)
        self.browse_roots = roots

    @property
    def presets_dir(self) -> Path:
        return self.data_dir / "presets"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def settings_dir(self) -> Path:
        return self.data_dir / "settings"

    @property
    def last_settings_path(self) -> Path:
        return self.data_dir / LAST_SETTINGS

    def presets(self) -> dict[str, Path]:
        return io.list_presets([self.presets_dir])

    def load_preset(self, name: str, current: TrainingSettings | None = None) -> TrainingSettings:
        return io.load_preset(name, current, [self.presets_dir])

    def save_last(self, settings: TrainingSettings) -> None:
        io.save_settings(settings, self.last_settings_path)

    def initial_settings(self) -> tuple[TrainingSettings, str]:
        """The last used settings if there are any (a restart restores them), else the preset given
        on the command line, else the defaults; and a sentence that says which."""
        last = self.last_settings_path
        if last.is_file():
            try:
                # Our own file: validated as a whole, so the skip-list the user edited comes back too.
                return io.validate_document(io.read_json(last)), f"Restored the last used settings ({last})."
            except SettingsError as exc:
                note = f"Could not restore {last} ({exc.issues[0]}); "
            else:  # pragma: no cover
                note = ""
        else:
            note = ""
        if self.preset:
            return self.load_preset(self.preset), f"{note}Preset '{self.preset}' loaded."
        return io.defaults(), f"{note}Default settings."
