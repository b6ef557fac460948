"""optpo_jax/field_ranges.py: a field's kind and range, declared on its dataclass and checked on construction."""

import dataclasses
import math

import numpy as np
import pytest

from optpo_jax.field_ranges import INT, REAL, FieldError, Range, check_ranges, ranged


@dataclasses.dataclass(frozen=True)
class Settings:
    rows: int = ranged(4, INT, 1, 64)
    rate: float = ranged(0.5, REAL, 0.0, 1.0, low_inclusive=False)

    def __post_init__(self):
        check_ranges(self)


def test_values_in_range_are_stored_as_python_numbers():
    settings = Settings(rows=np.int64(64), rate=np.float32(1.0))  # both bounds inclusive where declared so
    assert settings == Settings(rows=64, rate=1.0)
    assert type(settings.rows) is int and type(settings.rate) is float  # hashable, comparable static settings


@pytest.mark.parametrize("fields, shown", [
    ({"rows": 0}, "Settings.rows must be an integer in [1, 64], got 0"),
    ({"rows": 65}, "Settings.rows must be an integer in [1, 64], got 65"),
    ({"rows": 4.0}, "Settings.rows must be an integer in [1, 64], got 4.0"),  # a float is not a count
    ({"rows": True}, "Settings.rows must be an integer in [1, 64], got True"),
    ({"rate": 0.0}, "Settings.rate must be a finite number in (0.0, 1.0], got 0.0"),
    ({"rate": math.nan}, "Settings.rate must be a finite number in (0.0, 1.0], got nan"),
    ({"rate": "0.5"}, "Settings.rate must be a finite number in (0.0, 1.0], got '0.5'"),
])
def test_a_value_outside_its_kind_or_range_names_the_field_the_range_and_the_value(fields, shown):
    with pytest.raises(FieldError) as caught:
        Settings(**fields)
    assert str(caught.value) == shown
    assert caught.value.field == next(iter(fields))  # what train.setup re-raises under the config path


def test_a_range_alone_checks_fields_no_dataclass_holds():
    assert Range(INT, 0, 10).check("config", "steps", 10) == 10
    with pytest.raises(FieldError, match=r"^config\.steps must be an integer in \[0, 10\], got -1$"):
        Range(INT, 0, 10).check("config", "steps", -1)
