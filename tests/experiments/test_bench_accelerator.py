"""CPU smoke test of experiments/bench_accelerator.py at a reduced shape: sane outputs, no timing claims."""

import math

import pytest

from tests.experiments.scripts import experiment_module


@pytest.fixture(scope="module")
def bench():
    yield from experiment_module("bench_accelerator")


def test_reduced_run_gives_sane_throughputs_and_table(bench):
    rows, prompt_len, new_tokens, update_rows = (2,), 8, 6, 2  # one wave size: each is a compilation
    # Generous peaks fixed by flag (no CPU reaches 100 GB/s and 1 TFLOP/s on this model), so the fraction bound
    # below cannot flake on a loaded machine; the measured peaks are checked in the next test.
    # The new path only (each path is two compilations); the reference path is the sampler and a grpo_step
    # over full logits, both tested elsewhere, and its settings are checked below.
    results = bench.run_benchmark(models=("qwen2.5-0.5b-instruct",), rows=rows, prompt_len=prompt_len,
                                  new_tokens=new_tokens, update_rows=update_rows, small=True,
                                  bandwidth_gbs=100.0, peak_tflops=1.0, paths=("new",))
    update_name = f"update ({prompt_len + new_tokens} tokens/row)"
    assert [(r["measurement"], r["path"], r["rows"]) for r in results] == [("sample", "new", 2),
                                                                           (update_name, "new", 2)]
    for r in results:
        for key in ("tokens_per_s", "roofline_tokens_per_s", "compile_s", "seconds"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_roofline"] <= 1.5, r
        assert r["peaks_from"] == "flag" and r["model"] == "qwen2.5-0.5b-instruct (small)"
    waves, updates = results[:1], results[1:]
    for r in waves:
        # No stop tokens: every row generates all of its new tokens.
        assert r["generated_tokens"] == r["tokens"] == r["rows"] * new_tokens
        assert r["bound"] in ("memory", "compute")
    for update in updates:
        assert update["tokens"] == update_rows * (prompt_len + new_tokens)
        assert update["trained_tokens"] == update_rows * new_tokens and not update["skipped"]

    table = bench.markdown_table(results).splitlines()
    assert table[0].startswith("| model | measurement | path | rows | tokens/s |") and len(table) == 2 + len(results)
    assert "qwen2.5-0.5b-instruct (small) | update (14 tokens/row) | new | 2 |" in table[-1]
    assert "cpu" in bench.device_description() and "jax " in bench.device_description()
    config = bench.model_config("qwen2.5-0.5b-instruct", small=True)
    reference, new = bench.path_config(config, "reference"), bench.path_config(config, "new")
    assert (reference.attention, reference.fused_mlp, new.attention, new.fused_mlp) == (
        "reference", False, "dot_product", True)
    old_layout = bench.random_update_batch(config, 2, prompt_len, prompt_len + new_tokens, "reference")
    packed = bench.random_update_batch(config, 2, prompt_len, prompt_len + new_tokens, "new")
    assert old_layout.target_index is None and old_layout.target_tokens.shape == (2, prompt_len + new_tokens)
    assert packed.target_tokens.shape == packed.target_index.shape == (2, new_tokens)
    # Target t of row r (token prompt_len + 1 + t) is predicted by row token prompt_len + t, the one before it.
    assert int(packed.target_index[1, 0]) == (prompt_len + new_tokens) + prompt_len


def test_peaks_come_from_flags_table_or_measurement(bench):
    measured = bench.device_peaks()  # a CPU is not in the table: measured
    assert measured.source == "measured" and measured.bandwidth_gbs > 0 and measured.tflops > 0
    assert math.isfinite(measured.bandwidth_gbs) and math.isfinite(measured.tflops)
    assert bench.device_peaks(bandwidth_gbs=3350.0, peak_tflops=989.0) == bench.Peaks(3350.0, 989.0, "flag")
    assert bench.device_peaks(peak_tflops=5.0).source == "measured + flag"


def test_small_flag_fills_the_reduced_shape_and_keeps_explicit_flags(bench):
    args = bench.parse_args(["--small", "--rows", "3"])
    assert args.rows == [3] and args.new_tokens == bench.SMALL_SHAPE["new_tokens"]
    full = bench.parse_args([])
    assert (tuple(full.rows), full.prompt_len, full.new_tokens) == ((64, 128, 256), 512, 1024)
