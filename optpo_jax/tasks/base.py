"""The task interface: what the training loop and the evaluator ask of a task.

A task turns a problem into prompt tokens, a completion into an answer (or None), and,
for metrics only (or for the ``ground_truth`` reward), grades an answer against the
problem's reference. ``ArithmeticTask`` (the embedded task) and ``MathTask`` (chat models
on math benchmarks) implement it; your own needs nothing from this package but the
methods below:

    class LetterCountTask:
        stop_token_ids = (tokenizer.eos_token_id,)
        pad_token_id = tokenizer.pad_token_id
        def prompt_tokens(self, problem): return tokenizer(problem.prompt)["input_ids"]
        def extract(self, completion_tokens): ...   # the answer, hashable, or None
        def is_correct(self, answer, problem): return answer == problem.answer

and reaches a run as ``train(config, workdir, task=LetterCountTask())`` or, from the command
line, ``--config.task=my_module:make_task`` with ``make_task(config, tokenizer) -> task``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Task(Protocol):
    """Prompts, answer extraction and grading, as the training loop and evaluator use them.

    Required:
      stop_token_ids: token ids that end a completion (the EOS of the model's chat format).
      pad_token_id: the id prompts and finished rows are padded with.
      prompt_tokens(problem) -> list[int]: the prompt of one problem, tokenized. Called once
        per problem per batch; a task may cache. It must raise rather than silently cut a
        prompt it cannot fit (or count what it cut, as ``MathTask.truncated_prompts``).
      extract(completion_tokens) -> Hashable | None: the answer of one completion (its tokens
        up to the stop token), None when it has none. Answers are the votes: equal answers
        vote together.
      is_correct(answer, problem) -> bool: whether ``answer`` (from ``extract``, possibly
        None) is right for ``problem``. Read only for metrics and the ``ground_truth`` reward.

    Optional (looked up with ``getattr``):
      canonical(answer) -> Hashable: answers with the same canonical form share a vote slot.
      equivalent(first, second) -> bool: a new answer also joins the first earlier slot it is
        equivalent to (e.g. ``0.5`` and ``\\frac{1}{2}``; ``MathTask`` uses math-verify).
      problems(config) -> (train_problems, held_out_problems or None): where the prompts come
        from; without it they are ``tasks.data.load_problems(config.data.path, ...)``.
      prompt_length(problem) -> int: the prompt's tokens as ``prompt_tokens`` will give them, for the setup's
        check against ``sampling.prompt_buckets`` (without it: ``len(prompt_tokens(problem))``, or no check
        for a task that counts its cuts in ``truncated_prompts``).
      truncated_prompts, overlong_answers: running counts, reported in the step metrics.
    """

    stop_token_ids: tuple[int, ...]
    pad_token_id: int

    def prompt_tokens(self, problem: Any) -> list[int]: ...

    def extract(self, completion_tokens: Sequence[int]) -> Hashable | None: ...

    def is_correct(self, answer: Any, problem: Any) -> bool: ...


TaskFactory = Callable[[Any, Any], Task]
"""``factory(config, tokenizer) -> Task``: ``tokenizer`` is the policy's (None for the shipped policy)."""


def check_task(task: Any, source: str) -> Task:
    """``task`` if it has what ``Task`` requires; else a ValueError naming ``source`` and what is missing."""
    missing = [name for name in ("stop_token_ids", "pad_token_id", "prompt_tokens", "extract", "is_correct")
               if not hasattr(task, name)]
    if missing:
        raise ValueError(f"{source}: the task {type(task).__name__} lacks {', '.join(missing)} (see tasks.base.Task)")
    if not callable(task.prompt_tokens) or not callable(task.extract) or not callable(task.is_correct):
        raise ValueError(f"{source}: prompt_tokens, extract and is_correct must be methods (see tasks.base.Task)")  # noqa: TRY004
    return task


def import_factory(spec: str) -> TaskFactory:
    """The factory ``module:function`` names (``config.task="my_tasks:make_task"``); errors name ``spec``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"config.task must be a built-in task name or 'module:factory', got {spec!r}")
    if os.getcwd() not in sys.path:  # as `python -m` does: a module beside the user is found from the console script
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"config.task={spec!r}: cannot import module {module_name!r}: {error}") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"config.task={spec!r}: module {module_name!r} has no callable {attribute!r}")  # noqa: TRY004
    return factory
