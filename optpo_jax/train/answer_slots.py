"""Per-prompt answer tables: which vote slot each extracted answer goes to."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class AnswerSlots:
    """Maps each prompt's answers to slot ids 0, 1, 2, ... in order of first appearance.

    Slots stay stable across waves, so ``sprt_update`` can keep counting into them. Answers
    with the same ``canonical(answer)`` (default: the answer itself) share a slot at dict
    cost; with ``equivalent`` (a predicate on two answers) a new answer also joins the
    first earlier slot it is equivalent to (e.g. ``0.5`` and ``\\frac{1}{2}``).
    """

    def __init__(self, num_prompts: int, num_slots: int, equivalent: Callable | None = None,
                 canonical: Callable | None = None):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.equivalent = equivalent
        self.canonical = canonical
        self.tables: list[list] = [[] for _ in range(num_prompts)]
        self.lookups: list[dict] = [{} for _ in range(num_prompts)]

    @classmethod
    def for_task(cls, task, num_prompts: int, num_slots: int) -> AnswerSlots:
        """Tables that group answers the way ``task`` does (its ``canonical`` form and ``equivalent``, if any)."""
        return cls(num_prompts, num_slots, getattr(task, "equivalent", None), getattr(task, "canonical", None))

    def select(self, prompts: slice) -> AnswerSlots:
        """The tables of ``prompts`` (a slice), sharing the grouping functions."""
        selected = AnswerSlots(0, self.num_slots, self.equivalent, self.canonical)
        selected.tables, selected.lookups = self.tables[prompts], self.lookups[prompts]
        return selected

    def _slot(self, prompt: int, answer) -> int:
        lookup, table = self.lookups[prompt], self.tables[prompt]
        key = self.canonical(answer) if self.canonical else answer
        if key in lookup:
            return lookup[key]
        slot = next((i for i, known in enumerate(table) if self.equivalent and self.equivalent(known, answer)), None)
        if slot is None:
            if len(table) == self.num_slots:
                raise ValueError(
                    f"prompt {prompt} has more than num_slots={self.num_slots} distinct answers; "
                    "num_slots must be at least SPRTConfig.max_samples"
                )
            table.append(answer)
            slot = len(table) - 1
        lookup[key] = slot
        return slot

    def assign(self, prompt_ids: Sequence[int], answers: Sequence) -> np.ndarray:
        """[R] int32 slot of each row's answer; -1 where the answer is None."""
        return np.array(
            [-1 if answer is None else self._slot(int(p), answer) for p, answer in zip(prompt_ids, answers, strict=True)],
            np.int32,
        )

    def answer(self, prompt: int, slot: int):
        """The answer stored in ``slot`` of ``prompt`` (the first form seen), or None for -1."""
        return None if slot < 0 else self.tables[prompt][slot]

    def restore(self, prompt: int, table: list) -> None:
        """Sets a prompt's table to ``table`` exactly (slot i = table[i]), e.g. from a carry or checkpoint.

        The equivalence is not re-run: a check that timed out before might succeed now and
        shift every later slot away from the votes already counted in it.
        """
        self.tables[prompt] = list(table)
        self.lookups[prompt] = {}
        for slot, answer in enumerate(table):
            self.lookups[prompt].setdefault(self.canonical(answer) if self.canonical else answer, slot)
