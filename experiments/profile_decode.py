"""Where one decode step of the wave sampler spends its time: a jax.profiler trace, by kind of work.

Builds a random-weight preset (bfloat16 by default, like bench_accelerator.py), samples
``--waves`` waves of ``--rows`` rows (``--new_tokens`` tokens each, no stop token) under
the profiler, and sums the device time of every XLA operation of the decode loop,
grouped by what it does (the named scopes of the decoder and the sampler in the HLO
metadata, then the kind of operation):

- head: the logits over the vocabulary;
- weights: the other matmuls over parameters (projections, MLP);
- attention: scores, softmax and the weighted sum over the KV cache;
- cache write: the new token's keys and values into the cache;
- sampling: the draw from the logits (softmax, top-k / top-p, the random numbers);
- parameter prep: concatenations and casts (the fused q/k/v and gate/up kernels): not
  the model's work if it runs every step;
- copies: whole-buffer copies (of the loop state or the cache);
- other: norms, rope, residual adds, the stop test and the rest.

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

import jax
import numpy as np
from bench_common import timed
from flax import nnx

from optpo_jax.models import init_decoder, preset
from optpo_jax.sampler import SamplingConfig, sample_padded

CATEGORIES = (  # the first match wins: named scopes first
    ("head", r"/head/"),
    ("attention", r"/attend/"),
    ("cache write", r"/kv_cache_write/"),
    ("sampling", r"/draw/"),
    ("weights", r"dot_general"),
    ("parameter prep", r"concatenate|convert_element_type"),
    ("copies", r"^copy|/copy$"),
)


def categorize(name: str, op_name: str) -> str:
    """The kind of work of one HLO instruction, from its name and op_name metadata."""
    return next((kind for kind, pattern in CATEGORIES if re.search(pattern, op_name) or re.search(pattern, name)),
                "other")


def op_metadata(hlo_text: str) -> dict[str, str]:
    """{HLO instruction name: its op_name metadata} of a compiled module's text."""
    return {match.group(1): match.group(2)
            for match in re.finditer(r'%(\S+) = [^\n]*?op_name="([^"]*)"', hlo_text)}


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
    parser.add_argument("--top", type=int, default=0, help="also list the N most expensive operations")
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
        wall = sum(timed(run, jax.random.key(wave + 1))[1] for wave in range(args.waves))
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)[0]) as trace:
            events = json.load(trace)["traceEvents"]
    seconds, per_op = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in metadata:
            seconds[categorize(event["name"], metadata[event["name"]])] += event["dur"] / 1e6
            per_op[event["name"]] += event["dur"] / 1e6
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
    for name, value in per_op.most_common(args.top):
        print(f"{value / steps * 1e3:8.3f} ms  {categorize(name, metadata[name]):16s} {name}  {metadata[name][-90:]}")


if __name__ == "__main__":
    main()
