"""High-precision references computed with scipy (float64 adaptive quadrature)."""

import numpy as np
from scipy import integrate, special, stats


def mode_prob_reference(counts, prior=1.0):
    """P(leader is the mode) under Dir(v_j + a for observed answers, a for unseen), by scipy quad."""
    counts = np.asarray(counts)
    if counts.max(initial=0) == 0:
        return 0.0
    lead = int(np.argmax(counts))
    alpha_lead = counts[lead] + prior
    others = np.array([c + prior for i, c in enumerate(counts) if c > 0 and i != lead] + [prior])

    def integrand(x):
        with np.errstate(divide="ignore"):
            log_cdf = np.sum(np.log(special.gammainc(others, x)))
        return np.exp(stats.gamma.logpdf(x, alpha_lead) + log_cdf)

    spread = np.sqrt(alpha_lead)
    upper = alpha_lead + 20 * spread + 40
    mode = alpha_lead - 1
    points = [p for p in (mode - 3 * spread, mode, mode + 3 * spread) if 0 < p < upper]
    value, _ = integrate.quad(integrand, 0, upper, points=points, epsabs=1e-13, epsrel=1e-12, limit=500)
    return value
