"""optpo_jax/models/decoder.py: logits and cached decoding against transformers and the reference attention."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from optpo_jax.models import (
    forward,
    init_cache,
    load_hf,
    padded_positions,
)
from optpo_jax.sampler import SamplingConfig, sample
from tests.hf_checkpoints import VOCAB, torch_logits


def test_logits_match_transformers(checkpoint):
    # Reference: transformers' PyTorch forward of the same checkpoint (eager attention, float32).
    family, folder, torch_model = checkpoint
    if family == "llama":
        assert len(list(folder.glob("model-*.safetensors"))) > 1  # the sharded path is exercised
    model = load_hf(folder)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 17))
    ours = np.asarray(model(tokens))
    difference = np.max(np.abs(ours - torch_logits(torch_model, tokens)))
    print(f"{family}: max |logit difference| = {difference:.2e}")
    assert difference <= 1e-4
    assert model.tokenizer.chat_template is not None


def greedy_continuations(model, prompts, num_new_tokens):
    """Left-padded prefill into a cache, then one cached token at a time, argmax."""
    width = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    valid = np.zeros_like(tokens, dtype=bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        valid[row, width - len(prompt):] = True
    step = jax.jit(forward, static_argnums=0)
    cache = init_cache(model.config, len(prompts), width + num_new_tokens)
    logits, cache = step(model.config, model.params, jnp.asarray(tokens), padded_positions(jnp.asarray(valid)), cache)
    generated = []
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    for _ in range(num_new_tokens):
        generated.append(next_token)
        positions = cache.lengths[:, None]
        logits, cache = step(model.config, model.params, next_token[:, None], positions, cache)
        next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return np.stack(generated, axis=1)


def test_greedy_cached_decode_matches_transformers_generate(checkpoint):
    # Reference: transformers' generate(do_sample=False) with left padding and an attention mask.
    _, folder, torch_model = checkpoint
    model = load_hf(folder)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, VOCAB, n)) for n in (5, 11, 8)]
    ours = greedy_continuations(model, prompts, 20)
    width = max(len(p) for p in prompts)
    input_ids = torch.zeros((3, width), dtype=torch.long)
    attention_mask = torch.zeros((3, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        theirs = torch_model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=20,
            min_new_tokens=20, pad_token_id=0, eos_token_id=None,
        )[:, width:].numpy()
    np.testing.assert_array_equal(ours, theirs)
    # The wave sampler (right-padded prompts, while_loop decode) gives the same greedy tokens.
    tokens = np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    wave = sample(model.params, model.config, tokens, [len(p) for p in prompts], np.ones(3, bool),
                  jax.random.key(0), SamplingConfig(max_new_tokens=20, temperature=0.0))
    np.testing.assert_array_equal(np.asarray(wave.tokens), theirs)


def test_right_padding_and_cache_equal_each_prompt_alone(checkpoint):
    _, folder, _ = checkpoint
    model = load_hf(folder, load_tokenizer=False)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    tokens = np.zeros((2, 6), np.int32)
    valid = np.zeros((2, 6), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        valid[row, : len(prompt)] = True
    cache = init_cache(model.config, 2, 8)
    logits, cache = forward(model.config, model.params, jnp.asarray(tokens), padded_positions(jnp.asarray(valid)), cache)
    step_logits, _ = forward(model.config, model.params, jnp.array([[20], [21]]), cache.lengths[:, None], cache)
    for row, prompt in enumerate(prompts):
        alone = np.asarray(model(np.array([prompt + [20 + row]])))[0]
        np.testing.assert_allclose(np.asarray(logits[row, : len(prompt)]), alone[:-1], atol=1e-4)
        np.testing.assert_allclose(np.asarray(step_logits[row, 0]), alone[-1], atol=1e-4)


def test_bfloat16_params_and_compute_stay_close_to_float32(checkpoint):
    _, folder, _ = checkpoint
    full = load_hf(folder, load_tokenizer=False)
    half = load_hf(folder, dtype="bfloat16", load_tokenizer=False)
    leaf = jax.tree.leaves(half.params)[0]
    assert leaf.dtype == jnp.bfloat16
    tokens = np.random.default_rng(4).integers(0, VOCAB, (2, 10))
    want, got = np.asarray(full(tokens)), np.asarray(half(tokens))
    assert got.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_decode_over_the_filled_cache_and_dot_product_attention_equal_the_reference(checkpoint):
    """Reference: the wave sampler with one cache segment (every step reads every slot) and the einsum attention
    (float32 scores). Decoding in segments over the filled cache gives the same greedy tokens, and so does
    jax.nn.dot_product_attention (scores in the compute dtype). Llama (GQA 4:2), Qwen2 (MQA 4:1), Qwen3 (q/k
    norms), prompts of 3 to 12 tokens, 130 new tokens (3 segments), float32."""
    import dataclasses

    from optpo_jax.sampler import cache_segment_ends

    _, folder, _ = checkpoint
    model = load_hf(folder, load_tokenizer=False)
    tokens, lengths = _mixed_prompts()
    reference = SamplingConfig(max_new_tokens=130, temperature=0.0, cache_segments=1)
    assert cache_segment_ends(130, 3) == [64, 128, 130] and cache_segment_ends(130, 1) == [130]
    run = lambda model_config, config: sample(model.params, model_config, tokens, lengths, np.ones(4, bool),
                                              jax.random.key(0), config)
    want = run(model.config, reference)
    # Both new parts at once (each has its own logits check in the bfloat16 test below).
    got = run(dataclasses.replace(model.config, attention="dot_product"), dataclasses.replace(reference,
                                                                                             cache_segments=3))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.policy_logprobs), np.asarray(want.policy_logprobs), atol=1e-4)


def _mixed_prompts():
    rng = np.random.default_rng(7)
    lengths = np.array([3, 12, 7, 5], np.int32)
    tokens = np.zeros((4, 12), np.int32)
    for row, length in enumerate(lengths):
        tokens[row, :length] = rng.integers(3, VOCAB, length)
    return tokens, lengths


def test_bfloat16_decode_logits_over_the_filled_cache_and_dot_product_stay_within_rounding(checkpoint):
    """In bfloat16 a near-tie of a random model can break either way, so the logits are compared: a decode step
    over a cache of the filled slots only (decoder.grow_cache later) and one over every slot, and the
    dot_product kernel (bfloat16 scores) against the einsum reference (float32 scores), within 2^-7 of the
    largest logit (bfloat16 keeps 8 bits)."""
    import dataclasses
    import functools

    from optpo_jax.models.decoder import grow_cache
    from optpo_jax.sampler import prefill

    _, folder, _ = checkpoint
    model = load_hf(folder, dtype="bfloat16", load_tokenizer=False)
    tokens, lengths = _mixed_prompts()
    fused = dataclasses.replace(model.config, attention="dot_product")
    valid = np.ones(4, bool)
    @functools.partial(jax.jit, static_argnums=(0, 1))
    def prefill_and_step(model_config, slots, params):
        first, cache = prefill(model_config, params, tokens, lengths, valid, slots)
        step, cache = forward(model_config, params, jnp.argmax(first, -1)[:, None].astype(jnp.int32),
                              jnp.asarray(lengths)[:, None], cache)
        return first, step[:, 0], grow_cache(cache, 150)

    step_logits = {}
    for name, model_config, slots in (("reference", model.config, 150), ("filled", model.config, 13),
                                      ("dot_product", fused, 13)):
        first, step, cache = prefill_and_step(model_config, slots, model.params)
        assert cache.keys[0].shape[2] == 150
        step_logits[name] = np.concatenate([np.asarray(first), np.asarray(step)])
    scale = np.abs(step_logits["reference"]).max()
    for name in ("filled", "dot_product"):
        assert np.abs(step_logits[name] - step_logits["reference"]).max() <= 2**-7 * scale, name


def test_fused_mlp_and_its_hand_written_gradient_equal_the_reference():
    """Reference: the MLP as two matmuls and jax.nn.silu differentiated by JAX (ModelConfig.fused_mlp=False);
    decoder.gated_silu's gradient in closed form: d/da silu(a) b = b s (1 + a (1 - s)), d/db = silu(a)."""
    import dataclasses

    from flax import nnx

    from optpo_jax.models.config import ModelConfig
    from optpo_jax.models.decoder import gated_silu, init_decoder

    rng = np.random.default_rng(0)
    gate, up, grad = (jnp.asarray(rng.normal(size=(5, 7)), jnp.float32) for _ in range(3))
    want = jax.vjp(lambda a, b: jax.nn.silu(a) * b, gate, up)[1](grad)
    got = jax.vjp(gated_silu, gate, up)[1](grad)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    config = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=8)
    params = nnx.split(init_decoder(config, seed=1))[1]
    tokens = jnp.asarray(rng.integers(0, 32, (3, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (3, 9))
    loss = lambda model_config: lambda p: jnp.sum(jnp.sin(forward(model_config, p, tokens, positions)[0]))
    fused = jax.jit(jax.grad(loss(config)))(params)
    reference = jax.jit(jax.grad(loss(dataclasses.replace(config, fused_mlp=False))))(params)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
