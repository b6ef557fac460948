"""optpo_jax/train/waves.py: prompts tokenized to a shared bucket, one wave sampled and read back, its votes counted."""

import dataclasses

import jax
import numpy as np

from optpo_jax.sampler import SamplingConfig
from optpo_jax.sprt import SPRTConfig, init_vote_state
from optpo_jax.train.answer_slots import AnswerSlots
from optpo_jax.train.waves import Wave, count_votes, sample_wave, tokenize_prompts


def test_prompts_are_right_padded_to_the_bucket_of_the_longest(setup):
    task, problems = setup.task, setup.train_problems[:3]
    expected = [task.prompt_tokens(problem) for problem in problems]
    longest = max(len(tokens) for tokens in expected)
    table = tokenize_prompts(task, problems, SamplingConfig(prompt_buckets=(longest - 1, longest + 5, 64)))
    assert table.tokens.shape == (3, longest + 5)  # the smallest bucket that holds the longest prompt
    for row, tokens in enumerate(expected):
        assert table.lengths[row] == len(tokens)
        assert table.tokens[row, : len(tokens)].tolist() == tokens
        assert (table.tokens[row, len(tokens) :] == task.pad_token_id).all()


def test_a_wave_reads_back_every_valid_row_with_its_answer(setup):
    task, problems = setup.task, setup.train_problems[:2]
    sampling = dataclasses.replace(setup.learner.config.sampling, temperature=0.0)
    table = tokenize_prompts(task, problems, sampling)
    prompt_ids, valid = np.array([0, 1, 1, 0]), np.array([True, True, False, True])
    wave = sample_wave(setup.policy.params, setup.policy.config, task, table, prompt_ids, valid,
                       jax.random.key(0), sampling)
    assert wave.completion_lengths[2] == 0 and wave.answers[2] is None  # an invalid row is padding
    for row in np.flatnonzero(valid):
        length = wave.completion_lengths[row]
        assert 0 < length <= sampling.max_new_tokens
        assert wave.answers[row] == task.extract(wave.completions[row, :length])
        assert (wave.policy_logprobs[row, length:] == 0).all() and (wave.policy_logprobs[row, :length] <= 0).all()
    # Greedy: the same prompt gives the same completion in any row.
    np.testing.assert_array_equal(wave.completions[0], wave.completions[3])


def test_count_votes_puts_equal_answers_in_one_slot_and_skips_rows_without_one():
    answers = ["5", "5", None, "7", "9", "7"]
    wave = Wave(prompt_ids=np.array([0, 0, 0, 1, 1, 1]), valid=np.array([True] * 5 + [False]),
                completions=np.zeros((6, 2), np.int32), completion_lengths=np.ones(6, np.int32),
                policy_logprobs=np.zeros((6, 2), np.float32), answers=answers)
    config = SPRTConfig(rule="fixed", min_samples=1, max_samples=8)
    votes, slots = count_votes(init_vote_state(2, 8), AnswerSlots(2, 8), wave, config)
    assert slots.tolist() == [0, 0, -1, 0, 1, 0]  # per-prompt tables: "7" is slot 0 of prompt 1
    counts = np.asarray(votes.counts)
    assert counts[0, :2].tolist() == [2, 0] and counts[1, :2].tolist() == [1, 1]  # the invalid "7" is not counted
    assert np.asarray(votes.num_samples).tolist() == [3, 2]  # a row without an answer still counts as drawn


def test_a_rollout_draws_the_same_tokens_in_any_row_wave_or_schedule(setup):
    """Common random numbers: rollout k of prompt p draws from its own stream of the key, so it comes out the
    same whichever row and wave it is placed in, and from the continuous pool too (same policy, same key);
    two valid rows with the same (prompt, rollout) are refused."""
    import pytest

    from optpo_jax.train.row_pool import RowPool

    task, problems = setup.task, setup.train_problems[:2]
    sampling = setup.learner.config.sampling  # temperature 1
    table = tokenize_prompts(task, problems, sampling)
    params, config, key = setup.policy.params, setup.policy.config, jax.random.key(7)
    first = sample_wave(params, config, task, table, np.array([0, 1, 0, 1]), np.ones(4, bool), key, sampling,
                        rollout_index=np.array([0, 0, 1, 1]))
    other = sample_wave(params, config, task, table, np.array([1, 0, 0, 1, 0]),
                        np.array([True, False, True, True, True]), key, sampling,
                        rollout_index=np.array([1, 5, 0, 0, 1]))
    completion = lambda wave, row: wave.completions[row, : wave.completion_lengths[row]].tolist()
    for row_first, row_other in [(0, 2), (1, 3), (2, 4), (3, 0)]:  # (p, k): (0, 0), (1, 0), (0, 1), (1, 1)
        assert completion(first, row_first) == completion(other, row_other)
    several = sample_wave(params, config, task, table, np.zeros(16, int), np.ones(16, bool), key, sampling,
                          rollout_index=np.arange(16))
    assert len({tuple(completion(several, row)) for row in range(16)}) > 1  # streams of one prompt differ
    pool = RowPool(params, config, task, table, sampling, 4, key)
    pool.insert(np.array([1, 0, 0, 1]))  # the pool numbers each prompt's rollouts in insertion order
    finished = []
    while len(finished) < 4:
        done = pool.decode()
        finished += [((int(p), int(k)), done.completions[i, : done.completion_lengths[i]].tolist())
                     for i, (p, k) in enumerate(zip(done.prompt_ids, done.rollout_index, strict=True))]
    by_stream = dict(finished)
    for row, stream in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        assert by_stream[stream] == completion(first, row)
    with pytest.raises(ValueError, match="same \\(prompt, rollout_index\\)"):
        sample_wave(params, config, task, table, np.array([0, 0]), np.ones(2, bool), key, sampling,
                    rollout_index=np.array([3, 3]))
