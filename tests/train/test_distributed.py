"""Sharded runs against one device (CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from optpo_jax.grpo import GRPOBatch, GRPOConfig, grpo_step, token_logprobs
from optpo_jax.models import forward, init_decoder
from optpo_jax.sampler import SamplingConfig, sample
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.distributed import make_mesh, merge_shares, mesh_of, process_share, shard_params, shard_rows
from tests.test_sampler import CONFIG, right_padded

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")


@pytest.fixture(scope="module")
def params():
    state = nnx.split(init_decoder(CONFIG, seed=3))[1]
    return jax.tree.map(lambda x: x * 12.0 if x.ndim == 2 else x, state)


def test_make_mesh_sizes_and_errors():
    devices = jax.devices()[:8] if jax.device_count() >= 8 else jax.devices()
    mesh = make_mesh(data=-1, devices=devices)
    assert mesh.shape["data"] == len(devices) and mesh.axis_names == ("data", "fsdp", "tensor")
    with pytest.raises(ValueError, match="at most one -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs"):
        make_mesh(data=3, fsdp=5, devices=devices)


@needs_8
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_greedy_sampler_matches_one_device(params, shape):
    prompts = [[5, 6, 7, 8], [9], [3, 4, 5], [20, 21, 22], [7, 7], [11, 12, 13, 14, 15], [2], [8, 9]]
    tokens, lengths = right_padded(prompts)
    config = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_token_ids=(0,))
    single = sample(params, CONFIG, tokens, lengths, np.ones(8, bool), jax.random.key(0), config)
    sharded_params = shard_params(params, make_mesh(*shape))
    assert mesh_of(sharded_params) is not None
    sharded = sample(sharded_params, CONFIG, tokens, lengths, np.ones(8, bool), jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(single.tokens))
    np.testing.assert_allclose(np.asarray(sharded.policy_logprobs), np.asarray(single.policy_logprobs), atol=1e-5)


def grpo_batch(num_rows=8, width=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CONFIG.vocab_size, (num_rows, width + 1)).astype(np.int32)
    mask = np.zeros((num_rows, width), bool)
    for row in range(num_rows):
        mask[row, 3 : 3 + rng.integers(2, width - 3)] = True
    return GRPOBatch(
        input_tokens=tokens[:, :-1], target_tokens=tokens[:, 1:], loss_mask=mask,
        advantages=rng.normal(size=num_rows).astype(np.float32),
        old_logprobs=(-2.0 + 0.1 * rng.normal(size=(num_rows, width))).astype(np.float32),
        positions=np.broadcast_to(np.arange(width, dtype=np.int32), (num_rows, width)).copy(),
    )


def apply_fn(params, batch):
    return token_logprobs(forward(CONFIG, params, batch.input_tokens, batch.positions)[0], batch.target_tokens)


SEQ_MEAN = GRPOConfig(loss_aggregation="seq-mean-token-mean")
ADAM = optax.adam(1e-2)


def one_step(params, batch, num_micro_batches=1, config=SEQ_MEAN, optimizer=ADAM):
    step = jax.jit(lambda p, o, b: grpo_step(p, o, b, apply_fn, optimizer, config, num_micro_batches))
    new_params, _, metrics = step(params, optimizer.init(params), batch)
    return new_params, metrics


@needs_8
@pytest.mark.parametrize("shape", MESHES)
def test_sharded_grpo_step_matches_one_device(params, shape):
    batch = grpo_batch()
    expected, expected_metrics = one_step(params, batch)
    mesh = make_mesh(*shape)
    sharded, metrics = one_step(shard_params(params, mesh), GRPOBatch(**shard_rows(dataclasses.asdict(batch), mesh)))
    assert isinstance(jax.tree.leaves(sharded)[0].sharding, NamedSharding)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected_metrics["loss"]), rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-scale"])
def test_micro_batched_step_equals_the_full_batch(params, aggregation):
    batch = grpo_batch(num_rows=8, seed=1)
    batch = batch.replace(loss_mask=batch.loss_mask.copy())
    batch.loss_mask[3::4] = False  # rows 3 and 7: a whole padding micro-batch (micro-batches are strided)
    config = GRPOConfig(loss_aggregation=aggregation)
    # Plain SGD: the parameter change is the gradient itself (Adam would amplify rounding in tiny gradients).
    full, full_metrics = one_step(params, batch, 1, config, optax.sgd(1.0))
    micro, micro_metrics = one_step(params, batch, 4, config, optax.sgd(1.0))
    for name in ("loss", "clip_fraction", "kl", "mean_ratio", "mean_advantage"):
        np.testing.assert_allclose(float(micro_metrics[name]), float(full_metrics[name]), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(params),
                                                                   strict=True))
    assert moved > 1e-3  # the step did something, so the comparison means something
    with pytest.raises(ValueError, match="divide"):
        one_step(params, batch, 3, config)


def test_remat_gives_the_same_gradients(params):
    batch = grpo_batch(seed=2)
    loss = lambda config: lambda p: jnp.sum(forward(config, p, batch.input_tokens, batch.positions)[0] ** 2)
    plain = jax.jit(jax.grad(loss(CONFIG)))(params)
    remat = jax.jit(jax.grad(loss(dataclasses.replace(CONFIG, remat=True))))(params)
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)



def test_sampling_with_remat_on_equals_off(params):
    """A run with ``remat`` samples too (it once failed inside the decode loop); remat changes no token."""
    tokens, lengths = right_padded([[5, 6, 7], [8, 9]])
    config = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_token_ids=(2,), pad_token_id=0)
    plain = sample(params, CONFIG, tokens, lengths, np.ones(2, bool), jax.random.key(0), config)
    remat = sample(params, dataclasses.replace(CONFIG, remat=True), tokens, lengths, np.ones(2, bool),
                   jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(remat.tokens), np.asarray(plain.tokens))


@needs_8
def test_sharded_loop_checkpoints_restore_onto_another_mesh(tmp_path):
    from optpo_jax.train.loop import train
    from optpo_jax.train.setup import make_optimizer
    from tests.run_configs import tiny_config

    config = tiny_config(steps=2)
    config.mesh.update({"data": 8, "fsdp": 1, "tensor": 1})
    summary = train(config, tmp_path, progress=False)
    assert summary["total_rollouts"] > 0
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    from optpo_jax.tasks.arithmetic import load_policy

    params = load_policy().params
    optimizer = make_optimizer(config)
    like = {"params": params, "opt_state": optimizer.init(params)}
    saved, _, _ = checkpoints.restore(like)  # onto one device
    other = shard_params(params, make_mesh(2, 2, 2))
    moved, totals, _ = checkpoints.restore({"params": other, "opt_state": jax.jit(optimizer.init)(other)})
    assert totals["step"] == 2
    for a, b in zip(jax.tree.leaves(moved["params"]), jax.tree.leaves(saved["params"]), strict=True):
        assert a.sharding.mesh.devices.shape == (2, 2, 2)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(saved["params"]), jax.tree.leaves(params), strict=True))
    # ...and the run goes on there: one more step on the (2, 2, 2) mesh from the restored state.
    config.steps = 3
    config.mesh.update({"data": 2, "fsdp": 2, "tensor": 2})
    summary = train(config, tmp_path, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3]  # the first run's final evaluation is replaced and summary["total_rollouts"] > 0


def test_bfloat16_params_follow_a_float32_master():
    from optpo_jax.optim import float32_master

    params = {"w": jnp.full((4,), 0.02, jnp.bfloat16)}
    grads = {"w": jnp.ones((4,), jnp.bfloat16)}
    optimizer = float32_master(optax.sgd(1e-6))
    state = optimizer.init(params)
    assert state.master["w"].dtype == jnp.float32
    for _ in range(3000):
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # 3000 steps of 1e-6 move the weight by 3e-3; plain bfloat16 SGD would round every step away.
    assert params["w"].dtype == jnp.bfloat16
    start = float(jnp.asarray(0.02, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(state.master["w"]), start - 3e-3, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(params["w"], np.float32), start - 3e-3, rtol=1e-2)
    plain = {"w": jnp.full((4,), 0.02, jnp.bfloat16)}
    sgd = optax.sgd(1e-6)
    plain = optax.apply_updates(plain, sgd.update(grads, sgd.init(plain), plain)[0])
    assert float(plain["w"][0]) == np.float32(jnp.bfloat16(0.02))


def test_process_shares_interleave_back_into_item_order():
    # Simulates 3 processes' shares (items[p::3]); on this single process process_share keeps everything.
    items = list(range(10))
    shares = [items[process::3] for process in range(3)]
    assert merge_shares(shares) == items
    assert process_share(items) == items and merge_shares([items]) == items
