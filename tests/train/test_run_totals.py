"""optpo_jax/train/run_totals.py: the loop's running totals, as a checkpoint keeps them."""

import dataclasses

import pytest

from optpo_jax.train.run_totals import RunTotals

STEP = {"rollouts": 40, "generated_tokens": 900, "trained_tokens": 700, "label_accuracy": 0.75}


def test_a_step_adds_its_counts_and_keeps_the_totals_frozen():
    start = RunTotals()
    after = start.after_step(STEP, 2.5, prior=None).after_step(STEP, 1.5, prior={"num_prompts": 3})
    assert (after.step, after.rollouts, after.generated_tokens, after.trained_tokens) == (2, 80, 1800, 1400)
    assert after.seconds == pytest.approx(4.0) and after.label_accuracy_sum == pytest.approx(1.5)
    assert after.prior == {"num_prompts": 3}
    assert start == RunTotals()  # nothing changed in place
    with pytest.raises(dataclasses.FrozenInstanceError):
        start.step = 1


def test_totals_round_trip_through_json_and_read_older_checkpoints():
    totals = dataclasses.replace(RunTotals().after_step(STEP, 2.0, None), before={"pass@1": 0.5})
    saved = totals.to_json()
    assert "prior" not in saved  # None fields are left out, as the loop's dict never held them
    assert RunTotals.from_json({**saved, "checksums": {"params/w": 1}}) == totals  # the checkpoint's own keys
    # A run saved before trained_tokens was counted resumes with 0 for it.
    old = {"step": 3, "rollouts": 120, "generated_tokens": 2700, "seconds": 6.0, "label_accuracy_sum": 2.0}
    assert RunTotals.from_json(old) == RunTotals(step=3, rollouts=120, generated_tokens=2700, seconds=6.0,
                                                 label_accuracy_sum=2.0)
