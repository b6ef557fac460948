"""metrics.jsonl lines and a finished run's files, for the tests of their writer and their readers."""

import json
from pathlib import Path

METRICS_LINES = [{"step": 0, "eval/pass@1": 0.25, "eval/pass@1_stderr": 0.1},
                 {"step": 1, "rollouts": 8, "total_rollouts": 8, "train_seconds": 1.0},
                 {"step": 2, "rollouts": 8, "total_rollouts": 16, "train_seconds": 2.0, "eval/pass@1": 0.5}]

CUT_LINE = '{"step": 3, "rollouts": 8, "total_roll'  # a kill while appending step 3


def jsonl(records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def run_dir(path: Path, metrics: str) -> Path:
    """A finished run's files, as ``report.seed_stats.read_run`` reads them, with ``metrics`` as its metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": 2, "data": {"mode": "test"}}))
    (path / "summary.json").write_text(json.dumps({"steps": 2, "after": {"pass@1": 0.5}}))
    (path / "final_eval.json").write_text(json.dumps({"per_prompt_pass@1": [0.5], "prompts_sha256": "x"}))
    (path / "metrics.jsonl").write_text(metrics)
    return path
