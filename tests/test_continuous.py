"""Continuous rollouts (issue 26): refill, the row pool's decode state, and the schedule in training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optpo_jax import SPRTConfig, allocate_wave, consensus, init_vote_state, refill, sprt_update
from optpo_jax.allocation import rollouts_to_stop
from optpo_jax.continuous import TRACE_COUNTS, decode_chunk, init_decode_state, insert_rows
from optpo_jax.grpo import GRPOConfig
from optpo_jax.models import ModelConfig, init_decoder, scripted
from optpo_jax.sampler import SamplingConfig, sample
from optpo_jax.train import rollouts as rollouts_module
from optpo_jax.train.learner import Learner
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.step_config import StepConfig, UpdateConfig
from optpo_jax.train.vote_book import VoteBook

RULE = SPRTConfig(rule="dirichlet", threshold=0.9, min_samples=2, max_samples=10)


def random_votes(rng, num_prompts, config=RULE, num_slots=10):
    """Votes after a random number of random answers per prompt (some prompts done)."""
    state = init_vote_state(num_prompts, num_slots)
    for _ in range(rng.integers(0, 6)):
        ids = rng.integers(0, num_prompts, 8).astype(np.int32)
        state = sprt_update(state, ids, rng.integers(-1, 3, 8).astype(np.int32), np.ones(8, bool), config)
    return state


def brute_force_refill(state, in_flight, num_rows, config, num_free):
    """The refill rule written out row by row (reference for ``refill``; demands from ``rollouts_to_stop``,
    itself checked against a brute-force search in test_allocation.py)."""
    done = np.asarray(state.done)
    budget = np.where(done, 0, np.maximum(config.max_samples - np.asarray(state.num_samples) - in_flight, 0))
    demand = np.minimum(np.maximum(np.asarray(rollouts_to_stop(state, config)) - in_flight, 0), budget)
    granted = np.zeros(len(done), np.int64)
    rows_left = num_free
    for prompt in range(len(done)):  # demands in prompt order
        give = min(demand[prompt], rows_left)
        granted[prompt] += give
        rows_left -= give
    room = budget - granted
    with_room = int(np.sum(room > 0))
    if with_room:
        for prompt in range(len(done)):  # an even share each, within room
            give = min(room[prompt], rows_left // with_room) if room[prompt] > 0 else 0
            granted[prompt] += give
        rows_left = num_free - granted.sum()
        room = budget - granted
        confidence = np.asarray(state.confidence)
        for prompt in sorted(range(len(done)), key=lambda p: (confidence[p], p)):  # then least settled first
            give = min(room[prompt], rows_left)
            granted[prompt] += give
            rows_left -= give
    prompt_ids = np.zeros(num_rows, np.int32)
    valid = np.zeros(num_rows, bool)
    row = 0
    for prompt in range(len(done)):
        prompt_ids[row : row + granted[prompt]] = prompt
        valid[row : row + granted[prompt]] = True
        row += granted[prompt]
    return prompt_ids, valid


@pytest.mark.parametrize("seed", range(4))
def test_refill_matches_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    num_prompts, num_rows = int(rng.integers(1, 7)), 12
    state = random_votes(rng, num_prompts)
    room = np.where(state.done, 0, RULE.max_samples - np.asarray(state.num_samples))
    in_flight = np.minimum(rng.integers(0, 4, num_prompts), room).astype(np.int32)
    num_free = int(rng.integers(0, num_rows + 1))
    refill_jit = jax.jit(refill, static_argnums=(2, 3))
    prompt_ids, valid = refill_jit(state, in_flight, num_rows, RULE, None, num_free)
    expected_ids, expected_valid = brute_force_refill(state, in_flight, num_rows, RULE, num_free)
    np.testing.assert_array_equal(valid, expected_valid)
    np.testing.assert_array_equal(np.where(valid, prompt_ids, 0), expected_ids)
    # Never beyond a budget: votes + rollouts in flight + new rows <= max_samples.
    granted = np.bincount(np.asarray(prompt_ids)[np.asarray(valid)], minlength=num_prompts)
    assert np.all(np.asarray(state.num_samples) + in_flight + granted <= RULE.max_samples)
    assert not np.any(granted[np.asarray(state.done)])
    # A kept-current to_stop gives the same rows.
    given = refill_jit(state, in_flight, num_rows, RULE, None, num_free, rollouts_to_stop(state, RULE))
    np.testing.assert_array_equal(given[0], prompt_ids)


def test_refill_with_nothing_in_flight_is_allocate_wave_and_vmaps():
    rng = np.random.default_rng(7)
    states = [random_votes(rng, 5) for _ in range(3)]
    for state in states:
        for got, want in zip(refill(state, np.zeros(5, np.int32), 16, RULE), allocate_wave(state, 16, RULE),
                             strict=True):
            np.testing.assert_array_equal(got, want)
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *states)
    in_flight = jnp.asarray(rng.integers(0, 3, (3, 5)), jnp.int32)
    batched = jax.vmap(lambda votes, flight: refill(votes, flight, 16, RULE, None, 9))(stacked, in_flight)
    for index, state in enumerate(states):
        single = refill(state, in_flight[index], 16, RULE, None, 9)
        np.testing.assert_array_equal(batched[0][index], single[0])
        np.testing.assert_array_equal(batched[1][index], single[1])
        assert int(np.sum(single[1])) <= 9


def test_vote_book_counts_like_a_full_update():
    """Updating only the prompts a count touches equals sprt_update over all of them (reference)."""
    rng = np.random.default_rng(3)
    full = init_vote_state(9, 10)
    book = VoteBook(full, RULE)
    for _ in range(12):  # 6 rows a count (one compilation), some of them invalid
        ids, slots = rng.integers(0, 9, 6).astype(np.int32), rng.integers(-1, 3, 6).astype(np.int32)
        valid = rng.random(6) < 0.7
        full = sprt_update(full, ids, slots, valid, RULE)
        book.count(ids, slots, valid)
    for name, values in vars(full).items():
        np.testing.assert_allclose(getattr(book.votes, name), np.asarray(values), err_msg=name)
    np.testing.assert_array_equal(book.to_stop, rollouts_to_stop(full, RULE))


DECODER = ModelConfig(model_type="qwen2", vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def test_inserted_rows_decode_exactly_like_the_prompt_alone():
    """Rows inserted at different times into a pool whose ring cache wraps, greedy: each rollout's tokens equal
    the wave sampler's (whose rows decode as their prompts would alone: test_sampler.py checks that against an
    uncached forward), so no row sees another's tokens."""
    model_config = DECODER
    params = jax.tree.map(lambda x: x * 12.0 if x.ndim == 2 else x, nnx.split(init_decoder(model_config, seed=3))[1])
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0)
    prompts = [[3, 7, 1], [5], [2, 9, 4, 4, 8, 1, 6], [11, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
    width, num_rows = 8, 3
    state = init_decode_state(model_config, num_rows, width, sampling, jax.random.key(0))
    outputs = {}

    def insert(state, row, prompt_index):
        bucket = 4 if len(prompts[prompt_index]) <= 4 else width  # a narrower bucket than the pool was made for
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompts[prompt_index])] = prompts[prompt_index]
        return insert_rows(params, state, np.array([row], np.int32), tokens,
                           np.array([len(prompts[prompt_index])], np.int32), np.ones(1, bool), np.zeros(1, np.int32),
                           np.array([[prompt_index, 0]], np.int32), model_config=model_config, config=sampling)

    def harvest(state, row, prompt_index):
        length = int(state.lengths[row])
        outputs[prompt_index] = (np.asarray(state.tokens[row, :length]), np.asarray(state.policy_logprobs[row, :length]))

    pending, row_prompt = list(range(len(prompts))), {}
    while pending or row_prompt:
        free = [row for row in range(num_rows) if row not in row_prompt or not bool(state.running[row])]
        for row in free:
            if row in row_prompt:
                harvest(state, row, row_prompt.pop(row))
        if pending and free:  # one new prompt per chunk, so rows start (and end) at different steps
            state = insert(state, free[0], pending[0])
            row_prompt[free[0]] = pending.pop(0)
        if row_prompt:
            state = decode_chunk(params, state, 3, num_rows, model_config=model_config, config=sampling)
    assert int(state.decode_steps) > width + sampling.max_new_tokens  # the ring wrapped
    assert sorted(outputs) == list(range(len(prompts)))
    alone = sample(params, model_config, *_padded(prompts), np.ones(len(prompts), bool), jax.random.key(1), sampling)
    for prompt_index, (tokens, logprobs) in outputs.items():  # a wave's rows decode as their prompt alone would
        assert len(tokens) == int(alone.lengths[prompt_index]) == sampling.max_new_tokens
        np.testing.assert_array_equal(tokens, np.asarray(alone.tokens[prompt_index]))
        np.testing.assert_allclose(logprobs, np.asarray(alone.policy_logprobs[prompt_index]), atol=2e-5)


def _padded(token_lists):
    width = max(len(tokens) for tokens in token_lists)
    padded = np.zeros((len(token_lists), width), np.int32)
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = tokens
    return padded, np.array([len(tokens) for tokens in token_lists], np.int32)


class ReplayTask:
    """The scripted policy's task (as in experiments/bench_continuous.py)."""

    pad_token_id = scripted.PAD

    def prompt_tokens(self, question):
        return [question]

    def extract(self, completion):
        answers = [int(token) for token in completion if token >= scripted.FIRST_ANSWER]
        return str(answers[0] - scripted.FIRST_ANSWER) if answers else None


def scripted_run(schedule, on_stop="finish", num_rows=8, lookahead=0):
    """A deterministic trace: 7 questions, 10 scripted rollouts each; all of a question's rollouts have one
    length (so they finish in the order they started), answers vary with the rollout's number."""
    rng = np.random.default_rng(0)
    num_questions = 7 + lookahead
    lengths = np.repeat(rng.integers(2, 12, (num_questions, 1)), 10, axis=1)
    slot_ids = np.where(rng.random((num_questions, 10)) < 0.7, 0, rng.integers(-1, 3, (num_questions, 10)))
    params = scripted.script_params(lengths, slot_ids)
    sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=(scripted.STOP,), pad_token_id=scripted.PAD,
                              schedule=schedule, on_stop=on_stop)
    config = StepConfig(sprt=RULE, sampling=sampling, update=UpdateConfig(), grpo=GRPOConfig(),
                        rows_per_wave=num_rows)
    questions = list(range(num_questions))
    learner = Learner(ReplayTask(), scripted.ScriptedConfig(num_answers=10), config)
    return collect_rollouts(params, learner, questions[:7], jax.random.key(0), lookahead=questions[7:])


def test_continuous_and_waves_reach_the_same_votes_on_a_deterministic_trace():
    """The same rollouts (rollout k of a question plays its k-th script in both) reach the same labels, and a
    second identical continuous run compiles no new shape of the pool. The
    counts at the stop may differ: the rule is applied once per ``sprt_update``, i.e. per wave or per round
    trip, so a prompt can take in a vote or two more in one schedule than in the other."""
    waves, _ = scripted_run("waves")
    continuous, _ = scripted_run("continuous")
    traces = TRACE_COUNTS.copy()
    scripted_run("continuous")
    assert TRACE_COUNTS == traces, "a second identical run compiled new shapes"
    assert np.asarray(waves.votes.done).all() and np.asarray(continuous.votes.done).all()
    labels = lambda run: [run.answer_slots.answer(p, int(s)) for p, s in enumerate(consensus(run.votes))]
    assert labels(continuous) == labels(waves)
    assert np.abs(np.asarray(continuous.votes.num_samples) - np.asarray(waves.votes.num_samples)).max() <= 2
    for run in (waves, continuous):  # every vote is a kept rollout (kept ones after the stop are not votes)
        for question in range(7):
            slots = run.slots[run.prompt_index == question]
            assert np.all(np.bincount(slots[slots >= 0], minlength=10) >= np.asarray(run.votes.counts[question]))
    assert continuous.decode_steps < waves.decode_steps


def test_cancel_never_gives_a_stopped_prompt_a_row_and_keeps_every_budget(monkeypatch):
    calls = []
    allocate = rollouts_module._allocate_with_lookahead

    def checked(votes, num_prompts, num_rows, config, extra=None, prior_state=None, in_flight=None, num_free=None,
                to_stop=None):
        prompt_ids, valid = allocate(votes, num_prompts, num_rows, config, extra, prior_state, in_flight, num_free,
                                     to_stop)
        granted = np.bincount(prompt_ids[valid], minlength=len(votes.done))
        assert not np.any(granted[np.asarray(votes.done)]), "a stopped prompt got a row"
        in_flight = np.zeros_like(granted) if in_flight is None else in_flight
        assert np.all(np.asarray(votes.num_samples) + in_flight + granted <= config.max_samples)
        calls.append(int(valid.sum()))
        return prompt_ids, valid

    monkeypatch.setattr(rollouts_module, "_allocate_with_lookahead", checked)
    batch, carry = scripted_run("continuous", on_stop="cancel", num_rows=16, lookahead=3)
    assert len(calls) > 3 and sum(calls) >= len(batch.prompt_index)
    kept = np.bincount(batch.prompt_index, minlength=7)
    assert np.all(kept <= RULE.max_samples) and np.all(kept >= np.asarray(batch.votes.num_samples))
    assert batch.rows_total > batch.rows_used  # rollouts were cancelled or dropped
    np.testing.assert_array_equal(np.bincount(carry.kept["prompt_index"], minlength=3),
                                  np.asarray(carry.votes.num_samples))


class GradedReplayTask(ReplayTask):
    def is_correct(self, answer, question):
        return answer == "0"


def test_evaluation_samples_the_same_rollouts_in_both_schedules():
    """evaluate() through the row pool: sample k of a question plays script k in both schedules and is put
    back in its place, so the answers, the votes (ties included) and the metrics are the same."""
    from optpo_jax.train.evaluation import evaluate

    rng = np.random.default_rng(1)
    lengths, answers = rng.integers(2, 12, (5, 6)), rng.integers(-1, 3, (5, 6))
    policy = dataclasses.make_dataclass("Policy", ["params", "config"])(
        scripted.script_params(lengths, answers), scripted.ScriptedConfig(num_answers=6))
    results = {}
    for schedule in ("waves", "continuous"):
        sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=(scripted.STOP,), schedule=schedule)
        results[schedule] = evaluate(policy, GradedReplayTask(), list(range(5)), 6, jax.random.key(0), sampling,
                                     rows_per_wave=8, progress=False)
    expected = [[None if a < 0 else str(a) for a in row] for row in answers]
    assert results["waves"].answers == results["continuous"].answers == expected
    assert results["waves"].summary() == results["continuous"].summary()
    assert results["waves"].generated_tokens == results["continuous"].generated_tokens == lengths.sum()


def test_a_continuous_run_stopped_mid_batch_resumes_like_an_uninterrupted_one(tmp_path, monkeypatch):
    """Nothing of the pool is saved: a run stopped inside the third step's decode (an exception here;
    tests/train/test_loop.py SIGKILLs a waves run and a LoRA run) resumes from its last checkpoint and carry, the
    lookahead's rollouts in flight dropped, and ends with the same metrics as a run never stopped."""
    import json

    from optpo_jax.train import row_pool
    from optpo_jax.train.loop import train
    from tests.run_configs import tiny_config

    config = tiny_config(steps=3, **{"sampling.schedule": "continuous", "sampling.on_stop": "cancel",
                                      "policy_update.min_rollouts_per_prompt": 4, "eval.every_steps": 0})
    train(config, tmp_path / "full", progress=False)
    stopped, decode, calls = tmp_path / "stopped", row_pool.RowPool.decode, []

    def stop_in_step_three(pool):
        if (stopped / "checkpoints" / "2").exists():
            calls.append(1)
            if len(calls) == 2:  # rollouts are in flight: the batch is half drawn
                assert pool.in_flight().any()
                raise KeyboardInterrupt("stopped mid-batch")
        return decode(pool)

    monkeypatch.setattr(row_pool.RowPool, "decode", stop_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(config, stopped, progress=False)
    monkeypatch.setattr(row_pool.RowPool, "decode", decode)
    train(config, stopped, resume=True, progress=False)
    lines = lambda run: [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                         for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines(stopped) == lines(tmp_path / "full")
    assert len(lines(stopped)) >= 3
