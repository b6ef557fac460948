"""Hugging Face checkpoints in and out: config.json, safetensors (single or sharded), tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from optpo_jax.models.config import DTYPES, ModelConfig, dtype_name, from_hf_config, to_hf_config
from optpo_jax.models.decoder import forward, graphdef_for, init_decoder
from optpo_jax.models.lora import merge_adapters_jit, save_peft_adapters

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_FILE = "generation_config.json"
# config.json's "architectures": vLLM picks the model class from it (transformers goes by model_type).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Files that hold a tokenizer's vocabulary (fast tokenizers' tokenizer.json; SentencePiece;
# slow BPE's vocab.json + merges.txt; WordPiece). tokenizer_config.json alone holds none:
# AutoTokenizer then builds a 1-token tokenizer without complaint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def hf_key(path: tuple) -> str:
    """transformers' checkpoint key of a parameter path in our NNX state."""
    *module, leaf = path
    prefix = "" if module[0] == "lm_head" else "model."
    return f"{prefix}{'.'.join(str(part) for part in module)}.{'bias' if leaf == 'bias' else 'weight'}"


def _is_kernel(path: tuple) -> bool:
    """Linear kernels are [in, out] here and [out, in] in transformers."""
    return path[-1] == "kernel"


@dataclasses.dataclass
class HFModel:
    """A loaded checkpoint: ``model(tokens [B, T]) -> logits [B, T, V]``.

    Attributes:
      config: our static architecture.
      params: the decoder's ``nnx.State``.
      hf_config: the transformers config it came from (written back by ``save_hf``).
      tokenizer: the transformers tokenizer (chat template kept), or None.
      generation_config: the checkpoint's generation_config.json as a dict (sampling
        defaults and stop tokens that transformers and vLLM apply), written back
        unchanged by ``save_hf``; None when it had none.
    """

    config: ModelConfig
    params: nnx.State
    hf_config: Any = None
    tokenizer: Any = None
    generation_config: dict | None = None

    def __call__(self, tokens) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return _forward_jit(self.config, self.params, tokens, positions)[0]

    @property
    def module(self):
        """The NNX decoder module holding ``params``."""
        return nnx.merge(graphdef_for(self.config), self.params)


_forward_jit = jax.jit(forward, static_argnames=("config",))


def _weight_files(path: Path) -> dict[str, Path]:
    """Map from checkpoint key to the safetensors file that holds it."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {key: path / name for key, name in weight_map.items()}
    if (path / SINGLE_FILE).exists():
        with _open(path / SINGLE_FILE) as handle:
            return {key: path / SINGLE_FILE for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    raise FileNotFoundError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _open(file: Path):
    if not file.exists():
        raise FileNotFoundError(f"weight file {file} (named in {INDEX_FILE}) does not exist")
    try:
        return safe_open(str(file), framework="flax")
    except SafetensorError as error:
        raise ValueError(f"cannot read safetensors file {file}: {error}") from error


def _read_tensors(files: dict[str, Path]) -> dict[str, jax.Array]:
    tensors = {}
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                try:
                    tensors[key] = handle.get_tensor(key)
                except SafetensorError as error:
                    raise ValueError(f"cannot read {key!r} from {file}: {error}") from error
    missing = sorted(set(files) - set(tensors))
    if missing:
        raise ValueError(f"keys listed in {INDEX_FILE} but absent from their files: {missing[:5]}")
    return tensors


def _fill_params(config: ModelConfig, tensors: dict[str, jax.Array], source: Path) -> nnx.State:
    """Checks every tensor against the architecture and places it; errors on any mismatch."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: init_decoder(config)))
    by_key = {hf_key(path): path for path, _ in nnx.to_flat_state(abstract)}
    expected = dict(nnx.to_flat_state(abstract))
    dtype = DTYPES[config.param_dtype]
    values = {}
    for key, tensor in tensors.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            embedding = tensors.get("model.embed_tokens.weight")
            if embedding is None or not bool(jnp.array_equal(embedding, tensor)):
                raise ValueError(f"{source}: lm_head.weight differs from the tied embedding")
            continue
        if key not in by_key:
            raise ValueError(f"{source}: checkpoint weight {key!r} is not used by the {config.model_type} model")
        path = by_key[key]
        array = tensor.T if _is_kernel(path) else tensor
        want = expected[path].get_value().shape
        if array.shape != want:
            hf_shape = want[::-1] if _is_kernel(path) else want
            raise ValueError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(hf_shape)}")
        values[path] = jnp.asarray(array, dtype)
    unfilled = sorted(hf_key(path) for path in expected if path not in values)
    if unfilled:
        raise ValueError(f"{source}: parameters missing from the checkpoint: {unfilled}")
    for path, variable in expected.items():
        variable.set_value(values[path])
    return nnx.from_flat_state(expected)


def _load_tokenizer(path: Path, vocab_size: int):
    """AutoTokenizer of ``path``; an error naming the directory and the files when there is none."""
    from transformers import AutoTokenizer

    if not any((path / name).exists() for name in TOKENIZER_FILES):
        present = sorted(child.name for child in path.iterdir())
        raise FileNotFoundError(
            f"no tokenizer in {path}: none of {', '.join(TOKENIZER_FILES)} exists (the directory holds "
            f"{', '.join(present)}); copy the tokenizer files of the model there, or pass load_tokenizer=False "
            "to load the weights only"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"cannot load the tokenizer in {path}: {error}") from error
    if len(tokenizer) < 2 or len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens; the model's embedding has {vocab_size} rows "
            "(a tokenizer of another model, or tokenizer files missing?)"
        )
    return tokenizer


def _load_generation_config(path: Path) -> dict | None:
    """The checkpoint's generation_config.json as written (not validated: it is only copied on export)."""
    file = path / GENERATION_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON: {error}") from error


def load_hf(
    path: str | Path,
    dtype: Any = "float32",
    compute_dtype: Any = None,
    load_tokenizer: bool = True,
) -> HFModel:
    """Loads a Llama / Qwen2 / Qwen3 checkpoint directory into our decoder.

    Args:
      path: directory with config.json, model.safetensors or a sharded index, and
        tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt).
      dtype: parameter dtype: "float32" or "bfloat16", or the dtype itself as JAX / numpy
        users pass it (``jnp.bfloat16``, ``np.float32``, ``jnp.dtype("float32")``).
      compute_dtype: activation dtype, in the same forms (default: ``dtype``).
      load_tokenizer: whether to load the tokenizer with AutoTokenizer; False loads the
        weights only and needs no tokenizer files (``tokenizer`` is then None).

    Raises:
      FileNotFoundError naming the missing file (config.json, weights, or, when
      ``load_tokenizer``, the tokenizer files and the directory); ValueError naming the key
      and both shapes on a mismatch, an unused checkpoint weight, or an unfilled parameter;
      ValueError naming the argument for a dtype other than float32 / bfloat16, and naming
      the directory for a tokenizer that does not load or has more tokens than the
      embedding has rows.
    """
    from transformers import AutoConfig

    dtype = dtype_name(dtype, "load_hf(dtype=...)")
    compute_dtype = dtype if compute_dtype is None else dtype_name(compute_dtype, "load_hf(compute_dtype=...)")
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} does not exist")
    hf_config = AutoConfig.from_pretrained(path)
    config = from_hf_config(hf_config, param_dtype=dtype, compute_dtype=compute_dtype)
    # The tokenizer first: a missing one is found before the (large) weights are read.
    tokenizer = _load_tokenizer(path, config.vocab_size) if load_tokenizer else None
    params = _fill_params(config, _read_tensors(_weight_files(path)), path)
    return HFModel(config=config, params=params, hf_config=hf_config, tokenizer=tokenizer,
                   generation_config=_load_generation_config(path))


def _cast(tree, dtype: str | None):
    """``tree`` with its arrays in ``dtype`` (None: unchanged). float32 from bfloat16 is exact."""
    if dtype is None:
        return tree
    return jax.tree.map(lambda leaf: leaf.astype(DTYPES[dtype]), tree)


def _hf_tensors(params: nnx.State) -> dict[str, jax.Array]:
    """The params under transformers' keys and layout (kernels transposed to [out, in])."""
    tensors = {}
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        tensors[hf_key(path)] = jnp.asarray(value.T if _is_kernel(path) else value)
    return tensors


def _written_dtype(tensors: dict[str, jax.Array]) -> str:
    """The one dtype of the tensors, which config.json must state (transformers' dtype="auto" loads that)."""
    names = sorted({jnp.dtype(tensor.dtype).name for tensor in tensors.values()})
    if len(names) != 1 or names[0] not in DTYPES:
        raise ValueError(f"save_hf: the params must all be one of {tuple(DTYPES)}, got dtypes {names}")
    return names[0]


def _write_config(model: HFModel, out_dir: Path, dtype: str) -> None:
    """config.json stating the weights' dtype and the architecture, without changing ``model.hf_config``."""
    # A copy: the run that exports goes on using its config.
    hf_config = copy.deepcopy(model.hf_config) if model.hf_config is not None else to_hf_config(model.config)
    hf_config.dtype = dtype
    if not getattr(hf_config, "architectures", None):
        hf_config.architectures = [ARCHITECTURES[model.config.model_type]]
    hf_config.save_pretrained(out_dir)
    # transformers 5 writes "dtype" only; readers before 4.56 (and vLLM on them) look for "torch_dtype".
    written = json.loads((out_dir / "config.json").read_text())
    written["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")


def _refuse_mixing(out_dir: Path, present: tuple[str, ...], holds: str, writing: str) -> None:
    """A directory holds one model: writing ``writing`` beside ``holds`` would leave loaders two to pick from."""
    found = [name for name in present if (out_dir / name).exists()]
    if found:
        raise ValueError(f"save_hf: {out_dir} holds {holds} ({', '.join(found)}); write {writing} to another "
                         "directory (or remove those files first)")


def _remove_old_shards(out_dir: Path) -> None:
    """Removes an earlier sharded export (its index and the shards it lists): loaders prefer the index over the
    single file written now, so they would read the old weights."""
    index = out_dir / INDEX_FILE
    if not index.exists():
        return
    for shard in set(json.loads(index.read_text()).get("weight_map", {}).values()):
        (out_dir / Path(shard).name).unlink(missing_ok=True)
    index.unlink()


def save_hf(model: HFModel, out_dir: str | Path, adapters: dict | None = None, lora=None,
            adapters_only: bool = False, base_model: str = "", dtype: Any = None) -> None:
    """Writes config.json, model.safetensors, the tokenizer and generation_config.json for
    transformers / vLLM.

    config.json states the dtype of the weights written. The tokenizer is written when
    ``model.tokenizer`` is set (``save_pretrained``: tokenizer.json, tokenizer_config.json, chat
    template), generation_config.json when the source checkpoint had one (copied as it was).

    With LoRA ``adapters`` (and their ``lora`` LoRAConfig, see ``models.lora``): the merged
    model by default, or with ``adapters_only`` the adapters alone in PEFT's layout
    (adapter_config.json naming ``base_model``, adapter_model.safetensors, always float32).

    ``dtype``: "float32" or "bfloat16" (or a dtype object) for the weights written; None (default)
    writes the params as they are. The params are cast before a merge, so "float32" merges
    W + scale A B in float32 over a bfloat16 base instead of rounding it to bfloat16.
    """
    if (adapters is None) != (lora is None):
        raise ValueError("save_hf: pass both adapters and lora (their LoRAConfig), or neither")
    dtype = None if dtype is None else dtype_name(dtype, "save_hf(dtype=...)")
    if adapters_only:
        if adapters is None:
            raise ValueError("save_hf(adapters_only=True) needs the adapters and their LoRAConfig")
        if dtype not in (None, "float32"):
            raise ValueError(f"save_hf(adapters_only=True) writes float32 adapters (PEFT's layout), not {dtype}")
        _refuse_mixing(Path(out_dir), (SINGLE_FILE, INDEX_FILE), "a merged model", "the adapters")
        save_peft_adapters(adapters, lora, out_dir, base_model)
        return
    _refuse_mixing(Path(out_dir), ("adapter_config.json", "adapter_model.safetensors"), "LoRA adapters",
                   "a merged model")
    params = _cast(model.params, dtype)
    if adapters is not None:
        params = merge_adapters_jit(params, adapters, lora)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(params)
    _write_config(model, out_dir, _written_dtype(tensors))
    _remove_old_shards(out_dir)
    save_file(tensors, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        (out_dir / GENERATION_FILE).write_text(json.dumps(model.generation_config, indent=2) + "\n")
