import json
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_run_the_loop_on_one_global_mesh(tmp_path):
    # Two CPU processes joined by jax.distributed (gloo collectives), 4 devices each, one 8-device mesh.
    port = str(free_port())
    env = {"PYTHONPATH": f"{Path(__file__).parent}:{Path(__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs[0][-3000:] + outputs[1][-3000:]
    summaries = [json.loads(next(line for line in out.splitlines() if line.startswith("SUMMARY "))[8:])
                 for out in outputs]
    for summary in summaries:
        summary.pop("train_seconds")
    assert summaries[0] == summaries[1] and summaries[0]["devices"] == 8  # the same global computation on both
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 2]  # written once, by the lead process
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
