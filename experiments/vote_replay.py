"""Replays recorded self-consistency votes (../shared/data/vote_samples) as a policy.

Each question's recorded answers, in the order they were sampled, stand in for the
rollouts a policy would draw: the n-th rollout of a question is its n-th recorded
answer. Answers are mapped to slots in order of first appearance; an empty string
(no answer extracted) is slot -1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

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
