"""LoRA adapters (optpo_jax.models.lora): exact at B = 0, merged export against transformers'
PyTorch model, adapters-only export against peft's own loader, and training that touches
only the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from optpo_jax.grpo import GRPOBatch, token_logprobs
from optpo_jax.models import LoRAConfig, init_adapters, load_hf, load_peft_adapters, merge_adapters, save_hf
from optpo_jax.models.lora import PROJECTIONS
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.setup import build_setup
from tests.hf_checkpoints import write_checkpoint
from tests.run_configs import tiny_config

TOKENS = np.array([[1, 5, 9, 17, 33, 60, 2, 7], [1, 88, 4, 4, 12, 95, 40, 3]], np.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    torch_model = write_checkpoint("qwen2", folder)
    return folder, torch_model, load_hf(folder)


def _random_adapters(params, lora, seed=1):
    """Adapters with B drawn too (B = 0 would hide a wrong A or scale)."""
    adapters = init_adapters(params, lora, seed=seed)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.1 * jax.random.normal(next(keys), leaf.shape) if path[-1].key == "lora_b" else leaf,
        adapters)


def test_zero_b_gives_the_base_logits_exactly(checkpoint):
    _, _, model = checkpoint
    lora = LoRAConfig(rank=4, alpha=8.0)
    adapters = init_adapters(model.params, lora)
    merged = merge_adapters(model.params, adapters, lora)
    base_logits = np.asarray(model(TOKENS))
    merged_logits = np.asarray(type(model)(model.config, merged)(TOKENS))
    np.testing.assert_array_equal(merged_logits, base_logits)


def test_merge_is_w_plus_scaled_a_b_on_the_targets_only(checkpoint):
    """Closed form in numpy: W' = W + alpha / rank * A @ B on q_proj and down_proj; every other leaf unchanged."""
    _, _, model = checkpoint
    lora = LoRAConfig(rank=2, alpha=6.0, targets="q_proj,down_proj")
    adapters = _random_adapters(model.params, lora)
    merged = merge_adapters(model.params, adapters, lora)
    changed = 0
    flat_base = dict(jax.tree_util.tree_flatten_with_path(model.params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        base = np.asarray(flat_base[path])
        if names[-2] == "kernel" and names[-3] in ("q_proj", "down_proj"):
            adapter = adapters["layers"][str(names[1])][names[2]][names[3]]
            expected = base + 3.0 * np.asarray(adapter["lora_a"]) @ np.asarray(adapter["lora_b"])
            np.testing.assert_allclose(np.asarray(leaf), expected, rtol=1e-6, atol=1e-6)
            changed += 1
        else:
            np.testing.assert_array_equal(np.asarray(leaf), base)
    assert changed == 2 * model.config.num_layers


def test_merged_export_loads_in_transformers_with_our_logits(checkpoint, tmp_path):
    """Reference: transformers' PyTorch Qwen2 loading the merged safetensors that save_hf writes."""
    from transformers import AutoModelForCausalLM

    _, _, model = checkpoint
    lora = LoRAConfig(rank=4, alpha=8.0)
    adapters = _random_adapters(model.params, lora)
    save_hf(model, tmp_path, adapters=adapters, lora=lora)
    ours = np.asarray(type(model)(model.config, merge_adapters(model.params, adapters, lora))(TOKENS))
    assert np.abs(ours - np.asarray(model(TOKENS))).max() > 1e-2  # the adapters matter
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(TOKENS).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_adapters_only_export_round_trips_through_peft(checkpoint, tmp_path):
    """Reference: peft.PeftModel.from_pretrained on the base PyTorch model and our adapter files."""
    peft = pytest.importorskip("peft")
    folder, torch_model, model = checkpoint
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
    adapters = _random_adapters(model.params, lora)
    save_hf(model, tmp_path, adapters=adapters, lora=lora, adapters_only=True, base_model=str(folder))
    loaded, loaded_config = load_peft_adapters(tmp_path)
    assert loaded_config == lora
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path)
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(TOKENS).long()).logits.numpy()
    ours = np.asarray(type(model)(model.config, merge_adapters(model.params, adapters, lora))(TOKENS))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_invalid_lora_settings_are_named():
    with pytest.raises(ValueError, match=r"LoRAConfig.rank must be an integer in \[1, 65536\], got 0"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="lora.targets"):
        LoRAConfig(rank=2, targets="q_proj,qq_proj")
    with pytest.raises(ConfigError, match="config.lora.rank"):
        build_setup(tiny_config(**{"lora.rank": -1}))
    with pytest.raises(ConfigError, match="config.lora"):
        build_setup(tiny_config(**{"lora.rank": 2, "lora.targets": "attention"}))


def _update_batch(rows=4, width=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 16, size=(rows, width + 1)).astype(np.int32)
    mask = np.zeros((rows, width), bool)
    mask[:, 6:] = True
    return {"input_tokens": jnp.asarray(tokens[:, :-1]), "target_tokens": jnp.asarray(tokens[:, 1:]),
                "loss_mask": jnp.asarray(mask), "advantages": jnp.asarray([1.0, -1.0, 0.5, -0.5], jnp.float32),
                "positions": jnp.asarray(np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)))}


def test_only_the_adapters_train_and_the_reference_kl_starts_at_zero():
    from optpo_jax.train.update import batch_logprobs

    setup = build_setup(tiny_config(**{"lora.rank": 4, "grpo.kl_coef": 0.1}))
    state = setup.initial_state()
    assert state.reference_params is state.base_params  # under LoRA the KL reference is the frozen base
    assert {leaf.shape for leaf in jax.tree.leaves(state.params)} <= {
        (setup.policy.config.hidden_size, 4), (4, setup.policy.config.hidden_size),
        (setup.policy.config.intermediate_size, 4), (4, setup.policy.config.intermediate_size)}
    trained_sizes = sorted(leaf.size for leaf in jax.tree.leaves(state.params))
    moment_sizes = sorted(leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.size > 1)
    assert moment_sizes == sorted(trained_sizes * 2)  # Adam's two moments, of the adapters only
    base_before = jax.tree.map(np.array, state.base_params)
    batch = _update_batch()
    config = setup.learner.model_config
    ref = jax.jit(batch_logprobs, static_argnums=(0, 3))(config, state.reference_params,
                                                          GRPOBatch(old_logprobs=None, **batch), 1.0)
    policy_logits = type(setup.policy)(config, state.policy_params())(batch["input_tokens"])
    np.testing.assert_array_equal(np.asarray(token_logprobs(policy_logits, batch["target_tokens"], 1.0)),
                                  np.asarray(ref))
    adapters, _, metrics = setup.learner.update_step(state.params, state.opt_state,
                                                     GRPOBatch(old_logprobs=ref, ref_logprobs=ref, **batch),
                                                     state.base_params)
    # B = 0: the merged policy is the base, so the KL is 0 up to the rounding of two compiled programs.
    assert abs(float(metrics["kl"])) < 1e-6 and not bool(metrics["skipped"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state.base_params), base_before)
    moved = [float(jnp.abs(leaf).max()) for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]
             if path[-1].key == "lora_b"]
    assert len(moved) == len(PROJECTIONS) * config.num_layers and min(moved) > 0
