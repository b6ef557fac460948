"""The memory plan against what XLA allocates on this backend, for a few shapes of the embedded task.

    python experiments/plan_vs_compiled.py

Prints, per shape, the plan's bytes (``optpo-jax plan``) and the compiled executables'
(``memory_compiled.compiled_peak``: one update micro-batch and one wave, compiled, not run),
and their ratio. The same shapes (but the remat one) are tests/train/test_memory_plan.py's.
"""

from optpo_jax.default_config import arithmetic_config
from optpo_jax.train.memory_compiled import compiled_peak
from optpo_jax.train.memory_plan import plan_memory, run_shape

SHAPES = {
    "full fine-tuning, 64-row micro-batch, 64 new tokens": {"policy_update.micro_batch_rows": 64,
                                                           "sampling.max_new_tokens": 64},
    "LoRA rank 16, 128-row micro-batch": {"lora.rank": 16, "policy_update.micro_batch_rows": 128},
    "waves of 1024 rows x 96 new tokens": {"rows_per_wave": 1024, "policy_update.micro_batch_rows": 32,
                                           "sampling.max_new_tokens": 96},
    "the default (256-row micro-batch)": {},
    "the default with remat": {"remat": True},
}


def main():
    print("| shape | planned update MB | compiled update MB | planned sampling MB | compiled sampling MB "
          "| planned / compiled peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, overrides in SHAPES.items():
        config = arithmetic_config("optpo")
        config.update_from_flattened_dict(overrides)
        plan, compiled = plan_memory(run_shape(config)), compiled_peak(config)
        print(f"| {name} | {(plan.persistent + plan.update) / 1e6:.0f} | {compiled['update'] / 1e6:.0f} "
              f"| {(plan.persistent + plan.sampling) / 1e6:.0f} | {compiled['sampling'] / 1e6:.0f} "
              f"| {plan.total / compiled['total']:.2f} |")


if __name__ == "__main__":
    main()
