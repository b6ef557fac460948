import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from optpo_jax.grpo import token_logprobs
from optpo_jax.models import ModelConfig, forward, init_decoder
from optpo_jax.sampler import TRACE_COUNTS, SamplingConfig, sample

VOCAB = 24
CONFIG = ModelConfig(
    model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=8, qkv_bias=True,
)


@pytest.fixture(scope="module")
def params():
    # Weights broad enough that logits are far from ties and far from uniform.
    state = nnx.split(init_decoder(CONFIG, seed=3))[1]
    return jax.tree.map(lambda x: x * 12.0 if x.ndim == 2 else x, state)


def right_padded(prompts, width=None):
    width = width or max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    return tokens, np.array([len(p) for p in prompts], np.int32)


_plain_forward = jax.jit(lambda params, tokens, positions: forward(CONFIG, params, tokens, positions)[0])


def argmax_continuation(params, prompt, num_tokens, width=32):
    """Reference: the plain forward over the whole sequence (no cache), argmax, one token at a time.

    The sequence sits in a fixed [1, width] buffer (positions -1 after it) so one compilation serves.
    """
    sequence = list(prompt)
    for _ in range(num_tokens):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(sequence)] = sequence
        positions = np.where(np.arange(width) < len(sequence), np.arange(width), -1)[None]
        logits = _plain_forward(params, tokens, positions)
        sequence.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
    return sequence[len(prompt):]


def test_greedy_matches_uncached_argmax_for_mixed_prompt_lengths(params):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [3, 4, 5], [20, 21, 22, 23, 4]]
    tokens, lengths = right_padded(prompts)
    config = SamplingConfig(max_new_tokens=9, temperature=0.0)
    out = sample(params, CONFIG, tokens, lengths, np.ones(4, bool), jax.random.key(0), config)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), argmax_continuation(params, prompt, 9))
        # The same prompt sampled alone gives the same continuation.
        alone_tokens, alone_lengths = right_padded([prompt])
        alone = sample(params, CONFIG, alone_tokens, alone_lengths, np.ones(1, bool), jax.random.key(1), config)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(out.tokens[row]))
    np.testing.assert_array_equal(np.asarray(out.lengths), [9] * 4)
    assert not stopped_rows(out, config.stop_token_ids).any()


def stopped_rows(out, stop_ids):
    """[R] bool: the rows whose last generated token is a stop id (what SampleOutput's stop means)."""
    lengths = np.asarray(out.lengths)
    last = np.asarray(out.tokens)[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    return (lengths > 0) & np.isin(last, stop_ids)


def first_token_probs(params, prompt, temperature=1.0):
    logits, _ = forward(CONFIG, params, jnp.array([prompt]), jnp.arange(len(prompt))[None])
    scaled = np.asarray(logits[0, -1], np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    return probs / probs.sum()


def draw_first_tokens(params, prompt, config, num_rows=2048, seed=0):
    tokens, lengths = right_padded([prompt] * num_rows)
    out = sample(params, CONFIG, tokens, lengths, np.ones(num_rows, bool), jax.random.key(seed), config)
    return np.asarray(out.tokens[:, 0]), np.asarray(out.policy_logprobs[:, 0])


def assert_draws_follow(draws, probs):
    """Chi-square goodness of fit (scipy) of the drawn tokens to ``probs``: none of probability 0, the rare ones
    pooled into one cell."""
    counts = np.bincount(draws, minlength=VOCAB)
    assert not counts[probs == 0].any()
    common, rare = probs * len(draws) >= 5, (probs > 0) & (probs * len(draws) < 5)
    observed, expected = counts[common], probs[common] * len(draws)
    if rare.any():
        observed, expected = np.append(observed, counts[rare].sum()), np.append(expected, rare @ probs * len(draws))
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_temperature_one_reproduces_softmax(params):
    # Reference: softmax of the plain forward's logits.
    prompt = [7, 3, 9]
    probs = first_token_probs(params, prompt)
    assert probs.max() < 0.9 and (probs > 0.01).sum() >= 4  # a distribution worth testing
    draws, policy_logprobs = draw_first_tokens(params, prompt, SamplingConfig(max_new_tokens=1))
    assert_draws_follow(draws, probs)
    np.testing.assert_allclose(policy_logprobs, np.log(probs[draws]), atol=1e-4)


def test_top_k_keeps_k_and_top_p_removes_the_tail(params):
    prompt = [7, 3, 9]
    probs = first_token_probs(params, prompt, temperature=0.7)
    order = np.argsort(-probs)

    # The draws follow the restricted distribution (the kept tokens' probabilities renormalised); the
    # log-probabilities returned are the full-vocabulary policy's.
    draws, policy = draw_first_tokens(params, prompt, SamplingConfig(1, temperature=0.7, top_k=3))
    assert set(draws) == set(order[:3])
    restricted = np.where(np.isin(np.arange(VOCAB), order[:3]), probs, 0.0)
    assert_draws_follow(draws, restricted / restricted.sum())
    np.testing.assert_allclose(policy, np.log(probs[draws]), atol=1e-4)  # the full-vocabulary policy

    nucleus_size = int(np.searchsorted(np.cumsum(probs[order]), 0.8) + 1)
    assert 1 < nucleus_size < VOCAB - 2
    draws, policy = draw_first_tokens(params, prompt, SamplingConfig(1, temperature=0.7, top_p=0.8))
    assert set(draws) == set(order[:nucleus_size])
    nucleus = np.where(np.isin(np.arange(VOCAB), order[:nucleus_size]), probs, 0.0)
    assert_draws_follow(draws, nucleus / nucleus.sum())
    np.testing.assert_allclose(policy, np.log(probs[draws]), atol=1e-4)


def test_stop_tokens_end_rows_and_pad_after(params):
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14]]
    tokens, lengths = right_padded(prompts)
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    free = sample(params, CONFIG, tokens, lengths, np.ones(3, bool), jax.random.key(0), greedy)
    free_tokens = np.asarray(free.tokens)
    stop_ids = (int(free_tokens[0, 2]), int(free_tokens[1, 4]))
    config = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_token_ids=stop_ids, pad_token_id=1)
    out = sample(params, CONFIG, tokens, lengths, np.ones(3, bool), jax.random.key(0), config)
    for row in range(3):
        hits = [i for i, t in enumerate(free_tokens[row]) if t in stop_ids]
        expected_length = hits[0] + 1 if hits else 8
        assert int(out.lengths[row]) == expected_length
        assert bool(stopped_rows(out, stop_ids)[row]) == bool(hits)
        np.testing.assert_array_equal(np.asarray(out.tokens[row, :expected_length]), free_tokens[row, :expected_length])
        assert (np.asarray(out.tokens[row, expected_length:]) == 1).all()
        assert (np.asarray(out.policy_logprobs[row, expected_length:]) == 0).all()
        assert (np.asarray(out.policy_logprobs[row, :expected_length]) < 0).all()


def test_same_key_same_wave_and_invalid_rows_are_padding(params):
    tokens, lengths = right_padded([[5, 6, 7], [9, 10], [11, 12, 13, 14]])
    valid = np.array([True, False, True])
    config = SamplingConfig(max_new_tokens=6, pad_token_id=2)
    first = sample(params, CONFIG, tokens, lengths, valid, jax.random.key(4), config)
    again = sample(params, CONFIG, tokens, lengths, valid, jax.random.key(4), config)
    other = sample(params, CONFIG, tokens, lengths, valid, jax.random.key(5), config)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))
    assert (np.asarray(first.tokens[1]) == 2).all() and int(first.lengths[1]) == 0
    assert not stopped_rows(first, config.stop_token_ids)[1]
    assert (np.asarray(first.policy_logprobs[1]) == 0).all()


def test_policy_logprobs_match_the_trainers_recomputation(params):
    # GRPO's old log-probabilities must be what grpo.token_logprobs recomputes from the same params.
    prompts = [[5, 6, 7], [9, 10, 4, 4]]
    tokens, lengths = right_padded(prompts)
    config = SamplingConfig(max_new_tokens=5, temperature=0.8, top_k=5)
    out = sample(params, CONFIG, tokens, lengths, np.ones(2, bool), jax.random.key(7), config)
    for row, prompt in enumerate(prompts):
        sequence = np.array(prompt + list(np.asarray(out.tokens[row])))
        logits, _ = forward(CONFIG, params, jnp.array([sequence[:-1]]), jnp.arange(len(sequence) - 1)[None])
        recomputed = token_logprobs(logits, jnp.array([sequence[1:]]), temperature=0.8)[0, len(prompt) - 1:]
        np.testing.assert_allclose(np.asarray(out.policy_logprobs[row]), np.asarray(recomputed), atol=1e-4)


def test_one_compilation_for_many_waves_in_a_bucket(params):
    config = SamplingConfig(max_new_tokens=4, prompt_buckets=(8, 16), stop_token_ids=(0,))
    rng = np.random.default_rng(0)
    before = dict(TRACE_COUNTS)
    for wave in range(4):
        prompts = [list(rng.integers(3, VOCAB, rng.integers(1, 8))) for _ in range(6)]
        tokens, lengths = right_padded(prompts, width=7 + wave)  # a different given width every wave
        valid = rng.random(6) < 0.8
        valid[0] = True
        sample(params, CONFIG, tokens, lengths, valid, jax.random.key(wave), config)
    assert TRACE_COUNTS[(6, 8, 4)] - before.get((6, 8, 4), 0) == 1
    prompts = [list(rng.integers(3, VOCAB, 12)) for _ in range(6)]
    sample(params, CONFIG, *right_padded(prompts), np.ones(6, bool), jax.random.key(9), config)
    assert TRACE_COUNTS[(6, 16, 4)] - before.get((6, 16, 4), 0) == 1


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
     ("prompt_buckets", (16, 8)), ("stop_token_ids", (-1,))],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: value})


def test_bad_inputs_are_named(params):
    tokens, lengths = right_padded([[5, 6, 7], [9]])
    config = SamplingConfig(max_new_tokens=2, prompt_buckets=(2,))
    with pytest.raises(ValueError, match="prompt_buckets"):
        sample(params, CONFIG, tokens, lengths, np.ones(2, bool), jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\]=0"):
        sample(params, CONFIG, tokens, [3, 0], np.ones(2, bool), jax.random.key(0), SamplingConfig(2))
    with pytest.raises(ValueError, match="valid"):
        sample(params, CONFIG, tokens, lengths, np.ones(3, bool), jax.random.key(0), SamplingConfig(2))


def test_a_long_decode_reports_its_token_count_to_the_progress_bar(params):
    """A decode of >= 256 new tokens with a bar shows ``token i/N`` every 64 tokens (the "before" evaluation of a
    math config once sat at "evaluate: 0/2" for minutes); the tokens are those of the decode without a bar, and
    short decodes or no bar compile no callback."""
    from optpo_jax.sampler import PROGRESS_EVERY, decode_progress, pad_wave, progress_every, sample_padded

    class Bar:
        disable = False

        def __init__(self):
            self.postfixes = []

        def set_postfix_str(self, text, refresh=True):
            self.postfixes.append(text)

    config = SamplingConfig(max_new_tokens=4 * PROGRESS_EVERY)  # no stop token: every row runs to the end
    tokens, lengths = right_padded([[1, 2, 3], [4, 5]])
    inputs = pad_wave(tokens, lengths, np.ones(2, bool), config)
    bar = Bar()
    assert progress_every(config, None) == 0 and progress_every(SamplingConfig(max_new_tokens=32), bar) == 0
    with decode_progress(bar, config.max_new_tokens):
        every = progress_every(config, bar)
        reported = sample_padded(params, *inputs, jax.random.key(0), model_config=CONFIG, config=config,
                                 progress_every=every)
        jax.effects_barrier()
    plain = sample_padded(params, *inputs, jax.random.key(0), model_config=CONFIG, config=config)
    assert every == PROGRESS_EVERY
    assert sorted(set(bar.postfixes)) == sorted(f"token {i}/256" for i in (64, 128, 192))
    np.testing.assert_array_equal(np.asarray(reported.tokens), np.asarray(plain.tokens))
