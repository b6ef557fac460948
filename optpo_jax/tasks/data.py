"""Loading benchmark problems from JSON / JSONL files or Hugging Face datasets."""

from __future__ import annotations

import json
from pathlib import Path

from optpo_jax.tasks.math import MathProblem


def _rows_from_file(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_number} is not valid JSON: {error}") from error
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of records, got {type(rows).__name__}")  # noqa: TRY004
    return rows


def _rows_from_hub(name: str, split: str) -> list:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"loading {name!r} from the Hugging Face hub needs `pip install datasets`") from error
    return list(datasets.load_dataset(name, split=split))


def load_problems(source: str, prompt_field: str = "prompt", answer_field: str = "answer", id_field: str = "id",
                  split: str = "test", limit: int = 0) -> list[MathProblem]:
    """Problems from a .json (list of records) or .jsonl file, or a hub dataset name.

    Raises ValueError naming the file (or dataset) and the row for a record that is not
    an object or lacks a non-empty prompt or answer field.
    """
    path = Path(source)
    if not path.exists() and (path.suffix in (".json", ".jsonl") or source.startswith((".", "/"))):
        raise FileNotFoundError(f"problem file {source} does not exist")
    rows = _rows_from_file(path) if path.exists() else _rows_from_hub(source, split)
    problems = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {index} is a {type(row).__name__}, expected an object")  # noqa: TRY004
        for field in (prompt_field, answer_field):
            if not isinstance(row.get(field), str | int | float) or str(row.get(field)).strip() == "":
                raise ValueError(f"{source}: row {index} has no usable {field!r} field (got {row.get(field)!r})")
        problems.append(MathProblem(prompt=str(row[prompt_field]), answer=str(row[answer_field]),
                                    id=str(row.get(id_field, index))))
    return problems[:limit] if limit else problems
