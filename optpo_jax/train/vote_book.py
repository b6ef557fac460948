"""A batch's votes on the host, with each prompt's ``rollouts_to_stop`` kept current.

A continuous decode counts a few finished rollouts at a time, hundreds of times per
batch. Updating and re-planning every prompt each time would cost O(prompts) per round
trip (a few milliseconds for a thousand prompts under the Dirichlet rule); ``VoteBook``
gathers the prompts a count touches, runs ``sprt_update`` and ``rollouts_to_stop`` on them
alone (one jitted call, padded to a ``row_bucket``) and writes them back. Both functions
treat prompts independently, so the votes equal those of a full update.
"""

from __future__ import annotations

import jax
import numpy as np

from optpo_jax.allocation import rollouts_to_stop
from optpo_jax.sprt import SPRTConfig, VoteState, sprt_update
from optpo_jax.train.row_pool import row_bucket


def _update_and_plan(votes: VoteState, prompt_ids, slots, valid, config: SPRTConfig, prior_state):
    votes = sprt_update(votes, prompt_ids, slots, valid, config, prior_state=prior_state)
    return votes, rollouts_to_stop(votes, config, prior_state)


_update_and_plan_jit = jax.jit(_update_and_plan, static_argnames=("config",))
_rollouts_to_stop_jit = jax.jit(rollouts_to_stop, static_argnames=("config",))


class VoteBook:
    """Votes of P prompts (host arrays) and ``to_stop`` [P]: each prompt's ``rollouts_to_stop``."""

    def __init__(self, votes: VoteState, config: SPRTConfig, prior_state=None, num_rows: int = 1):
        self.votes = jax.tree.map(lambda values: np.array(values), votes)
        self.num_rows = num_rows  # the pool's rows: counts are padded to its row buckets
        self.config, self.prior_state = config, prior_state
        self.to_stop = np.array(_rollouts_to_stop_jit(votes, config, prior_state))

    def count(self, prompt_ids: np.ndarray, slots: np.ndarray, valid: np.ndarray) -> None:
        """``sprt_update`` of rows (prompt_ids, slots, valid) [n], in row order, on the prompts they touch."""
        touched = np.unique(np.asarray(prompt_ids)[np.asarray(valid, bool)])
        if not len(touched):
            return
        size = row_bucket(len(prompt_ids), self.num_rows)  # one size for prompts and rows: one shape per bucket
        gathered = np.concatenate([touched, np.full(size - len(touched), touched[0])])  # padding: never written back
        local_ids = np.where(valid, np.searchsorted(touched, prompt_ids), 0).astype(np.int32)
        pad = lambda values: np.pad(np.asarray(values), (0, size - len(values)))
        sub_votes, sub_to_stop = _update_and_plan_jit(self.votes.select(gathered), pad(local_ids), pad(slots),
                                                      pad(valid).astype(bool), self.config, self.prior_state)
        for name, values in vars(sub_votes).items():
            getattr(self.votes, name)[touched] = np.asarray(values)[: len(touched)]
        self.to_stop[touched] = np.asarray(sub_to_stop)[: len(touched)]
