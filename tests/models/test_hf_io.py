"""optpo_jax/models/hf_io.py: loading Hugging Face checkpoints and what save_hf / optpo-jax export write."""

import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optpo_jax.models import (
    LoRAConfig,
    init_adapters,
    load_hf,
    merge_adapters,
    preset,
    save_hf,
)
from optpo_jax.models.hf_io import hf_key
from tests.hf_checkpoints import VOCAB, tiny_tokenizer, torch_logits, write_checkpoint

TOKENS = np.array([[1, 5, 9, 17, 33, 60, 2, 7], [1, 88, 4, 4, 12, 95, 40, 3]], np.int32)


# Sampling defaults a model ships with (Qwen2.5-Math's are of this kind): they must survive the export.
GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0, "do_sample": True, "temperature": 0.7,
              "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "transformers_version": "4.37.0"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (float32) with a hand-written generation_config.json."""
    folder = tmp_path_factory.mktemp("qwen2")
    torch_model = write_checkpoint("qwen2", folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return folder, torch_model


def safetensors_dtypes(path) -> set:
    """The dtypes the safetensors header records, read from the file itself (no framework involved)."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def _flat(params) -> dict:
    return {hf_key(path): np.asarray(variable.get_value(), np.float32) for path, variable in nnx.to_flat_state(params)}


def test_bfloat16_export_says_bfloat16_and_transformers_loads_bfloat16(source, tmp_path):
    """Before: config.json said float32 over bfloat16 weights, so transformers' dtype="auto" upcast them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, _ = source
    model = load_hf(folder, dtype="bfloat16")
    save_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == "bfloat16"
    assert written["torch_dtype"] == "bfloat16"  # the key that readers before transformers 4.56 look at
    assert safetensors_dtypes(tmp_path / "model.safetensors") == {"BF16"}
    assert AutoConfig.from_pretrained(tmp_path).dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reference.dtype == torch.bfloat16
    # The weights transformers holds are ours, bit for bit (kernels transposed).
    theirs = {key: value.float().numpy() for key, value in reference.state_dict().items()}
    for key, value in _flat(model.params).items():
        np.testing.assert_array_equal(theirs[key], value.T if value.ndim == 2 and "embed" not in key else value)
    # The loaded model's own config is not rewritten by saving (the run goes on using it).
    assert model.hf_config.dtype in ("float32", torch.float32)


def test_float32_export_loads_in_transformers_with_our_logits_tokenizer_and_generation_config(source, tmp_path):
    """Reference: transformers' PyTorch Qwen2, tokenizer and GenerationConfig loading the export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, _ = source
    model = load_hf(folder)
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == GENERATION  # before: not written
    assert GenerationConfig.from_pretrained(tmp_path).temperature == 0.7
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert reference.dtype == torch.float32
    with torch.no_grad():
        theirs = reference(torch.from_numpy(TOKENS).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(TOKENS)), theirs, atol=1e-4, rtol=0)
    source_tokenizer, tokenizer = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tmp_path)
    text = "w5 w9 w17 w95 w4"
    assert tokenizer(text)["input_ids"] == source_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == source_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.pad_token) == (source_tokenizer.eos_token, source_tokenizer.pad_token)


def test_merged_lora_export_keeps_the_generation_config_and_adapters_only_does_not(source, tmp_path):
    folder, _ = source
    model = load_hf(folder, load_tokenizer=False)
    lora = LoRAConfig(rank=2, alpha=4.0)
    adapters = init_adapters(model.params, lora)
    save_hf(model, tmp_path / "merged", adapters=adapters, lora=lora)
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text()) == GENERATION
    save_hf(model, tmp_path / "adapters", adapters=adapters, lora=lora, adapters_only=True, base_model=str(folder))
    assert not (tmp_path / "adapters" / "generation_config.json").exists()  # PEFT's layout: the base has it


def test_float32_merge_of_a_bfloat16_base_is_exact_in_float32(source, tmp_path):
    """save_hf(dtype="float32") widens the bfloat16 base, then merges: W + scale A B is not rounded to bfloat16.
    Reference: the merge in float32 of the widened base (merge_adapters, itself checked in numpy in test_lora)."""
    folder, _ = source
    model = load_hf(folder, dtype="bfloat16", load_tokenizer=False)
    lora = LoRAConfig(rank=2, alpha=4.0)
    keys = iter(jax.random.split(jax.random.key(3), 1000))
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, leaf: 0.01 * jax.random.normal(next(keys), leaf.shape) if path[-1].key == "lora_b" else leaf,
        init_adapters(model.params, lora))
    save_hf(model, tmp_path, adapters=adapters, lora=lora, dtype="float32")
    assert safetensors_dtypes(tmp_path / "model.safetensors") == {"F32"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    widened = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), model.params)
    expected = _flat(merge_adapters(widened, adapters, lora))
    written = _flat(load_hf(tmp_path, load_tokenizer=False).params)
    rounded = _flat(merge_adapters(model.params, adapters, lora))
    assert any(np.any(expected[key] != rounded[key]) for key in expected)  # bfloat16 would have rounded the merge
    for key, value in expected.items():
        np.testing.assert_array_equal(written[key], value)


def test_export_names_the_architecture_for_vllm(tmp_path):
    """vLLM picks the model class from config.json's architectures; the shipped policy's config has none."""
    from optpo_jax.tasks.arithmetic import load_policy

    save_hf(load_policy(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def run_config(model_dir: str, problems: str, float32_master: bool = True):
    """A math run on the tiny Qwen2 in bfloat16 (the config file of the CLI test imports this)."""
    from optpo_jax.default_config import math_config

    config = math_config("aime", "optpo")
    config.model_path, config.model_dtype = model_dir, "bfloat16"
    config.data.path = problems
    config.data.num_prompts = 2
    config.prompts_per_step, config.steps, config.rows_per_wave = 2, 2, 8
    config.sprt.update({"min_samples": 2, "max_samples": 4})
    config.sampling.update({"max_new_tokens": 4, "prompt_buckets": (32,)})
    config.math.max_prompt_tokens = 32
    config.policy_update.update({"micro_batch_rows": 8, "grad_accumulation": 1})
    config.remat = False
    config.optimizer.float32_master = float32_master
    return config


@pytest.fixture
def run_args(source, tmp_path):
    """``run_config``'s model directory and problems file."""
    folder, _ = source
    problems = tmp_path / "problems.json"
    problems.write_text(json.dumps([{"prompt": "w5 w9", "answer": "3"}, {"prompt": "w7", "answer": "4"}]))
    return str(folder), str(problems)


def config_file(tmp_path, run_args, float32_master: bool):
    """The CLI's --config file of ``run_config``."""
    path = tmp_path / f"run_config_{float32_master}.py"
    path.write_text("from tests.models.test_hf_io import run_config\n\n"
                    f"def get_config():\n    return run_config(*{run_args!r}, float32_master={float32_master})\n")
    return path


def save_run(workdir, run_args, float32_master: bool) -> tuple[dict, dict]:
    """A run checkpoint of bfloat16 params; with ``float32_master`` their master copy differs from them
    (as after steps below bfloat16's resolution). Returns (master or None, params) by checkpoint key."""
    from optpo_jax.optim import MasterState
    from optpo_jax.train.checkpoints import Checkpointer
    from optpo_jax.train.setup import build_setup

    config = run_config(*run_args, float32_master=float32_master)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort())  # export reads the run's own config
    state = build_setup(config).initial_state()
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    master = jax.tree.map(lambda p: p.astype(jnp.float32) * (1 + 1e-4 * jax.random.normal(next(keys), p.shape)),
                          state.params)
    params = jax.tree.map(lambda m: m.astype(jnp.bfloat16), master)
    opt_state = state.opt_state
    if float32_master:
        assert isinstance(opt_state, MasterState)  # make_optimizer wraps the whole chain
        opt_state = MasterState(master, opt_state.inner)
    checkpoints = Checkpointer(workdir / "checkpoints")
    checkpoints.save(1, {"params": params, "opt_state": opt_state}, {})
    checkpoints.manager.wait_until_finished()
    return (_flat(master) if float32_master else None), _flat(params)


def export(capsys, config, workdir, out, *extra) -> str:
    """``optpo-jax export`` in this process (absl flags parsed as main() would); returns what it printed."""
    from tests.cli_in_process import run_command

    code, printed, _ = run_command(capsys, "export", f"--config={config}", f"--workdir={workdir}", f"--out={out}",
                                   *extra)
    assert code == 0, code
    return printed


def test_cli_float32_export_writes_the_master_weights_exactly(run_args, tmp_path, capsys):
    """Before: no --export_dtype, and the export held the bfloat16 params whatever the run had."""
    master, params = save_run(tmp_path / "run", run_args, float32_master=True)
    assert any(np.any(master[key] != params[key]) for key in master)  # the master copy is more than the params
    run = (config_file(tmp_path, run_args, float32_master=True), tmp_path / "run")
    export(capsys, *run, tmp_path / "as_trained")
    printed = export(capsys, *run, tmp_path / "float32", "--export_dtype=float32")
    assert "float32 master" in printed
    for name, expected, dtype in (("as_trained", params, "bfloat16"), ("float32", master, "float32")):
        out = tmp_path / name
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        assert safetensors_dtypes(out / "model.safetensors") == {"F32" if dtype == "float32" else "BF16"}
        assert json.loads((out / "generation_config.json").read_text()) == GENERATION
        written = _flat(load_hf(out, dtype=dtype, load_tokenizer=False).params)
        for key, value in expected.items():
            np.testing.assert_array_equal(written[key], value)


def test_cli_float32_export_without_master_weights_widens_the_params_and_says_so(run_args, tmp_path, capsys):
    """A bfloat16 run that kept no float32 copy: widening is exact (the same values in twice the bytes), so
    it is allowed, and the command says that the values are the bfloat16 ones."""
    _, params = save_run(tmp_path / "run", run_args, float32_master=False)
    printed = export(capsys, config_file(tmp_path, run_args, float32_master=False), tmp_path / "run",
                     tmp_path / "widened", "--export_dtype=float32")
    assert "no float32 master copy" in printed
    assert safetensors_dtypes(tmp_path / "widened" / "model.safetensors") == {"F32"}
    written = _flat(load_hf(tmp_path / "widened", load_tokenizer=False).params)
    for key, value in params.items():
        np.testing.assert_array_equal(written[key], value)


def test_adapters_and_a_merged_model_never_share_a_directory_and_old_shards_go(tmp_path):
    """Adapters written into a merged model's directory (or the reverse) once left both sets of files, and an
    earlier sharded export's index made loaders read the old weights (reference: load_hf of the directory)."""
    from optpo_jax.tasks.arithmetic import load_policy

    policy = load_policy()
    lora = LoRAConfig(rank=2)
    adapters = jax.tree.map(lambda leaf: leaf + 0.01, init_adapters(policy.params, lora))
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapters"
    save_hf(policy, merged_dir, adapters=adapters, lora=lora)
    save_hf(policy, adapter_dir, adapters=adapters, lora=lora, adapters_only=True)
    with pytest.raises(ValueError, match="holds a merged model .*write the adapters to another directory"):
        save_hf(policy, merged_dir, adapters=adapters, lora=lora, adapters_only=True)
    with pytest.raises(ValueError, match="holds LoRA adapters .*write a merged model to another directory"):
        save_hf(policy, adapter_dir, adapters=adapters, lora=lora)
    assert not (merged_dir / "adapter_config.json").exists() and not (adapter_dir / "model.safetensors").exists()

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (stale / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    save_hf(policy, stale)
    assert sorted(path.name for path in stale.glob("*.safetensors*")) == ["model.safetensors"]
    reloaded = load_hf(stale, load_tokenizer=False)
    for ours, theirs in zip(jax.tree.leaves(policy.params), jax.tree.leaves(reloaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    write_checkpoint("qwen2", folder)
    return folder


def _without_tokenizer(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    for file in target.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or file.suffix == ".jinja":
            file.unlink()
    return target


def test_missing_tokenizer_files_are_named(qwen2_folder, tmp_path):
    """Item 11: no tokenizer files -> an error naming them and the directory, not a 1-token tokenizer."""
    bare = _without_tokenizer(qwen2_folder, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*bare.*tokenizer\.json.*load_tokenizer=False"):
        load_hf(bare)
    # Weights only: no tokenizer files needed.
    model = load_hf(bare, load_tokenizer=False)
    assert model.tokenizer is None
    assert model(np.array([[5, 6, 7]])).shape == (1, 3, VOCAB)
    # With the files, the tokenizer is the real one.
    assert len(load_hf(qwen2_folder).tokenizer) == VOCAB


def test_tokenizer_larger_than_the_embedding_is_an_error(qwen2_folder, tmp_path):
    """Item 11: a tokenizer whose ids exceed the embedding rows (another model's) is named, not clipped."""
    other = shutil.copytree(qwen2_folder, tmp_path / "other")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["extra_a", "extra_b"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match=rf"{VOCAB + 2} tokens.*{VOCAB} rows"):
        load_hf(other)


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (jnp.dtype("float32"), "float32"),
     (jnp.float32, "float32"), ("bfloat16", "bfloat16")],
)
def test_dtypes_as_jax_users_pass_them(qwen2_folder, dtype, name):
    """Item 11: ``dtype=jnp.bfloat16``, ``np.float32``, ``jnp.dtype(...)`` work like the strings."""
    model = load_hf(qwen2_folder, dtype=dtype, load_tokenizer=False)
    assert model.config.param_dtype == model.config.compute_dtype == name
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(name)}
    hash(model.config)  # still static under jit
    mixed = load_hf(qwen2_folder, dtype=dtype, compute_dtype=jnp.float32, load_tokenizer=False)
    assert (mixed.config.param_dtype, mixed.config.compute_dtype) == (name, "float32")
    assert preset("qwen2.5-0.5b-instruct", param_dtype=dtype).param_dtype == name


@pytest.mark.parametrize(
    ("argument", "bad"),
    [("dtype", jnp.float16), ("dtype", "float16"), ("dtype", "bf16"), ("dtype", float), ("dtype", None),
     ("dtype", 3), ("compute_dtype", jnp.int32)],
)
def test_unknown_dtype_names_the_argument_and_the_choices(qwen2_folder, argument, bad):
    """Item 11: an unknown dtype is a ValueError naming the argument and listing what is accepted."""
    with pytest.raises(ValueError, match=rf"load_hf\({argument}=\.\.\.\) must be one of \('float32', 'bfloat16'\)"):
        load_hf(qwen2_folder, load_tokenizer=False, **{argument: bad})


def test_save_hf_round_trip_loads_in_transformers(checkpoint, tmp_path):
    # Reference: transformers' AutoModelForCausalLM loading what save_hf wrote.
    _, folder, torch_model = checkpoint
    model = load_hf(folder)
    save_hf(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    np.testing.assert_allclose(torch_logits(reloaded, tokens), torch_logits(torch_model, tokens), atol=1e-5)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def _copy_checkpoint(folder, target):
    shutil.copytree(folder, target)
    return target


def test_truncated_file_renamed_key_and_wrong_shape_are_named(tmp_path):
    folder = tmp_path / "qwen2"
    write_checkpoint("qwen2", folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)

    truncated = _copy_checkpoint(folder, tmp_path / "t")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf(truncated)

    renamed = _copy_checkpoint(folder, tmp_path / "r")
    changed = dict(tensors)
    changed["model.layers.0.mlp.gate_projection.weight"] = changed.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(changed, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="gate_projection.weight"):
        load_hf(renamed)

    reshaped = _copy_checkpoint(folder, tmp_path / "s")
    changed = dict(tensors)
    changed["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 32)
    save_file(changed, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(16, 32\).*\(8, 32\)"):
        load_hf(reshaped)

    missing = _copy_checkpoint(folder, tmp_path / "m")
    changed = dict(tensors)
    del changed["model.norm.weight"]
    save_file(changed, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_hf(missing)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")
    unsupported = _copy_checkpoint(folder, tmp_path / "u")
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(ValueError, match="gpt2"):
        load_hf(unsupported)
