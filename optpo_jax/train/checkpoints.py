"""Orbax checkpoints of a run: params, optimizer state and the loop's counters."""

from __future__ import annotations

import collections
import copy
import json
import os
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from optpo_jax.sprt import VoteState
from optpo_jax.train.rollouts import LookaheadCarry


class Checkpointer:
    """Saves ``{"params", "opt_state"}`` with Orbax and the loop counters as JSON, per step.

    Orbax writes each step into a temporary directory and renames it only when complete,
    so a run killed mid-save leaves no checkpoint that ``latest_step`` would return.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.directory = Path(directory).absolute()
        # Handlers named up front, so a process that has not saved yet can read a step's metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(), "totals": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.keep = keep

    def _carry_path(self, step: int) -> Path:
        # Each process carries the lookahead of its own share of the prompts.
        return self.directory.parent / "carry" / f"process{jax.process_index()}" / f"{step}.npz"

    def _save_carry(self, step: int, carry: LookaheadCarry | None) -> None:
        """Writes the carry of ``step`` before its Orbax step commits, so every committed step has one."""
        path = self._carry_path(step)
        if carry is None:
            _write_npz(path, {})  # the step left no carry: its next batch starts afresh
        else:
            save_carry(path, carry)
        for old in sorted(path.parent.glob("*.npz"), key=lambda p: int(p.name.split(".")[0]))[: -self.keep - 1]:
            old.unlink()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_background(self) -> None:
        """Raises CheckpointError if an earlier save failed in the background (a full disk, a removed folder):
        the run stops at the next step instead of training on without checkpoints."""
        try:
            self.manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - whatever the writer thread raised
            raise self._save_failed(error) from None

    def _save_failed(self, error: Exception) -> CheckpointError:
        cause = getattr(error, "strerror", None) or str(error)[:300]
        return CheckpointError(f"saving a checkpoint in {self.directory} failed ({cause}); the steps saved before "
                               f"it are intact ({sorted(self.manager.all_steps())}): free the disk, then --resume")

    def save(self, step: int, state: dict, totals: dict, carry: LookaheadCarry | None = None) -> None:
        """Saves ``state`` with checksums of every array (checked on restore) and a copy of ``totals``."""
        self.check_background()
        self._save_carry(step, carry)
        # A copy: Orbax writes asynchronously and the caller goes on updating its totals.
        saved = dict(copy.deepcopy(totals), checksums=tree_checksums(state))
        try:  # Orbax first waits for the previous save, and re-raises its failure here
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            totals=ocp.args.JsonSave(saved)))
        except OSError as error:
            raise self._save_failed(error) from None

    def restore(self, like: dict, step: int | None = None) -> tuple[dict, dict, LookaheadCarry | None]:
        """(state, totals, carry) at ``step`` (default: the latest), shaped like ``like``.

        Raises CheckpointError when the step cannot be read, its arrays differ from the
        checksums written at save time or hold non-finite values; the message names the
        latest earlier step that verifies.
        """
        step = self.latest_step() if step is None else step
        saved_steps = sorted(self.manager.all_steps())
        if step not in saved_steps:  # a missing step is no damage: nothing to start again
            raise CheckpointError(f"{self.directory} has no checkpoint at step {step}; it holds steps {saved_steps}")
        mismatch = self._layout_mismatch(like, step)
        if mismatch:
            raise CheckpointError(mismatch)
        state, totals, problem = self._read(like, step)
        if problem:
            earlier = [s for s in sorted(self.manager.all_steps(), reverse=True) if s < step]
            good = next((s for s in earlier if not self._read(like, s)[2]), None)
            offer = (f"step {good} verifies: resume from it with --resume_step={good}" if good is not None
                     else "no earlier step verifies: start again with --overwrite")
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt ({problem}); {offer}")
        try:
            carry = load_carry(self._carry_path(step))
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        return state, totals, carry

    def _layout_mismatch(self, like: dict, step: int) -> str | None:
        """What differs between the arrays saved at ``step`` and those ``like`` expects (their number, shapes
        and dtypes), or None. A difference is a config that builds another model than the run's (LoRA rank or
        targets, model, dtype, optimizer), not a damaged checkpoint."""
        try:
            metadata = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: _read reports the step as damaged
            return None
        is_array = lambda node: hasattr(node, "shape") and hasattr(node, "dtype")
        layout = lambda tree: collections.Counter(
            (tuple(node.shape), str(node.dtype)) for node in jax.tree.leaves(tree, is_leaf=is_array) if is_array(node))
        saved, wanted = layout(getattr(metadata, "tree", metadata)), layout(like)
        if saved == wanted:
            return None
        only_saved, only_wanted = sorted((saved - wanted).items())[:2], sorted((wanted - saved).items())[:2]
        return (f"checkpoint step {step} in {self.directory} holds other arrays than this config builds "
                f"({sum(saved.values())} saved, {sum(wanted.values())} expected; saved only: {only_saved}, expected "
                f"only: {only_wanted}): the config differs from the run's in what it trains (LoRA rank or targets, "
                "model, model_dtype or optimizer). The checkpoint is not damaged: use the run's own config.json")

    def _read(self, like: dict, step: int) -> tuple[dict | None, dict | None, str | None]:
        """(state, totals, problem): problem is None when the step reads and verifies."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                          totals=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 - any read failure means this step cannot be used
            return None, None, f"it cannot be read: {type(error).__name__}: {str(error)[:200]}"
        state, totals = restored["state"], dict(restored["totals"])
        expected = totals.pop("checksums", None)
        return state, totals, verify_state(state, expected)

    def rewind(self, step: int) -> None:
        """Deletes every checkpoint and carry after ``step``, so a run resumed there saves those steps anew."""
        for later in [s for s in self.manager.all_steps() if s > step]:
            self.manager.delete(later)
        carry_dir = self._carry_path(step).parent
        for path in carry_dir.glob("*.npz"):
            if int(path.name.split(".")[0]) > step:
                path.unlink()

    def wait(self) -> None:
        """Waits for the background saves; CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - whatever the writer thread raised
            raise self._save_failed(error) from None
        self.check_background()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (unreadable, changed since it was saved, non-finite)."""


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    """Sum of the leaf's bit patterns times odd position weights, mod 2^32 (any one flipped bit changes it)."""
    if leaf.dtype == jnp.bool_:
        bits = leaf.astype(jnp.uint32).ravel()
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[leaf.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


# One call per leaf: leaves may live on different devices (an optimizer's step count on one, params on a mesh).
_leaf_checksum_jit = jax.jit(_leaf_checksum)
_all_finite_jit = jax.jit(lambda leaf: jnp.all(jnp.isfinite(leaf)))


def _read_scalar(value: jax.Array):
    # Replicated scalars; on several processes only this process's copy can be read.
    return np.asarray(value.addressable_data(0))


def _named_leaves(tree) -> tuple[list[str], list]:
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(path) for path, _ in paths_and_leaves], [leaf for _, leaf in paths_and_leaves]


def tree_checksums(tree) -> dict[str, int]:
    """A checksum per array of ``tree``, keyed by its path (computed on device, a few scalars to the host)."""
    names, leaves = _named_leaves(tree)
    return {name: int(_read_scalar(_leaf_checksum_jit(jnp.asarray(leaf)))) for name, leaf in zip(names, leaves, strict=True)}


def verify_state(state, expected: dict | None) -> str | None:
    """None when ``state`` matches ``expected`` checksums (if any) and is finite; else what is wrong."""
    names, leaves = _named_leaves(state)
    if expected is not None:
        actual = tree_checksums(state)
        differing = [name for name in names if actual[name] != expected.get(name)]
        if differing or set(expected) != set(actual):
            return f"{len(differing)} of {len(names)} arrays differ from their checksums, e.g. {differing[:1]}"
    bad = [name for name, leaf in zip(names, leaves, strict=True)
           if jnp.issubdtype(leaf.dtype, jnp.inexact) and not _read_scalar(_all_finite_jit(leaf))]
    return f"non-finite values in {len(bad)} arrays, e.g. {bad[0]}" if bad else None


def save_carry(path: Path, carry: LookaheadCarry) -> None:
    """Writes ``carry`` to ``path`` (.npz) atomically, with the process count it was split over."""
    arrays = {f"votes.{name}": np.asarray(value) for name, value in vars(carry.votes).items()}
    arrays.update({f"kept.{name}": value for name, value in carry.kept.items()})
    arrays["tables"] = np.array(json.dumps(carry.tables))
    arrays["process_count"] = np.array(jax.process_count())
    _write_npz(path, arrays)


def load_carry(path: Path) -> LookaheadCarry | None:
    """The carry saved at ``path``; None (with a warning) when there is none, or it was split over another
    number of processes (its votes would belong to other prompts). ValueError when the file is unreadable."""
    if not path.exists():
        warnings.warn(f"no lookahead carry at {path}: the next batch starts its votes afresh", stacklevel=2)
        return None
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"the lookahead carry {path} is unreadable ({type(error).__name__}: {error}); it was "
                         "cut short or overwritten: resume from an earlier step with --resume_step") from error
    if "tables" not in arrays:
        return None
    if int(arrays["process_count"]) != jax.process_count():
        warnings.warn(f"the carry at {path} was split over {int(arrays['process_count'])} processes, not "
                      f"{jax.process_count()}: the next batch starts its votes afresh", stacklevel=2)
        return None
    fields = lambda prefix: {k.split(".", 1)[1]: arrays[k] for k in arrays if k.startswith(prefix)}
    return LookaheadCarry(VoteState(**fields("votes.")), json.loads(str(arrays["tables"])), fields("kept."))


def _write_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)
