"""The engine's name tables cover exactly the choices the settings schema offers: a name the page
offers always works, and a name the engine knows is always offered."""

import typing

from lora_gui.engine.optim import OPTIMIZERS
from lora_gui.engine.sampling import SAMPLER_CLASSES
from lora_gui.settings import schema


def _choices(model, field: str) -> tuple[str, ...]:
    return typing.get_args(model.model_fields[field].annotation)


def test_optimizer_table_equals_the_schema_choices():
    # The optimizer is a dropdown of suggestions (a dotted class path may be typed in as well).
    extra = schema.TrainingGroup.model_fields["optimizer"].json_schema_extra
    assert tuple(extra["choices"]) == schema.OPTIMIZERS
    assert list(OPTIMIZERS) == list(schema.OPTIMIZERS)


def test_sampler_table_equals_the_schema_choices():
    assert _choices(schema.SampleSettings, "sample_sampler") == schema.SAMPLERS
    assert list(SAMPLER_CLASSES) == list(schema.SAMPLERS)
