"""Reports over finished runs: method comparisons over seeds (``compare``), their statistics (``seed_stats``)
and figures (``plots``, needs matplotlib). They read the files ``train.loop.train`` writes; the pure core at
the package root imports none of them."""
