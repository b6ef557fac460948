"""optpo_jax/tasks/data.py: load_problems on real, hostile and malformed data files."""

import json
import re
import sys
from pathlib import Path

import pytest

from optpo_jax.tasks.data import load_problems

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


BENCHMARKS = ("aime_ttt.json", "amc_ttt.json", "gpqa_ttt.json", "math_ttt.json")


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


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_100000_deep_is_a_value_error_naming_the_file(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=rf"deep\{suffix}: .*too deeply"):
        load_problems(str(path))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_5000_digit_integer_answer_loads_exactly(tmp_path, suffix):
    """Python refuses int <-> str over 4300 digits; the loader once raised that with no file or row."""
    from optpo_jax.tasks.data import load_problems

    record = '{"prompt": "p", "answer": ' + "9" * 5000 + "}"
    path = tmp_path / f"big{suffix}"
    path.write_text(f"[{record}]" if suffix == ".json" else record + "\n")
    assert load_problems(str(path))[0].answer == "9" * 5000
