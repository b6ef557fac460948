import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from optpo_jax.tasks.arithmetic import SHIFTED, generate_problems
from optpo_jax.train.batches import batch_problems
from tests.run_configs import tiny_config

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def printed(output: str, tag: str):
    return json.loads(next(line for line in output.splitlines() if line.startswith(tag + " "))[len(tag) + 1 :])


def run_cluster(workdir: Path, steps: int, resume: bool = False) -> list[str]:
    """Runs the worker on a 2-process cluster; returns each process's output."""
    port = str(free_port())
    env = {"PYTHONPATH": str(Path(__file__).parents[2]), "PATH": "/usr/bin:/bin",
           **{name: value for name, value in os.environ.items() if name.startswith("JAX_")}}  # the session's cache
    command = [str(workdir), str(steps)] + (["--resume"] if resume else [])
    logs = [workdir.parent / f"{workdir.name}.worker{i}.{'resume' if resume else 'start'}.log" for i in range(2)]
    workers, timed_out = [], False
    try:
        for i, log in enumerate(logs):
            with log.open("w") as out:
                workers.append(subprocess.Popen([sys.executable, str(WORKER), str(i), port, *command], stdout=out,
                                                stderr=subprocess.STDOUT, text=True, env=env))
        # A crashed process leaves its peer waiting in a collective: stop both at the first failure.
        deadline = time.monotonic() + 300
        while any(worker.poll() is None for worker in workers):
            timed_out = time.monotonic() > deadline
            if timed_out or any(worker.poll() not in (None, 0) for worker in workers):
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
    outputs = [log.read_text() for log in logs]
    codes = [worker.returncode for worker in workers]
    assert codes == [0, 0], (f"return codes {codes}{' (timed out after 300 s)' if timed_out else ''}\n"
                             + outputs[0][-3000:] + outputs[1][-3000:])
    return outputs


def without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if "seconds" not in key} for record in records]


def test_two_processes_share_the_prompts_run_one_global_loop_and_resume(tmp_path):
    # Two CPU processes joined by jax.distributed (gloo collectives), 4 devices each, one 8-device mesh.
    config = tiny_config(steps=3, rows_per_wave=24)  # as in the worker
    outputs = run_cluster(tmp_path / "run", config.steps)
    summaries = [printed(out, "SUMMARY") for out in outputs]
    assert without_timings(summaries)[0] == without_timings(summaries)[1]  # the same global totals on both
    assert summaries[0]["devices"] == 8

    # Each process voted on and trained on its own half of every batch, and the totals add both halves.
    problems = generate_problems(config.data.num_prompts, SHIFTED, seed=config.data.seed)
    local = [printed(out, "LOCAL") for out in outputs]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for step in range(config.steps):
        shares = [set(process[step]["prompts"]) for process in local]
        batch = {problem.prompt for problem in batch_problems(problems, step, config.prompts_per_step, config.seed)}
        assert len(shares[0]) == len(shares[1]) == config.prompts_per_step // 2
        assert shares[0] | shares[1] == batch and not shares[0] & shares[1]
        assert lines[step + 1]["rollouts"] == local[0][step]["rollouts"] + local[1][step]["rollouts"]
        assert sum(lines[step + 1]["rollouts_per_prompt_histogram"]) == config.prompts_per_step
    assert summaries[0]["total_rollouts"] == sum(step["rollouts"] for process in local for step in process)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 3]  # written once, by the lead process
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert sorted(p.name for p in (tmp_path / "run" / "carry").iterdir()) == ["process0", "process1"]

    # Resumed from step 2 (each process restoring its own lookahead carry), step 3 is the uninterrupted one.
    for process in (0, 1):
        with np.load(tmp_path / "run" / "carry" / f"process{process}" / "2.npz") as carry:
            assert len(carry["kept.prompt_index"]) > 0  # step 3's prompts had started voting
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    resumed_outputs = run_cluster(tmp_path / "resumed", config.steps, resume=True)
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert without_timings(resumed) == without_timings(lines)
    assert [len(printed(out, "LOCAL")) for out in resumed_outputs] == [1, 1]  # only step 3 ran again
    assert not any("afresh" in out for out in resumed_outputs)  # both carries were found and used
