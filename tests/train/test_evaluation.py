"""optpo_jax/train/evaluation.py: evaluate() on waves that lose answers."""

import pytest

from optpo_jax.train.setup import build_setup
from tests.run_configs import small_config


def test_evaluate_refuses_a_wave_with_fewer_answers_than_rows(monkeypatch):
    """A wave that lost answers is an error, not a shorter list zipped away (zip(strict=False) hid it)."""
    from optpo_jax.train import evaluation, waves

    setup = build_setup(small_config())

    def short_wave(*args, **kwargs):
        wave = waves.sample_wave(*args, **kwargs)
        wave.answers = wave.answers[:3]
        return wave

    monkeypatch.setattr(evaluation, "sample_wave", short_wave)
    with pytest.raises(ValueError, match="zip"):
        evaluation.evaluate(setup.policy, setup.task, setup.eval_problems[:4], 2, __import__("jax").random.key(0),
                            setup.eval_sampling, rows_per_wave=8, progress=False)
