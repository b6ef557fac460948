"""Time of ``posterior_mode_prob`` on counts [4096, 64], against direct evaluation.

The baseline evaluates the same integral on the same grid but calls
``jax.scipy.special.gammainc`` for every (prompt, slot, node), the straightforward
vectorised quadrature. Both run jitted on the same counts in this process.

    python experiments/bench_posterior.py [--prompts 4096] [--slots 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import timed
from jax.scipy.special import gammainc, gammaln

from optpo_jax import posterior_mode_prob
from optpo_jax.posterior import quadrature_nodes


def direct_quadrature(counts, prior=1.0, max_count=256):
    """Same grid, F from gammainc per (prompt, slot, node): [P, K] -> [P]."""
    y, step = quadrature_nodes(prior, max_count)
    x = jnp.asarray(y * y, jnp.float32)
    leader = jnp.argmax(counts, -1)
    alpha_lead = jnp.max(counts, -1).astype(jnp.float32) + prior
    is_competitor = (counts > 0) & (jnp.arange(counts.shape[-1]) != leader[:, None])
    shapes = counts.astype(jnp.float32) + prior
    log_cdf = jnp.log(jnp.maximum(gammainc(shapes[:, :, None], x), 1e-30))
    log_product = jnp.sum(jnp.where(is_competitor[:, :, None], log_cdf, 0.0), 1)
    log_product += jnp.log(jnp.maximum(gammainc(prior, x), 1e-30))
    log_density = (alpha_lead[:, None] - 1) * jnp.log(x) - x - gammaln(alpha_lead)[:, None]
    return jnp.sum(jnp.exp(log_density + log_product) * 2 * jnp.sqrt(x) * step, -1)


def best_and_median(fn, counts, repeats: int) -> tuple[float, float]:
    """(fastest, median) seconds of ``repeats`` calls of ``fn(counts)`` after one compiling call."""
    timed(fn, counts)
    times = [timed(fn, counts)[1] for _ in range(repeats)]
    return min(times), float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--slots", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Realistic votes: each prompt spread 1..64 votes over a Dirichlet(0.3) answer law.
    totals = rng.integers(1, 65, args.prompts)
    laws = rng.dirichlet(np.full(args.slots, 0.3), args.prompts)
    counts = jnp.asarray(np.stack([rng.multinomial(t, p) for t, p in zip(totals, laws)]), jnp.int32)
    fast = jax.jit(posterior_mode_prob)
    slow = jax.jit(direct_quadrature)
    fast_best, fast_median = best_and_median(fast, counts, 20)
    slow_best, slow_median = best_and_median(slow, counts, 3)
    gap = float(jnp.max(jnp.abs(fast(counts) - slow(counts))))
    print(f"counts {tuple(counts.shape)}, {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"posterior_mode_prob (table + matmul): best {fast_best * 1e3:.2f} ms, median {fast_median * 1e3:.2f} ms")
    print(f"direct gammainc quadrature:           best {slow_best * 1e3:.1f} ms, median {slow_median * 1e3:.1f} ms")
    print(f"speed-up (best/best): {slow_best / fast_best:.0f}x; max |difference| {gap:.1e}")


if __name__ == "__main__":
    main()
