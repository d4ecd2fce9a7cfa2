"""Settings: the single source of truth (pydantic + standard library only)."""

from lora_gui.settings.errors import Issue, SettingsError
from lora_gui.settings.schema import FIELD_GROUPS, GROUPS, StepPlan, TrainingSettings

__all__ = ["FIELD_GROUPS", "GROUPS", "Issue", "SettingsError", "StepPlan", "TrainingSettings"]
