"""Value ranges of config fields, declared once on the frozen dataclass that holds each field.

A field declared with ``ranged(default, INT, 1, 1024)`` is checked, and normalised to a
Python int or float (configs are static jit arguments: hashed and compared), by
``check_ranges`` in its dataclass's ``__post_init__``. The error names the field and the
accepted range; ``train.setup`` re-raises it under the config path the user writes
(``config.sprt.prior``). Fields of an experiment config with no dataclass have their ranges
in ``train.config_checks.EXPERIMENT_RANGES``, as the same ``Range``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

INT, REAL = "an integer", "a finite number"


class FieldError(ValueError):
    """A field's value that cannot run: the message is ``owner.field`` followed by ``problem`` (which starts
    with " must be ..." or "=value ..."), so that ``train.setup`` can name the config path instead."""

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner}.{field}{problem}" if owner else f"{field}{problem}")
        self.field, self.problem = field, problem


@dataclasses.dataclass(frozen=True)
class Range:
    """The kind (``INT`` or ``REAL``) and interval a field's value must lie in."""

    kind: str
    low: float
    high: float
    low_inclusive: bool = True
    high_inclusive: bool = True

    def text(self) -> str:
        left, right = "[" if self.low_inclusive else "(", "]" if self.high_inclusive else ")"
        return f"{self.kind} in {left}{self.low}, {self.high}{right}"

    def check(self, owner: str, field: str, value):
        """``value`` as a Python int (``INT``) or float (``REAL``); FieldError unless it has the kind and range.

        Bools are neither; a float is not an integer (4.0 names a mistake, not 4 rollouts).
        """
        is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if self.kind == INT and not is_int or self.kind == REAL and not is_real:
            raise FieldError(owner, field, f" must be {self.text()}, got {value!r}")
        above_low = self.low <= value if self.low_inclusive else self.low < value
        below_high = value <= self.high if self.high_inclusive else value < self.high
        if not (above_low and below_high):
            raise FieldError(owner, field, f" must be {self.text()}, got {value!r}")
        return int(value) if self.kind == INT else float(value)


def ranged(default, kind: str, low, high, low_inclusive: bool = True, high_inclusive: bool = True):
    """A dataclass field with ``default`` (``dataclasses.MISSING``: required) whose value must be ``kind`` in the
    given interval."""
    return dataclasses.field(default=default, metadata={"range": Range(kind, low, high, low_inclusive, high_inclusive)})


def check_ranges(instance) -> None:
    """Checks every ``ranged`` field of the frozen dataclass ``instance`` and stores it normalised."""
    owner = type(instance).__name__
    for field in dataclasses.fields(instance):
        bounds = field.metadata.get("range")
        if bounds is not None:
            object.__setattr__(instance, field.name, bounds.check(owner, field.name, getattr(instance, field.name)))
