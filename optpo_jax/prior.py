"""A prior the run learns: the Dirichlet concentration fitted to the votes of finished prompts.

Each prompt's answers are modelled as draws from an answer distribution that is itself
drawn from a Dirichlet process of concentration theta (answers come from an open set:
new ones keep appearing). The probability of a prompt's vote counts then depends on theta
only through K (distinct answers) and n (votes) (Ewens' sampling formula):

    log p(counts | theta) = K log theta + lgamma(theta) - lgamma(theta + n) + const,

and the stopping rules' posterior Dir(counts + a, a) takes a = theta. The fit is the
maximum of the summed log-likelihood over a fixed grid of concentrations (``PRIOR_GRID``),
so a rule with a learned prior is one of a few compiled branches. Whether a prompt stopped
early depends on its votes only, so optional stopping leaves this likelihood unchanged:
early-stopped prompts are valid data.

Pure and explicit: ``PriorState`` is carried by the caller (the training loop keeps it from
step to step and in checkpoints) and passed to ``sprt_update`` / ``allocate_wave``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.scipy.special import gammaln

# Concentrations the fit chooses from (the default prior 1.0 among them). Each is one compiled
# branch of every rule that uses the learned prior, so the grid is kept short.
PRIOR_GRID = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0)


@struct.dataclass
class PriorState:
    """Sufficient statistics of the concentration's likelihood.

    Attributes:
      log_likelihood: [G] float32, summed log p(counts | theta) of the finished prompts
        for each theta of ``PRIOR_GRID`` (up to a constant).
      num_prompts: [] int32, finished prompts seen.
    """

    log_likelihood: jax.Array
    num_prompts: jax.Array


def init_prior_state() -> PriorState:
    """No prompt seen yet: the rules use ``SPRTConfig.prior``."""
    return PriorState(jnp.zeros(len(PRIOR_GRID), jnp.float32), jnp.zeros((), jnp.int32))


def prior_log_likelihood(counts: jax.Array, finished: jax.Array | None = None) -> jax.Array:
    """[G] summed log p(counts | theta) over the prompts of ``counts`` [P, K] that are ``finished`` [P]."""
    counts = jnp.asarray(counts)
    votes = jnp.sum(counts, axis=-1).astype(jnp.float32)
    answers = jnp.sum(counts > 0, axis=-1).astype(jnp.float32)
    used = votes > 0 if finished is None else jnp.asarray(finished, bool) & (votes > 0)
    theta = jnp.asarray(PRIOR_GRID, jnp.float32)[:, None]
    per_prompt = answers * jnp.log(theta) + gammaln(theta) - gammaln(theta + votes)
    return jnp.sum(jnp.where(used[None], per_prompt, 0.0), axis=-1)


def update_prior(state: PriorState, finished_counts: jax.Array, finished: jax.Array | None = None,
                 reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> PriorState:
    """Adds the votes of finished prompts: ``finished_counts`` [P, K], optionally masked by ``finished`` [P].

    Prompts without a vote add nothing. Pure and jittable without ``reduce``. ``reduce``
    (e.g. ``train.distributed.process_sum``) sums the increments over processes, as one
    float64 host array [G + 1] (the log-likelihoods, then the prompt count), so that every
    process holds the same state.
    """
    counts = jnp.asarray(finished_counts)
    if counts.ndim != 2:
        raise ValueError(f"finished_counts must be [P, K], got shape {counts.shape}")
    votes = jnp.sum(counts, axis=-1)
    used = votes > 0 if finished is None else jnp.asarray(finished, bool) & (votes > 0)
    log_likelihood, num_used = prior_log_likelihood(counts, used), jnp.sum(used).astype(jnp.int32)
    if reduce is not None:
        total = reduce(np.concatenate([np.asarray(log_likelihood, np.float64), [int(num_used)]]))
        log_likelihood, num_used = total[:-1].astype(np.float32), np.int32(total[-1])
    return PriorState(state.log_likelihood + log_likelihood, state.num_prompts + num_used)


def prior_branch(state: PriorState) -> jax.Array:
    """[] int32: 0 before any prompt finished (the config's prior), else 1 + the grid index of the fit."""
    return jnp.where(state.num_prompts > 0, 1 + jnp.argmax(state.log_likelihood), 0).astype(jnp.int32)


def branch_concentrations(default: float) -> tuple[float, ...]:
    """The concentration of each ``prior_branch``: ``default`` (nothing fitted yet), then ``PRIOR_GRID``."""
    return (float(default),) + PRIOR_GRID


def learned_concentration(state: PriorState, default: float) -> jax.Array:
    """[] float32, the concentration the rules use: the fit, or ``default`` before any prompt finished (jittable)."""
    return jnp.asarray(branch_concentrations(default), jnp.float32)[prior_branch(state)]


def fitted_concentration(state: PriorState, default: float) -> float:
    """The concentration the rules use (host value, for metrics and reports)."""
    return branch_concentrations(default)[int(prior_branch(state))]


def prior_to_json(state: PriorState) -> dict:
    """A JSON-able copy (floats round-trip exactly), for checkpoints."""
    return {"log_likelihood": np.asarray(state.log_likelihood, np.float64).tolist(),
            "num_prompts": int(state.num_prompts)}


def prior_from_json(saved: dict) -> PriorState:
    """Inverse of ``prior_to_json``."""
    log_likelihood = np.asarray(saved["log_likelihood"], np.float32)
    if log_likelihood.shape != (len(PRIOR_GRID),):
        raise ValueError(f"a saved prior state has {log_likelihood.shape} likelihoods, PRIOR_GRID has {len(PRIOR_GRID)}")
    return PriorState(jnp.asarray(log_likelihood), jnp.asarray(saved["num_prompts"], jnp.int32))
