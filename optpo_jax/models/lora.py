"""LoRA as a pure params-side transform: adapters live beside the frozen base, merged on use.

W' = W + (alpha / rank) * A @ B for each targeted projection kernel W [in, out], with
A [in, rank] and B [rank, out]. B starts at zero, so at initialisation the merged params
equal the base exactly and the base doubles as the KL reference (no second copy).

Why a transform and not ``flax.nnx.LoRA`` modules: the decoder stays one module whose
fused q/k/v projection, sharding rules and checkpoint keys do not change; only the
adapters (a small nested dict) are trained, sit in the optimizer state and go into
checkpoints; sampling merges once per step and decodes at full speed. The update merges
once per optimizer step too: each micro-batch differentiates the merged kernels and
``adapter_pullback`` turns that gradient into the adapters' (two rank-wide matmuls per
kernel), so only adapter-sized gradients are summed.

Adapters are a nested dict mirroring the params: ``{"layers": {"0": {"self_attn":
{"q_proj": {"lora_a": [in, r], "lora_b": [r, out]}}}}}`` (layer indices as strings so
Orbax and JSON keep them), float32 whatever the base dtype.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from optpo_jax.field_ranges import INT, REAL, check_ranges, ranged

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, scale (alpha / rank, as in PEFT) and the projections that get adapters."""

    rank: int = ranged(dataclasses.MISSING, INT, 1, 65536)
    alpha: float = ranged(16.0, REAL, 0.0, 1e6, low_inclusive=False)
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        object.__setattr__(self, "targets", tuple(self.targets))
        check_ranges(self)
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or unknown:
            raise ValueError(f"lora.targets must be a non-empty subset of {PROJECTIONS}, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _names(path) -> tuple:
    """('layers', 0, 'self_attn', 'q_proj', 'kernel') from a jax key path of an nnx.State leaf."""
    names = []
    for entry in path:
        name = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))
        if name != "value":
            names.append(name)
    return tuple(names)


def _adapter_path(names: tuple, config: LoRAConfig) -> tuple[str, ...] | None:
    """The adapter's key path for a base leaf, or None when the leaf gets no adapter."""
    if len(names) >= 2 and names[-1] == "kernel" and names[-2] in config.targets:
        return tuple(str(name) for name in names[:-1])
    return None


def _lookup(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def targeted_kernels(params, config: LoRAConfig) -> list[tuple[tuple[str, ...], tuple[int, int]]]:
    """(adapter key path, kernel shape [in, out]) of every kernel of ``params`` that gets an adapter.

    ``params`` may be abstract (``nnx.eval_shape``): only shapes are read.
    """
    kernels = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        adapter_path = _adapter_path(_names(path), config)
        if adapter_path is not None:
            kernels.append((adapter_path, tuple(leaf.shape)))
    if not kernels:
        raise ValueError(f"lora.targets {config.targets} match no kernel of these params")
    return kernels


def init_adapters(params, config: LoRAConfig, seed: int = 0) -> dict:
    """Adapters for every targeted kernel of ``params`` (an nnx.State): A as PEFT's default
    (uniform in +-1/sqrt(in)), B zero, both float32."""
    adapters: dict = {}
    key = jax.random.key(seed)
    for adapter_path, (size_in, size_out) in targeted_kernels(params, config):
        key, draw = jax.random.split(key)
        bound = 1.0 / np.sqrt(size_in)
        node = adapters
        for name in adapter_path:
            node = node.setdefault(name, {})
        node["lora_a"] = jax.random.uniform(draw, (size_in, config.rank), jnp.float32, -bound, bound)
        node["lora_b"] = jnp.zeros((config.rank, size_out), jnp.float32)
    return adapters


def merge_adapters(params, adapters: dict, config: LoRAConfig):
    """The params with W + scale * A @ B in place of each adapted kernel (same structure and dtypes).

    Pure and differentiable in ``adapters``; the base is read, never changed.
    """

    def merged(path, leaf):
        adapter_path = _adapter_path(_names(path), config)
        if adapter_path is None:
            return leaf
        adapter = _lookup(adapters, adapter_path)
        delta = jnp.dot(adapter["lora_a"], adapter["lora_b"], preferred_element_type=jnp.float32)
        return (leaf.astype(jnp.float32) + config.scale * delta).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(merged, params)


merge_adapters_jit = jax.jit(merge_adapters, static_argnames=("config",))


def split_targeted(params, config: LoRAConfig) -> dict:
    """The adapted kernels of ``params`` as a nested dict shaped like the adapters: what a LoRA step
    differentiates (``join_targeted`` puts them back into the params)."""
    kernels: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        adapter_path = _adapter_path(_names(path), config)
        if adapter_path is not None:
            node = kernels
            for name in adapter_path[:-1]:
                node = node.setdefault(name, {})
            node[adapter_path[-1]] = leaf
    return kernels


def join_targeted(kernels: dict, params, config: LoRAConfig):
    """``params`` with each adapted kernel taken from ``kernels`` (``split_targeted``'s layout)."""
    def joined(path, leaf):
        adapter_path = _adapter_path(_names(path), config)
        return leaf if adapter_path is None else _lookup(kernels, adapter_path)

    return jax.tree_util.tree_map_with_path(joined, params)


def adapter_pullback(kernel_grads: dict, adapters: dict, config: LoRAConfig) -> dict:
    """The adapters' gradient from the gradient G of the merged kernels W + scale * A @ B:
    dA = scale * G @ B^T, dB = scale * A^T @ G, in float32 (what differentiating ``merge_adapters`` gives)."""
    def pulled(adapter, grad):
        grad = grad.astype(jnp.float32)
        return {"lora_a": config.scale * jnp.dot(grad, adapter["lora_b"].T),
                "lora_b": config.scale * jnp.dot(adapter["lora_a"].T, grad)}

    return jax.tree.map(pulled, adapters, kernel_grads, is_leaf=lambda node: isinstance(node, dict) and "lora_a" in node)


def _peft_module_key(adapter_path: tuple[str, ...]) -> str:
    """PEFT's key stem: base_model.model.model.layers.0.self_attn.q_proj."""
    return f"{_PEFT_PREFIX}model.{'.'.join(adapter_path)}"


def _flat_adapters(adapters: dict, prefix: tuple = ()) -> list[tuple[tuple[str, ...], dict]]:
    if "lora_a" in adapters:
        return [(prefix, adapters)]
    return [item for name, child in adapters.items() for item in _flat_adapters(child, prefix + (name,))]


def save_peft_adapters(adapters: dict, config: LoRAConfig, out_dir: str | Path, base_model: str = "") -> None:
    """Writes PEFT's layout: adapter_config.json and adapter_model.safetensors (lora_A [r, in],
    lora_B [out, r], float32), loadable with ``peft.PeftModel.from_pretrained(base, out_dir)``."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for adapter_path, adapter in _flat_adapters(adapters):
        stem = _peft_module_key(adapter_path)
        tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(np.asarray(adapter["lora_a"], np.float32).T)
        tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(np.asarray(adapter["lora_b"], np.float32).T)
    save_file(tensors, str(out_dir / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "target_modules": list(config.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "base_model_name_or_path": base_model, "inference_mode": True,
    }
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=1))


def load_peft_adapters(directory: str | Path) -> tuple[dict, LoRAConfig]:
    """Adapters and their LoRAConfig from PEFT's layout (as written by ``save_peft_adapters``).

    Raises FileNotFoundError naming a missing file and ValueError naming a key PEFT wrote
    that is not a LoRA A/B weight of a decoder projection (nothing is silently skipped).
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
        if not (directory / name).exists():
            raise FileNotFoundError(f"{directory / name} does not exist")
    settings = json.loads((directory / PEFT_CONFIG_FILE).read_text())
    targets = settings["target_modules"]
    config = LoRAConfig(rank=int(settings["r"]), alpha=float(settings["lora_alpha"]),
                        targets=tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets))
    adapters: dict = {}
    for key, value in load_file(str(directory / PEFT_WEIGHTS_FILE)).items():
        head = f"{_PEFT_PREFIX}model."
        kind = key.rsplit(".", 2)[-2] if key.endswith(".weight") else None
        if not key.startswith(head) or kind not in ("lora_A", "lora_B"):
            raise ValueError(f"{directory / PEFT_WEIGHTS_FILE}: key {key!r} is not a LoRA A/B weight of the decoder")
        node = adapters
        for name in key[len(head):].rsplit(".", 2)[0].split("."):
            node = node.setdefault(name, {})
        node["lora_a" if kind == "lora_A" else "lora_b"] = jnp.asarray(value.T, jnp.float32)
    return adapters, config
