"""One process of a 2-process CPU "cluster" (4 virtual devices each) running a few loop steps.

    python tests/train/multihost_worker.py PROCESS_ID PORT WORKDIR STEPS [--resume]

Prints the run's summary and, per step, the prompts this process trained on and its rollouts.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, workdir, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
resume = "--resume" in sys.argv
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import json

from optpo_jax.train import loop
from optpo_jax.train.setup import build_setup
from tests.run_configs import tiny_config

local_steps = []


def recording_training_step(state, learner, problems, *args, **kwargs):
    result = training_step(state, learner, problems, *args, **kwargs)
    rollouts = result[1].rollouts
    local_steps.append({"prompts": [problem.prompt for problem in problems],
                        "rollouts": len(rollouts.prompt_index)})
    return result


def layout_error(mesh: dict) -> str:
    config = tiny_config()
    config.mesh.update(mesh)
    try:
        build_setup(config)
    except ValueError as error:
        return str(error)
    return ""


# Several processes need a mesh, and a tensor axis across hosts would give two processes the same rows.
assert "must span" in layout_error({"data": 1, "fsdp": 1, "tensor": 1})
assert "tensor axis within a host" in layout_error({"data": 1, "fsdp": 1, "tensor": 8})
training_step, loop.training_step = loop.training_step, recording_training_step
config = tiny_config(steps=steps, rows_per_wave=24)  # several waves a step: spare rows start the next batch
config.mesh.data = -1  # 8 devices over 2 processes
summary = loop.train(config, workdir, resume=resume, progress=False)
print("SUMMARY " + json.dumps({"devices": jax.device_count(), **summary}), flush=True)
print("LOCAL " + json.dumps(local_steps), flush=True)
