"""Orbax checkpoints of a run: params, optimizer state and the loop's counters."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from optpo_jax.sprt import VoteState


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

    def _save_carry(self, step: int, carry: dict | None) -> None:
        """Writes the rollout carry (votes and rollouts of prompts started early) atomically.

        Written before the Orbax step it belongs to commits, so every committed step has its carry.
        """
        path = self._carry_path(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        if carry is not None:
            arrays = {f"votes.{k}": np.asarray(v) for k, v in vars(carry["votes"]).items()}
            arrays.update({f"kept.{k}": v for k, v in carry["kept"].items()})
            arrays["tables"] = np.array(json.dumps(carry["tables"]))
            arrays["process_count"] = np.array(jax.process_count())
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
        for old in sorted(path.parent.glob("*.npz"), key=lambda p: int(p.name.split(".")[0]))[: -self.keep - 1]:
            old.unlink()

    def _load_carry(self, step: int) -> dict | None:
        """The carry this process saved at ``step``; None (its prompts start voting afresh) when
        there is none or it was split over another number of processes."""
        path = self._carry_path(step)
        if not path.exists():
            warnings.warn(f"no lookahead carry at {path}: the next batch starts its votes afresh", stacklevel=2)
            return None
        with np.load(path) as arrays:
            if "tables" not in arrays:
                return None
            if int(arrays["process_count"]) != jax.process_count():
                warnings.warn(f"the carry at {path} was split over {int(arrays['process_count'])} processes, not "
                              f"{jax.process_count()}: the next batch starts its votes afresh", stacklevel=2)
                return None
            votes = VoteState(**{k.split(".", 1)[1]: arrays[k] for k in arrays if k.startswith("votes.")})
            kept = {k.split(".", 1)[1]: arrays[k] for k in arrays if k.startswith("kept.")}
            return {"votes": votes, "kept": kept, "tables": json.loads(str(arrays["tables"]))}

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, totals: dict, carry: dict | None = None) -> None:
        self._save_carry(step, carry)
        # A copy: Orbax writes asynchronously and the caller goes on updating its totals.
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        totals=ocp.args.JsonSave(copy.deepcopy(totals))))

    def restore(self, like: dict, step: int | None = None) -> tuple[dict, dict, dict | None]:
        """(state, totals, carry) at ``step`` (default: the latest), shaped like ``like``."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      totals=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["totals"]), self._load_carry(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()
