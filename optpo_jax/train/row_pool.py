"""The host side of continuous decoding: which prompt and rollout each row of the pool serves.

``RowPool`` owns a ``continuous.DecodeState`` and the bookkeeping around it: it inserts
prompts into free rows (padded to a ``row_bucket``, so a handful of shapes compile),
cancels rows, runs ``decode_chunk`` and hands back the rollouts that finished, with their
extracted answers, in the order they were started. Training (``rollouts.py``) and
evaluation (``evaluation.py``) both drive it; what to insert is theirs to decide (``refill``).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from optpo_jax.continuous import decode_chunk, init_decode_state, insert_rows
from optpo_jax.sampler import SamplingConfig, bucket_width
from optpo_jax.train.distributed import mesh_of, shard_rows
from optpo_jax.train.waves import PromptTable, Wave, rollout_streams

CHUNK_FINISHES = 16
"""A decode chunk returns to the host once 1 / CHUNK_FINISHES of the rows have finished (at least
one, at most half of those running): rows wait a few steps for a refill, host round trips stay rare."""


def row_bucket(count: int, num_rows: int) -> int:
    """The padded size of ``count`` rows of a pool of ``num_rows``: the smallest of num_rows / CHUNK_FINISHES
    times a power of 4, or num_rows, that holds them. A round trip frees about num_rows / CHUNK_FINISHES rows,
    so three or four shapes serve every insert and every vote count."""
    size = max(num_rows // CHUNK_FINISHES, 1)
    while size < count:
        size *= 4
    return min(size, num_rows) if count <= num_rows else count


@dataclasses.dataclass
class Finished(Wave):
    """Rollouts that finished in one round trip (a ``Wave`` of only valid rows), plus
    ``rollout_index`` [n]: each one's number among its prompt's rollouts."""

    rollout_index: np.ndarray = None


# Reads go through jitted copies: a NumPy view of a state buffer would keep it alive and stop the
# next call from donating it (XLA would copy the whole state instead).
_running_jit = jax.jit(lambda state: state.running)
_read_rows_jit = jax.jit(lambda state, rows: (state.tokens[rows], state.lengths[rows], state.policy_logprobs[rows]))


class RowPool:
    """R rows decoding continuously for the prompts of a ``PromptTable`` (one process).

    Args:
      params, model_config: the policy.
      task: extracts the answers of finished rollouts.
      prompts: the prompts rows can serve.
      sampling: the SamplingConfig (``max_new_tokens``, temperature, stop tokens...).
      num_rows: R, the rows decoding at once.
      key: sampling key; rollout k of prompt p draws from stream (p, k) (``sampler.rollout_keys``), whatever row
        it lands in.
      started: [P] rollouts already drawn per prompt (numbers new rollouts after them).
    """

    def __init__(self, params, model_config, task, prompts: PromptTable, sampling: SamplingConfig, num_rows: int,
                 key: jax.Array, started: np.ndarray | None = None):
        self.params, self.model_config, self.task, self.prompts, self.sampling = (
            params, model_config, task, prompts, sampling)
        self.num_rows = num_rows
        width = prompts.tokens.shape[1]
        self.state = shard_rows(init_decode_state(model_config, num_rows, width, sampling, key), mesh_of(params))
        self.row_prompt = np.full(num_rows, -1, np.int64)  # -1: the row is free
        self.row_rollout = np.zeros(num_rows, np.int64)
        self.row_serial = np.zeros(num_rows, np.int64)  # start order, to hand rollouts back in it
        self.serial = 0
        num_prompts = len(prompts.lengths)
        self.started = np.zeros(num_prompts, np.int64) if started is None else np.array(started, np.int64)
        self.insertions = 0
        self.round_trips = 0

    @property
    def decode_steps(self) -> int:
        return int(self.state.decode_steps)

    def free_rows(self) -> np.ndarray:
        """Rows serving no rollout, ascending."""
        return np.flatnonzero(self.row_prompt < 0)

    def in_flight(self) -> np.ndarray:
        """[P] rollouts of each prompt being decoded."""
        busy = self.row_prompt >= 0
        return np.bincount(self.row_prompt[busy], minlength=len(self.started))

    def insert(self, prompt_ids: np.ndarray) -> None:
        """Starts one rollout of each of ``prompt_ids`` in the lowest free rows."""
        prompt_ids = np.asarray(prompt_ids, np.int64)
        free = self.free_rows()
        if len(prompt_ids) > len(free):
            raise ValueError(f"{len(prompt_ids)} rollouts to insert into {len(free)} free rows")
        if not len(prompt_ids):
            return
        rows = free[: len(prompt_ids)]
        rollout_index = np.empty(len(prompt_ids), np.int64)
        for i, prompt in enumerate(prompt_ids):  # the k-th rollout of its prompt, in insertion order
            rollout_index[i] = self.started[prompt]
            self.started[prompt] += 1
        self.row_prompt[rows], self.row_rollout[rows] = prompt_ids, rollout_index
        self.row_serial[rows] = self.serial + np.arange(len(rows))
        self.serial += len(rows)
        self.insertions += len(rows)
        self._write(rows, prompt_ids, rollout_index, np.ones(len(rows), bool))

    def cancel(self, rows: np.ndarray) -> None:
        """Stops the rollouts in ``rows`` and frees them; nothing of them is returned."""
        rows = np.asarray(rows, np.int64)
        if len(rows):
            self.row_prompt[rows] = -1
            self._write(rows, np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64), np.zeros(len(rows), bool))

    def _write(self, rows, prompt_ids, rollout_index, valid) -> None:
        size = row_bucket(len(rows), self.num_rows)
        pad = lambda values, fill: np.concatenate([values, np.full(size - len(values), fill, values.dtype)])
        tokens = self.prompts.tokens[prompt_ids]
        width = tokens.shape[1]  # without buckets every insert uses the table's width: one shape
        if self.sampling.prompt_buckets:
            width = min(bucket_width(int(self.prompts.lengths[prompt_ids].max(initial=1)), self.sampling), width)
        self.state = insert_rows(
            self.params, self.state, pad(rows, self.num_rows).astype(np.int32),
            np.pad(tokens[:, :width], ((0, size - len(rows)), (0, 0))).astype(np.int32),
            pad(self.prompts.lengths[prompt_ids].astype(np.int32), 1), pad(valid, False),
            pad(rollout_index, 0).astype(np.int32),
            np.pad(rollout_streams(prompt_ids, rollout_index), ((0, size - len(rows)), (0, 0))),
            model_config=self.model_config, config=self.sampling,
        )

    def decode(self) -> Finished:
        """Decodes until some rows finish; returns their rollouts (in start order) and frees their rows."""
        busy = self.row_prompt >= 0
        running = int(busy.sum())
        if not running:
            raise RuntimeError("decode() on a pool with no rollout in flight")
        min_finished = max(1, min(self.num_rows // CHUNK_FINISHES, running // 2))
        self.state = decode_chunk(self.params, self.state, self.sampling.max_new_tokens, min_finished,
                                  model_config=self.model_config, config=self.sampling)
        self.round_trips += 1
        rows = np.flatnonzero(busy & ~np.asarray(_running_jit(self.state)))
        rows = rows[np.argsort(self.row_serial[rows], kind="stable")]
        completions, lengths, policy_logprobs = (np.asarray(values)[: len(rows)] for values in _read_rows_jit(
            self.state, np.pad(rows, (0, row_bucket(len(rows), self.num_rows) - len(rows))).astype(np.int32)))
        answers = [self.task.extract(completions[i, : lengths[i]]) for i in range(len(rows))]
        finished = Finished(
            prompt_ids=self.row_prompt[rows].astype(np.int32), valid=np.ones(len(rows), bool), completions=completions,
            completion_lengths=lengths, policy_logprobs=policy_logprobs, answers=answers,
            rollout_index=self.row_rollout[rows].copy(),
        )
        self.row_prompt[rows] = -1
        return finished



