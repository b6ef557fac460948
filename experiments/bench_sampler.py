"""Rollout throughput: our jitted sampler against transformers' generate, same model, same wave.

A random ~20M-parameter Qwen2-style checkpoint (``bench_common.qwen2_20m_config``: hidden 512,
4 layers, 8 heads / 2 KV heads, intermediate 1408, vocab 8192, untied) is written once and loaded by both
sides. Both sample at temperature 1 over the full vocabulary (no top-k / top-p), with
KV caches, R rows of P prompt tokens, N new tokens each (no stop token: every row runs
to N). The CPU's limit is R tokens per the time of one float32 [R, hidden] x [hidden,
params / hidden] matmul, i.e. 2 x parameters FLOPs per token at this machine's matmul
rate for the decode's batch. Everything runs in this one process.

    python experiments/bench_sampler.py [--rows 64] [--prompt 64] [--new 128]
    python experiments/bench_sampler.py --sweep-rows 8 32 64 128 --repeats 3   # figure: docs/figures/sampler_throughput.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np
import torch
from bench_common import best_time, matmul_limit, qwen2_20m_config, random_twins, timed

from optpo_jax.report.plots import save_figure, write_csv
from optpo_jax.sampler import SamplingConfig, sample

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def make_samplers(torch_model, model, rows: int, prompt: int, new: int):
    """(ours, theirs): callables that sample one wave of ``rows`` x ``prompt`` -> ``new`` tokens and block.

    ``ours(new_tokens)`` may ask for fewer new tokens (1 = prefill only).
    """
    vocab_size = model.config.vocab_size
    prompts = np.random.default_rng(0).integers(3, vocab_size, (rows, prompt))
    lengths = np.full((rows,), prompt, np.int32)
    valid = np.ones((rows,), bool)
    key = [jax.random.key(0)]

    def ours(new_tokens=new):
        key[0], subkey = jax.random.split(key[0])
        config = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
        out = sample(model.params, model.config, prompts, lengths, valid, subkey, config)
        assert int(out.lengths.min()) == new_tokens
        out.tokens.block_until_ready()

    torch_prompts = torch.as_tensor(prompts)

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=torch_prompts, attention_mask=torch.ones_like(torch_prompts), do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                use_cache=True, pad_token_id=0, eos_token_id=None,
            )
        assert out.shape[1] == prompt + new

    return ours, theirs


def interleaved_best(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best seconds of each side, timed alternately so that both see the same machine load."""
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(ours)[1])
        theirs_times.append(timed(theirs)[1])
    return min(ours_times), min(theirs_times)


def sweep(torch_model, model, rows_list: list[int], args) -> list[dict]:
    """Generated tokens/s of both samplers (and the matmul limit) at each wave size in ``rows_list``."""
    results = []
    for rows in rows_list:
        ours, theirs = make_samplers(torch_model, model, rows, args.prompt, args.new)
        ours()  # compile
        theirs()  # warm-up
        ours_seconds, theirs_seconds = interleaved_best(ours, theirs, args.repeats)
        limit = matmul_limit(rows, model.config.hidden_size, model.config.num_params(), 10 * args.repeats)
        generated = rows * args.new
        results.append({"rows": rows, "prompt_tokens": args.prompt, "new_tokens": args.new,
                        "ours_tokens_per_s": round(generated / ours_seconds, 1),
                        "transformers_tokens_per_s": round(generated / theirs_seconds, 1),
                        "matmul_limit_tokens_per_s": round(limit, 1),
                        "ratio": round(theirs_seconds / ours_seconds, 3)})
        print(results[-1], flush=True)
    return results


def plot_sweep(results: list[dict], num_params: int):
    """Generated tokens/s against rows per wave: ours, transformers and the matmul rate (a reference, not a bound
    at small batches, where one jitted matmul call costs more than its FLOPs)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    axis = figure.subplots()
    rows = [r["rows"] for r in results]
    series = [("ours_tokens_per_s", "optpo-jax `sample` (jit, while_loop)", "tab:blue", "o"),
              ("transformers_tokens_per_s", "transformers `generate` (torch)", "tab:orange", "s"),
              ("matmul_limit_tokens_per_s", "matmul rate of this CPU at that batch (2 x params FLOPs per token)", "gray", "")]
    for key, label, color, marker in series:
        axis.plot(rows, [r[key] for r in results], marker=marker or None, color=color, label=label,
                  linestyle="--" if not marker else "-")
    for r in results:
        axis.annotate(f"{r['ratio']:.2f}x", (r["rows"], r["ours_tokens_per_s"]), textcoords="offset points",
                      xytext=(0, 7), ha="center", fontsize=8, color="tab:blue")
    axis.set_xscale("log", base=2)
    axis.set_xticks(rows, [str(r) for r in rows])
    axis.set_xlabel("rows per wave (sequences sampled together)")
    axis.set_ylabel("generated tokens per second")
    top = max(max(r["ours_tokens_per_s"], r["matmul_limit_tokens_per_s"]) for r in results)
    axis.set_ylim(0, 1.35 * top)  # headroom so that the legend covers no line
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    r = results[0]
    axis.set_title(f"Sampling throughput, {num_params / 1e6:.1f}M-param Qwen2-style model, CPU ({torch.get_num_threads()} "
                   f"threads)\n{r['prompt_tokens']} prompt -> {r['new_tokens']} new tokens, temperature 1; "
                   "numbers: speed-up of ours over transformers", fontsize=10)
    return figure


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sweep-rows", type=int, nargs="*", default=None,
                        help="measure these wave sizes instead and write sampler_throughput.csv / .png to --out")
    parser.add_argument("--out", default=str(FIGURES))
    args = parser.parse_args()
    hf_config = qwen2_20m_config()
    torch_model, model = random_twins(hf_config)
    num_params = model.config.num_params()
    if args.sweep_rows:
        results = sweep(torch_model, model, args.sweep_rows, args)
        write_csv(results, Path(args.out) / "sampler_throughput.csv")
        print(save_figure(plot_sweep(results, num_params), Path(args.out) / "sampler_throughput.png"))
        return
    generated = args.rows * args.new
    print(f"Qwen2-style model, {num_params / 1e6:.1f}M parameters; {args.rows} rows x {args.prompt} prompt tokens "
          f"-> {args.new} new tokens, temperature 1; torch threads {torch.get_num_threads()}, jax {jax.devices()}")
    ours, theirs = make_samplers(torch_model, model, args.rows, args.prompt, args.new)
    first_call = timed(ours)[1]
    ours(1)  # compiles the prefill-only variant
    theirs()  # warm-up
    ours_seconds, theirs_seconds = interleaved_best(ours, theirs, args.repeats)
    prefill_seconds = best_time(lambda: ours(1), args.repeats)
    limit = matmul_limit(args.rows, hf_config.hidden_size, num_params, 10 * args.repeats)

    ours_rate, theirs_rate = generated / ours_seconds, generated / theirs_seconds
    decode_rate = args.rows * (args.new - 1) / (ours_seconds - prefill_seconds)
    print("| sampler | generated tokens/s | wave time (s) | fraction of matmul limit |")
    print("|---|---|---|---|")
    print(f"| optpo-jax `sample` (jit, while_loop) | {ours_rate:,.0f} | {ours_seconds:.2f} | {ours_rate / limit:.0%} |")
    print(f"| ... its decode alone (wave minus prefill) | {decode_rate:,.0f} | {ours_seconds - prefill_seconds:.2f} "
          f"| {decode_rate / limit:.0%} |")
    print(f"| transformers `generate` (torch) | {theirs_rate:,.0f} | {theirs_seconds:.2f} | {theirs_rate / limit:.0%} |")
    print(f"ratio ours / transformers: {ours_rate / theirs_rate:.2f}x; matmul limit {limit:,.0f} tokens/s; "
          f"first call of ours (compile + run): {first_call:.1f} s; prefill {prefill_seconds:.2f} s")


if __name__ == "__main__":
    main()
