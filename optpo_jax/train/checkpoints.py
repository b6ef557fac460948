"""Orbax checkpoints of a run: params, optimizer state and the loop's counters."""

from __future__ import annotations

import copy
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from optpo_jax.train.rollouts import LookaheadCarry


class Checkpointer:
    """Saves ``{"params", "opt_state"}`` with Orbax and the loop counters as JSON, per step.

    Orbax writes each step into a temporary directory and renames it only when complete,
    so a run killed mid-save leaves no checkpoint that ``latest_step`` would return.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.keep = keep

    def _carry_path(self, step: int) -> Path:
        # Each process carries the lookahead of its own share of the prompts.
        return self.directory.parent / "carry" / f"process{jax.process_index()}" / f"{step}.npz"

    def _save_carry(self, step: int, carry: LookaheadCarry | None) -> None:
        """Writes the carry of ``step`` before its Orbax step commits, so every committed step has one."""
        path = self._carry_path(step)
        if carry is None:
            LookaheadCarry.save_none(path)
        else:
            carry.save(path)
        for old in sorted(path.parent.glob("*.npz"), key=lambda p: int(p.name.split(".")[0]))[: -self.keep - 1]:
            old.unlink()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, totals: dict, carry: LookaheadCarry | None = None) -> None:
        self._save_carry(step, carry)
        # A copy: Orbax writes asynchronously and the caller goes on updating its totals.
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        totals=ocp.args.JsonSave(copy.deepcopy(totals))))

    def restore(self, like: dict, step: int | None = None) -> tuple[dict, dict, LookaheadCarry | None]:
        """(state, totals, carry) at ``step`` (default: the latest), shaped like ``like``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      totals=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["totals"]), LookaheadCarry.load(self._carry_path(step))

    def wait(self) -> None:
        self.manager.wait_until_finished()
