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
