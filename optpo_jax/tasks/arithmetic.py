"""The embedded task: multi-term sums with written intermediate steps, and a distribution shift.

A prompt is a sum of 2 to 5 numbers written least-significant digit first (``403+583=``
is 304 + 385); the completion writes every running partial sum, also reversed, and ends
with EOS: ``403+583+12=`` -> ``986,9071$`` (689, then 1709). Reversed digits make
addition learnable by a small model (carries flow left to right), and the running sums
are the "reasoning" whose slips make sampled answers disagree.

The source distribution (pretraining) has mostly 2-4 terms and 5% 5-term sums; the
shifted test distribution has only 5-term sums: rare in training, so a small model is
unsure on them, errs in varied ways, and its majority vote beats its single samples.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD, BOS, EOS = "_", "^", "$"
ALPHABET = PAD + BOS + EOS + "0123456789+,="
POLICY_DIR = Path(__file__).parent / "arith_policy"


class CharTokenizer:
    """One token per character of ALPHABET: pad 0, bos 1, eos 2, digits, '+', ',', '='."""

    def __init__(self, alphabet: str = ALPHABET):
        self.alphabet = alphabet
        self.ids = {char: index for index, char in enumerate(alphabet)}
        self.pad_id, self.bos_id, self.eos_id = self.ids[PAD], self.ids[BOS], self.ids[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.ids))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.alphabet!r}")
        return [self.ids[char] for char in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.alphabet[int(t)] if 0 <= int(t) < len(self.alphabet) else "?" for t in token_ids)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Sums whose term count is drawn from ``term_weights`` and each term's digit count
    uniformly from ``digits`` (inclusive range)."""

    term_weights: dict
    digits: tuple[int, int] = (1, 3)


SOURCE = Distribution(term_weights={2: 0.3167, 3: 0.3167, 4: 0.3166, 5: 0.05})
SHIFTED = Distribution(term_weights={5: 1.0})


@dataclasses.dataclass(frozen=True)
class Problem:
    """One sum: its terms, the prompt text (without BOS) and the integer answer."""

    terms: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(_reversed_digits(t) for t in self.terms) + "="

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def solution(self) -> str:
        """The completion a perfect model writes: reversed running sums, then EOS."""
        partial_sums = np.cumsum(self.terms)[1:]
        return ",".join(_reversed_digits(int(s)) for s in partial_sums) + EOS


def _reversed_digits(number: int) -> str:
    return str(number)[::-1]


def generate_problems(num_problems: int, distribution: Distribution, seed: int) -> list[Problem]:
    """``num_problems`` sums drawn from ``distribution``; the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    counts = np.array(sorted(distribution.term_weights))
    weights = np.array([distribution.term_weights[c] for c in counts], np.float64)
    low, high = distribution.digits
    problems = []
    for num_terms in rng.choice(counts, size=num_problems, p=weights / weights.sum()):
        num_digits = rng.integers(low, high + 1, size=num_terms)
        smallest = np.where(num_digits == 1, 0, 10 ** (num_digits - 1))
        terms = rng.integers(smallest, 10**num_digits)
        problems.append(Problem(tuple(int(t) for t in terms)))
    return problems


_COMPLETION = re.compile(r"^\d+(,\d+)*$")


def extract_answer(completion: str) -> int | None:
    """The final answer of a completion, or None when there is none. Never raises.

    The completion counts up to its first EOS; it must have one (a truncated completion
    has no answer) and be comma-separated reversed numbers; the answer is the last.
    """
    if not isinstance(completion, str) or EOS not in completion:
        return None
    body = completion[: completion.index(EOS)]
    if not _COMPLETION.match(body):
        return None
    return int(body.rsplit(",", 1)[-1][::-1])


class ArithmeticTask:
    """The embedded task (``tasks.base.Task``): character tokens, reversed running sums, exact answers."""

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.stop_token_ids = (self.tokenizer.eos_id,)
        self.pad_token_id = self.tokenizer.pad_id

    def prompt_tokens(self, problem: Problem) -> list[int]:
        return [self.tokenizer.bos_id, *self.tokenizer.encode(problem.prompt)]

    def extract(self, completion_tokens: Sequence[int]) -> int | None:
        return extract_answer(self.tokenizer.decode(completion_tokens))

    def is_correct(self, answer, problem: Problem) -> bool:
        return answer is not None and answer == problem.answer

    def problems(self, config) -> tuple[list[Problem], list[Problem]]:
        """(training, held-out) prompts: ``config.data.num_prompts`` shifted sums each, seeded apart."""
        num_prompts, data = config.data.num_prompts, config.data
        return (generate_problems(num_prompts, SHIFTED, seed=data.seed),
                generate_problems(num_prompts, SHIFTED, seed=data.held_out_seed))


def load_policy(path: str | Path = POLICY_DIR):
    """The shipped policy (an ``HFModel`` of our decoder) trained by experiments/pretrain_arith.py."""
    from optpo_jax.models import load_hf

    return load_hf(path, load_tokenizer=False)
