"""Math benchmarks (AIME, AMC, MATH-500, GPQA): chat prompts, answer extraction and equivalence.

Extraction takes the last ``\\boxed{...}`` (nested braces) or ``\\fbox{...}``, then falls back
to "the answer is ..."; for multiple choice, a letter A-D. Its work is linear in the
completion's length whatever the content (about a millisecond for 3,072 tokens), and an
answer longer than ``MAX_ANSWER_CHARS`` is no answer (``None``), never cut short into a
different one; ``MathTask`` counts those in ``overlong_answers``.

Equivalence first compares a normalised string (``\\dfrac`` -> ``\\frac``, ``025`` -> ``25``,
``142.0`` -> ``142``, ``\\text{}``, degrees, spaces) and two different integers, in this
process; anything else goes to math-verify in a grading worker process
(``optpo_jax.tasks.grading``) under a hard per-call time limit that works from any thread:
a call that runs out is "not equal" and is counted in ``timeouts``. An answer must parse as
a whole: ``\\sin 2 \\cup`` is not ``2`` (``grading_worker.parse_whole``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from optpo_jax.tasks.grading import GradingPool, default_pool

TTRL_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final choice within \\boxed{}."

MAX_ANSWER_CHARS = 1000
"""Longest extracted answer, in characters (reference answers of the bundled benchmarks have
at most 53). A longer ``\\boxed{...}`` content, ``\\boxed`` token or "the answer is ..."
sentence is no answer: never truncated, and no earlier answer is taken in its place."""

MAX_ANSWER_PHRASES = 16
"""The "the answer is ..." fallback tries at most this many of the last such phrases."""


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """A benchmark question and its reference answer (LaTeX or a letter)."""

    prompt: str
    answer: str
    id: str = ""


class _Overlong(Exception):
    """The answer found is longer than MAX_ANSWER_CHARS."""


_BOX = re.compile(r"\\(?:boxed|fbox)\b( *)")
_BOX_TOKEN = re.compile(rf"[^\s$]{{1,{MAX_ANSWER_CHARS + 1}}}")


class _BraceDepths:
    """Brace depth after each character (``{`` +1, ``}`` -1), computed once with numpy.

    The ``{`` at ``i`` closes at the first later character where the depth drops below its
    own: the same brace as counting depth forward from ``i``. Whether it closes at all is
    one lookup in the suffix minimum, so trying every box of a text is linear.
    """

    def __init__(self, text: str):
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        self.depth = np.cumsum((codes == ord("{")).astype(np.int64) - (codes == ord("}")))
        self.suffix_min = np.minimum.accumulate(self.depth[::-1])[::-1]

    def close(self, index: int) -> int | None:
        """Index of the ``}`` that closes the ``{`` at ``index``; None if it never closes.
        Raises _Overlong when it closes more than MAX_ANSWER_CHARS characters later."""
        level = self.depth[index]
        if index + 1 >= len(self.depth) or self.suffix_min[index + 1] >= level:
            return None
        window = self.depth[index + 1 : index + 2 + MAX_ANSWER_CHARS]
        below = np.flatnonzero(window < level)
        if below.size == 0:
            raise _Overlong
        return index + 1 + int(below[0])


def _last_boxed(text: str) -> str | None:
    """last_boxed, raising _Overlong when the last answer is longer than MAX_ANSWER_CHARS."""
    boxes = list(_BOX.finditer(text))
    depths = None
    for box in reversed(boxes):
        rest = box.end()
        if text.startswith("{", rest):
            if depths is None:
                depths = _BraceDepths(text)
            closing = depths.close(rest)
            if closing is None:
                continue  # unclosed: an earlier box may hold the answer
            return text[rest + 1 : closing].strip()
        if box.group(1):
            token = _BOX_TOKEN.match(text, rest)
            if token:
                if len(token.group(0)) > MAX_ANSWER_CHARS:
                    raise _Overlong
                return token.group(0)
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), or None.

    A box whose brace never closes is skipped for the one before it; a last answer longer
    than ``MAX_ANSWER_CHARS`` gives None. Linear time.
    """
    try:
        return _last_boxed(text)
    except _Overlong:
        return None


# "the answer is X." - X runs to the first sentence end, newline, "$" or the end of the text.
# Possessive quantifiers and a capture that must end on a non-space character keep each try
# linear in the text it reads; the capture is capped at MAX_ANSWER_CHARS.
_ANSWER_PHRASE = re.compile(r"final answer|the answer", re.IGNORECASE)
_ANSWER_TAIL = re.compile(
    rf"\s*+(?:is|:)?\s*+:?\s*+\$*+([^\n$]{{0,{MAX_ANSWER_CHARS - 1}}}?[^\s$])\$*+[^\S\n]*+(?:\.\s|\.$|\n|$)",
    re.IGNORECASE,
)
_ANSWER_START = re.compile(r"\s*+(?:is|:)?\s*+:?\s*+\$*+", re.IGNORECASE)
_LONG_RUN = re.compile(rf"[^\n$]{{{MAX_ANSWER_CHARS + 1}}}")
_CHOICE = re.compile(r"(?:answer|choice|option)\s*+(?:is|:)?\s*+:?\s*+\(?\*{0,2}([A-D])\b", re.IGNORECASE)


def _answer_phrase(text: str) -> str | None:
    """X of the last "the answer is X" / "final answer: X" that reads as one; raises _Overlong."""
    phrases = collections.deque((match.end() for match in _ANSWER_PHRASE.finditer(text)), maxlen=MAX_ANSWER_PHRASES)
    for end in reversed(phrases):
        found = _ANSWER_TAIL.match(text, end)
        if found:
            return found.group(1).strip()
        if _LONG_RUN.match(text, _ANSWER_START.match(text, end).end()):
            raise _Overlong  # no sentence end within MAX_ANSWER_CHARS
    return None


def _extract_math_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    return _answer_phrase(text) or None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a completion as a string, or None. Never raises; linear time.

    The last ``\\boxed{...}``; without one, the last "the answer is X" (X up to a sentence
    end, newline or ``$``, of the last ``MAX_ANSWER_PHRASES`` such phrases). An answer
    longer than ``MAX_ANSWER_CHARS`` gives None.
    """
    if not isinstance(text, str):
        return None
    try:
        return _extract_math_answer(text)
    except _Overlong:
        return None


def _extract_choice(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed:
        content = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed).strip().strip("()").strip()
        return content.upper() if re.fullmatch(r"[A-Da-d]", content) else None
    matches = _CHOICE.findall(text)
    return matches[-1].upper() if matches else None


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-D from a completion, or None. Never raises; linear time."""
    if not isinstance(text, str):
        return None
    try:
        return _extract_choice(text)
    except _Overlong:
        return None


def normalize_answer(answer: str) -> str:
    """A canonical string for the common spellings of one answer (cheap, exact matches only)."""
    text = answer.strip().strip("$").strip()
    text = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", text)
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ ", "", text)
    text = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", text)
    text = text.replace(" ", "").rstrip(".")
    number = re.fullmatch(r"([+-]?)0*(\d+)(?:\.0*)?", text)
    if number:
        return number.group(1).replace("+", "") + number.group(2)
    return text


_INTEGER = re.compile(r"-?\d+")


class MathEquivalence:
    """``equivalence(a, b) -> bool`` under a hard per-call time limit; counts calls and timeouts.

    Identical normalised strings are equal and two different integers are not, without a
    worker; other pairs are checked by math-verify in ``pool`` (default: the process's
    shared ``grading.default_pool()``) within ``timeout_seconds`` (plus the pool's grace
    before a stuck worker is killed). Safe to call from any thread. Verdicts are cached per
    pair (``cache_size`` pairs), timeouts included, so a pathological answer that repeats
    costs one timeout. A pair whose worker died (killed, crashed) is checked again on a
    fresh worker (the pool's ``retries``); an error is "not equal" for this call only and is
    never cached, so the next call with that pair checks it again.

    Counters: ``calls`` (pairs sent to a worker), ``timeouts`` (of those, ran out of time;
    counted as not equal), ``errors`` (math-verify failed unexpectedly, or the pair's worker
    died on every try; not equal this once).
    """

    def __init__(self, timeout_seconds: float = 2, pool: GradingPool | None = None, cache_size: int = 1 << 14):
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)) \
                or not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be a finite number of seconds > 0, got {timeout_seconds!r}")
        self.timeout_seconds = float(timeout_seconds)
        self.pool = pool
        self.cache_size = int(cache_size)
        self.calls = 0
        self.timeouts = 0
        self.errors = 0
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _fast(self, first: str, second: str) -> bool | None:
        one, other = normalize_answer(first), normalize_answer(second)
        if one == other:
            return True
        if _INTEGER.fullmatch(one) and _INTEGER.fullmatch(other):
            return False  # normalize_answer wrote both without leading zeros or '+': different integers
        return None

    def __call__(self, first: str, second: str) -> bool:
        if not isinstance(first, str) or not isinstance(second, str):
            return False
        fast = self._fast(first, second)
        if fast is not None:
            return fast
        key = (first, second)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            self.calls += 1
        result, status = (self.pool or default_pool()).equal(first, second, self.timeout_seconds)
        with self._lock:
            if status == "timeout":
                self.timeouts += 1
            elif status == "error":
                self.errors += 1
            if self.cache_size > 0 and status != "error":  # an error is no verdict
                self._cache[key] = result
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return result

    def many(self, pairs: Iterable[tuple[str, str]]) -> list[bool]:
        """``[self(a, b) for a, b in pairs]``, checked on all of the pool's workers at once."""
        pairs = list(pairs)
        workers = (self.pool or default_pool()).size
        if len(pairs) < 2 or workers < 2:
            return [self(first, second) for first, second in pairs]
        with ThreadPoolExecutor(workers) as executor:
            return list(executor.map(lambda pair: self(*pair), pairs))


class MathTask:
    """The task interface (as ArithmeticTask) for chat models on math benchmarks.

    Prompts are the tokenizer's chat template around ``question + instruction``; a prompt
    longer than ``max_prompt_tokens`` loses the end of its question (the template, the
    instruction and the assistant header stay) and is counted in ``truncated_prompts``. A completion whose answer is longer than
    ``MAX_ANSWER_CHARS`` has no answer and is counted in ``overlong_answers``. Creating the
    task starts the grading workers (``grading.default_pool()``) so that they import
    math-verify while the model loads.
    """

    def __init__(self, tokenizer, instruction: str = TTRL_INSTRUCTION, max_prompt_tokens: int = 1024,
                 multiple_choice: bool = False, timeout_seconds: float = 2):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.max_prompt_tokens = max_prompt_tokens
        self.multiple_choice = multiple_choice
        self.equivalent = MathEquivalence(timeout_seconds)  # votes: its timeouts are the reported ones
        self.grader = MathEquivalence(timeout_seconds)  # ground truth, for metrics only
        self.canonical = normalize_answer
        self.truncated_prompts = 0
        self.overlong_answers = 0
        self._prompt_cache: dict = {}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_token_ids = tuple(sorted(t for t in stops if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id))
        if not multiple_choice:
            default_pool().start()

    def prompt_tokens(self, problem: MathProblem) -> list[int]:
        """The chat-formatted prompt, tokenized once per problem (so each truncation is counted once)."""
        if problem not in self._prompt_cache:
            self._prompt_cache[problem] = self._tokenize(problem)
        return self._prompt_cache[problem]

    def _chat_tokens(self, question: str) -> list[int]:
        content = f"{question}\n{self.instruction}" if self.instruction else question
        tokens = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=True)
        return list(tokens["input_ids"] if hasattr(tokens, "keys") else tokens)

    def prompt_length(self, problem: MathProblem) -> int:
        """Tokens of the prompt as ``prompt_tokens`` will give it (cut to ``max_prompt_tokens``), without counting
        a cut: what the setup checks against the prompt buckets before any wave."""
        if problem in self._prompt_cache:
            return len(self._prompt_cache[problem])
        return min(len(self._chat_tokens(problem.prompt)), self.max_prompt_tokens)

    def _tokenize(self, problem: MathProblem) -> list[int]:
        """The chat prompt; an over-long one loses the end of its question, never the template's header,
        the instruction or the assistant header (without them the model does not answer in format)."""
        tokens = self._chat_tokens(problem.prompt)
        if len(tokens) <= self.max_prompt_tokens:
            return tokens
        self.truncated_prompts += 1
        question = self.tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        keep = len(question) - (len(tokens) - self.max_prompt_tokens)
        while keep > 0:  # re-tokenizing a cut can merge tokens differently: shorten until it fits
            tokens = self._chat_tokens(self.tokenizer.decode(question[:keep]))
            if len(tokens) <= self.max_prompt_tokens:
                return tokens
            keep -= len(tokens) - self.max_prompt_tokens
        raise ValueError(f"config.math.max_prompt_tokens={self.max_prompt_tokens} cannot hold the chat template "
                         f"and the instruction ({len(self._chat_tokens(''))} tokens without the question)")

    def extract(self, completion_tokens: Sequence[int]) -> str | None:
        text = self.tokenizer.decode(list(completion_tokens), skip_special_tokens=True)
        try:
            return _extract_choice(text) if self.multiple_choice else _extract_math_answer(text)
        except _Overlong:
            self.overlong_answers += 1
            return None

    def is_correct(self, answer, problem: MathProblem) -> bool:
        if answer is None:
            return False
        if self.multiple_choice:
            return answer.strip().upper() == problem.answer.strip().upper()
        return self.grader(problem.answer, answer)
