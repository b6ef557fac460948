"""Batched rollout sampling with fixed shapes: one compilation serves every wave.

A wave is R rows of right-padded prompts. The prompts are prefilled into a KV cache of
``bucket + max_new_tokens`` slots, then a ``lax.while_loop`` decodes one token per row
per step and leaves as soon as every valid row has finished. Each row has its own
positions, so a row's continuation is the one its prompt would get alone. Rows with
``valid=False`` and rows that have stopped are carried as padding (position -1: they
write nothing the other rows can see). The cache lives in the loop carry, which XLA
updates in place, and nothing leaves the device until the wave is done.

Log-probabilities. Sampling draws from softmax(logits / temperature), restricted to
the top-k tokens and then to the smallest top-p nucleus, renormalised. The output's
``policy_logprobs`` is log softmax(logits / temperature) over the full vocabulary, which
is what ``grpo.token_logprobs`` recomputes during training: GRPO's old log-probabilities.
(Under top-k / top-p it is not the restricted distribution's; nothing reads that one.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from optpo_jax.field_ranges import INT, REAL, check_ranges, ranged
from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import forward, grow_cache, init_cache

# Number of times the jitted sampler has been traced, per (rows, prompt width,
# max_new_tokens); each trace is one compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()


SCHEDULES = ("waves", "continuous")
ON_STOP = ("finish", "cancel")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a wave is sampled (hashable: static under jit).

    Attributes:
      max_new_tokens: generated tokens per row at most (Lg).
      temperature: softmax temperature; 0 means greedy (argmax).
      top_p: nucleus mass in (0, 1]; 1 disables it.
      top_k: keep the k most likely tokens; 0 disables it.
      stop_token_ids: a row finishes on the first of these it samples (kept in the output).
      pad_token_id: written after a row finishes and on rows that are not valid.
      prompt_buckets: allowed padded prompt widths, ascending; a wave's prompts are padded
        to the smallest bucket that holds them, so waves share compilations. Empty: no
        bucketing (the given width is used).
      schedule: "waves" (fixed waves, each decoded until its longest row stops) or
        "continuous" (a pool of rows refilled as rollouts finish: ``continuous.py``).
      on_stop: continuous only: what happens to a prompt's rollouts in flight when its vote
        stops: "finish" (they finish and train, like any retained rollout) or "cancel".
      cache_segments: waves decode in up to this many segments (``cache_segment_ends``);
        the KV cache holds the prompt and the segments so far and grows at each segment's
        end, so a step reads only the filled part of it (not max_new_tokens ahead). 1:
        every step reads the whole cache (the reference path; the same tokens, tested).
    """

    max_new_tokens: int = ranged(128, INT, 1, 131072)
    temperature: float = ranged(1.0, REAL, 0.0, 100.0)
    top_p: float = ranged(1.0, REAL, 0.0, 1.0, low_inclusive=False)
    top_k: int = ranged(0, INT, 0, 10**9)
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    prompt_buckets: tuple[int, ...] = ()
    schedule: str = "waves"
    on_stop: str = "finish"
    cache_segments: int = ranged(4, INT, 1, 1024)

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "prompt_buckets", tuple(int(b) for b in self.prompt_buckets))
        check_ranges(self)
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SamplingConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.on_stop not in ON_STOP:
            raise ValueError(f"SamplingConfig.on_stop must be one of {ON_STOP}, got {self.on_stop!r}")
        buckets = self.prompt_buckets
        if any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"SamplingConfig.prompt_buckets must be positive and strictly ascending, got {buckets}")


@struct.dataclass
class SampleOutput:
    """One wave of rollouts.

    Attributes:
      tokens: [R, Lg] int32 generated tokens, pad_token_id after a row's end.
      policy_logprobs: [R, Lg] float32 log softmax(logits / temperature) over the full
        vocabulary (temperature 1 when greedy), 0 on padding: the policy's log-probability
        that GRPO's ratio starts from (with top-k / top-p, not the restricted distribution's).
      lengths: [R] int32 generated tokens per row, stop token included.
    """

    tokens: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array


@struct.dataclass
class WaveDecodeState:
    """The wave sampler's loop state between decode steps (``continuous.DecodeState`` is the pool's).

    Attributes:
      step: [] int32, the next token's index.
      cache: the policy's KV cache (or the scripted policy's state).
      row_keys: [R] each row's rollout stream (``rollout_keys``).
      tokens, policy_logprobs: [R, Lg] the ``SampleOutput`` arrays so far.
      finished: [R] bool, rows that stopped (or were never valid).
      lengths: [R] int32 tokens generated per row.
    """

    step: jax.Array
    cache: object
    row_keys: jax.Array
    tokens: jax.Array
    policy_logprobs: jax.Array
    finished: jax.Array
    lengths: jax.Array


def _restrict(scaled_logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Sets logits outside top-k, then outside the top-p nucleus, to -inf. [R, V] -> [R, V]."""
    vocab_size = scaled_logits.shape[-1]
    keep = min(config.top_k, vocab_size) if config.top_k > 0 else vocab_size
    if keep < vocab_size:
        kth_largest = jax.lax.top_k(scaled_logits, keep)[0][:, -1:]
        scaled_logits = jnp.where(scaled_logits >= kth_largest, scaled_logits, -jnp.inf)
    if config.top_p < 1.0:
        descending = jax.lax.top_k(scaled_logits, keep)[0]
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # The most likely token is always kept; then every token the nucleus still needs.
        kept = (mass_before < config.top_p).at[:, 0].set(True)
        smallest_kept = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        scaled_logits = jnp.where(scaled_logits >= smallest_kept, scaled_logits, -jnp.inf)
    return scaled_logits


def _log_normalizer(scaled_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max [R, 1], log-sum-exp [R, 1]) of [R, V] logits; -inf entries have probability 0."""
    row_max = jax.lax.stop_gradient(jnp.max(scaled_logits, axis=-1, keepdims=True))
    total = jnp.sum(jnp.exp(scaled_logits - row_max), axis=-1, keepdims=True)
    return row_max, row_max + jnp.log(total)


def rollout_keys(key: jax.Array, streams: jax.Array) -> jax.Array:
    """[R] keys of R rollouts' random streams: ``fold_in(fold_in(key, prompt), rollout)`` for ``streams`` [R, 2]
    int32 rows (prompt, rollout number among the prompt's).

    A rollout's tokens are drawn from its own stream (one uniform per token position), so
    they do not depend on which row or wave it was placed in: two runs with the same key draw
    the same rollout k of a prompt from the same uniforms (common random numbers). Two
    methods that allocate rows differently, or a policy that changed a little, then sample
    alike where their distributions agree, which is what makes paired comparisons sharp.
    """
    return jax.vmap(lambda prompt, rollout: jax.random.fold_in(jax.random.fold_in(key, prompt), rollout))(
        streams[:, 0], streams[:, 1])


def row_streams(num_rows: int) -> np.ndarray:
    """[R, 2] streams of R rows that are all different rollouts: (row, 0)."""
    return np.stack([np.arange(num_rows), np.zeros(num_rows)], axis=1).astype(np.int32)


def token_uniforms(row_keys: jax.Array, positions: jax.Array) -> jax.Array:
    """[R] uniforms in [0, 1) for token ``positions`` [R] of the rollouts with ``row_keys`` [R]."""
    return jax.vmap(lambda key, position: jax.random.uniform(jax.random.fold_in(key, position)))(row_keys, positions)


def _draw(logits: jax.Array, uniforms: jax.Array, config: SamplingConfig):
    """One token per row from its uniform ([R], ``token_uniforms``). logits [R, V] -> (tokens [R], policy_logprobs [R]).

    Works on unnormalised probabilities and normalises only the drawn tokens' values:
    each full-vocabulary pass costs as much as a small matmul on CPU.
    """
    pick = lambda table, tokens: jnp.take_along_axis(table, tokens[:, None], axis=-1)
    if config.temperature == 0:
        row_max, log_total = _log_normalizer(logits)
        # First index of the maximum; a fused compare-and-min is much faster than argmax on CPU.
        column = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        tokens = jnp.min(jnp.where(logits == row_max, column, logits.shape[-1]), axis=-1)
        return tokens, (pick(logits, tokens) - log_total)[:, 0]
    scaled = logits / config.temperature
    row_max, policy_log_total = _log_normalizer(scaled)
    scaled_sampling = scaled
    if config.top_k > 0 or config.top_p < 1.0:
        scaled_sampling = _restrict(scaled, config)
        row_max = jnp.max(scaled_sampling, axis=-1, keepdims=True)
    tokens = _inverse_cdf_draw(jnp.exp(scaled_sampling - row_max), uniforms)
    return tokens, (pick(scaled, tokens) - policy_log_total)[:, 0]


def _inverse_cdf_draw(probs: jax.Array, uniforms: jax.Array, block: int = 128) -> jax.Array:
    """One index per row with probability proportional to ``probs`` [R, V] -> [R] int32, at the quantile
    ``uniforms`` [R] of each row's distribution.

    One uniform per row instead of a Gumbel per vocabulary entry, and a two-level
    cumulative sum (over blocks, then inside the chosen block): a full-length cumsum
    lowers to a slow reduce-window on CPU and accumulates more rounding.
    """
    num_rows, vocab_size = probs.shape
    padded = -vocab_size % block
    blocks = jnp.pad(probs, ((0, 0), (0, padded))).reshape(num_rows, -1, block)
    block_mass = jnp.sum(blocks, axis=-1)  # [R, V / block]
    block_cumulative = jnp.cumsum(block_mass, axis=-1)
    target = uniforms[:, None] * block_cumulative[:, -1:]
    num_blocks = block_mass.shape[1]
    # Rounding can put the target at the total; never land on a block without mass.
    last_block = num_blocks - 1 - jnp.argmax(block_mass[:, ::-1] > 0, axis=-1)
    chosen = jnp.minimum(jnp.sum(block_cumulative <= target, axis=-1), last_block)
    # The same float values that chose the block, so the target is never below the block's start.
    rows = jnp.arange(num_rows)
    mass_before = jnp.where(chosen > 0, block_cumulative[rows, jnp.maximum(chosen - 1, 0)], 0.0)[:, None]
    inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [R, block]
    offset = jnp.sum(jnp.cumsum(inside, axis=-1) <= target - mass_before, axis=-1)
    # Rounding can push the offset one past a block's last non-zero entry; step back onto it.
    index = chosen * block + jnp.minimum(offset, block - 1)
    last_nonzero = chosen * block + (block - 1) - jnp.argmax(inside[:, ::-1] > 0, axis=-1)
    return jnp.minimum(index, last_nonzero).astype(jnp.int32)


def _is_stop(tokens: jax.Array, config: SamplingConfig) -> jax.Array:
    if not config.stop_token_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(config.stop_token_ids, jnp.int32))


PROGRESS_EVERY = 64
"""Decodes of at least this many new tokens report their token count every this many steps to
``decode_progress``'s bar (a host callback every 64 steps: far below the cost of the steps)."""


class _DecodeBar:
    """The host-side progress bar that a running decode reports its token count to, if any."""

    bar = None
    max_new_tokens = 0


@contextlib.contextmanager
def decode_progress(bar, max_new_tokens: int):
    """Within this block, long decodes show ``token i/max_new_tokens`` in ``bar``'s postfix (a tqdm bar, or None)."""
    previous = _DecodeBar.bar, _DecodeBar.max_new_tokens
    _DecodeBar.bar, _DecodeBar.max_new_tokens = bar, max_new_tokens
    try:
        yield
    finally:
        _DecodeBar.bar, _DecodeBar.max_new_tokens = previous


def _report_token(step) -> None:
    bar = _DecodeBar.bar
    if bar is not None:
        bar.set_postfix_str(f"token {int(step)}/{_DecodeBar.max_new_tokens}", refresh=True)


def progress_every(config: SamplingConfig, bar) -> int:
    """The static ``progress_every`` of a decode: PROGRESS_EVERY for a long one with a bar to report to, else 0."""
    if bar is None or getattr(bar, "disable", False) or config.max_new_tokens < 4 * PROGRESS_EVERY:
        return 0
    return PROGRESS_EVERY


def policy_functions(model_config):
    """(init_cache, forward) of the policy ``model_config`` describes: the decoder, or the scripted
    replay policy (``models.scripted``), whose forward also takes each row's ``rollout_index``."""
    from optpo_jax.models import scripted

    if isinstance(model_config, scripted.ScriptedConfig):
        return scripted.init_cache, scripted.forward
    decoder_forward = lambda config, params, tokens, positions, cache, logit_indices=None, rollout_index=None: (
        forward(config, params, tokens, positions, cache, logit_indices))
    return init_cache, decoder_forward


def prefill(model_config, params, prompt_tokens, prompt_lengths, valid, num_slots, rollout_index=None):
    """Prompts [R, W] into a fresh cache of ``num_slots`` slots: (logits [R, V] after each prompt, cache)."""
    num_rows, width = prompt_tokens.shape
    new_cache, policy_forward = policy_functions(model_config)
    columns = jnp.arange(width, dtype=jnp.int32)[None, :]
    in_prompt = (columns < prompt_lengths[:, None]) & valid[:, None]
    logits, cache = policy_forward(
        model_config, params, prompt_tokens, jnp.where(in_prompt, columns, -1), new_cache(model_config, num_rows,
                                                                                         num_slots),
        logit_indices=jnp.maximum(prompt_lengths - 1, 0), rollout_index=rollout_index,
    )
    return logits[:, 0], cache


# A segment shorter than this saves less cache reading than its extra compiled loop costs.
MIN_CACHE_SEGMENT = 64


def cache_segment_ends(max_new_tokens: int, segments: int) -> list[int]:
    """The decode steps at which the waves' KV cache grows: ``segments`` equal parts of
    ``max_new_tokens`` rounded up to multiples of ``MIN_CACHE_SEGMENT``, the last at max_new_tokens."""
    size = -(-max(-(-max_new_tokens // segments), 1) // MIN_CACHE_SEGMENT) * MIN_CACHE_SEGMENT
    return list(range(size, max_new_tokens, size)) + [max_new_tokens]


def _sample_padded(params, prompt_tokens, prompt_lengths, valid, key, model_config, config, progress_every=0,
                   rollout_index=None, streams=None):
    num_rows, width = prompt_tokens.shape
    TRACE_COUNTS[(num_rows, width, config.max_new_tokens)] += 1
    max_new = config.max_new_tokens
    segment_ends = cache_segment_ends(max_new, config.cache_segments)
    policy_forward = policy_functions(model_config)[1]
    # The step that writes slot width + e - 1 is never run in a segment ending at e: width + e slots hold it.
    first_logits, cache = prefill(model_config, params, prompt_tokens, prompt_lengths, valid,
                                  width + segment_ends[0], rollout_index)

    def emit(state: WaveDecodeState, logits) -> WaveDecodeState:
        """Draws token ``state.step`` from ``logits`` [R, V] for the rows still running."""
        with jax.named_scope("draw"):  # labels the profile (experiments/profile_decode.py)
            uniforms = token_uniforms(state.row_keys, jnp.full((num_rows,), state.step))
            token, policy_logprob = _draw(logits, uniforms, config)
        running = ~state.finished
        token = jnp.where(running, token, config.pad_token_id)
        write = lambda buffer, value: jax.lax.dynamic_update_slice(buffer, value[:, None], (0, state.step))
        return state.replace(
            step=state.step + 1, tokens=write(state.tokens, token),
            policy_logprobs=write(state.policy_logprobs, jnp.where(running, policy_logprob, 0.0)),
            finished=state.finished | (running & _is_stop(token, config)), lengths=state.lengths + running)

    def keep_going(state: WaveDecodeState, end) -> jax.Array:
        return (state.step < end) & ~jnp.all(state.finished)

    def decode_step(state: WaveDecodeState) -> WaveDecodeState:
        step = state.step
        if progress_every:  # static: a decode without a bar compiles no callback
            jax.lax.cond(step % progress_every == 0, lambda: jax.debug.callback(_report_token, step), lambda: None)
        previous = jax.lax.dynamic_slice_in_dim(state.tokens, step - 1, 1, axis=1)
        positions = jnp.where(state.finished, -1, prompt_lengths + step - 1)[:, None]
        logits, cache = policy_forward(model_config, params, previous, positions, state.cache)
        return emit(state.replace(cache=cache), logits[:, 0])

    streams = row_streams(num_rows) if streams is None else streams
    state = WaveDecodeState(
        step=jnp.zeros((), jnp.int32), cache=cache, row_keys=rollout_keys(key, streams),
        tokens=jnp.full((num_rows, max_new), config.pad_token_id, jnp.int32),
        policy_logprobs=jnp.zeros((num_rows, max_new), jnp.float32), finished=~valid,
        lengths=jnp.zeros((num_rows,), jnp.int32))
    state = emit(state, first_logits)
    for segment, end in enumerate(segment_ends):
        if segment:
            state = state.replace(cache=grow_cache(state.cache, width + end))
        state = jax.lax.while_loop(functools.partial(keep_going, end=end), decode_step, state)
    return SampleOutput(state.tokens, state.policy_logprobs, state.lengths)


sample_padded = jax.jit(_sample_padded, static_argnames=("model_config", "config", "progress_every"))
sample_padded.__doc__ = """The jitted sampler on inputs already padded by ``pad_wave`` (and placed on a mesh, if any):
``(params, prompt_tokens [R, W], prompt_lengths [R], valid [R], key, *, model_config, config, progress_every=0,
rollout_index=None, streams=None) -> SampleOutput``; ``progress_every`` > 0 reports the token count to
``decode_progress``'s bar that often; ``rollout_index`` [R] int32 numbers each row's rollout of its prompt (read by
the scripted policy); ``streams`` [R, 2] int32 (prompt, rollout) of each row's random stream (``rollout_keys``;
distinct on valid rows), default ``row_streams`` (row, 0)."""


def bucket_width(width: int, config: SamplingConfig) -> int:
    """The padded prompt width a wave of ``width``-token prompts compiles for."""
    if not config.prompt_buckets:
        return width
    for bucket in config.prompt_buckets:
        if bucket >= width:
            return bucket
    raise ValueError(
        f"prompts of {width} tokens exceed the largest of SamplingConfig.prompt_buckets={config.prompt_buckets}; "
        "add a bucket or shorten the prompts"
    )


def right_padded(token_lists: list, pad_token_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token lists as right-padded [N, width] int32 tokens (width default: the longest) and [N] lengths."""
    width = max((len(tokens) for tokens in token_lists), default=1) if width is None else width
    padded = np.full((len(token_lists), width), pad_token_id, np.int32)
    for row, tokens in enumerate(token_lists):
        padded[row, : len(tokens)] = tokens
    return padded, np.array([len(tokens) for tokens in token_lists], np.int32)


def pad_wave(prompt_tokens, prompt_lengths, valid, config: SamplingConfig, width: int | None = None):
    """Checks a wave's host arrays and pads its prompts to the width the sampler compiles for.

    Args:
      prompt_tokens: [R, Lp] int32 right-padded prompts.
      prompt_lengths: [R] int32 real tokens of each prompt (>= 1 on valid rows).
      valid: [R] bool; rows that are False are padding from the start.
      config: the SamplingConfig (its prompt buckets).
      width: the padded width; default the smallest bucket that holds the longest valid
        prompt. Several processes must pass the same width (they compile one program).

    Returns:
      (prompt_tokens [R, width], prompt_lengths [R] (1 on invalid rows), valid [R]) as numpy.
    """
    prompt_tokens = np.asarray(prompt_tokens, np.int32)
    prompt_lengths = np.asarray(prompt_lengths, np.int32)
    valid = np.asarray(valid, bool)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must be [R, Lp], got shape {prompt_tokens.shape}")
    num_rows, given_width = prompt_tokens.shape
    if prompt_lengths.shape != (num_rows,) or valid.shape != (num_rows,):
        raise ValueError(
            f"prompt_lengths and valid must be [{num_rows}], got {prompt_lengths.shape} and {valid.shape}"
        )
    bad = np.flatnonzero(valid & ((prompt_lengths < 1) | (prompt_lengths > given_width)))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"prompt_lengths[{row}]={prompt_lengths[row]} must be in [1, {given_width}] on a valid row")
    prompt_lengths = np.where(valid, prompt_lengths, 1).astype(np.int32)
    longest = int(prompt_lengths[valid].max(initial=1))
    width = bucket_width(longest, config) if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest valid prompt ({longest} tokens)")
    if width >= given_width:
        prompt_tokens = np.pad(prompt_tokens, ((0, 0), (0, width - given_width)), constant_values=config.pad_token_id)
    return prompt_tokens[:, :width], prompt_lengths, valid


def sample(
    params,
    model_config: ModelConfig,
    prompt_tokens,
    prompt_lengths,
    valid,
    key: jax.Array,
    config: SamplingConfig,
) -> SampleOutput:
    """Samples one wave of rollouts on this process's devices.

    Args:
      params: the decoder's parameter state (``nnx.State``).
      model_config: its architecture.
      prompt_tokens: [R, Lp] int32 right-padded prompts.
      prompt_lengths: [R] int32 real tokens of each prompt (>= 1 on valid rows).
      valid: [R] bool; rows that are False are padding from the start.
      key: a ``jax.random`` key; the same key gives the same wave (row r draws from stream (r, 0)).
      config: the SamplingConfig.

    Returns:
      A SampleOutput with [R, max_new_tokens] tokens and log-probabilities (see the
      module docstring for which distribution each log-probability is under). For a wave
      split over a mesh or several processes use ``train.waves.sample_wave``.
    """
    tokens, lengths, valid = pad_wave(prompt_tokens, prompt_lengths, valid, config)
    return sample_padded(params, tokens, lengths, valid, key, model_config=model_config, config=config)
