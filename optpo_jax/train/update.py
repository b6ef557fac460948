"""The policy update of a step: rollouts laid out as ``GRPOBatch`` micro-batches, then optimizer steps.

    update_policy(state, rows, learner, rng)
      PPO first: with_gae -> the critic's values and GAE advantages of every row
      per pass, per optimizer step:  fit_micro_batch -> GRPOBatch (packed, or one rollout per row)
        UpdateStep: gradients (summed over micro-batches) -> apply (optax)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optpo_jax.grpo import GRPOBatch, GRPOConfig, accumulate_gradients, apply_update, token_logprobs
from optpo_jax.models.decoder import forward
from optpo_jax.models.logprobs import packed_logprobs
from optpo_jax.models.lora import LoRAConfig, adapter_pullback, join_targeted, merge_adapters, split_targeted
from optpo_jax.ppo import PPOConfig, gae_advantages, whiten
from optpo_jax.train import packing
from optpo_jax.train.critic import batch_values, batch_values_jit
from optpo_jax.train.distributed import local_row_count, local_rows, mesh_of, process_max, rows_to_global
from optpo_jax.train.learner import Learner
from optpo_jax.train.rollouts import Rollouts
from optpo_jax.train.state import TrainState
from optpo_jax.train.step_config import UpdateConfig


@dataclasses.dataclass(frozen=True)
class RolloutRows:
    """The update's per-rollout host arrays (first axis: n rollouts), laid out per micro-batch later.

    Attributes:
      prompt_tokens: [n, Wp] int32 right-padded prompts; prompt_lengths [n].
      completion_tokens: [n, Lg] int32; completion_lengths [n].
      old_logprobs: [n, Lg] float32 sampling-time log-probabilities.
      advantages: [n] float32: GRPO's advantage of each rollout; PPO's factor of its per-token
        advantages (its vote weight).
      prompt_index: [n] int32 prompt of each rollout in the batch.
      rewards: [n] float32 each rollout's reward (PPO's GAE reads it), or None.
      token_advantages, old_values, returns: [n, Lg] float32 per completion token (PPO,
        ``with_gae``), else None.
    """

    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    completion_tokens: np.ndarray
    completion_lengths: np.ndarray
    old_logprobs: np.ndarray
    advantages: np.ndarray
    prompt_index: np.ndarray
    rewards: np.ndarray | None = None
    token_advantages: np.ndarray | None = None
    old_values: np.ndarray | None = None
    returns: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.advantages)

    def take(self, indices: np.ndarray) -> RolloutRows:
        """The rows at ``indices``."""
        return RolloutRows(**{name: None if values is None else values[indices] for name, values in vars(self).items()})

    def padded(self, num_rows: int) -> RolloutRows:
        """Padded with empty rollouts (zero lengths, advantages and tokens) to ``num_rows``."""
        pad = lambda values: np.pad(values, [(0, num_rows - len(values))] + [(0, 0)] * (values.ndim - 1))
        return RolloutRows(**{name: None if values is None else pad(values) for name, values in vars(self).items()})

    def per_token(self) -> dict[str, np.ndarray]:
        """The [n, Lg] arrays aligned with the completion tokens that a layout places like ``old_logprobs``
        (under their GRPOBatch names; PPO's advantages replace the per-rollout ones)."""
        arrays = {"old_logprobs": self.old_logprobs, "advantages": self.token_advantages,
                  "old_values": self.old_values, "returns": self.returns}
        return {name: values for name, values in arrays.items() if values is not None}


def update_rows(rollouts: Rollouts, rows: np.ndarray, advantages: np.ndarray,
                rewards: np.ndarray | None = None) -> RolloutRows:
    """The ``RolloutRows`` of the rollouts at ``rows``, with their ``advantages`` (and ``rewards``), [N] over all
    rollouts."""
    return RolloutRows(
        prompt_tokens=rollouts.prompt_tokens[rows], prompt_lengths=rollouts.prompt_lengths[rows],
        completion_tokens=rollouts.completion_tokens[rows], completion_lengths=rollouts.completion_lengths[rows],
        old_logprobs=rollouts.policy_logprobs[rows].astype(np.float32),
        advantages=advantages[rows].astype(np.float32), prompt_index=rollouts.prompt_index[rows],
        rewards=None if rewards is None else rewards[rows].astype(np.float32))


def padded_layout(rows: RolloutRows, width: int) -> GRPOBatch:
    """One rollout per row: teacher-forcing arrays [n, width] of prompt + completion (the reference layout)."""
    prompt_lengths, completion_lengths = rows.prompt_lengths, rows.completion_lengths
    num_rows = len(rows)
    full_width = rows.prompt_tokens.shape[1] + rows.completion_tokens.shape[1]
    tokens = np.zeros((num_rows, full_width), np.int32)
    aligned = rows.per_token()
    per_token = {name: np.zeros((num_rows, full_width - 1), np.float32) for name in aligned}
    for row in range(num_rows):
        start, length = prompt_lengths[row], completion_lengths[row]
        tokens[row, :start] = rows.prompt_tokens[row, :start]
        tokens[row, start : start + length] = rows.completion_tokens[row, :length]
        for name, values in aligned.items():
            per_token[name][row, start - 1 : start - 1 + length] = values[row, :length]
    columns = np.arange(full_width - 1)[None]
    total = (prompt_lengths + completion_lengths)[:, None]
    placed = {name: values[:, :width] for name, values in per_token.items()}
    return GRPOBatch(**{"advantages": rows.advantages, **placed},
                     input_tokens=tokens[:, :width], target_tokens=tokens[:, 1 : width + 1],
                     positions=np.where(columns < total - 1, columns, -1).astype(np.int32)[:, :width],
                     loss_mask=((columns >= prompt_lengths[:, None] - 1) & (columns < total - 1))[:, :width])


def completion_aligned(layout_values: np.ndarray, rows: RolloutRows, packed: bool) -> np.ndarray:
    """[n, T] values of a micro-batch's targets -> [n, Lg] per completion token (0 past each completion):
    the inverse of the placement of ``old_logprobs`` by ``padded_layout`` / ``packed_layout``."""
    completion_width = rows.completion_tokens.shape[1]
    aligned = np.zeros((len(rows), completion_width), np.float32)
    for row, (start, length) in enumerate(zip(rows.prompt_lengths, rows.completion_lengths, strict=True)):
        offset = 0 if packed else start - 1
        aligned[row, :length] = layout_values[row, offset : offset + length]
    return aligned


def packed_layout(rows: RolloutRows, num_pieces: int, width: int, completion_width: int,
                  row_multiple: int) -> GRPOBatch:
    """Each prompt once with its completions, in rows of ``width`` tokens (``train.packing``).

    Rollout r trains in micro-batch r % num_pieces; the packed rows per micro-batch are
    agreed over processes and rounded up (``packing.row_ladder``) to few shapes.
    """
    prompts = [tokens[:length] for tokens, length in zip(rows.prompt_tokens, rows.prompt_lengths, strict=True)]
    plans = packing.plan_rows(rows.prompt_lengths, rows.completion_lengths, rows.prompt_index, prompts,
                              num_pieces, width)
    num_rows = packing.row_ladder(process_max(max(len(piece) for piece in plans)), row_multiple)
    arrays = packing.pack_rows(plans, rows.prompt_lengths, rows.completion_tokens, rows.completion_lengths,
                               num_rows, width, completion_width, row_offset=jax.process_index() * num_rows)
    per_token = {name: np.where(arrays["loss_mask"], values[:, :completion_width], 0.0).astype(np.float32)
                 for name, values in rows.per_token().items()}
    return GRPOBatch(**{"advantages": rows.advantages, **arrays, **per_token})


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


def fit_micro_batch(chunk: RolloutRows, chunk_rows: int, config: UpdateConfig, mesh) -> GRPOBatch:
    """The GRPOBatch of ``chunk``: padded with empty rollouts to its micro-batch shape (agreed over processes),
    packed (``config.pack_width``) or one rollout per row; this process's rows (``rows_to_global`` joins them)."""
    devices = 1 if mesh is None else mesh.local_mesh.shape["data"] * mesh.local_mesh.shape["fsdp"]
    prompt_lengths, completion_lengths = chunk.prompt_lengths, chunk.completion_lengths
    if config.pack_width:
        # A packed micro-batch's cost is its packed rows; its per-rollout arrays only feed a gather and the
        # loss, so at chunk_rows x the full completion width they cost little and add no compilations.
        rows, width = chunk_rows, chunk.completion_tokens.shape[1]
    else:
        longest = int((prompt_lengths + completion_lengths).max(initial=2)) - 1
        full_width = chunk.prompt_tokens.shape[1] + chunk.completion_tokens.shape[1] - 1
        rows, width = micro_batch_shape(process_max(len(chunk)), process_max(longest), chunk_rows, full_width,
                                        config, config.grad_accumulation * devices)
    padded = chunk.padded(rows)
    if not config.pack_width:
        return padded_layout(padded, width)
    row_width = process_max(packing.packed_width(prompt_lengths, completion_lengths, config.pack_width,
                                                 config.width_bucket))
    return packed_layout(padded, config.grad_accumulation, row_width, width, devices)


def batch_logprobs(model_config, params, batch: GRPOBatch, temperature: float) -> jax.Array:
    """[R, T] log-probabilities of ``batch.target_tokens`` under the decoder ``params``, in either layout."""
    if batch.target_index is None:
        logits, _ = forward(model_config, params, batch.input_tokens, batch.positions)
        return token_logprobs(logits, batch.target_tokens, temperature)
    return packed_logprobs(model_config, params, batch.input_tokens, batch.positions, batch.groups, batch.branches,
                           batch.target_index, batch.target_tokens, temperature)


_batch_logprobs_jit = jax.jit(batch_logprobs, static_argnames=("model_config", "temperature"))


@dataclasses.dataclass(frozen=True)
class UpdateStep:
    """``(trained, opt_state, batch, base_params) -> (trained, opt_state, metrics)``: one optimizer step,
    in two jitted halves.

    ``gradients(trained, batch, base_params) -> (grads, loss, metrics)`` compiles once per
    batch shape; ``apply(trained, opt_state, grads, loss) -> (trained, opt_state, grad_norm,
    skipped)`` (``grpo.apply_update``, donating its inputs) once per run. Together they are
    ``grpo.grpo_step`` (with a critic, ``ppo.ppo_step``: ``trained`` and ``opt_state`` are then
    ``{"policy": ..., "critic": ...}``); apart, a new micro-batch shape recompiles only the
    model's half (on this CPU 2 of the 5 seconds a whole step took to compile).
    """

    gradients: Callable
    apply: Callable

    def __call__(self, trained, opt_state, batch: GRPOBatch, base_params):
        grads, loss, metrics = self.gradients(trained, batch, base_params)
        trained, opt_state, grad_norm, skipped = self.apply(trained, opt_state, grads, loss)
        return trained, opt_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=skipped)


def make_update_step(model_config, optimizer, grpo_config: GRPOConfig, num_micro_batches: int = 1,
                     lora: LoRAConfig | None = None, critic_optimizer: optax.GradientTransformation | None = None,
                     ppo_config: PPOConfig | None = None) -> UpdateStep:
    """The optimizer step of the training loop (``UpdateStep``): GRPO's, or with ``critic_optimizer`` PPO's.

    ``trained`` is the full params (``base_params`` None) or, with ``lora``, the adapters
    over the frozen ``base_params``, which get no gradient and no optimizer state. The
    adapters are merged once per step; each micro-batch differentiates the merged kernels and
    pulls its gradient back to the adapters (``lora.adapter_pullback``) before it is summed.
    With a critic (``train.critic``), ``trained`` is ``{"policy": ..., "critic": ...}``: the
    critic's own params or adapters (differentiated through their merge), each model updated
    by its own optimizer, both skipped if either's update is not finite.
    """
    logprob_fn = lambda params, batch: batch_logprobs(model_config, params, batch, grpo_config.temperature)
    with_critic = critic_optimizer is not None
    value_clip = ppo_config.value_clip if with_critic else 0.5

    def gradients(trained, batch: GRPOBatch, base_params):
        policy = trained["policy"] if with_critic else trained
        value_fn = lambda critic, micro_batch: batch_values(model_config, critic, base_params, lora, micro_batch)
        with_value = lambda params: {"policy": params, "critic": trained["critic"]} if with_critic else params
        if lora is None:
            return accumulate_gradients(with_value(policy), batch, logprob_fn, grpo_config, num_micro_batches,
                                        value_fn=value_fn if with_critic else None, value_clip=value_clip)
        merged = merge_adapters(base_params, policy, lora)
        merged_logprobs = lambda kernels, micro_batch: logprob_fn(join_targeted(kernels, merged, lora), micro_batch)
        policy_pullback = lambda grads: adapter_pullback(grads, policy, lora)
        pullback = ((lambda grads: {"policy": policy_pullback(grads["policy"]), "critic": grads["critic"]})
                    if with_critic else policy_pullback)
        return accumulate_gradients(with_value(split_targeted(merged, lora)), batch, merged_logprobs, grpo_config,
                                    num_micro_batches, pullback=pullback, value_fn=value_fn if with_critic else None,
                                    value_clip=value_clip)

    def apply(trained, opt_state, grads, loss):
        if not with_critic:
            new_trained, new_opt_state, finite = apply_update(trained, opt_state, grads, loss, optimizer)
            return new_trained, new_opt_state, optax.tree.norm(grads), ~finite
        updated = {name: apply_update(trained[name], opt_state[name], grads[name], loss, part_optimizer)
                   for name, part_optimizer in (("policy", optimizer), ("critic", critic_optimizer))}
        finite = updated["policy"][2] & updated["critic"][2]
        keep = lambda index, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                               {name: updated[name][index] for name in updated}, old)
        return keep(0, trained), keep(1, opt_state), optax.tree.norm(grads["policy"]), ~finite

    return UpdateStep(jax.jit(gradients), jax.jit(apply, donate_argnums=(0, 1)))


_gae_jit = jax.jit(gae_advantages, static_argnames=("gamma", "lam"))
_whiten_jit = jax.jit(whiten)


def with_gae(rows: RolloutRows, critic, base_params, learner: Learner, lora: LoRAConfig | None) -> RolloutRows:
    """``rows`` with PPO's per-token arrays: the critic's values before the update (``old_values``), GAE
    ``returns`` and ``token_advantages`` (whitened over this process's tokens with
    ``ppo.whiten_advantages``, then times each rollout's factor ``rows.advantages``).

    The reward of a rollout sits at its last completion token; the value after it is 0.
    Values are computed in the update's micro-batch layout and read back per completion token.
    """
    config, ppo_config = learner.config.update, learner.config.ppo
    chunk_rows = local_row_count(config.micro_batch_rows, "policy_update.micro_batch_rows")
    mesh = mesh_of(critic)
    cuts = _step_cuts(len(rows), chunk_rows, 0)
    values = [np.zeros((0, rows.completion_tokens.shape[1]), np.float32)]
    for start, end in itertools.pairwise(cuts):
        chunk = rows.take(np.arange(start, min(end, len(rows))))
        batch = fit_micro_batch(chunk, chunk_rows, config, mesh)
        layout_values = batch_values_jit(learner.model_config, critic, base_params, lora, rows_to_global(batch, mesh))
        local = local_rows(layout_values, mesh)[: len(chunk)]  # already on the host
        values.append(completion_aligned(local, chunk, packed=bool(config.pack_width)))
    old_values = np.concatenate(values)
    lengths = rows.completion_lengths
    # Padded to a multiple of 256 rows: one compilation for most steps' row counts.
    padded = max(-(-len(rows) // 256), 1) * 256
    columns = np.arange(old_values.shape[1])[None]
    mask = np.zeros((padded, old_values.shape[1]), bool)
    mask[: len(rows)] = columns < lengths[:, None]
    rewards = np.zeros(mask.shape, np.float32)
    rewards[np.arange(len(rows)), np.maximum(lengths - 1, 0)] = np.where(lengths > 0, rows.rewards, 0.0)
    values_padded = np.zeros(mask.shape, np.float32)
    values_padded[: len(rows)] = old_values
    advantages, returns = _gae_jit(rewards, values_padded, mask, gamma=ppo_config.gamma, lam=ppo_config.lam)
    if ppo_config.whiten_advantages:
        advantages = _whiten_jit(advantages, mask)
    advantages = np.asarray(advantages)[: len(rows)] * rows.advantages[:, None]
    return dataclasses.replace(rows, token_advantages=advantages.astype(np.float32), old_values=old_values,
                               returns=np.asarray(returns)[: len(rows)])


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


def update_policy(state: TrainState, rows: RolloutRows, learner: Learner,
                  rng: np.random.Generator) -> tuple[TrainState, dict]:
    """Runs ``epochs`` passes of micro-batched GRPO steps over ``rows``; returns the state and the metrics.

    Each pass takes ceil(rows / micro_batch_rows) optimizer steps, or with
    ``optimizer_steps`` k that many near-equal steps (padded to a micro-batch shape; see
    ``_step_cuts``).

    ``rows`` are this process's; each optimizer step takes micro_batch_rows / process_count
    of them from every process, and a process out of rows pads (zero loss mask). The number of
    optimizer steps is set by the process with the most rows, so uneven shares can add steps
    (the loss of each stays exact: its denominator counts only real rows).
    """
    config, grpo_config = learner.config.update, learner.config.grpo
    chunk_rows = local_row_count(config.micro_batch_rows, "policy_update.micro_batch_rows")
    cuts = _step_cuts(len(rows), chunk_rows, config.optimizer_steps)
    mesh = mesh_of(state.params)
    with_critic = state.critic is not None
    if with_critic and len(rows):
        rows = with_gae(rows, state.critic, state.base_params, learner, state.lora)
    trained = {"policy": state.params, "critic": state.critic} if with_critic else state.params
    opt_state = {"policy": state.opt_state, "critic": state.critic_opt_state} if with_critic else state.opt_state
    metrics = []
    for _ in range(config.epochs if len(cuts) > 1 else 0):
        order = rng.permutation(len(rows))
        for start, end in itertools.pairwise(cuts):
            batch = rows_to_global(fit_micro_batch(rows.take(order[start:end]), chunk_rows, config, mesh), mesh)
            if grpo_config.kl_coef > 0:
                batch = batch.replace(ref_logprobs=_batch_logprobs_jit(learner.model_config, state.reference_params,
                                                                      batch, grpo_config.temperature))
            trained, opt_state, step_metrics = learner.update_step(trained, opt_state, batch, state.base_params)
            metrics.append(step_metrics)
    if with_critic:
        state = state.replace(params=trained["policy"], opt_state=opt_state["policy"], critic=trained["critic"],
                              critic_opt_state=opt_state["critic"])
    else:
        state = state.replace(params=trained, opt_state=opt_state)
    if not metrics:
        return state, {"optimizer_steps": 0}
    names = ("loss", "kl", "clip_fraction", "grad_norm", "mean_ratio") + (
        ("value_loss", "value_clip_fraction") if with_critic else ())
    summary = {name: float(np.mean([float(m[name]) for m in metrics])) for name in names}
    summary["skipped_steps"] = int(sum(bool(m["skipped"]) for m in metrics))
    summary["optimizer_steps"] = len(metrics)
    return state, summary
