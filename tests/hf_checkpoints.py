"""Tiny random transformers checkpoints (PyTorch, CPU) written to a folder for tests."""

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

VOCAB = 96
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|>"

FAMILIES = {
    # Llama 3: untied, GQA 4:2, rope_theta 5e5 with llama3 scaling, sharded safetensors.
    "llama": {
        "config": lambda: LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        "shard_size": "30KB",
    },
    # Qwen2: q/k/v bias, tied embeddings, GQA 4:1.
    "qwen2": {
        "config": lambda: Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "shard_size": None,
    },
    # Qwen3: q/k RMSNorm, attention bias on, no GQA, head_dim != hidden / heads.
    "qwen3": {
        "config": lambda: Qwen3Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, head_dim=16, attention_bias=True, max_position_embeddings=256,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "shard_size": None,
    },
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def write_checkpoint(family: str, folder: Path, seed: int = 0):
    """Writes a random checkpoint of ``family``; returns the PyTorch model (eval, float32)."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    hf_config = spec["config"]()
    hf_config.pad_token_id, hf_config.bos_token_id, hf_config.eos_token_id = 0, 1, 2
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            # Norm weights near 1, everything else broad enough to make every weight matter.
            if parameter.ndim == 1 and parameter.shape[0] in (32, 16):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.15)
    model.eval()
    kwargs = {"max_shard_size": spec["shard_size"]} if spec["shard_size"] else {}
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return model


def torch_logits(torch_model, tokens):
    """The reference logits: transformers' PyTorch model on ``tokens`` [B, T]."""
    with torch.no_grad():
        return torch_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
