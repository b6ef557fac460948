"""Packed update batches: each prompt once, followed by all of its completions, several prompts per row.

GRPO trains many completions of each prompt. One rollout per row pays for the prompt once
per completion and for the padding up to the longest row (the embedded task: 12,288
token slots for 8,182 real tokens, of which 3,928 are repeated prompts). Packed, the
micro-batch of that step is 4,745 tokens. A row of ``L`` tokens holds groups, a group
being one prompt and completions of it; attention (``decoder.attention_mask``) keeps
groups apart and completions of one group apart, and positions restart with each prompt,
so every target's log-probability is the one its own sequence gives (tested against the
one-rollout-per-row path).

A completion of c tokens feeds c - 1 of them: its first target is predicted by the
prompt's last token, shared by the group. A group longer than ``L`` is split over
rows, its prompt repeated in each.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def row_ladder(needed: int, multiple: int = 1) -> int:
    """The smallest of multiple x {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, ...} holding ``needed`` rows.

    Powers of two, and from 32 on half-steps too: few shapes to compile (each costs
    seconds), and never more than a third of a large batch padding.
    """
    units = max(-(-needed // multiple), 1)
    power = 1
    while True:
        for size in (power, power + power // 2) if power >= 32 else (power,):
            if size >= units:
                return size * multiple
        power *= 2


@dataclasses.dataclass
class Group:
    """One prompt and the rollout rows (of the piece) whose completions share it in a packed row."""

    prompt: np.ndarray
    rollouts: list


def _groups(prompt_keys, prompts, completion_lengths, width: int) -> list[Group]:
    """The piece's rollouts grouped by prompt, each group cut so that it fits ``width`` tokens.

    A rollout without completion tokens (a micro-batch's padding) trains nothing and is left out."""
    groups: dict = {}
    for rollout, key in enumerate(prompt_keys):
        if completion_lengths[rollout] > 0:
            groups.setdefault(key, []).append(rollout)
    cut = []
    for members in groups.values():
        prompt = prompts[members[0]]
        current = Group(prompt, [])
        used = len(prompt)
        for rollout in members:
            needed = max(completion_lengths[rollout] - 1, 0)
            if len(prompt) + needed > width:
                raise ValueError(f"a rollout of {len(prompt)} prompt + {needed} fed completion tokens is longer than "
                                 f"the packed row width {width} (packed_width widens rows to the longest)")
            if current.rollouts and used + needed > width:
                cut.append(current)
                current, used = Group(prompt, []), len(prompt)
            current.rollouts.append(rollout)
            used += needed
        cut.append(current)
    return cut


def _fill_rows(groups: list[Group], completion_lengths, width: int) -> list[list[Group]]:
    """First-fit decreasing: groups into as few rows of ``width`` tokens as it finds."""
    size = lambda group: len(group.prompt) + sum(max(completion_lengths[r] - 1, 0) for r in group.rollouts)
    rows, room = [], []
    for group in sorted(groups, key=size, reverse=True):
        need = size(group)
        for index, free in enumerate(room):
            if need <= free:
                rows[index].append(group)
                room[index] -= need
                break
        else:
            rows.append([group])
            room.append(width - need)
    return rows


def packed_width(prompt_lengths, completion_lengths, pack_width: int, bucket: int) -> int:
    """Tokens per packed row: ``pack_width``, or the longest single sequence (rounded up to ``bucket``) if longer."""
    longest = int(np.max(prompt_lengths + np.maximum(completion_lengths - 1, 0), initial=1))
    if bucket:
        longest = -(-longest // bucket) * bucket
    return max(pack_width, longest)


def plan_rows(prompt_lengths, completion_lengths, prompt_keys, prompts, num_pieces: int,
              width: int) -> list[list[list[Group]]]:
    """Per piece (rollout r goes to piece r % num_pieces), the packed rows: lists of groups."""
    plans = []
    for piece in range(num_pieces):
        members = np.arange(piece, len(prompt_lengths), num_pieces)
        groups = _groups([prompt_keys[r] for r in members], [prompts[r] for r in members],
                         completion_lengths[members], width)
        for group in groups:
            group.rollouts = [int(members[r]) for r in group.rollouts]
        plans.append(_fill_rows(groups, completion_lengths, width))
    return plans


def pack_rows(plans, prompt_lengths, completions, completion_lengths, num_rows: int, width: int,
              completion_width: int, row_offset: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a packed micro-batch from ``plan_rows``.

    Pieces are interleaved: packed row p of piece m is row p * num_pieces + m, so that a
    strided split into num_pieces micro-batches (``grpo.accumulate_gradients``) gives each
    its own rows; ``row_offset`` (this process's first row inside a micro-batch: process
    index x num_rows) places the target indices of a multi-process batch.

    Args:
      plans: ``plan_rows``'s output.
      prompt_lengths, completion_lengths: [N] of the rollouts.
      completions: [N, >= completion_width] completion tokens.
      num_rows: packed rows per piece (>= the longest plan).
      width: tokens per packed row.
      completion_width: T, columns of the per-rollout arrays.
      row_offset: see above.

    Returns:
      tokens, positions, groups, branches [num_pieces * num_rows, width] (position -1 on
      padding) and target_index, target_tokens, loss_mask [N, T].
    """
    num_pieces = len(plans)
    shape = (num_pieces * num_rows, width)
    tokens, positions = np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
    groups, branches = np.full(shape, -1, np.int32), np.zeros(shape, np.int32)
    num_rollouts = len(prompt_lengths)
    target_index = np.zeros((num_rollouts, completion_width), np.int32)
    columns = np.arange(completion_width)
    for piece, rows in enumerate(plans):
        if len(rows) > num_rows:
            raise ValueError(f"piece {piece} packs into {len(rows)} rows, more than num_rows={num_rows}")
        for row_in_piece, row_groups in enumerate(rows):
            row = row_in_piece * num_pieces + piece
            flat_row = (row_offset + row_in_piece) * width
            column = 0
            for group_number, group in enumerate(row_groups):
                prompt_length = len(group.prompt)
                span = slice(column, column + prompt_length)
                tokens[row, span], positions[row, span] = group.prompt, np.arange(prompt_length)
                groups[row, span] = group_number
                last_prompt = column + prompt_length - 1
                column += prompt_length
                for branch, rollout in enumerate(group.rollouts, start=1):
                    fed = max(completion_lengths[rollout] - 1, 0)
                    span = slice(column, column + fed)
                    tokens[row, span] = completions[rollout, :fed]
                    positions[row, span] = prompt_length + np.arange(fed)
                    groups[row, span], branches[row, span] = group_number, branch
                    # Target 0 is predicted by the prompt's last token, target t by fed token t - 1.
                    index = np.where(columns == 0, last_prompt, column + columns - 1)
                    target_index[rollout] = flat_row + np.clip(index, 0, width - 1)
                    column += fed
    loss_mask = columns[None, :] < completion_lengths[:, None]
    target_index = np.where(loss_mask, target_index, row_offset * width)
    target_tokens = np.where(loss_mask, completions[:, :completion_width], 0).astype(np.int32)
    return {"input_tokens": tokens, "positions": positions, "groups": groups, "branches": branches,
            "target_index": target_index, "target_tokens": target_tokens, "loss_mask": loss_mask}
