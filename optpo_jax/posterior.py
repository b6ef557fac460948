"""Exact posterior probability that the leading answer is the policy's mode.

Votes for a prompt are modelled as draws from the policy's categorical answer
distribution p. With a symmetric Dirichlet prior of concentration ``prior`` the
posterior over the m answers seen so far plus ONE slot that stands for every answer
not yet seen is Dir(v_1 + a, ..., v_m + a, a). Writing p_j = G_j / sum(G) with
independent G_j ~ Gamma(alpha_j), the probability that the leader (slot L) has the
largest p is

    P(L is the mode) = integral_0^inf g_L(x) prod_{j != L} F_j(x) dx,

with g the Gamma density and F the Gamma CDF (the regularised lower incomplete gamma
function). A slot with zero votes is not a competitor: K is only a capacity.

How it is evaluated fast and exactly
------------------------------------
Evaluating F per (prompt, slot, node) with ``gammainc`` costs about 0.3 us an element
on a CPU core, far too slow for thousands of prompts. Because every shape is
``count + prior`` with an integer count, F and g only ever need to be known at
shapes prior + c, c = 0..max_count. They are tabulated once (float64, scipy) on a
fixed grid that is uniform in y = sqrt(x), where every Gamma law has a standard
deviation close to 1/2, so one step size resolves small and large counts alike. The
log-product over competitors is then a histogram of competitor counts times the
log-CDF table: a single [N, C] x [C, L] matmul. The trapezoidal rule on this smooth,
rapidly decaying integrand converges geometrically; the step is chosen so that the
error is below 1e-6 against scipy ``quad`` (see tests/test_posterior.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from scipy import special as scipy_special

# Step in y = sqrt(x). 0.2 gives < 1e-6 error for prior >= 1; smaller priors make
# the integrand less smooth at x = 0 and get a proportionally finer grid.
_BASE_STEP = 0.2
# Log-values below this are exp() == 0 in float32; flooring keeps 0 * log(0) finite.
_LOG_FLOOR = -1.0e4


def quadrature_nodes(prior: float, max_count: int) -> tuple[np.ndarray, float]:
    """Grid nodes y_l = step * l, l = 1..L, in y = sqrt(x), and the step. ([L] float64, step)."""
    if not prior > 0:
        raise ValueError(f"prior must be > 0, got {prior!r}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count!r}")
    step = _BASE_STEP * min(1.0, prior)
    largest_shape = max_count + prior
    # Upper end well past the right tail of the largest leader's Gamma law.
    x_end = largest_shape + 10.0 * math.sqrt(largest_shape) + 10.0
    num_nodes = math.ceil(math.sqrt(x_end) / step)
    return step * np.arange(1, num_nodes + 1, dtype=np.float64), step  # y = 0 contributes 0


@functools.lru_cache(maxsize=64)
def quadrature_tables(prior: float, max_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Tables of the Gamma log-CDF and the weighted log-density on the grid.

    Args:
      prior: Dirichlet concentration a > 0 (a static Python float).
      max_count: the largest vote count the tables cover.

    Returns:
      log_cdf: [C, L] float32, log F_{a + c}(x_l) for c = 0..max_count.
      log_weighted_density: [C, L] float32, log of g_{a + c}(x_l) * dx/dy * step,
        so that sum_l exp(log_weighted_density[c] + ...) is the quadrature.
    """
    y, step = quadrature_nodes(prior, max_count)
    x = y * y
    shapes = prior + np.arange(max_count + 1, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore"):
        log_cdf = np.log(scipy_special.gammainc(shapes, x[None, :]))
    log_density = (shapes - 1.0) * np.log(x)[None, :] - x[None, :] - scipy_special.gammaln(shapes)
    log_weighted = log_density + np.log(2.0 * y * step)[None, :]
    return (
        np.maximum(log_cdf, _LOG_FLOOR).astype(np.float32),
        np.maximum(log_weighted, _LOG_FLOOR).astype(np.float32),
    )


def _check_counts(counts: jax.Array, max_count: int) -> None:
    """checkify check: every count lies in [0, max_count]; names the first that does not."""
    bad = (counts < 0) | (counts > max_count)
    index = jnp.unravel_index(jnp.argmax(bad.reshape(-1)), counts.shape)
    where = ", ".join(f"{{i{axis}}}" for axis in range(counts.ndim))
    checkify.check(
        ~jnp.any(bad),
        f"posterior_mode_prob: counts[{where}] = {{value}}, outside [0, max_count={max_count}]",
        value=counts[index], **{f"i{axis}": i for axis, i in enumerate(index)},
    )


def posterior_mode_prob(
    counts: jax.Array, prior: float = 1.0, *, max_count: int = 256, checked: bool = False
) -> jax.Array:
    """Posterior probability that the most-voted answer is the policy's mode.

    Exact up to quadrature error (< 1e-6 against scipy ``quad`` for up to 256 votes
    and 64 observed answers at prior 0.5, 1 and 2), computed in float32 with no
    Monte Carlo. One vote gives 0.75 and four unanimous votes 0.96875 at prior 1,
    matching the Beta rule 1 - I_0.5(v1 + 1, v2 + 1).

    Ties: the leader is the lowest slot index among those with the most votes. Tied
    leaders are exchangeable, so each gets the same value, which is below 1/2.

    Args:
      counts: [..., K] non-negative integer votes per answer slot; the last axis is
        the answer axis and zero-vote slots are ignored (K is only a capacity).
      prior: Dirichlet concentration a > 0, a static Python float.
      max_count: static bound on any single count; it sizes the quadrature tables.
        A row whose count exceeds it gets NaN rather than a wrong value.
      checked: static; add a ``jax.experimental.checkify`` check that fails on the
        first count that is negative or above ``max_count``, naming its index and
        value. Under ``jit`` wrap the call in ``checkify.checkify`` and call
        ``error.throw()`` on the result (see ``sprt_update``); eagerly it raises at once.

    Returns:
      [...] float32 probabilities; 0 for rows without any vote. NaN for a row with a
      negative count or a count above ``max_count`` (invalid votes), so a stopping
      rule comparing it with a threshold never stops on it.

    Raises:
      TypeError at trace time for a non-integer dtype; ValueError for a scalar or an
      empty answer axis (K = 0).
    """
    counts = jnp.asarray(counts)
    if counts.ndim < 1:
        raise ValueError(f"counts must have an answer axis, got shape {counts.shape}")
    if not jnp.issubdtype(counts.dtype, jnp.integer):
        raise TypeError(f"counts must be integer votes, got dtype {counts.dtype}")
    if counts.shape[-1] == 0:
        raise ValueError(f"counts needs at least one answer slot (K >= 1), got shape {counts.shape}")
    if checked:
        _check_counts(counts, max_count)
    log_cdf, log_weighted_density = quadrature_tables(float(prior), int(max_count))
    batch_shape, num_slots = counts.shape[:-1], counts.shape[-1]
    flat = counts.reshape(-1, num_slots).astype(jnp.int32)
    leader_count = jnp.max(flat, axis=-1)
    table_index = jnp.clip(flat, 0, max_count)
    competitors = jax.vmap(
        lambda row: jnp.bincount(row, weights=(row > 0).astype(jnp.float32), length=max_count + 1)
    )(table_index)
    leader_index = jnp.clip(leader_count, 0, max_count)
    competitors = competitors.at[jnp.arange(flat.shape[0]), leader_index].add(-1.0)
    # Column 0 is the single slot for every answer not seen yet.
    competitors = competitors.at[:, 0].set(1.0)
    log_integrand = jnp.matmul(competitors, log_cdf, precision=jax.lax.Precision.HIGHEST)
    log_integrand = log_integrand + jnp.asarray(log_weighted_density)[leader_index]
    prob = jnp.clip(jnp.sum(jnp.exp(log_integrand), axis=-1), 0.0, 1.0)
    prob = jnp.where(leader_count > 0, prob, 0.0)
    # In the given dtype, before the int32 cast could wrap a large count into range.
    invalid = jnp.any((counts < 0) | (counts > max_count), axis=-1).reshape(-1)
    prob = jnp.where(invalid, jnp.nan, prob)
    return prob.reshape(batch_shape)
