"""optpo_jax/train/metrics_log.py: metrics.jsonl and TensorBoard events across interruptions."""

import json
import struct
from pathlib import Path

import pytest

from optpo_jax.report import seed_stats
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.loop import train
from optpo_jax.train.metrics_log import MetricsLog, read_metrics
from optpo_jax.train.workdir import WorkdirError
from tests.run_configs import tiny_config


def _events(path: Path):
    """(step, kind) of every event in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        kind = "start" if event.HasField("session_log") else "scalar" if event.HasField("summary") else "other"
        events.append((event.step, kind))
    return events


def test_tensorboard_drops_the_interrupted_steps_on_resume(run_copy):
    Checkpointer(run_copy / "checkpoints").rewind(1)  # as if killed after step 2 was logged, before it was saved
    train(tiny_config(steps=2), run_copy, resume=True, progress=False)
    files = sorted((run_copy / "tb").glob("events.*"), key=lambda path: path.stat().st_mtime)
    assert ("start" in {kind for _, kind in _events(files[-1])}) and (2, "start") in _events(files[-1])
    # TensorBoard's purge: a START at step s discards earlier files' events at steps >= s.
    seen = []
    for path in files:
        events = _events(path)
        purge = min((step for step, kind in events if kind == "start"), default=None)
        if purge is not None:
            seen = [step for step in seen if step < purge]
        seen += [step for step, kind in events if kind == "scalar"]
    steps_logged = sorted(set(seen))
    assert steps_logged == [0, 1, 2]


LINES = [{"step": 0, "eval/pass@1": 0.25, "eval/pass@1_stderr": 0.1},
         {"step": 1, "rollouts": 8, "total_rollouts": 8, "train_seconds": 1.0},
         {"step": 2, "rollouts": 8, "total_rollouts": 16, "train_seconds": 2.0, "eval/pass@1": 0.5}]


CUT = '{"step": 3, "rollouts": 8, "total_roll'  # a kill while appending step 3


def _jsonl(records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _run_dir(path: Path, metrics: str) -> Path:
    """A finished run's files, as ``seed_stats.read_run`` reads them."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": 2, "data": {"mode": "test"}}))
    (path / "summary.json").write_text(json.dumps({"steps": 2, "after": {"pass@1": 0.5}}))
    (path / "final_eval.json").write_text(json.dumps({"per_prompt_pass@1": [0.5], "prompts_sha256": "x"}))
    (path / "metrics.jsonl").write_text(metrics)
    return path


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_jsonl(LINES) + CUT)
    with pytest.warns(UserWarning, match="last line was cut"):
        assert read_metrics(tmp_path) == LINES
    log = MetricsLog(tmp_path, truncate_after=2)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == _jsonl(LINES)
    assert read_metrics(tmp_path) == LINES


@pytest.mark.parametrize("bad", ['{"step": 1, "rollou', "", "[1, 2]"])
def test_a_malformed_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path, bad):
    lines = _jsonl(LINES).splitlines(keepends=True)
    lines[1] = bad + "\x00\n" if bad == "" else bad + "\n"  # "": a line of NUL bytes
    run = _run_dir(tmp_path / "run", "".join(lines))
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        MetricsLog(run, truncate_after=2)
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        seed_stats.read_run(run)
