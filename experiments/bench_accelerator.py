"""Sampler and GRPO-update throughput of real-size Qwen2.5 models against the device's rooflines.

Random-weight Qwen2.5-0.5B(-Instruct) and Qwen2.5(-Math)-1.5B presets in bfloat16 (built
offline, no download). For each model it times one wave of the jitted sampler at 64, 128
and 256 rows (512 prompt tokens, 1024 new tokens, no stop token, so every row generates
all 1024) and one GRPO update micro-batch (forward + backward + AdamW over rows x (prompt
+ completion) tokens), and prints each throughput next to the device's roofline:

- wave: prefill at the matmul peak, then each decode step at max(bytes / bandwidth,
  FLOPs / peak), where the bytes are the weights plus the KV cache of the context so far
  (the memory-bandwidth bound at these batch sizes);
- update: 6 x matmul parameters FLOPs per token, plus causal attention, at the matmul peak.

Each measurement runs two paths in the same process (``--paths``): ``reference``, the
code as it was before issue 27 (every decode step reads the whole KV cache, einsum
attention with float32 scores, the MLP's gate and up as two matmuls with XLA's gradient;
the update's log-softmax over full [rows, tokens, vocabulary] float32 logits), and
``new`` (the cache read only as far as it is filled, ``jax.nn.dot_product_attention``:
cuDNN's fused kernel on a GPU, one gate/up matmul and ``decoder.gated_silu``; the
update's log-probabilities from the head in chunks, ``models.logprobs``).

Peaks come from a table keyed by ``jax.devices()[0].device_kind`` (override with
``--bandwidth_gbs`` / ``--peak_tflops``); on a CPU or an unknown device they are measured
(one matmul, one array copy). Compile seconds are the first call minus a timed call.

    python experiments/bench_accelerator.py                 # full shapes on a GPU / TPU: about 3 minutes on an H200
    python experiments/bench_accelerator.py --small         # tiny model and shapes: CPU smoke run, well under a minute
    python experiments/bench_accelerator.py --models qwen2.5-math-1.5b --rows 256 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_common import best_time, timed
from flax import nnx

from optpo_jax.grpo import GRPOBatch, GRPOConfig, grpo_step, token_logprobs
from optpo_jax.models import forward, init_decoder, preset
from optpo_jax.sampler import SamplingConfig, sample
from optpo_jax.train.update import batch_logprobs

PATHS = ("reference", "new")

DEFAULT_MODELS = ("qwen2.5-0.5b-instruct", "qwen2.5-math-1.5b")

# (substring of device_kind, HBM GB/s, dense bf16 TFLOP/s) from the vendors' data sheets; the first match wins,
# so more specific names come first. Measured figures on this workplace's machines are lower (H200: ~4.3 TB/s
# copy, ~790 TFLOP/s on an 8192^3 matmul), which is why the fractions below are of the data-sheet roofline.
DEVICE_PEAKS = (
    ("H200", 4800.0, 989.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100", 3350.0, 989.0),  # SXM: jax names it "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100", 1555.0, 312.0),
    ("L4", 300.0, 121.0),
    ("TPU v6 lite", 1640.0, 918.0),  # v6e
    ("TPU v5 lite", 819.0, 197.0),  # v5e
    ("TPU v5", 2765.0, 459.0),  # v5p
    ("TPU v4", 1200.0, 275.0),
)

# The reduced shape of --small (and of the CPU test): same code paths, a model of ~0.1M parameters.
SMALL_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2,
               "num_kv_heads": 1, "head_dim": 32}
SMALL_SHAPE = {"rows": (4, 8), "prompt_len": 16, "new_tokens": 16, "update_rows": 2}


@dataclasses.dataclass(frozen=True)
class Peaks:
    """The roofline's two ceilings and where they came from ("data sheet", "measured" or "flag")."""

    bandwidth_gbs: float
    tflops: float
    source: str


def measure_peaks() -> Peaks:
    """Best-of-5 bf16 (or float32, whichever is faster) matmul rate and array-copy bandwidth of device 0.

    Sized per platform: big enough to leave the caches on an accelerator, small enough to
    take about a second on a 2-core CPU.
    """
    on_cpu = jax.devices()[0].platform == "cpu"
    size, copy_bytes = (1024, 2**26) if on_cpu else (8192, 2**31)
    matmul = jax.jit(lambda a, b: a @ b)
    rates = []
    for dtype in (jnp.bfloat16, jnp.float32):
        a = jnp.ones((size, size), dtype)
        timed(matmul, a, a)  # compiles
        rates.append(2 * size**3 / best_time(lambda a=a: matmul(a, a), 5))
    # x * 2 reads and writes every byte once: bandwidth counts both, like a data sheet's copy figure. Donating x
    # writes in place; a fresh output buffer each call would time the OS's page faults on a CPU (6x slower here).
    scale = jax.jit(lambda v: v * 2, donate_argnums=0)
    x = [scale(jnp.ones((copy_bytes // 4,), jnp.float32)).block_until_ready()]

    def copy():
        x[0] = scale(x[0]).block_until_ready()

    bandwidth = 2 * copy_bytes / best_time(copy, 5)
    return Peaks(bandwidth / 1e9, max(rates) / 1e12, "measured")


def device_peaks(bandwidth_gbs: float | None = None, peak_tflops: float | None = None) -> Peaks:
    """Peaks of device 0: each flag given wins, then the data-sheet table, else a measurement."""
    if bandwidth_gbs and peak_tflops:
        return Peaks(bandwidth_gbs, peak_tflops, "flag")
    kind = jax.devices()[0].device_kind.lower()
    listed = next((Peaks(bw, tf, "data sheet") for name, bw, tf in DEVICE_PEAKS if name.lower() in kind), None)
    base = listed or measure_peaks()
    flagged = " + flag" if bandwidth_gbs or peak_tflops else ""
    return Peaks(bandwidth_gbs or base.bandwidth_gbs, peak_tflops or base.tflops, base.source + flagged)


def model_config(name: str, small: bool):
    """The preset in bfloat16 (weights and compute); --small keeps its family and shrinks every size."""
    return preset(name, param_dtype="bfloat16", compute_dtype="bfloat16", **(SMALL_MODEL if small else {}))


def matmul_params(config) -> int:
    """Parameters that take part in a matmul per token: all but the embedding gather (tied: it is also the head)."""
    return config.num_params() - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)


def kv_bytes_per_token(config) -> int:
    """Bytes of keys and values one cached token holds over all layers."""
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * jnp.dtype(config.compute_dtype).itemsize


def wave_roofline(config, rows: int, prompt_len: int, new_tokens: int, peaks: Peaks) -> tuple[float, str]:
    """(generated tokens/s, binding ceiling) of an ideal device for one wave.

    The prefill is compute-bound (every prompt token through the body, the head once per
    row). Decode step i reads all weights plus the KV cache of its prompt_len + i context
    once and does 2 x matmul params FLOPs per row; it takes the longer of the two times.
    """
    bandwidth, flops = peaks.bandwidth_gbs * 1e9, peaks.tflops * 1e12
    head = config.vocab_size * config.hidden_size
    attention = 4 * config.num_layers * config.num_heads * config.head_dim  # QK^T and AV FLOPs per token per context
    prefill_flops = 2 * rows * (prompt_len * (matmul_params(config) - head) + head)
    prefill_flops += attention * rows * prompt_len * (prompt_len + 1) / 2
    seconds, memory_steps = prefill_flops / flops, 0
    weight_bytes = config.num_params() * jnp.dtype(config.param_dtype).itemsize
    for step in range(1, new_tokens):  # the first token comes out of the prefill
        context = prompt_len + step
        memory = (weight_bytes + rows * context * kv_bytes_per_token(config)) / bandwidth
        compute = rows * (2 * matmul_params(config) + attention * context) / flops
        seconds += max(memory, compute)
        memory_steps += memory >= compute
    bound = "memory" if memory_steps >= (new_tokens - 1) / 2 else "compute"
    return rows * new_tokens / seconds, bound


def update_roofline(config, width: int, peaks: Peaks) -> float:
    """Tokens/s of an update at the matmul peak: 6 x matmul params per token (forward + backward) plus causal
    attention (6 x layers x heads x head_dim x width, the QK^T and AV matmuls over width / 2 keys on average)."""
    per_token = 6 * matmul_params(config) + 6 * config.num_layers * config.num_heads * config.head_dim * width
    return peaks.tflops * 1e12 / per_token


def first_and_best(fn, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles, best of ``repeats`` later calls)."""
    return timed(fn)[1], best_time(fn, repeats)


def path_config(config, path: str):
    """The model config of a path: the einsum attention and the unfused MLP (reference), or
    jax.nn.dot_product_attention and the fused MLP (new)."""
    reference = path == "reference"
    return dataclasses.replace(config, attention="reference" if reference else "dot_product", fused_mlp=not reference)


def time_wave(params, config, rows: int, prompt_len: int, new_tokens: int, repeats: int, path: str = "new") -> dict:
    """Times one wave of ``rows`` random prompts to ``new_tokens`` tokens; no stop tokens, so none ends early."""
    prompts = np.random.default_rng(rows).integers(3, config.vocab_size, (rows, prompt_len)).astype(np.int32)
    lengths, valid = np.full((rows,), prompt_len, np.int32), np.ones((rows,), bool)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=(),
                              cache_segments=1 if path == "reference" else SamplingConfig.cache_segments)
    config = path_config(config, path)
    keys = iter(jax.random.split(jax.random.key(rows), repeats + 1))
    generated = []

    def wave():
        out = sample(params, config, prompts, lengths, valid, next(keys), sampling)
        out.tokens.block_until_ready()
        generated.append(int(np.asarray(out.lengths).sum()))

    first, seconds = first_and_best(wave, repeats)
    return {"seconds": seconds, "compile_s": max(first - seconds, 0.0), "tokens": rows * new_tokens,
            "generated_tokens": min(generated)}


def random_update_batch(config, rows: int, prompt_len: int, width: int, path: str = "reference") -> GRPOBatch:
    """A GRPO batch of random sequences whose completions (after the prompt) carry the loss.

    Old log-probabilities are log(1 / vocab), what a random-weight model gives, so the
    ratio sits near 1 inside the clip range and every token has a gradient. ``new``: the
    same sequences in the training loop's packed layout, one per row (every prompt
    differs, so nothing is shared), targets and loss on the completions only.
    """
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, config.vocab_size, (rows, width + 1)).astype(np.int32)
    mask = np.zeros((rows, width), bool)
    mask[:, prompt_len:] = True  # width - prompt_len = the completion's tokens
    return GRPOBatch(
        input_tokens=jnp.asarray(tokens[:, :-1]), target_tokens=jnp.asarray(tokens[:, 1:]), loss_mask=jnp.asarray(mask),
        advantages=jnp.asarray(rng.choice([-1.0, 1.0], rows).astype(np.float32)),
        old_logprobs=jnp.full((rows, width), -math.log(config.vocab_size), jnp.float32),
        positions=jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width)),
    ) if path == "reference" else GRPOBatch(
        input_tokens=jnp.asarray(tokens[:, :-1]), target_tokens=jnp.asarray(tokens[:, prompt_len + 1:]),
        loss_mask=jnp.ones((rows, width - prompt_len), bool),
        advantages=jnp.asarray(rng.choice([-1.0, 1.0], rows).astype(np.float32)),
        old_logprobs=jnp.full((rows, width - prompt_len), -math.log(config.vocab_size), jnp.float32),
        positions=jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (rows, width)),
        groups=jnp.zeros((rows, width), jnp.int32),
        branches=jnp.broadcast_to((jnp.arange(width) >= prompt_len).astype(jnp.int32), (rows, width)),
        target_index=jnp.asarray(np.arange(rows)[:, None] * width + prompt_len + np.arange(width - prompt_len),
                                 jnp.int32),
    )


def time_update(params, config, rows: int, prompt_len: int, width: int, repeats: int, path: str = "new") -> dict:
    """Times one jitted GRPO step (one micro-batch of ``rows`` x ``width`` tokens, AdamW) on a copy of ``params``."""
    config = path_config(config, path)

    def reference_logprobs(trained, batch: GRPOBatch):  # the full [rows, width, vocabulary] float32 logits
        return token_logprobs(forward(config, trained, batch.input_tokens, batch.positions)[0], batch.target_tokens)

    logprob_fn = reference_logprobs if path == "reference" else (
        lambda trained, batch: batch_logprobs(config, trained, batch, 1.0))
    optimizer = optax.adamw(1e-6)
    step = jax.jit(functools.partial(grpo_step, logprob_fn=logprob_fn, optimizer=optimizer, config=GRPOConfig(),
                                     num_micro_batches=1), donate_argnums=(0, 1))
    batch = random_update_batch(config, rows, prompt_len, width, path)
    # Donation consumes the arguments, so the update trains a copy and the sampler's params stay valid.
    state = [jax.tree.map(jnp.copy, params), optimizer.init(params)]
    # Float32 gradients turn AdamW's bfloat16 moments into float32 after one step, which would compile the step a
    # second time inside the timed calls: start from the dtypes that the step returns.
    shapes = jax.eval_shape(step, *state, batch)[:2]
    state = jax.tree.map(lambda x, shape: x.astype(shape.dtype), state, list(shapes))
    skipped = []

    def update():
        state[0], state[1], metrics = step(state[0], state[1], batch)
        jax.block_until_ready((state, metrics))
        skipped.append(bool(metrics["skipped"]))

    first, seconds = first_and_best(update, repeats)
    del state[:]  # frees the optimizer state before the next model
    return {"seconds": seconds, "compile_s": max(first - seconds, 0.0), "tokens": rows * width,
            "trained_tokens": int(batch.loss_mask.sum()), "skipped": any(skipped)}


def bench_model(name: str, rows_list, prompt_len: int, new_tokens: int, update_rows: int, small: bool,
                repeats: int, peaks: Peaks, emit, paths=PATHS) -> list[dict]:
    """The waves at each row count, then the update, of one model, each on every path; ``emit(result)``
    reports each as it lands."""
    config = model_config(name, small)
    params = nnx.split(init_decoder(config, seed=0))[1]
    common = {"model": name + (" (small)" if small else ""), "params": config.num_params()}
    results = []
    for rows in rows_list:
        limit, bound = wave_roofline(config, rows, prompt_len, new_tokens, peaks)
        for path in paths:
            measured = time_wave(params, config, rows, prompt_len, new_tokens, repeats, path)
            results.append(emit(dict(common, measurement="sample", path=path, rows=rows, **measured,
                                     roofline_tokens_per_s=limit, bound=bound)))
    width = prompt_len + new_tokens
    for path in paths if update_rows else ():
        measured = time_update(params, config, update_rows, prompt_len, width, repeats, path)
        results.append(emit(dict(common, measurement=f"update ({width} tokens/row)", path=path, rows=update_rows,
                                 **measured, roofline_tokens_per_s=update_roofline(config, width, peaks),
                                 bound="compute")))
    return results


def finish(result: dict) -> dict:
    """Adds tokens/s and the fraction of the roofline to a timed result."""
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["fraction_of_roofline"] = result["tokens_per_s"] / result["roofline_tokens_per_s"]
    return result


def run_benchmark(models=DEFAULT_MODELS, rows=(64, 128, 256), prompt_len: int = 512, new_tokens: int = 1024,
                  update_rows: int = 4, small: bool = False, repeats: int = 1, bandwidth_gbs: float | None = None,
                  peak_tflops: float | None = None, on_result=None, paths=PATHS) -> list[dict]:
    """Times every (model, rows) wave and each model's update, on each of ``paths``; one dict per table row.

    Each dict holds model, params, measurement ("sample" or "update (...)"), path, rows, tokens
    (generated, or forward + backward for the update), seconds (best timed call),
    tokens_per_s, roofline_tokens_per_s, fraction_of_roofline, bound, compile_s, the
    device's peaks, and generated_tokens (waves: the rows' lengths summed) or
    trained_tokens / skipped (update). ``on_result`` sees each dict as soon as it is done.
    """
    peaks = device_peaks(bandwidth_gbs, peak_tflops)
    extra = {"bandwidth_gbs": peaks.bandwidth_gbs, "peak_tflops": peaks.tflops, "peaks_from": peaks.source}

    def emit(result):
        result = finish(dict(result, **extra))
        if on_result is not None:
            on_result(result)
        return result

    results = []
    for name in models:
        results += bench_model(name, rows, prompt_len, new_tokens, update_rows, small, repeats, peaks, emit, paths)
    return results


def device_description() -> str:
    """One line naming device 0, the backend and jax's version."""
    device = jax.devices()[0]
    return (f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); "
            f"jax {jax.__version__}; python {sys.version.split()[0]}")


def markdown_table(results: list[dict]) -> str:
    """The results as a markdown table, one line per measurement."""
    lines = [("| model | measurement | path | rows | tokens/s | roofline tokens/s (bound) | fraction of roofline "
             "| compile s |"), "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['measurement']} | {r['path']} | {r['rows']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['roofline_tokens_per_s']:,.0f} ({r['bound']}) | {r['fraction_of_roofline']:.3f} | "
                     f"{r['compile_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags; --small swaps in the reduced shape for every shape flag left unset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="preset names (optpo_jax.models)")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="wave sizes (default 64 128 256)")
    parser.add_argument("--prompt_len", type=int, default=None, help="prompt tokens per row (default 512)")
    parser.add_argument("--new_tokens", type=int, default=None, help="generated tokens per row (default 1024)")
    parser.add_argument("--update_rows", type=int, default=None,
                        help="rows of the update micro-batch (default 4; 0 skips the update)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the compiling one; the best counts")
    parser.add_argument("--small", action="store_true", help="tiny model and shapes (CPU smoke run)")
    parser.add_argument("--bandwidth_gbs", type=float, default=None, help="memory bandwidth override, GB/s")
    parser.add_argument("--peak_tflops", type=float, default=None, help="matmul peak override, TFLOP/s")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object instead")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="reference (before issue 27) and / or new, each measured in this one run")
    args = parser.parse_args(argv)
    defaults = SMALL_SHAPE if args.small else {"rows": (64, 128, 256), "prompt_len": 512, "new_tokens": 1024,
                                               "update_rows": 4}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None):
    """Runs the benchmark from the command line: progress lines, then the device, its peaks and the table."""
    args = parse_args(argv)
    start = time.perf_counter()
    progress = None if args.json else lambda r: print(
        f"{r['model']} {r['measurement']} {r['path']} x{r['rows']}: {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['fraction_of_roofline']:.3f} of roofline, compile {r['compile_s']:.1f} s", flush=True)
    results = run_benchmark(args.models, tuple(args.rows), args.prompt_len, args.new_tokens, args.update_rows,
                            args.small, args.repeats, args.bandwidth_gbs, args.peak_tflops, on_result=progress,
                            paths=tuple(args.paths))
    if args.json:
        print(json.dumps({"device": device_description(), "results": results}, indent=1))
        return
    r = results[0]
    print(f"\n{device_description()}")
    print(f"peaks ({r['peaks_from']}): {r['bandwidth_gbs']:,.0f} GB/s, {r['peak_tflops']:,.1f} TFLOP/s; "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, bfloat16; "
          f"total {time.perf_counter() - start:.0f} s\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
