"""Optimizer helpers: low-precision params trained through a float32 master copy."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterState(NamedTuple):
    master: optax.Params  # float32 copy of the params
    inner: optax.OptState  # the wrapped optimizer's state, built on the float32 copy


def float32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on a float32 copy of (for example bfloat16) params.

    The optimizer state and the master weights are float32, so updates far below
    bfloat16's resolution (a 5e-7 learning rate on weights of order 1e-2) accumulate
    instead of rounding away; the returned updates move each param to its master value
    rounded to the param's dtype.
    """

    def init(params):
        # A copy even where the params are already float32: the update donates params and optimizer state,
        # and one buffer in both would be donated twice.
        master = jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("float32_master needs the params in update()")
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, inner_state = inner.update(grads, state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        to_params = jax.tree.map(lambda m, p: m.astype(p.dtype) - p, master, params)
        return to_params, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


def float32_master_params(opt_state) -> optax.Params | None:
    """The float32 master copy of the params in an optimizer state built by ``float32_master``
    (top level or nested in a chain), or None when the optimizer keeps none.

    With bfloat16 params it holds the trained values the params are only a rounding of.
    """
    found = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, MasterState))
             if isinstance(node, MasterState)]
    if len(found) > 1:
        raise ValueError(f"the optimizer state holds {len(found)} float32 master copies; expected at most one")
    return found[0].master if found else None
