"""Math benchmarks (AIME, AMC, MATH-500, GPQA): chat prompts, answer extraction and equivalence.

Extraction takes the last ``\\boxed{...}`` (nested braces) or ``\\fbox{...}``, then falls back
to "the answer is ..."; for multiple choice, a letter A-D. Equivalence first compares a
normalised string (``\\dfrac`` -> ``\\frac``, ``025`` -> ``25``, ``142.0`` -> ``142``,
``\\text{}``, degrees, spaces), then asks math-verify under a per-call time limit: a call
that runs out counts as "not equal" and is counted in ``timeouts``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from math_verify import parse, verify
from math_verify.errors import TimeoutException

TTRL_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final choice within \\boxed{}."


@dataclasses.dataclass(frozen=True)
class MathProblem:
    """A benchmark question and its reference answer (LaTeX or a letter)."""

    prompt: str
    answer: str
    id: str = ""


def _balanced(text: str, start: int) -> str | None:
    """The content of the brace group opening at ``text[start] == '{'``, or None if unclosed."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), or None."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b", text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _balanced(text, rest)
            if content is not None:
                return content.strip()
        elif rest > match.end():
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)?\s*:?\s*\$*([^\n$]+?)\$*\s*(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_CHOICE = re.compile(r"(?:answer|choice|option)\s*(?:is|:)?\s*:?\s*\(?\*{0,2}([A-D])\b", re.IGNORECASE)


def extract_math_answer(text: str) -> str | None:
    """The final answer of a completion as a string, or None. Never raises."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    matches = _ANSWER_IS.findall(text)
    return matches[-1].strip() if matches and matches[-1].strip() else None


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-D from a completion, or None. Never raises."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed:
        content = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", boxed).strip().strip("()").strip()
        return content.upper() if re.fullmatch(r"[A-Da-d]", content) else None
    matches = _CHOICE.findall(text)
    return matches[-1].upper() if matches else None


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


class MathEquivalence:
    """``equivalence(a, b) -> bool`` with a per-call time limit; counts calls and timeouts."""

    def __init__(self, timeout_seconds: int = 2):
        if timeout_seconds < 1:
            raise ValueError(f"timeout_seconds must be a whole number >= 1, got {timeout_seconds}")
        self.timeout_seconds = int(timeout_seconds)
        self.calls = 0
        self.timeouts = 0

    def __call__(self, first: str, second: str) -> bool:
        if first is None or second is None:
            return False
        if normalize_answer(first) == normalize_answer(second):
            return True
        self.calls += 1
        try:
            gold = parse(f"${first}$", parsing_timeout=self.timeout_seconds, raise_on_error=True)
            target = parse(f"${second}$", parsing_timeout=self.timeout_seconds, raise_on_error=True)
            if not gold or not target:
                return False
            try:
                return verify(gold, target, timeout_seconds=self.timeout_seconds, raise_on_error=True)
            except TimeoutException:
                raise
            except Exception:  # noqa: BLE001 - one bad pair: let math-verify compare the others
                return verify(gold, target, timeout_seconds=self.timeout_seconds, raise_on_error=False)
        except TimeoutException:
            self.timeouts += 1
            return False
        except Exception:  # noqa: BLE001 - malformed LaTeX is "not equal", never a crash
            return False


class MathTask:
    """The task interface (as ArithmeticTask) for chat models on math benchmarks.

    Prompts are the tokenizer's chat template around ``question + instruction``; a prompt
    longer than ``max_prompt_tokens`` keeps its last tokens (the template's assistant
    header) and is counted in ``truncated_prompts``.
    """

    def __init__(self, tokenizer, instruction: str = TTRL_INSTRUCTION, max_prompt_tokens: int = 1024,
                 multiple_choice: bool = False, timeout_seconds: int = 2):
        self.tokenizer = tokenizer
        self.instruction = instruction
        self.max_prompt_tokens = max_prompt_tokens
        self.multiple_choice = multiple_choice
        self.equivalent = MathEquivalence(timeout_seconds)  # votes: its timeouts are the reported ones
        self.grader = MathEquivalence(timeout_seconds)  # ground truth, for metrics only
        self.canonical = normalize_answer
        self.truncated_prompts = 0
        self._prompt_cache: dict = {}
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        self.stop_token_ids = tuple(sorted(t for t in stops if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id))

    def prompt_tokens(self, problem: MathProblem) -> list[int]:
        """The chat-formatted prompt, tokenized once per problem (so each truncation is counted once)."""
        if problem not in self._prompt_cache:
            self._prompt_cache[problem] = self._tokenize(problem)
        return self._prompt_cache[problem]

    def _tokenize(self, problem: MathProblem) -> list[int]:
        content = f"{problem.prompt}\n{self.instruction}" if self.instruction else problem.prompt
        tokens = self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True, tokenize=True)
        tokens = list(tokens["input_ids"] if hasattr(tokens, "keys") else tokens)
        if len(tokens) > self.max_prompt_tokens:
            self.truncated_prompts += 1
            tokens = tokens[-self.max_prompt_tokens :]
        return tokens

    def extract(self, completion_tokens: Sequence[int]) -> str | None:
        text = self.tokenizer.decode(list(completion_tokens), skip_special_tokens=True)
        return extract_choice(text) if self.multiple_choice else extract_math_answer(text)

    def is_correct(self, answer, problem: MathProblem) -> bool:
        if answer is None:
            return False
        if self.multiple_choice:
            return answer.strip().upper() == problem.answer.strip().upper()
        return self.grader(problem.answer, answer)
