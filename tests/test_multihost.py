import json
import socket
import subprocess
import sys
from pathlib import Path

from test_loop import tiny_config

from optpo_jax.experiment import batch_problems
from optpo_jax.tasks.arithmetic import SHIFTED, generate_problems

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def printed(output: str, tag: str):
    return json.loads(next(line for line in output.splitlines() if line.startswith(tag + " "))[len(tag) + 1 :])


def test_two_processes_share_the_prompts_and_run_one_global_loop(tmp_path):
    # Two CPU processes joined by jax.distributed (gloo collectives), 4 devices each, one 8-device mesh.
    port = str(free_port())
    env = {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs[0][-3000:] + outputs[1][-3000:]
    summaries = [printed(out, "SUMMARY") for out in outputs]
    for summary in summaries:
        summary.pop("train_seconds")
    assert summaries[0] == summaries[1] and summaries[0]["devices"] == 8  # the same global totals on both

    # Each process voted on and trained on its own half of every batch, and the totals add both halves.
    config = tiny_config(steps=2)
    problems = generate_problems(config.data.num_prompts, SHIFTED, seed=config.data.seed)
    local = [printed(out, "LOCAL") for out in outputs]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for step in range(config.steps):
        shares = [set(process[step]["prompts"]) for process in local]
        batch = {problem.prompt for problem in batch_problems(problems, step, config.prompts_per_step, config.seed)}
        assert len(shares[0]) == len(shares[1]) == config.prompts_per_step // 2
        assert shares[0] | shares[1] == batch and not shares[0] & shares[1]
        assert lines[step + 1]["rollouts"] == local[0][step]["rollouts"] + local[1][step]["rollouts"]
        assert sum(lines[step + 1]["rollouts_per_prompt_histogram"]) == config.prompts_per_step
    assert summaries[0]["total_rollouts"] == sum(step["rollouts"] for process in local for step in process)

    assert [line["step"] for line in lines] == [0, 1, 2, 2]  # written once, by the lead process
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert sorted(p.name for p in (tmp_path / "carry").iterdir()) == ["process0", "process1"]
