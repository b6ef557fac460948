"""train/packing.py: prompts once with their completions in packed rows, against one rollout per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optpo_jax.grpo import token_logprobs
from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import forward, init_decoder
from optpo_jax.models.logprobs import packed_logprobs
from optpo_jax.train import packing

CONFIG = ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)


def _rollouts(seed=0, num_rollouts=9, completion_width=7):
    """Three prompts (lengths 3, 5, 2), each with several completions of 1..7 tokens."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 40, n).astype(np.int32) for n in (3, 5, 2)]
    prompt_keys = rng.integers(0, 3, num_rollouts)
    completion_lengths = rng.integers(1, completion_width + 1, num_rollouts).astype(np.int32)
    completions = rng.integers(1, 40, (num_rollouts, completion_width)).astype(np.int32)
    return prompts, prompt_keys, completions, completion_lengths


def _pack(prompts, prompt_keys, completions, completion_lengths, pieces, width, row_offset=0):
    rollout_prompts = [prompts[key] for key in prompt_keys]
    prompt_lengths = np.array([len(p) for p in rollout_prompts])
    plans = packing.plan_rows(prompt_lengths, completion_lengths, list(prompt_keys), rollout_prompts, pieces, width)
    rows = max(len(piece) for piece in plans)
    return packing.pack_rows(plans, prompt_lengths, completions, completion_lengths, rows, width,
                             completions.shape[1], row_offset), rows


def test_row_ladder_has_few_sizes_and_a_third_of_padding_at_most():
    assert [packing.row_ladder(n) for n in (1, 3, 5, 17, 33, 41, 49, 65, 97)] == [1, 4, 8, 32, 48, 48, 64, 96, 128]
    assert packing.row_ladder(10, multiple=4) == 16 and packing.row_ladder(0) == 1
    assert all(packing.row_ladder(n) <= 1.5 * n for n in range(32, 2000))


@pytest.mark.parametrize("pieces, width", [(1, 64), (1, 12), (2, 12)])
def test_every_target_is_predicted_by_the_token_before_it_in_its_own_sequence(pieces, width):
    prompts, keys, completions, completion_lengths = _rollouts()
    arrays, rows = _pack(prompts, keys, completions, completion_lengths, pieces, width, row_offset=0)
    # Strided pieces: packed row p of piece m is row p * M + m.
    for rollout, key in enumerate(keys):
        piece = rollout % pieces
        sequence = np.concatenate([prompts[key], completions[rollout, : completion_lengths[rollout]]])
        for t in range(completion_lengths[rollout]):
            index = arrays["target_index"][rollout, t]
            row, column = divmod(index, width)
            tokens = arrays["input_tokens"].reshape(rows, pieces, width)[row, piece]
            positions = arrays["positions"].reshape(rows, pieces, width)[row, piece]
            assert tokens[column] == sequence[len(prompts[key]) + t - 1]
            assert positions[column] == len(prompts[key]) + t - 1
            assert arrays["target_tokens"][rollout, t] == sequence[len(prompts[key]) + t]
        assert arrays["loss_mask"][rollout].sum() == completion_lengths[rollout]
    if width == 12:  # 12 tokens cannot hold a prompt with all its completions: groups split, prompts repeated
        assert (arrays["positions"] == 0).sum() > len(prompts)
    with pytest.raises(ValueError, match="longer than the packed row width 10"):
        _pack(prompts, keys, completions, completion_lengths, pieces, 10)


@pytest.mark.parametrize("pieces, width", [(1, 64), (2, 12)])
def test_packed_logprobs_equal_one_rollout_per_row(pieces, width):
    # Reference: one rollout per row (_one_rollout_per_row).
    prompts, keys, completions, completion_lengths = _rollouts(seed=1)
    params = nnx.split(init_decoder(CONFIG, seed=3))[1]
    arrays, rows = _pack(prompts, keys, completions, completion_lengths, pieces, width)
    got, logprobs = [], jax.jit(packed_logprobs, static_argnums=(0, 8))
    for piece in range(pieces):  # what one strided micro-batch sees
        take = lambda name, piece=piece: jnp.asarray(arrays[name].reshape(rows, pieces, width)[:, piece])
        members = np.arange(piece, len(keys), pieces)
        got.append(np.asarray(logprobs(CONFIG, params, take("input_tokens"), take("positions"), take("groups"),
                                       take("branches"), jnp.asarray(arrays["target_index"][members]),
                                       jnp.asarray(arrays["target_tokens"][members]), 0.8)))
    want = _one_rollout_per_row(params, prompts, keys, completions, completion_lengths, 0.8)
    for rollout in range(len(keys)):
        np.testing.assert_allclose(got[rollout % pieces][rollout // pieces, : completion_lengths[rollout]],
                                   want[rollout], rtol=1e-5, atol=1e-5)


def _one_rollout_per_row(params, prompts, keys, completions, completion_lengths, temperature):
    """Each rollout's completion log-probabilities from the decoder's forward with one rollout per row
    (prompt + completion, right-padded) and the full log-softmax (grpo.token_logprobs): the reference."""
    sequences = [np.concatenate([prompts[key], completions[r, : completion_lengths[r]]]) for r, key in enumerate(keys)]
    width = max(map(len, sequences))
    padded = np.zeros((len(keys), width), np.int32)
    for rollout, sequence in enumerate(sequences):
        padded[rollout, : len(sequence)] = sequence
    positions = np.where(np.arange(width - 1) < np.array([len(s) - 1 for s in sequences])[:, None],
                         np.arange(width - 1), -1)
    logits, _ = jax.jit(forward, static_argnums=0)(CONFIG, params, jnp.asarray(padded[:, :-1]),
                                                   jnp.asarray(positions, jnp.int32))
    logprobs = np.asarray(token_logprobs(logits, jnp.asarray(padded[:, 1:]), temperature))
    starts = [len(prompts[key]) - 1 for key in keys]
    return [logprobs[r, start : start + completion_lengths[r]] for r, start in enumerate(starts)]


def test_two_processes_rows_line_up_in_the_global_strided_micro_batches():
    """Two processes pack their own rollouts (process p's target indices offset by p x rows, ``row_offset``);
    the global batch is their rows one after the other, as ``rows_to_global`` lays them out; each strided
    micro-batch (``grpo.strided_micro_batches``) must then find every target's predicting token in its rows.
    Reference: one rollout per row (``_one_rollout_per_row``)."""
    from optpo_jax.grpo import strided_micro_batches

    prompts, keys, completions, completion_lengths = _rollouts(seed=2, num_rollouts=12)
    params = nnx.split(init_decoder(CONFIG, seed=4))[1]
    pieces, width, halves = 2, 16, (slice(0, 6), slice(6, 12))
    rollout_prompts = [prompts[key] for key in keys]
    prompt_lengths = np.array([len(p) for p in rollout_prompts])
    plans = [packing.plan_rows(prompt_lengths[half], completion_lengths[half], list(keys[half]),
                               rollout_prompts[half], pieces, width) for half in halves]
    rows = max(len(piece) for plan in plans for piece in plan)  # agreed over processes (process_max)
    local = [packing.pack_rows(plan, prompt_lengths[half], completions[half], completion_lengths[half], rows, width,
                               completions.shape[1], row_offset=process * rows)
             for process, (plan, half) in enumerate(zip(plans, halves, strict=True))]
    global_batch = {name: np.concatenate([arrays[name] for arrays in local]) for name in local[0]}
    micro = strided_micro_batches({name: jnp.asarray(values) for name, values in global_batch.items()}, pieces)
    logprobs = jax.jit(packed_logprobs, static_argnums=(0, 8))
    got = np.stack([np.asarray(logprobs(CONFIG, params, *(micro[name][m] for name in (
        "input_tokens", "positions", "groups", "branches", "target_index", "target_tokens")), 1.0))
        for m in range(pieces)])  # [M, rollouts / M, T]
    want = _one_rollout_per_row(params, prompts, keys, completions, completion_lengths, 1.0)
    order = np.arange(12).reshape(-1, pieces).T  # rollouts of micro-batch m: global rows m, m + M, ...
    for m in range(pieces):
        for slot, rollout in enumerate(order[m]):
            np.testing.assert_allclose(got[m, slot, : completion_lengths[rollout]], want[rollout], rtol=1e-5,
                                       atol=1e-5)
