"""One OptPO / TTRL training step: rollouts -> rewards -> advantages -> GRPO update.

The step is the same for both methods; only the stopping rule differs (OptPO: the
Dirichlet posterior test; TTRL: the ``fixed`` rule with 64 votes, GRPO on 32 of them).
Ground truth is read here only by the ``ground_truth`` reward (``rewards.REWARDS``);
``metrics.step_metrics`` reads it for metrics.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import struct

from optpo_jax.grpo import (
    GRPOBatch,
    GRPOConfig,
    accumulate_gradients,
    apply_update,
    group_advantages,
    token_logprobs,
)
from optpo_jax.models.decoder import forward
from optpo_jax.models.logprobs import packed_logprobs
from optpo_jax.models.lora import (
    LoRAConfig,
    adapter_pullback,
    join_targeted,
    merge_adapters,
    merged_params,
    split_targeted,
)
from optpo_jax.prior import PriorState, prior_log_likelihood
from optpo_jax.train import packing
from optpo_jax.train.distributed import local_row_count, mesh_of, process_max, process_sum, rows_to_global
from optpo_jax.train.rewards import REWARDS, consensus_labels
from optpo_jax.train.rollouts import LookaheadCarry, Rollouts, collect_rollouts
from optpo_jax.train.step_config import StepConfig, UpdateConfig


@struct.dataclass
class TrainState:
    """What a training step changes, and the fixed reference policy of the KL term.

    Attributes:
      params: what the optimizer trains: the policy's parameters (``nnx.State``, possibly
        sharded over a mesh) or, with ``lora``, the LoRA adapters (``models.lora``).
      opt_state: the optimizer's state (of ``params`` only).
      ref_params: the initial policy: a copy of the params (the update donates ``params``) or,
        with LoRA, the frozen base itself (adapters off = the initial policy).
      prior: the learned prior of the stopping rule (``sprt.learn_prior``), else None.
      lora: the LoRAConfig of the adapters, or None for full fine-tuning (static).
    """

    params: Any
    opt_state: Any
    ref_params: Any
    prior: PriorState | None = None
    lora: LoRAConfig | None = struct.field(pytree_node=False, default=None)

    def policy_params(self):
        """The current policy's full params: ``params``, or the base with the adapters merged in."""
        return self.params if self.lora is None else merged_params(self.ref_params, self.params, self.lora)


@dataclasses.dataclass
class StepOutput:
    """One step's results besides the new TrainState.

    Attributes:
      rollouts: the batch's retained rollouts and votes.
      rewards: [N] float32, 1 where a rollout's answer is its prompt's consensus.
      labels: [P] int32 consensus slot of each prompt (-1 without a vote).
      update_metrics: the update's means (loss, kl, ...), optimizer_steps, trained_rollouts, update_seconds.
      carry: the lookahead prompts' early votes, for the next step.
    """

    rollouts: Rollouts
    rewards: np.ndarray
    labels: np.ndarray
    update_metrics: dict
    carry: LookaheadCarry | None


_group_advantages = jax.jit(group_advantages, static_argnums=(3, 4))


def rollout_advantages(rewards: np.ndarray, prompt_index: np.ndarray, num_prompts: int, mode: str,
                       bucket: int = 256) -> np.ndarray:
    """[N] group advantages of N rollouts, computed jitted on N padded up to a multiple of ``bucket``.

    OptPO's N changes every step; unpadded, every step would compile group_advantages anew
    (measured: 0.7 s a step on the embedded task, against 0.01 s once compiled).
    """
    num_rollouts = len(rewards)
    padded = max(-(-num_rollouts // bucket), 1) * bucket
    mask = np.arange(padded) < num_rollouts
    pad = lambda values: np.pad(values, (0, padded - num_rollouts))
    advantages = _group_advantages(pad(rewards), pad(prompt_index.astype(np.int32)), mask, num_prompts, mode)
    return np.asarray(advantages)[:num_rollouts]


def training_rows(rollouts: Rollouts, advantages: np.ndarray, config: UpdateConfig, rng: np.random.Generator):
    """Indices of the rollouts the update uses: a per-prompt subsample, minus zero-advantage groups.

    A group whose rewards are all equal has advantage 0 everywhere and no policy gradient,
    so it costs compute without moving the policy.
    """
    rows = np.arange(len(rollouts.prompt_index))
    if config.train_samples_per_prompt:
        chosen = []
        for prompt in np.unique(rollouts.prompt_index):
            members = rows[rollouts.prompt_index == prompt]
            take = min(config.train_samples_per_prompt, len(members))
            chosen.append(np.sort(rng.choice(members, size=take, replace=False)))
        rows = np.concatenate(chosen)
    return rows[advantages[rows] != 0]


def update_rows(rollouts: Rollouts, rows: np.ndarray, advantages: np.ndarray) -> dict[str, np.ndarray]:
    """The update's per-rollout arrays of ``rows`` (first axis: rollouts), laid out per micro-batch later."""
    return {
        "prompt_tokens": rollouts.prompt_tokens[rows], "prompt_lengths": rollouts.prompt_lengths[rows],
        "completion_tokens": rollouts.completion_tokens[rows], "completion_lengths": rollouts.completion_lengths[rows],
        "old_logprobs": rollouts.policy_logprobs[rows].astype(np.float32),
        "advantages": advantages[rows].astype(np.float32), "prompt_index": rollouts.prompt_index[rows],
    }


def padded_layout(rows: dict, width: int) -> dict[str, np.ndarray]:
    """One rollout per row: teacher-forcing arrays [n, width] of prompt + completion (the reference layout)."""
    prompt_lengths, completion_lengths = rows["prompt_lengths"], rows["completion_lengths"]
    num_rows = len(prompt_lengths)
    full_width = rows["prompt_tokens"].shape[1] + rows["completion_tokens"].shape[1]
    tokens = np.zeros((num_rows, full_width), np.int32)
    old_logprobs = np.zeros((num_rows, full_width - 1), np.float32)
    for row in range(num_rows):
        start, length = prompt_lengths[row], completion_lengths[row]
        tokens[row, :start] = rows["prompt_tokens"][row, :start]
        tokens[row, start : start + length] = rows["completion_tokens"][row, :length]
        old_logprobs[row, start - 1 : start - 1 + length] = rows["old_logprobs"][row, :length]
    columns = np.arange(full_width - 1)[None]
    total = (prompt_lengths + completion_lengths)[:, None]
    arrays = {
        "input_tokens": tokens[:, :-1], "target_tokens": tokens[:, 1:],
        "positions": np.where(columns < total - 1, columns, -1).astype(np.int32),
        "loss_mask": (columns >= prompt_lengths[:, None] - 1) & (columns < total - 1),
        "old_logprobs": old_logprobs,
    }
    return {name: values[:, :width] for name, values in arrays.items()}


def packed_layout(rows: dict, num_pieces: int, width: int, completion_width: int, row_multiple: int
                  ) -> dict[str, np.ndarray]:
    """Each prompt once with its completions, in rows of ``width`` tokens (``train.packing``).

    Rollout r trains in micro-batch r % num_pieces; the packed rows per micro-batch are
    agreed over processes and rounded up (``packing.row_ladder``) to few shapes.
    """
    prompts = [tokens[:length] for tokens, length in zip(rows["prompt_tokens"], rows["prompt_lengths"], strict=True)]
    plans = packing.plan_rows(rows["prompt_lengths"], rows["completion_lengths"], rows["prompt_index"], prompts,
                              num_pieces, width)
    num_rows = packing.row_ladder(process_max(max(len(piece) for piece in plans)), row_multiple)
    arrays = packing.pack_rows(plans, rows["prompt_lengths"], rows["completion_tokens"], rows["completion_lengths"],
                               num_rows, width, completion_width, row_offset=jax.process_index() * num_rows)
    arrays["old_logprobs"] = np.where(arrays["loss_mask"], rows["old_logprobs"][:, :completion_width], 0.0)
    return arrays


def micro_batch_shape(num_rows: int, longest: int, chunk_rows: int, full_width: int, config: UpdateConfig,
                      row_multiple: int = 1) -> tuple[int, int]:
    """(rows, width) a micro-batch of ``num_rows`` rows, the longest ``longest`` columns wide, trains at.

    Rows: the smallest of chunk_rows, chunk_rows / 2, ... (``config.row_buckets`` sizes,
    each a multiple of ``row_multiple``) that holds them, so a last micro-batch is not
    mostly padding. Width: ``longest`` rounded up to a multiple of ``config.width_bucket``
    (at most ``full_width``; 0 trains at the full width). Few sizes: each is one compilation.
    """
    sizes = [chunk_rows >> k for k in range(config.row_buckets) if (chunk_rows >> k) % row_multiple == 0]
    rows = min((size for size in sizes if size >= num_rows), default=chunk_rows)
    bucket = config.width_bucket
    width = full_width if not bucket else min(-(-max(longest, 1) // bucket) * bucket, full_width)
    return rows, width


def _fit_micro_batch(chunk: dict, chunk_rows: int, config: UpdateConfig, mesh) -> dict:
    """The GRPOBatch arrays of a chunk of ``update_rows``: padded with empty rollouts to its micro-batch
    shape (agreed over processes), packed (``config.pack_width``) or one rollout per row."""
    devices = 1 if mesh is None else mesh.local_mesh.shape["data"] * mesh.local_mesh.shape["fsdp"]
    prompt_lengths, completion_lengths = chunk["prompt_lengths"], chunk["completion_lengths"]
    if config.pack_width:
        # A packed micro-batch's cost is its packed rows; its per-rollout arrays only feed a gather and the
        # loss, so at chunk_rows x the full completion width they cost little and add no compilations.
        rows, width = chunk_rows, chunk["completion_tokens"].shape[1]
    else:
        longest = int((prompt_lengths + completion_lengths).max(initial=2)) - 1
        full_width = chunk["prompt_tokens"].shape[1] + chunk["completion_tokens"].shape[1] - 1
        rows, width = micro_batch_shape(process_max(len(completion_lengths)), process_max(longest), chunk_rows,
                                        full_width, config, config.grad_accumulation * devices)
    padded = {name: np.pad(values, [(0, rows - len(values))] + [(0, 0)] * (values.ndim - 1))
              for name, values in chunk.items()}
    if not config.pack_width:
        return dict(padded_layout(padded, width), advantages=padded["advantages"])
    row_width = process_max(packing.packed_width(prompt_lengths, completion_lengths, config.pack_width,
                                                 config.width_bucket))
    return dict(packed_layout(padded, config.grad_accumulation, row_width, width, devices),
                advantages=padded["advantages"])


def batch_logprobs(model_config, params, batch: GRPOBatch, temperature: float) -> jax.Array:
    """[R, T] log-probabilities of ``batch.target_tokens`` under the decoder ``params``, in either layout."""
    if batch.target_index is None:
        logits, _ = forward(model_config, params, batch.input_tokens, batch.positions)
        return token_logprobs(logits, batch.target_tokens, temperature)
    return packed_logprobs(model_config, params, batch.input_tokens, batch.positions, batch.groups, batch.branches,
                           batch.target_index, batch.target_tokens, temperature)


_reference_logprobs = jax.jit(batch_logprobs, static_argnums=(0, 3))


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    """``(trained, opt_state, batch, base) -> (trained, opt_state, metrics)``: one GRPO optimizer step, in two jitted halves.

    ``gradients(trained, batch, base) -> (grads, loss, metrics)`` compiles once per batch
    shape; ``apply(trained, opt_state, grads, loss) -> (trained, opt_state, grad_norm,
    skipped)`` (``grpo.apply_update``, donating its inputs) once per run. Together they are
    ``grpo.grpo_step``; apart, a new micro-batch shape recompiles only the model's half
    (on this CPU 2 of the 5 seconds a whole step took to compile).
    """

    gradients: Callable
    apply: Callable

    def __call__(self, trained, opt_state, batch: GRPOBatch, base):
        grads, loss, metrics = self.gradients(trained, batch, base)
        trained, opt_state, grad_norm, skipped = self.apply(trained, opt_state, grads, loss)
        return trained, opt_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=skipped)


def make_update_step(model_config, optimizer, grpo_config: GRPOConfig, num_micro_batches: int = 1,
                     lora: LoRAConfig | None = None) -> UpdateStep:
    """The GRPO optimizer step of the training loop (``UpdateStep``).

    ``trained`` is the full params (``base`` None) or, with ``lora``, the adapters over the
    frozen ``base`` params, which get no gradient and no optimizer state. The adapters are
    merged once per step; each micro-batch differentiates the merged kernels and pulls its
    gradient back to the adapters (``lora.adapter_pullback``) before it is summed.
    """
    logprob_fn = lambda params, batch: batch_logprobs(model_config, params, batch, grpo_config.temperature)

    def gradients(trained, batch: GRPOBatch, base):
        if lora is None:
            return accumulate_gradients(trained, batch, logprob_fn, grpo_config, num_micro_batches)
        merged = merge_adapters(base, trained, lora)
        merged_logprobs = lambda kernels, micro_batch: logprob_fn(join_targeted(kernels, merged, lora), micro_batch)
        return accumulate_gradients(split_targeted(merged, lora), batch, merged_logprobs, grpo_config,
                                    num_micro_batches, pullback=lambda grads: adapter_pullback(grads, trained, lora))

    def apply(trained, opt_state, grads, loss):
        new_trained, new_opt_state, finite = apply_update(trained, opt_state, grads, loss, optimizer)
        return new_trained, new_opt_state, optax.tree.norm(grads), ~finite

    return UpdateStep(jax.jit(gradients), jax.jit(apply, donate_argnums=(0, 1)))


@dataclasses.dataclass(frozen=True)
class Learner:
    """The fixed parts of training, built once by ``setup.build_setup``.

    Attributes:
      task: prompts, answer extraction (and, for metrics only, grading).
      model_config: the policy's architecture.
      config: the step's static settings.
      update_step: ``make_update_step(model_config, optimizer, config.grpo, ...)``.
      lora: the LoRAConfig when only adapters are trained (``config.lora.rank`` > 0), else None.
    """

    task: Any
    model_config: Any
    config: StepConfig
    update_step: Callable
    lora: LoRAConfig | None = None


def _step_cuts(num_rows: int, chunk_rows: int, optimizer_steps: int) -> list[int]:
    """Row offsets where each optimizer step of a pass starts, then the end; the same on every process.

    0 steps: every ``chunk_rows`` rows. k: the most rows any process holds, M, cut at
    ceil(i M / k), i = 0..k (k near-equal steps, fewer only when M < k), unless a step
    would then exceed ``chunk_rows``.
    """
    if optimizer_steps:
        most_rows = process_max(num_rows)
        if -(-most_rows // optimizer_steps) <= chunk_rows:
            return sorted({-(-i * most_rows // optimizer_steps) for i in range(optimizer_steps + 1)})
    num_chunks = process_max(-(-num_rows // chunk_rows))
    return [i * chunk_rows for i in range(num_chunks + 1)] if num_chunks else [0]


def update_policy(state: TrainState, arrays: dict, learner: Learner,
                  rng: np.random.Generator) -> tuple[TrainState, dict]:
    """Runs ``epochs`` passes of micro-batched GRPO steps over ``arrays``; returns the state and the metrics.

    Each pass takes ceil(rows / micro_batch_rows) optimizer steps, or with
    ``optimizer_steps`` k that many near-equal steps (padded to a micro-batch shape; see
    ``_step_cuts``).

    ``arrays`` are this process's rows; each optimizer step takes micro_batch_rows / process_count
    of them from every process, and a process out of rows pads (zero loss mask). The number of
    optimizer steps is set by the process with the most rows, so uneven shares can add steps
    (the loss of each stays exact: its denominator counts only real rows).
    """
    config, grpo_config = learner.config.update, learner.config.grpo
    num_rows = len(arrays["advantages"])
    chunk_rows = local_row_count(config.micro_batch_rows, "policy_update.micro_batch_rows")
    cuts = _step_cuts(num_rows, chunk_rows, config.optimizer_steps)
    params, opt_state, mesh = state.params, state.opt_state, mesh_of(state.params)
    base = state.ref_params if state.lora is not None else None  # the frozen weights under the adapters
    metrics = []
    for _ in range(config.epochs if len(cuts) > 1 else 0):
        order = rng.permutation(num_rows)
        for start, end in itertools.pairwise(cuts):
            chunk = {name: values[order[start:end]] for name, values in arrays.items()}
            chunk = rows_to_global(_fit_micro_batch(chunk, chunk_rows, config, mesh), mesh)
            batch = GRPOBatch(**chunk)
            if grpo_config.kl_coef > 0:
                batch = batch.replace(ref_logprobs=_reference_logprobs(learner.model_config, state.ref_params, batch,
                                                                       grpo_config.temperature))
            params, opt_state, step_metrics = learner.update_step(params, opt_state, batch, base)
            metrics.append(step_metrics)
    state = state.replace(params=params, opt_state=opt_state)
    if not metrics:
        return state, {"optimizer_steps": 0}
    summary = {name: float(np.mean([float(m[name]) for m in metrics]))
               for name in ("loss", "kl", "clip_fraction", "grad_norm", "mean_ratio")}
    summary["skipped_steps"] = int(sum(bool(m["skipped"]) for m in metrics))
    summary["optimizer_steps"] = len(metrics)
    return state, summary


def learned_prior(prior: PriorState, rollouts: Rollouts) -> PriorState:
    """The prior after the batch's finished prompts, their votes added over every process (identical everywhere)."""
    counts = np.asarray(rollouts.votes.counts)
    local = np.concatenate([np.asarray(prior_log_likelihood(counts), np.float64), [np.sum(counts.sum(-1) > 0)]])
    total = process_sum(local)
    return PriorState(prior.log_likelihood + total[:-1].astype(np.float32),
                      prior.num_prompts + np.int32(total[-1]))


def training_step(state: TrainState, learner: Learner, problems: list, key: jax.Array, rng: np.random.Generator,
                  lookahead: list = (), carry: LookaheadCarry | None = None,
                  progress: bool = False) -> tuple[TrainState, StepOutput]:
    """One step on a batch of unlabeled ``problems``: rollouts, consensus rewards, advantages, update.

    ``lookahead`` / ``carry`` as in ``collect_rollouts``; ``key`` drives sampling and
    ``rng`` the update's row subsample and order.
    """
    rollouts, next_carry = collect_rollouts(state.policy_params(), learner.model_config, learner.task, problems,
                                            learner.config, key, lookahead, carry, progress=progress,
                                            prior_state=state.prior)
    if state.prior is not None:
        state = state.replace(prior=learned_prior(state.prior, rollouts))
    start = time.perf_counter()
    rewards = REWARDS[learner.config.reward](rollouts, problems, learner.task)
    labels = consensus_labels(rollouts)
    update = learner.config.update
    advantages = rollout_advantages(rewards, rollouts.prompt_index, len(problems), update.advantage_mode)
    rows = training_rows(rollouts, advantages, update, rng)
    state, update_metrics = update_policy(state, update_rows(rollouts, rows, advantages), learner, rng)
    update_metrics["update_seconds"] = time.perf_counter() - start
    trained = process_sum(np.array([len(rows), rollouts.completion_lengths[rows].sum()], np.int64))  # one exchange
    update_metrics["trained_rollouts"], update_metrics["trained_tokens"] = int(trained[0]), int(trained[1])
    return state, StepOutput(rollouts, rewards, labels, update_metrics, next_carry)
