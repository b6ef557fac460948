"""Where one decode step of the wave sampler spends its time: a jax.profiler trace, by kind of work.

Builds a random-weight preset (bfloat16 by default, like bench_accelerator.py), samples
``--waves`` waves of ``--rows`` rows (``--new_tokens`` tokens each, no stop token) under
the profiler, and sums the device time of every XLA operation of the decode loop,
grouped by what it does (from the op's source location in the HLO metadata):

- weights: the projections, the MLP and the head (matmuls over the parameters);
- attention: scores, softmax and the weighted sum over the KV cache;
- cache write: the new token's keys and values into the cache;
- sampling: the draw from the logits (softmax, top-k / top-p, the random numbers);
- parameter prep: work on the parameters alone (concatenated q/k/v or gate/up kernels,
  casts): not the model's work if it runs every step;
- loop bookkeeping: the output buffers, the stop test, copies of the loop state;
- other: norms, rope, residual adds and the rest.

Per step means divided by the decode steps run (waves x (new_tokens - 1)).

    python experiments/profile_decode.py                                   # the Qwen2.5-0.5B preset, 2 layers
    python experiments/profile_decode.py --layers 0 --rows 64 --new_tokens 256   # all layers (slow on a CPU)
    python experiments/profile_decode.py --cache_segments 1                # the reference: whole-cache reads
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from optpo_jax.models import init_decoder, preset
from optpo_jax.sampler import SamplingConfig, sample_padded

CATEGORIES = (
    ("attention", r"bkgts|btkgd|softmax|dot_product_attention|_where"),
    ("cache write", r"dynamic_update_slice"),
    ("sampling", r"_draw|_restrict|_inverse_cdf|_log_normalizer|random|threefry|argmax|sort|cumsum|categorical"),
    ("weights", r"dot_general|_fused_projection|gated_silu|dot\b"),
    ("parameter prep", r"concatenate|convert_element_type"),
    ("loop bookkeeping", r"while|cond|_is_stop|emit|keep_going|select_n|copy"),
)


def categorize(op_name: str, source: str) -> str:
    """The kind of work of one HLO op, from its op_name and source location."""
    text = f"{op_name} {source}"
    return next((name for name, pattern in CATEGORIES if re.search(pattern, text)), "other")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: 'op_name source_file:line'} of a compiled module's text."""
    found = {}
    for match in re.finditer(r"%(\S+) = .*?metadata=\{([^}]*)\}", hlo_text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        found[match.group(1)] = f"{fields.get('op_name', '')} {fields.get('source_file', '')}"
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b-instruct")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (0: the preset's)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--cache_segments", type=int, default=SamplingConfig.cache_segments)
    parser.add_argument("--attention", default="reference", choices=("reference", "dot_product"))
    parser.add_argument("--waves", type=int, default=2)
    args = parser.parse_args()
    overrides = {"num_layers": args.layers} if args.layers else {}
    config = preset(args.model, param_dtype=args.dtype, compute_dtype=args.dtype, attention=args.attention,
                    **overrides)
    params = nnx.split(init_decoder(config))[1]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, cache_segments=args.cache_segments)
    prompts = np.random.default_rng(0).integers(3, config.vocab_size, (args.rows, args.prompt_len)).astype(np.int32)
    lengths, valid = np.full(args.rows, args.prompt_len, np.int32), np.ones(args.rows, bool)
    run = lambda key: sample_padded(params, prompts, lengths, valid, key, model_config=config, config=sampling)
    metadata = op_metadata(sample_padded.lower(params, prompts, lengths, valid, jax.random.key(0),
                                               model_config=config, config=sampling).compile().as_text())
    jax.block_until_ready(run(jax.random.key(0)))
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        for wave in range(args.waves):
            jax.block_until_ready(run(jax.random.key(wave + 1)))
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]) as trace:
            events = json.load(trace)["traceEvents"]
    seconds = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in metadata:
            seconds[categorize(event["name"], metadata[event["name"]])] += event["dur"] / 1e6
    steps = args.waves * (args.new_tokens - 1)
    total = sum(seconds.values())
    print(f"{args.model}, {config.num_layers} layers, {config.num_params() / 1e6:.0f}M parameters, {args.dtype}, "
          f"{args.rows} rows, {args.prompt_len} + {args.new_tokens} tokens, cache_segments {args.cache_segments}, "
          f"attention {args.attention}; jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print(f"wall {wall / steps * 1e3:.2f} ms per decode step (prefill included), ops {total / steps * 1e3:.2f} ms")
    print("| work | ms per step | share |")
    print("|---|---|---|")
    for name, value in seconds.most_common():
        print(f"| {name} | {value / steps * 1e3:.3f} | {value / total:.0%} |")


if __name__ == "__main__":
    main()
