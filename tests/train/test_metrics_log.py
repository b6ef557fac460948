"""optpo_jax/train/metrics_log.py: metrics.jsonl and TensorBoard events across interruptions."""

import struct
from pathlib import Path

import pytest

from optpo_jax.report import seed_stats
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.loop import train
from optpo_jax.train.metrics_log import MetricsLog, read_metrics
from optpo_jax.train.workdir import WorkdirError
from tests.metrics_files import CUT_LINE, METRICS_LINES, jsonl, run_dir
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


def test_a_cut_last_metrics_line_is_dropped_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(jsonl(METRICS_LINES) + CUT_LINE)
    with pytest.warns(UserWarning, match="last line was cut"):
        assert read_metrics(tmp_path) == METRICS_LINES
    log = MetricsLog(tmp_path, truncate_after=2)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == jsonl(METRICS_LINES)
    assert read_metrics(tmp_path) == METRICS_LINES


@pytest.mark.parametrize("bad", ['{"step": 1, "rollou', "", "[1, 2]"])
def test_a_malformed_metrics_line_before_the_last_is_an_error_naming_the_line(tmp_path, bad):
    lines = jsonl(METRICS_LINES).splitlines(keepends=True)
    lines[1] = bad + "\x00\n" if bad == "" else bad + "\n"  # "": a line of NUL bytes
    run = run_dir(tmp_path / "run", "".join(lines))
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        MetricsLog(run, truncate_after=2)
    with pytest.raises(WorkdirError, match=r"metrics.jsonl, line 2: not a JSON record"):
        seed_stats.read_run(run)
