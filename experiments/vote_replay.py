"""Replays recorded self-consistency votes (../shared/data/vote_samples) as a policy.

Each question's recorded answers, in the order they were sampled, stand in for the
rollouts a policy would draw: the n-th rollout of a question is its n-th recorded
answer. Answers are mapped to slots in order of first appearance; an empty string
(no answer extracted) is slot -1. ``replay`` feeds them through a stopping rule wave
by wave.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.sprt import VoteState, init_vote_state, rank_within_prompt, sprt_update

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "vote_samples"
DATASETS = {"gsm8k": "consol_gsm8k_gpt-4o-mini.jsonl", "medqa": "consol_medqa_gpt-4o-mini.jsonl"}


@dataclasses.dataclass(frozen=True)
class VoteSamples:
    """slots: [Q, N] int32 answer slot per recorded rollout (-1 none);
    truth_slots: [Q] int32 slot of the true answer (-1 if never sampled);
    full_majority: [Q] int32 consensus slot over all N votes (-1 if no vote);
    tokens: [Q, N] int32 generated tokens of each recorded rollout, None if the file has none."""

    name: str
    slots: np.ndarray
    truth_slots: np.ndarray
    full_majority: np.ndarray
    tokens: np.ndarray | None = None


def load_vote_samples(name: str, data_dir: Path = DEFAULT_DATA_DIR) -> VoteSamples:
    """Loads one of the shared data sets of recorded votes (``DATASETS``) from ``data_dir``."""
    path = Path(data_dir) / DATASETS[name]
    if not path.exists():
        raise FileNotFoundError(f"vote samples not found at {path} (pass --data-dir)")
    return load_vote_file(path, name)


def load_vote_file(path: Path, name: str | None = None) -> VoteSamples:
    """Loads recorded votes from a .jsonl file (one question a line: ``answers`` in sampling order,
    ``truth``); raises naming the file and line on bad rows. ``name`` defaults to the file's stem."""
    path = Path(path)
    name = name or path.stem
    slots, truth_slots, tokens = [], [], []
    with path.open() as lines:
        for line_number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                answers, truth = row["answers"], row["truth"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path}:{line_number}: malformed row ({error})") from error
            slot_of = {}
            for answer in answers:
                if answer != "" and answer not in slot_of:
                    slot_of[answer] = len(slot_of)
            slots.append([slot_of.get(a, -1) if a != "" else -1 for a in answers])
            truth_slots.append(slot_of.get(truth, -1))
            tokens.append(row.get("tokens"))
    lengths = {len(s) for s in slots}
    if len(lengths) != 1:
        raise ValueError(f"{path}: questions have different numbers of answers {sorted(lengths)}")
    slots = np.asarray(slots, np.int32)
    counts = np.stack([np.bincount(row[row >= 0], minlength=slots.shape[1]) for row in slots])
    full_majority = np.where(counts.max(1) > 0, counts.argmax(1), -1).astype(np.int32)
    has_tokens = all(row is not None and len(row) == slots.shape[1] for row in tokens)
    return VoteSamples(name, slots, np.asarray(truth_slots, np.int32), full_majority,
                       np.asarray(tokens, np.int32) if has_tokens else None)


def every_question(state: VoteState, num_rows: int, config) -> tuple[jax.Array, jax.Array]:
    """The fixed schedule, an allocator like ``allocate_wave``: ``num_rows // Q`` rows for each of the Q questions,
    in question order (sprt_update ignores the rows of questions that have stopped)."""
    num_questions = state.done.shape[0]
    prompt_ids = jnp.repeat(jnp.arange(num_questions, dtype=jnp.int32), num_rows // num_questions)
    return prompt_ids, jnp.ones(prompt_ids.shape, bool)


def replay_wave(state: VoteState, answers: jax.Array, prior_state, *, allocate, num_rows: int, config):
    """One wave of one batch of questions: ``allocate`` hands out the rows, each row reads its question's next
    recorded answer (``answers`` [Q, N]), ``sprt_update`` counts them. (new state, rows that carried a recorded
    answer to a question still running)."""
    prompt_ids, valid = allocate(state, num_rows, config)
    num_answers = answers.shape[1]
    index = state.num_samples[prompt_ids] + rank_within_prompt(prompt_ids, valid)
    recorded = valid & (index < num_answers)  # past its last recorded answer a question has nothing to replay
    slots = jnp.where(recorded, answers[prompt_ids, jnp.minimum(index, num_answers - 1)], -1)
    new_state = sprt_update(state, prompt_ids, slots, recorded, config, prior_state=prior_state)
    return new_state, jnp.sum(recorded & ~state.done[prompt_ids])


@functools.partial(jax.jit, static_argnames=("allocate", "num_rows", "config"))
def _replay_batches(states: VoteState, answers: jax.Array, prior_state, *, allocate, num_rows: int, config):
    """``replay_wave`` on every batch at once (states [B, Q], answers [B, Q, N]); the prior is shared.
    (new states, [B] rows used, [B] whether each batch still has a question running)."""
    wave = functools.partial(replay_wave, prior_state=prior_state, allocate=allocate, num_rows=num_rows,
                             config=config)
    new_states, used = jax.vmap(wave)(states, answers)
    return new_states, used, ~jnp.all(new_states.done, axis=-1)


@dataclasses.dataclass(frozen=True)
class Replay:
    """votes: the final VoteState, [B, Q] like the replayed batches;
    waves: [B] waves each batch ran until all of its questions had stopped;
    used_rows: rows, over all waves and batches, that carried a recorded answer to a question still running."""

    votes: VoteState
    waves: np.ndarray
    used_rows: int

    def votes_by_question(self) -> VoteState:
        """The final votes as one VoteState of all B x Q questions, batch after batch."""
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), self.votes)


def replay(batches: np.ndarray, config, rows_per_wave: int, allocate=every_question, prior_state=None) -> Replay:
    """Feeds recorded answer slots ``batches`` [B, Q, N] (B independent batches of Q questions) through the
    stopping rule ``config`` (an SPRTConfig) wave by wave, ``rows_per_wave`` rows per batch per wave handed out by
    ``allocate(state, rows, config) -> (prompt_ids, valid)``, until every question has stopped or has no recorded
    answer left. ``prior_state``: a learned prior for the rule (None: ``config.prior``)."""
    num_batches, num_questions, num_answers = batches.shape
    answers = jnp.asarray(batches)
    votes = jax.vmap(lambda _: init_vote_state(num_questions, num_answers))(jnp.arange(num_batches))
    waves, used_rows = np.zeros(num_batches), 0
    running = np.full(num_batches, num_questions > 0)
    while running.any():
        new_votes, used, still_running = _replay_batches(votes, answers, prior_state, allocate=allocate,
                                                         num_rows=rows_per_wave, config=config)
        used = int(np.asarray(used).sum())
        if used == 0:  # the questions still running have no recorded answer left
            break
        votes, waves, used_rows = new_votes, waves + running, used_rows + used
        running = np.asarray(still_running)
    return Replay(votes, waves, used_rows)
