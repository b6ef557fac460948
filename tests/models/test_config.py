"""optpo_jax/models/config.py: the model presets."""

import pytest

from optpo_jax.models import (
    preset,
)


def test_presets_match_published_sizes():
    # Published parameter counts: Qwen2.5-Math-1.5B 1.54B, Qwen2.5-0.5B 0.49B, Llama-3.2-1B 1.24B.
    assert preset("qwen2.5-math-1.5b").num_params() == pytest.approx(1.54e9, rel=0.01)
    assert preset("qwen2.5-0.5b-instruct").num_params() == pytest.approx(0.494e9, rel=0.01)
    assert preset("llama-3.2-1b").num_params() == pytest.approx(1.236e9, rel=0.01)
    with pytest.raises(ValueError, match="'gpt-5'"):
        preset("gpt-5")
