"""The memory plan (optpo_jax.train.memory_plan) against XLA's compiled memory analysis on CPU
(``compiled_peak``: the executables' buffer assignment, since CPU devices have no memory_stats)."""

import importlib.util
from pathlib import Path

import pytest

from optpo_jax.default_config import arithmetic_config
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.memory_plan import check_fits, compiled_peak, format_plan, parse_bytes, plan_memory, run_shape

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Three shapes of the embedded task whose peaks fall in different places: the update of full
# fine-tuning, the update of LoRA (merged kernels, adapters' optimizer state), a large wave's KV cache.
# (Not remat: XLA:CPU keeps the activations anyway, so a CPU run cannot check that term.)
CASES = {
    "full fine-tuning, update-bound": {"policy_update.micro_batch_rows": 64, "sampling.max_new_tokens": 64},
    "LoRA rank 16": {"lora.rank": 16, "policy_update.micro_batch_rows": 128},
    "sampling-bound": {"rows_per_wave": 1024, "policy_update.micro_batch_rows": 32, "sampling.max_new_tokens": 96},
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_within_20_percent_of_the_compiled_peak(case):
    config = arithmetic_config("optpo")
    config.update_from_flattened_dict(CASES[case])
    measured = compiled_peak(config)
    planned = plan_memory(run_shape(config))
    assert 0.8 <= planned.total / measured["total"] <= 1.2, (planned, measured)
    # And the phase that sets the peak is the one the plan says.
    assert (planned.sampling > planned.update) == (measured["sampling"] > measured["update"])


def _config_file(name: str, method: str = "optpo"):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(method)


def test_the_1p5b_lora_configs_fit_16gb_and_full_fine_tuning_does_not():
    """The architecture comes from the preset named like the hub model: no download."""
    sixteen_gb = parse_bytes("16GB")
    for method in ("optpo", "ttrl"):
        lora = plan_memory(run_shape(_config_file("qwen2p5_math_1p5b_math500_lora", method)))
        assert lora.total < sixteen_gb
        assert lora.reference == 0 and lora.trained < 0.1 * lora.params
    full = plan_memory(run_shape(_config_file("qwen2p5_math_1p5b_math500")))
    assert full.total > sixteen_gb and full.reference == full.params


def test_a_run_that_does_not_fit_names_the_fields_to_change():
    config = _config_file("qwen2p5_math_1p5b_math500")
    shape = run_shape(config)
    with pytest.raises(ConfigError, match="config.lora.rank") as error:
        check_fits(config, shape.model, parse_bytes("16GB"))
    assert "does NOT fit" in str(error.value) and "config.mesh.fsdp" in str(error.value)
    assert "grad_accumulation" not in str(error.value)  # its micro-batches are one row already
    config.remat, config.policy_update.grad_accumulation = False, 1
    with pytest.raises(ConfigError, match="config.remat = True") as error:
        check_fits(config, shape.model, parse_bytes("80GB"))
    assert "double config.policy_update.grad_accumulation" in str(error.value)
    check_fits(config, shape.model, None)  # unknown device memory (CPU): nothing to check
    assert "fits" in format_plan(plan_memory(shape), parse_bytes("100TB"))


@pytest.mark.parametrize("text, expected", [("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("1.5e9", 1_500_000_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_names_a_bad_size():
    with pytest.raises(ValueError, match="--device_memory.*'16 parsecs'"):
        parse_bytes("16 parsecs")
