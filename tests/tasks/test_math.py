"""optpo_jax/tasks/math.py: answer extraction, equivalence, MathTask prompts and the math configs."""

import contextlib
import json
import random
import re
import signal
import time
from pathlib import Path

import jax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from math_verify import parse
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

from optpo_jax.default_config import math_config, math_lora_config
from optpo_jax.tasks.data import load_problems
from optpo_jax.tasks.math import (
    MAX_ANSWER_CHARS,
    MathEquivalence,
    MathTask,
    extract_choice,
    extract_math_answer,
    last_boxed,
)
from optpo_jax.train import train
from optpo_jax.train.answer_slots import AnswerSlots
from tests.tasks.fakes import FakeTokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


MATH_SETS = ["aime_ttt.json", "amc_ttt.json", "math_ttt.json"]


def numeric_variants(answer: str) -> list[str]:
    """Other spellings of a number: leading zeros, a trailing .0, \\text{}, degrees, $...$."""
    integer = str(int(float(answer)))
    return [f"0{integer}", f"{integer}.0", f"\\text{{{integer}}}", f"{integer}^\\circ", f"${integer}$",
            f"{integer}^{{\\circ}}", integer]


def is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+(\.0+)?", text) is not None


@pytest.mark.parametrize("file", MATH_SETS)
def test_every_ground_truth_parses_and_matches_its_other_spellings(file):
    equal = MathEquivalence(timeout_seconds=2)
    problems = load_problems(str(DATA / file))
    for index, problem in enumerate(problems):
        answer = problem.answer
        assert parse(f"${answer}$"), (file, index, answer)  # math-verify reads it
        assert extract_math_answer(f"So the result is \\boxed{{{answer}}}.") == answer
        variants = [answer.replace("\\frac", "\\dfrac"), f"\\boxed{{{answer}}}"[7:-1]]
        if is_number(answer):
            variants += numeric_variants(answer)
            different = str(int(float(answer)) + 1)
        else:
            different = f"{answer}+1" if "," not in answer and "\\in" not in answer else None
        for variant in variants:
            assert equal(answer, variant), (file, index, answer, variant)
        if different is not None:
            assert not equal(answer, different), (file, index, answer, different)
    assert equal.timeouts == 0


def test_fractions_decimals_and_zero_padding():
    equal = MathEquivalence()
    assert equal("\\frac{1}{2}", "0.5") and equal("0.5", "\\dfrac{1}{2}")
    assert equal("025", "25") and equal("142.0", "142") and equal("30^\\circ", "30")
    assert not equal("\\frac{1}{3}", "0.5") and not equal("25", "250")


def test_gpqa_letters():
    problems = load_problems(str(DATA / "gpqa_ttt.json"))
    assert {p.answer for p in problems} <= set("ABCD") and len(problems) == 198
    assert extract_choice("... so the answer is (C).") == "C"
    assert extract_choice("Final: \\boxed{B}") == "B"
    assert extract_choice("\\boxed{\\text{(d)}}") == "D"
    assert extract_choice("no letter here") is None


def test_extraction_forms():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b_{2}}} end") == "\\frac{a}{b_{2}}"
    assert last_boxed("\\fbox{7}") == "7" and last_boxed("\\boxed 42$") == "42"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_math_answer("Thus the final answer is $17$.") == "17"
    assert extract_math_answer("The answer is: 3/4\n") == "3/4"
    assert extract_math_answer("nothing") is None and extract_math_answer("") is None


LATEX_PIECES = ["\\frac{", "}", "{", "\\boxed{", "\\sqrt", "^", "_", "\\left(", "\\right)", "1", "x", "+", "=",
                "\\pi", "\\dfrac", "\\text{", "$", " ", ",", ".", "\\infty", "\\cdot", "10^{100}", "!", "\\\\"]


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(LATEX_PIECES), max_size=25).map("".join)),
       st.lists(st.sampled_from(LATEX_PIECES), max_size=12).map("".join))
def test_extraction_and_equivalence_never_raise_or_hang(text, other):
    assert extract_math_answer(text) is None or isinstance(extract_math_answer(text), str)
    assert extract_choice(text) in (None, "A", "B", "C", "D")
    equal = MathEquivalence(timeout_seconds=1)
    start = time.perf_counter()
    assert equal(extract_math_answer(text) or text, other) in (True, False)
    assert time.perf_counter() - start < 4 * 1.0 + 0.5  # two parses and a verify, each bounded


def test_slots_merge_equivalent_forms_and_stay_stable_across_waves():
    equal = MathEquivalence()
    from optpo_jax.tasks.math import normalize_answer

    slots = AnswerSlots(2, 8, equivalent=equal, canonical=normalize_answer)
    first = slots.assign([0, 0, 0, 1, 0], ["\\frac{1}{2}", "0.5", "3", "025", None])
    second = slots.assign([0, 1, 0, 1], ["\\dfrac{1}{2}", "25", "3.0", "24"])
    assert list(first) == [0, 0, 1, 0, -1] and list(second) == [0, 0, 1, 1]


def test_malformed_rows_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: row 1 has no usable 'answer'"):
        load_problems(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2"):
        load_problems(str(broken))
    assert len(load_problems(str(bad.with_name("ok.json")) if False else str(DATA / "aime_ttt.json"))) == 30


QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_qwen(folder: Path, texts: list[str]) -> None:
    """A BPE tokenizer trained on ``texts`` with a Qwen-style chat template, and a random tiny Qwen2."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>", chat_template=QWEN_TEMPLATE)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


@pytest.mark.parametrize("make_config", [math_config, math_lora_config], ids=["full", "lora"])
def test_aime_config_smoke_run_on_a_tiny_random_qwen2(tmp_path, make_config):
    """Both the full fine-tuning config and the 16 GB LoRA one (remat, one-row micro-batches)."""
    problems = json.loads((DATA / "aime_ttt.json").read_text())
    write_tiny_qwen(tmp_path / "model", [p["prompt"] for p in problems])
    config = make_config("aime", "optpo")
    config.model_path = str(tmp_path / "model")
    config.model_dtype = "float32"
    config.data.num_prompts = 4
    config.prompts_per_step, config.steps, config.rows_per_wave = 2, 2, 16
    config.sprt.update({"min_samples": 2, "max_samples": 4})
    config.sampling.update({"max_new_tokens": 12, "prompt_buckets": (128, 256)})
    config.math.max_prompt_tokens = 128
    config.lora.rank = min(config.lora.rank, 16)  # the tiny model's k / v projections are 16 wide
    config.policy_update.micro_batch_rows = 8
    config.policy_update.grad_accumulation = min(config.policy_update.grad_accumulation, 8)
    config.eval.update({"every_steps": 0, "final_samples": 2})
    summary = train(config, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "rollouts" in line]
    assert len(steps) == 2 and all(2 * 2 <= s["rollouts"] <= 2 * 4 for s in steps)
    assert steps[-1]["truncated_prompts"] > 0  # long AIME prompts were cut to 128 tokens, and counted
    assert "equivalence_timeouts" in steps[-1]
    assert summary["after"]["pass@1"] == 0.0  # a random model does not solve AIME


def test_maj_at_k_votes_equivalent_answers_together(tmp_path, monkeypatch):
    """maj@k counts \\frac{1}{2} and 0.5 as one answer, as training's votes do (exact strings would pick "3")."""
    from optpo_jax.models import load_hf
    from optpo_jax.sampler import SamplingConfig
    from optpo_jax.tasks.math import MathProblem, MathTask
    from optpo_jax.train import evaluation, waves

    write_tiny_qwen(tmp_path, ["What is one half?", "What is two?"])
    policy = load_hf(str(tmp_path), dtype="float32")
    task = MathTask(policy.tokenizer)
    problems = [MathProblem("What is one half?", "\\frac{1}{2}"), MathProblem("What is two?", "2")]
    scripted = {0: ["3", "0.5", "\\dfrac{1}{2}"], 1: ["3", "2.0", "3"]}

    def scripted_wave(*args, **kwargs):
        wave = waves.sample_wave(*args, **kwargs)
        seen = {prompt: 0 for prompt in scripted}
        for row, (prompt, valid) in enumerate(zip(wave.prompt_ids, wave.valid, strict=True)):
            if valid:
                wave.answers[row] = scripted[int(prompt)][seen[int(prompt)]]
                seen[int(prompt)] += 1
        return wave

    monkeypatch.setattr(evaluation, "sample_wave", scripted_wave)
    sampling = SamplingConfig(max_new_tokens=2, stop_token_ids=task.stop_token_ids, pad_token_id=task.pad_token_id)
    result = evaluation.evaluate(policy, task, problems, 3, jax.random.key(0), sampling, rows_per_wave=6,
                                 progress=False)
    assert result.answers == [scripted[0], scripted[1]]
    assert result.correct.tolist() == [[False, True, True], [False, True, False]]
    # Prompt 0: 0.5 and \dfrac{1}{2} share a slot (2 votes) and beat "3"; prompt 1: "3" has 2 votes against "2.0".
    assert result.majority_correct.tolist() == [True, False]


EXTRACTION_BUDGET_SECONDS = 0.010  # one 3,072-token (~12.6k character) completion, any content


class Overran(BaseException):
    pass


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raises Overran in the main thread after ``seconds`` (so a quadratic regression fails, not hangs)."""
    def stop(signum, frame):
        raise Overran(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


N = 12_600  # characters in a 3,072-token completion


_rng = random.Random(0)


_SOUP = ["\\frac{", "}", "{", "\\boxed{", "\\sqrt", "^", "_", "\\left(", "\\right)", "1", "x", "+", "=", "\\pi", "\\dfrac",
         "\\text{", "$", " ", ",", ".", "\\infty", "the answer is ", "\n", "\\fbox", "\\boxed ", "final answer: ", "answer: ("]


ADVERSARIAL = {
    "repeated 'the answer is ' then $y": ("the answer is " * 1000)[: N - 2] + "$y",
    "repeated \\boxed{": ("\\boxed{" * 2000)[:N],
    "repeated \\boxed{{}": ("\\boxed{{}" * 1500)[:N],
    "repeated \\fbox, space, newline": ("\\fbox \n" * 2000)[:N],
    "repeated closed boxes": ("\\boxed{1}" * 1500)[:N],
    "spaces after an answer, then $": "the answer is 5" + " " * (N - 20) + "x$z",
    "'answer' then spaces": ("answer" + " " * 3000 + "x") * 4,
    "repeated 'final answer: $'": ("final answer: $" * 900)[:N],
    "open braces": "\\boxed{" + "{" * (N - 7),
    "random LaTeX soup": "".join(_rng.choice(_SOUP) for _ in range(5000))[:N],
    "normal": ("We compute $x^2 + 1 = 5$, so x = 2. " * 400)[: N - 40] + " The final answer is \\boxed{\\frac{1}{2}}.",
}


def best_seconds(function, text, repeats=10):
    function(text)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_extraction_of_a_3072_token_completion_takes_under_10_ms(name):
    """Item 9: any content of completion length (~12.6k characters) is read in < 10 ms
    (2 s for a 12.6k-character one before; repeated \\boxed{ was quadratic)."""
    text = ADVERSARIAL[name]
    with time_cap(2.0):
        for function in (extract_math_answer, extract_choice, last_boxed):
            seconds = best_seconds(function, text)
            assert seconds < EXTRACTION_BUDGET_SECONDS, (function.__name__, name, seconds)


def test_extraction_of_long_hostile_texts_is_linear():
    """Item 9: 'the answer is ' * 10000 + '$y' (over 4 minutes before) and '\\boxed{' * 10000
    (18 s before) take milliseconds."""
    with time_cap(5.0):
        assert best_seconds(extract_math_answer, "the answer is " * 10000 + "$y", repeats=1) < 0.2
        assert best_seconds(extract_math_answer, "\\boxed{" * 10000, repeats=1) < 0.2
        assert best_seconds(extract_choice, "answer" + " " * 100_000 + "x", repeats=1) < 0.2
    assert extract_math_answer("the answer is " * 10000 + "$y") == "y"
    assert extract_math_answer("\\boxed{" * 10000) is None


def test_an_overlong_answer_is_no_answer_never_a_truncated_one():
    """Item 9: an answer longer than MAX_ANSWER_CHARS gives None (not a prefix, not an earlier
    box), and MathTask counts it in overlong_answers."""
    fits, too_long = "1" * MAX_ANSWER_CHARS, "1" * (MAX_ANSWER_CHARS + 1)
    assert extract_math_answer(f"\\boxed{{{fits}}}") == fits
    assert extract_math_answer(f"\\boxed{{7}} then \\boxed{{{too_long}}}") is None
    assert extract_math_answer(f"\\boxed {too_long}") is None and extract_math_answer(f"\\boxed {fits}") == fits
    assert extract_math_answer(f"The answer is {fits}.") == fits
    assert extract_math_answer(f"The answer is 7.\nThe answer is {too_long}") is None
    assert extract_choice(f"\\boxed{{{too_long}}}") is None
    task = MathTask(FakeTokenizer(), multiple_choice=True)
    assert task.extract(["\\boxed{", too_long, "}"]) is None and task.overlong_answers == 1
    assert task.extract(["\\boxed{B}"]) == "B" and task.overlong_answers == 1


def _reference_last_boxed(text):
    """The previous (quadratic) last_boxed, for comparison on short texts."""
    import re

    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\b", text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            depth = 0
            for index in range(rest, len(text)):
                depth += {"{": 1, "}": -1}.get(text[index], 0)
                if depth == 0:
                    return text[rest + 1 : index].strip()
        elif rest > match.end():
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["\\boxed", "\\fbox", "{", "}", " ", "a", "1", "$", "\n", "\\boxedx"]), max_size=40)
       .map("".join))
def test_linear_last_boxed_reads_what_the_old_one_did(text):
    """Item 9: the linear brace matcher returns the same box content as the old forward scan."""
    assert last_boxed(text) == _reference_last_boxed(text)


def test_an_overlong_chat_prompt_keeps_the_chat_header_instruction_and_assistant_header(tmp_path):
    """The cut falls in the question: the template's first and last tokens (reference: the untruncated chat
    template of transformers' tokenizer) stay, and the cut is counted."""
    from optpo_jax.tasks.math import MathProblem, MathTask
    from tests.tasks.test_math import write_tiny_qwen

    question = " ".join(f"word{i}" for i in range(200))
    write_tiny_qwen(tmp_path, [question, "Please reason step by step"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    task = MathTask(tokenizer, max_prompt_tokens=90, multiple_choice=True)
    full = task._chat_tokens(question)
    assert len(full) > 90
    tokens = task.prompt_tokens(MathProblem(question, "1"))
    header, footer = task._chat_tokens("")[:3], full[-12:]  # "<|im_start|>user\n" ... instruction, assistant header
    assert len(tokens) <= 90 and tokens[:3] == header and tokens[-12:] == footer
    assert tokenizer.decode(tokens).count("word0") == 1 and task.truncated_prompts == 1
    with pytest.raises(ValueError, match=r"config.math.max_prompt_tokens=5 cannot hold the chat template"):
        MathTask(tokenizer, max_prompt_tokens=5, multiple_choice=True).prompt_tokens(MathProblem(question, "1"))
