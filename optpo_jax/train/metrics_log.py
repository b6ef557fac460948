"""Per-step metrics as JSON lines and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from tensorboardX import SummaryWriter

from optpo_jax.train.workdir import read_json_lines, write_atomically


class MetricsLog:
    """Appends ``{"step": s, ...}`` lines to metrics.jsonl and scalars to TensorBoard (workdir/tb).

    On resume, lines of steps after ``truncate_after`` (written after the checkpoint the
    run restarts from) and the final evaluation are dropped, so the file reads like one
    uninterrupted run; so is a last line cut by the kill (a malformed line before it is a
    WorkdirError naming the line). The file is rewritten atomically.
    """

    def __init__(self, workdir: str | Path, truncate_after: int | None = None, enabled: bool = True):
        self.enabled = enabled  # False on all but the lead process of a multi-host run
        self.path = Path(workdir) / "metrics.jsonl"
        if not enabled:
            return
        if truncate_after is not None and self.path.exists():
            # A resumed run writes its own final evaluation, also when it extends a finished one.
            records, _ = read_json_lines(self.path)  # a cut last line was written after the checkpoint: dropped
            kept = [record for record in records if record["step"] <= truncate_after and not _is_final(record)]
            write_atomically(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        # TensorBoard drops the events at and after purge_step written by the interrupted run.
        purge_step = truncate_after + 1 if truncate_after is not None and truncate_after >= 0 else None
        self.writer = SummaryWriter(str(Path(workdir) / "tb"), purge_step=purge_step)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name.replace("@", "_at_"), value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()



def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of ``workdir``'s metrics.jsonl in file order: the one reader of the file.

    A last line cut by an interrupted write is left out with a warning; a malformed line
    before it is a WorkdirError naming the line (``workdir.read_json_lines``).
    """
    path = Path(workdir) / "metrics.jsonl"
    records, cut = read_json_lines(path)
    if cut:
        warnings.warn(f"{path}: its last line was cut by an interrupted write and is left out", stacklevel=2)
    return records


def _is_final(record: dict) -> bool:
    return any(name.startswith("final/") for name in record)
