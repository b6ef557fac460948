"""One process of a 2-process CPU "cluster" (4 virtual devices each) running a few loop steps.

    python tests/multihost_worker.py PROCESS_ID PORT WORKDIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

import json

from test_loop import tiny_config

from optpo_jax.experiment import train

config = tiny_config(steps=2)
config.mesh.data = -1  # 8 devices over 2 processes
summary = train(config, workdir, progress=False)
print("SUMMARY " + json.dumps({"devices": jax.device_count(), **summary}), flush=True)
