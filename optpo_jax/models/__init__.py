"""The policy model: a Flax NNX Llama / Qwen2 / Qwen3 decoder and HF checkpoint I/O."""

from optpo_jax.models.config import PRESETS, ModelConfig, from_hf_config, preset, to_hf_config
from optpo_jax.models.decoder import Decoder, KVCache, forward, init_cache, init_decoder, padded_positions
from optpo_jax.models.hf_io import HFModel, load_hf, save_hf
from optpo_jax.models.lora import LoRAConfig, init_adapters, load_peft_adapters, merge_adapters
from optpo_jax.models.sharding import partition_specs

__all__ = [
    "PRESETS", "Decoder", "HFModel", "KVCache", "LoRAConfig", "ModelConfig", "forward", "from_hf_config",
    "init_adapters", "init_cache", "init_decoder", "load_hf", "load_peft_adapters", "merge_adapters",
    "padded_positions", "partition_specs", "preset", "save_hf", "to_hf_config",
]
