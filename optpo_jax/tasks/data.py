"""Loading benchmark problems from JSON / JSONL files or Hugging Face datasets."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from pathlib import Path

from optpo_jax.tasks.math import MathProblem

# A hub dataset id: "name" or "org/name" of letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Suffixes (and near misses: .jsn, .jsonn, .jsnl, ...) that mark a string as a file name, not a hub id.
_FILE_SUFFIX = re.compile(r"\.(js\w*|txt|csv|tsv|parquet|arrow|gz|bz2|xz|zip|ya?ml)", re.IGNORECASE)


def _looks_like_path(source: str) -> bool:
    """True for strings that can only be a file name: no hub dataset id looks like them."""
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or not _HUB_ID.fullmatch(source)
        or bool(_FILE_SUFFIX.fullmatch(Path(source).suffix))
    )


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: not UTF-8 text at byte {error.start} (line {line}): {error.reason}; "
            "save the file as UTF-8"
        ) from error


def _exact_int(digits: str) -> int | str:
    """A JSON integer as an int, or as its digits where Python's int-string limit (4300 digits) would refuse it:
    the answer stays exact instead of failing without a file or row."""
    return int(digits) if len(digits) < 4000 else digits


def _rows_from_file(path: Path) -> list:
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a .json (list of records) or .jsonl file")
    text = _decode(path)
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line, parse_int=_exact_int))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {error}") from error
            except RecursionError as error:
                raise ValueError(f"{path}: line {line_number} nests JSON arrays / objects too deeply to read "
                                 "(a record is an object of prompt and answer fields)") from error
        return rows
    try:
        rows = json.loads(text, parse_int=_exact_int)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    except RecursionError as error:
        raise ValueError(f"{path}: nests JSON arrays / objects too deeply to read (expected a list of records, "
                         "each an object of prompt and answer fields)") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of records, got {type(rows).__name__}")  # noqa: TRY004
    return rows


def _rows_from_hub(name: str, split: str) -> list:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"no file {name!r} exists; loading it as a Hugging Face hub dataset needs `pip install datasets`"
        ) from error
    try:
        return list(datasets.load_dataset(name, split=split))
    except FileNotFoundError as error:  # datasets' DatasetNotFoundError is one
        raise FileNotFoundError(f"no such file: {name}, and no Hugging Face hub dataset of that name: {error}") from error


def _text(value, source: str, index: int, field: str) -> str:
    """A field's value as text: strings as they are, integers and finite floats as decimals."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = str(int(value)) if value.is_integer() else format(Decimal(repr(value)), "f")
    else:
        raise ValueError(
            f"{source}: row {index} has no usable {field!r} field (got {value!r}; expected a string, "
            "an integer or a finite number)"
        )
    if not text.strip():
        raise ValueError(f"{source}: row {index} has no usable {field!r} field (got {value!r})")
    return text


def load_problems(source: str, prompt_field: str = "prompt", answer_field: str = "answer", id_field: str = "id",
                  split: str = "test", limit: int = 0) -> list[MathProblem]:
    """Problems from a .json (list of records) or .jsonl file, or a hub dataset name.

    ``source`` is a file when it exists. A string that does not exist and can only be a
    path (starts with ".", "/" or "~", has a file suffix such as .json / .jsonl / .jsn, or
    more than one "/") is a FileNotFoundError "no such file"; anything else ("name" or
    "org/name") is a Hugging Face hub dataset (needs ``datasets``). Files are UTF-8 (a BOM is
    allowed); other bytes are a ValueError naming the file, the byte offset and the line.

    Prompt, answer and id values: strings are kept as they are (none may be blank);
    integers become their decimal string (``42`` -> "42"); finite floats too,
    whole ones as integers (``3.0`` -> "3", ``0.5`` -> "0.5", ``1e-7`` -> "0.0000001").
    Booleans, NaN / infinities, null, lists and objects are a ValueError naming the file
    (or dataset), the row (0-based record index) and the field. A missing id is the row
    index.

    ``limit``: keep the first ``limit`` problems; 0 keeps all (a negative or non-integer
    limit is a ValueError).

    Raises ValueError naming the file (or dataset) and the row for a record that is not
    an object or lacks a usable prompt or answer field, and naming the file for JSON nested
    too deeply to parse (instead of a RecursionError).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"load_problems: limit must be an integer >= 0 (0 keeps all problems), got {limit!r}")
    source = str(source)
    path = Path(source).expanduser()
    if not path.exists() and _looks_like_path(source):
        raise FileNotFoundError(f"no such file: {source} (a problem file; a hub dataset is named 'org/name')")
    rows = _rows_from_file(path) if path.exists() else _rows_from_hub(source, split)
    problems = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {index} is a {type(row).__name__}, expected an object")  # noqa: TRY004
        prompt, answer = (_text(row.get(field), source, index, field) for field in (prompt_field, answer_field))
        problem_id = _text(row[id_field], source, index, id_field) if id_field in row else str(index)
        problems.append(MathProblem(prompt=prompt, answer=answer, id=problem_id))
    return problems[:limit] if limit else problems
