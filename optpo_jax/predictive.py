"""The probability that a prompt's current leader is still the plurality when its budget is spent.

Under the Dirichlet posterior of the votes (``counts + prior`` for every answer seen, one
slot of weight ``prior`` for all answers not seen yet), the remaining ``m`` votes follow
the Dirichlet-multinomial predictive. ``plurality_at_budget_prob`` is the probability that
after them the leader is still the label a full-budget vote would give: more votes than
every other answer, or as many as an answer that appeared after it (``consensus`` breaks a
tie in favour of the lower slot, the answer seen first).

Computed exactly and deterministically (no sampling), by conditioning on the leader's
share of the remaining votes ``x`` (Beta-binomial) and then giving the rest to the other
answers one after another: each takes a Beta-binomial share of what is left (stick
breaking of the Dirichlet-multinomial), and a path survives while every answer stays
below the leader's final count. Every term is a probability, so float32 cannot overflow.

Answers beyond the ``competitors`` largest are pooled into one competitor whose count is
the largest of theirs; the pool must then stay below the leader in total, which is
stricter than each of its answers doing so, so with more than ``competitors + 1`` answers
seen the value is a lower bound (exact otherwise). The unseen slot is likewise one
competitor (new answers that would split are counted together: a lower bound again).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

COMPETITORS = 4  # answers besides the leader followed one by one; the rest are pooled
# Largest ``max_remaining``: each prompt builds [X, R, R] float32 arrays (X = R = max_remaining + 1)
# for 8 prompts at a time, 0.5 GiB each at 256 and 4 GiB at 512.
MAX_REMAINING = 256


def _log_beta_binomial(taken, total, a, b):
    """log P(taken | total, a, b) of the Beta-binomial, for a, b > 0 and 0 <= taken <= total."""
    return (gammaln(total + 1.0) - gammaln(taken + 1.0) - gammaln(total - taken + 1.0)
            + gammaln(taken + a) + gammaln(total - taken + b) - gammaln(total + a + b)
            + gammaln(a + b) - gammaln(a) - gammaln(b))


def _share_pmf(taken, total, a, b):
    """P(an answer of weight a takes ``taken`` of ``total`` votes | the rest weigh b); degenerate when a or b is 0."""
    valid = (taken >= 0) & (taken <= total)
    safe_a, safe_b = jnp.maximum(a, 1e-30), jnp.maximum(b, 1e-30)
    pmf = jnp.exp(_log_beta_binomial(jnp.clip(taken, 0, total), total, safe_a, safe_b))
    pmf = jnp.where(a <= 0, (taken == 0).astype(pmf.dtype), jnp.where(b <= 0, (taken == total).astype(pmf.dtype),
                                                                       pmf))
    return jnp.where(valid, pmf, 0.0)


def _single_prompt(counts: jax.Array, remaining: jax.Array, prior, max_remaining: int) -> jax.Array:
    """plurality_at_budget_prob for one prompt: counts [K] -> scalar."""
    num_slots = counts.shape[-1]
    padded = jnp.concatenate([counts.astype(jnp.int32), jnp.zeros(COMPETITORS + 2, jnp.int32)])
    # Most votes first, then the lower slot (the earlier answer): the order ``consensus`` breaks ties in.
    order_key = padded * (num_slots + COMPETITORS + 3) + (num_slots + COMPETITORS + 2 - jnp.arange(padded.shape[0]))
    top = jax.lax.top_k(order_key, COMPETITORS + 2)[1]
    top_counts = padded[top].astype(jnp.float32)
    leader, competitors, pool_count = top_counts[0], top_counts[1 : COMPETITORS + 1], top_counts[COMPETITORS + 1]
    counts = counts.astype(jnp.float32)
    weight = lambda c: jnp.where(c > 0, c + prior, 0.0)
    seen_weight = jnp.sum(weight(counts))
    pool_weight = jnp.maximum(seen_weight - weight(leader) - jnp.sum(weight(competitors)), 0.0)
    # The other answers in the order they take their shares: competitors, pool, unseen (takes what is left).
    other_counts = jnp.concatenate([competitors, pool_count[None], jnp.zeros(1)])
    other_weights = jnp.concatenate([weight(competitors), pool_weight[None], jnp.full(1, prior, jnp.float32)])
    later_weights = jnp.cumsum(other_weights[::-1])[::-1] - other_weights  # weight of the answers after each
    # A final tie goes to the lower slot: the leader wins it against later answers (and every unseen one).
    # The pool may hold earlier answers, so it must stay strictly below.
    wins_tie = jnp.concatenate([top[1 : COMPETITORS + 1] > top[0], jnp.array([False, True])])

    remaining = remaining.astype(jnp.float32)
    votes = jnp.arange(max_remaining + 1, dtype=jnp.float32)
    leader_takes = votes  # [X]
    leader_pmf = _share_pmf(leader_takes, remaining, weight(leader), seen_weight + prior - weight(leader))
    # left[x, r]: probability that r votes are still to be shared after the answers so far, all below the leader.
    left = (votes[None, :] == remaining - leader_takes[:, None]).astype(jnp.float32)
    before, after = votes[:, None], votes[None, :]  # r -> r'
    for j in range(COMPETITORS + 2):
        cap = leader + leader_takes - other_counts[j] - jnp.where(wins_tie[j], 0.0, 1.0)  # [X]: most votes j may take
        taken = before - after
        if j == COMPETITORS + 1:  # the unseen slot takes every vote left
            share = (after == 0).astype(jnp.float32) * jnp.ones_like(taken)
        else:
            share = _share_pmf(taken, before, other_weights[j], later_weights[j])
        allowed = taken[None] <= cap[:, None, None]
        left = jnp.einsum("xr,xrs->xs", left, jnp.where(allowed, share[None], 0.0))
    win = jnp.sum(leader_pmf * left[:, 0])
    # Certain once the runner-up cannot catch the leader; no vote yet: no leader.
    win = jnp.where(leader - competitors[0] - jnp.where(wins_tie[0], 0.0, 1.0) >= remaining, 1.0,
                    jnp.clip(win, 0.0, 1.0))
    return jnp.where(leader > 0, win, 0.0)


def plurality_at_budget_prob(counts: jax.Array, remaining: jax.Array, prior: float | jax.Array,
                             max_remaining: int) -> jax.Array:
    """P(the leader of ``counts`` is still the consensus after ``remaining`` more votes).

    Args:
      counts: [..., K] votes per answer slot (slots with 0 votes are not answers).
      remaining: [...] votes still to come, integers in [0, max_remaining].
      prior: the Dirichlet concentration a > 0 (each seen answer: count + a; unseen: a), a float or
        a traced scalar (a learned prior).
      max_remaining: static upper bound on ``remaining`` (the array sizes).

    Returns:
      [...] float32 in [0, 1]: 1 once the leader's margin over the runner-up exceeds
      ``remaining``; 0 without votes. Pure, jittable, vmappable; cost O(max_remaining^3)
      per prompt.
    """
    counts = jnp.asarray(counts)
    batch_shape = counts.shape[:-1]
    flat_counts = counts.reshape(-1, counts.shape[-1])
    flat_remaining = jnp.broadcast_to(jnp.asarray(remaining), batch_shape).reshape(-1)
    # A sequential map over small batches: vmap over all prompts at once materialises
    # [P, X, R, R] tensors (measured 3.6x slower on CPU for 1318 prompts at budget 40).
    result = jax.lax.map(lambda args: _single_prompt(*args, prior, max_remaining), (flat_counts, flat_remaining),
                         batch_size=8)
    return result.reshape(batch_shape)
