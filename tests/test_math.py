import json
import re
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
from optpo_jax.tasks.math import MathEquivalence, extract_choice, extract_math_answer, last_boxed
from optpo_jax.train import train
from optpo_jax.train.answer_slots import AnswerSlots

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
