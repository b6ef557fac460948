"""Hostile inputs to the loaders: checkpoints without tokenizers, dtypes as objects, bad data files.

Issue 15, items 11 (``load_hf``) and 12 (``load_problems``).
"""

import json
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_checkpoints import VOCAB, tiny_tokenizer, write_checkpoint

from optpo_jax.models import load_hf, preset
from optpo_jax.tasks.data import load_problems

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = ("aime_ttt.json", "amc_ttt.json", "gpqa_ttt.json", "math_ttt.json")


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    write_checkpoint("qwen2", folder)
    return folder


def _without_tokenizer(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    for file in target.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or file.suffix == ".jinja":
            file.unlink()
    return target


def test_missing_tokenizer_files_are_named(qwen2_folder, tmp_path):
    """Item 11: no tokenizer files -> an error naming them and the directory, not a 1-token tokenizer."""
    bare = _without_tokenizer(qwen2_folder, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*bare.*tokenizer\.json.*load_tokenizer=False"):
        load_hf(bare)
    # Weights only: no tokenizer files needed.
    model = load_hf(bare, load_tokenizer=False)
    assert model.tokenizer is None
    assert model(np.array([[5, 6, 7]])).shape == (1, 3, VOCAB)
    # With the files, the tokenizer is the real one.
    assert len(load_hf(qwen2_folder).tokenizer) == VOCAB


def test_tokenizer_larger_than_the_embedding_is_an_error(qwen2_folder, tmp_path):
    """Item 11: a tokenizer whose ids exceed the embedding rows (another model's) is named, not clipped."""
    other = shutil.copytree(qwen2_folder, tmp_path / "other")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["extra_a", "extra_b"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=rf"{VOCAB + 2} tokens.*{VOCAB} rows"):
        load_hf(other)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (jnp.dtype("float32"), "float32"),
     (jnp.float32, "float32"), ("bfloat16", "bfloat16")],
)
def test_dtypes_as_jax_users_pass_them(qwen2_folder, dtype, name):
    """Item 11: ``dtype=jnp.bfloat16``, ``np.float32``, ``jnp.dtype(...)`` work like the strings."""
    model = load_hf(qwen2_folder, dtype=dtype, load_tokenizer=False)
    assert model.config.param_dtype == model.config.compute_dtype == name
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(name)}
    hash(model.config)  # still static under jit
    mixed = load_hf(qwen2_folder, dtype=dtype, compute_dtype=jnp.float32, load_tokenizer=False)
    assert (mixed.config.param_dtype, mixed.config.compute_dtype) == (name, "float32")
    assert preset("qwen2.5-0.5b-instruct", param_dtype=dtype).param_dtype == name


@pytest.mark.parametrize(
    ("argument", "bad"),
    [("dtype", jnp.float16), ("dtype", "float16"), ("dtype", "bf16"), ("dtype", float), ("dtype", None),
     ("dtype", 3), ("compute_dtype", jnp.int32)],
)
def test_unknown_dtype_names_the_argument_and_the_choices(qwen2_folder, argument, bad):
    """Item 11: an unknown dtype is a ValueError naming the argument and listing what is accepted."""
    with pytest.raises(ValueError, match=rf"load_hf\({argument}=\.\.\.\) must be one of \('float32', 'bfloat16'\)"):
        load_hf(qwen2_folder, load_tokenizer=False, **{argument: bad})


def test_non_utf8_file_is_named_with_byte_and_line(tmp_path):
    """Item 12: bytes that are not UTF-8 -> ValueError naming the file, the byte offset and the line."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl: not UTF-8 text at byte 46 \(line 2\): invalid continuation byte"):
        load_problems(str(latin))
    # A UTF-8 byte order mark is not content.
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"prompt": "caf\u00e9", "answer": "2"}]).encode())
    assert load_problems(str(marked))[0].prompt == "caf\u00e9"


def test_missing_paths_are_no_such_file_and_hub_names_go_to_the_hub(tmp_path, monkeypatch):
    """Item 12: a path with a typo is "no such file: <path>", not "pip install datasets"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.json").write_text('[{"prompt": "a", "answer": "1"}]')
    assert len(load_problems("data/x.json")) == 1
    for typo in ("data/x.jsn", "data/x.jsonn", "x.jsonl", "./data/x", "/nowhere/x", "data/sub/x", "data\\x.json"):
        with pytest.raises(FileNotFoundError, match="^no such file: " + re.escape(typo) + " "):
            load_problems(typo)
    with pytest.raises(ValueError, match=r"data is a directory"):
        load_problems("data")
    # Hub ids ("name", "org/name", dots in names) go to the hub loader; without `datasets` the
    # message says both that no such file exists and what the hub needs.
    monkeypatch.setitem(sys.modules, "datasets", None)
    for hub_name in ("org/name", "gsm8k", "Qwen/Qwen2.5-data"):
        with pytest.raises(ImportError, match=rf"no file '{hub_name}' exists.*pip install datasets"):
            load_problems(hub_name)


def test_non_string_values_are_converted_or_named(tmp_path):
    """Item 12: integers / finite floats become decimals; booleans, NaN, inf, null, lists are errors."""
    good = tmp_path / "good.jsonl"
    rows = [{"prompt": "p0", "answer": 42, "id": 7}, {"prompt": "p1", "answer": 3.0},
            {"prompt": "p2", "answer": 0.5}, {"prompt": "p3", "answer": 1e-7}, {"prompt": "p4", "answer": "\\frac{1}{2}"},
            {"prompt": "p5", "answer": -12}]
    good.write_text("\n".join(json.dumps(row) for row in rows))
    problems = load_problems(str(good))
    assert [p.answer for p in problems] == ["42", "3", "0.5", "0.0000001", "\\frac{1}{2}", "-12"]
    assert [p.id for p in problems] == ["7", "1", "2", "3", "4", "5"]
    for value in ("true", "false", "NaN", "Infinity", "-Infinity", "null", "[1]", '{"a": 1}', '"  "'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(f'{{"prompt": "a", "answer": "1"}}\n\n{{"prompt": "b", "answer": {value}}}\n')
        with pytest.raises(ValueError, match=r"bad\.jsonl: row 1 has no usable 'answer' field"):
            load_problems(str(bad))
    for field, value in (("prompt", "true"), ("id", "false"), ("id", "null")):
        row = {"prompt": '"p"', "answer": '"1"', field: value}
        bad = tmp_path / "bad.json"
        bad.write_text("[" + "{" + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}]")
        with pytest.raises(ValueError, match=rf"bad\.json: row 0 has no usable '{field}' field \(got (True|False|None)"):
            load_problems(str(bad))
    for limit in (-1, 2.5, True):
        with pytest.raises(ValueError, match="limit must be an integer >= 0"):
            load_problems(str(good), limit=limit)
    assert len(load_problems(str(good), limit=2)) == 2


@pytest.mark.parametrize("file", BENCHMARKS)
def test_benchmark_files_load_exactly_as_written(file):
    """Item 12: the four benchmark files load unchanged (every value a string, kept as it is)."""
    raw = json.loads((DATA / file).read_text(encoding="utf-8"))
    problems = load_problems(str(DATA / file))
    assert [(p.prompt, p.answer, p.id) for p in problems] == [(r["prompt"], r["answer"], r["id"]) for r in raw]
    assert len(problems) == {"aime_ttt.json": 30, "amc_ttt.json": 83, "gpqa_ttt.json": 198, "math_ttt.json": 500}[file]
