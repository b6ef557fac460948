"""optpo_jax/__init__.py: the pure core's public names and what importing it pulls in."""

import subprocess
import sys

import numpy as np


def _modules_after(import_line: str) -> set:
    code = f"import sys; {import_line}; print(' '.join(sys.modules))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_core_imports_neither_the_host_side_nor_matplotlib():
    core = _modules_after("import optpo_jax, optpo_jax.sampler, optpo_jax.models")
    assert not any(name.startswith("optpo_jax.train") for name in core)
    host = _modules_after("import optpo_jax.train, optpo_jax.cli")
    assert "optpo_jax.train.loop" in host and "matplotlib" not in host


# AnswerSlots is part of the public API and maps each prompt's answers to slots in order of appearance.
def test_answer_slots_is_exported():
    import optpo_jax
    from optpo_jax import AnswerSlots

    assert "AnswerSlots" in optpo_jax.__all__
    slots = AnswerSlots(num_prompts=2, num_slots=3)
    np.testing.assert_array_equal(slots.assign([0, 0, 1, 0, 1], ["7", "9", "9", "7", None]), [0, 1, 0, 0, -1])
    assert slots.answer(0, 1) == "9" and slots.answer(1, -1) is None
