"""optpo_jax/train/memory_plan.py: the memory plan against XLA's compiled memory analysis, and its errors."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from optpo_jax.default_config import arithmetic_config, math_config
from optpo_jax.models.config import PRESETS
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.memory_compiled import compiled_peak
from optpo_jax.train.memory_plan import check_fits, format_plan, parse_bytes, plan_memory, run_shape

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# Three shapes of the embedded task whose peaks fall in different places: the update of full
# fine-tuning, the update of LoRA (merged kernels, adapters' optimizer state), a large wave's KV cache.
# (Not remat: XLA:CPU keeps the activations anyway, so a CPU run cannot check that term.)
CASES = {
    "full fine-tuning, update-bound": {"policy_update.micro_batch_rows": 64, "sampling.max_new_tokens": 64},
    "LoRA rank 16": {"lora.rank": 16, "policy_update.micro_batch_rows": 128},
    "sampling-bound": {"rows_per_wave": 1024, "policy_update.micro_batch_rows": 32, "sampling.max_new_tokens": 96},
    # PPO: a critic beside the policy (its weights, optimizer state, gradients and activations).
    "PPO, full fine-tuning": {"algorithm": "ppo", "policy_update.micro_batch_rows": 64, "sampling.max_new_tokens": 64},
    "PPO, LoRA rank 16": {"algorithm": "ppo", "lora.rank": 16, "policy_update.micro_batch_rows": 128},
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
    # PPO's critic is its own adapters over the same frozen base: adapters and their state, not a second model.
    grpo = plan_memory(run_shape(_config_file("qwen2p5_math_1p5b_math500_lora")))
    ppo = plan_memory(run_shape(_config_file("qwen2p5_math_1p5b_math500_lora_ppo")))
    assert ppo.total < sixteen_gb and ppo.critic == ppo.trained == grpo.trained > 0
    assert ppo.optimizer_state == 2 * grpo.optimizer_state and ppo.total > grpo.total


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


def test_a_prompt_past_the_models_context_is_refused_by_the_plan_naming_the_fields():
    """math.max_prompt_tokens=5000 padded to the bucket 8192, on a 1,024-token model."""
    config = math_config("math500")
    config.math.max_prompt_tokens = 5000
    config.sampling.prompt_buckets = (128, 8192)
    model = dataclasses.replace(PRESETS["qwen2.5-math-1.5b"], max_position_embeddings=1024)
    with pytest.raises(ConfigError, match=r"config\.math\.max_prompt_tokens=5000 \(padded to 8192 .*"
                                          r"config\.sampling\.prompt_buckets=\(128, 8192\)\) \+ "
                                          r"config\.sampling\.max_new_tokens=3072 = 11264 tokens exceed .*"
                                          r"max_position_embeddings=1024"):
        run_shape(config, model)
    run_shape(math_config("math500"))  # the shipped config: 1024 + 3072 = the model's 4096 exactly


@pytest.mark.parametrize("text", ["abc", "1e400GB", "0GB", "1.2.3GB", "nanGB"])
def test_a_bad_device_memory_is_a_config_error(text):
    with pytest.raises(ConfigError, match=rf"--device_memory must be .*got {text!r}"):
        parse_bytes(text)
