"""Default experiment configs (ml_collections), shared by the files in configs/."""

from __future__ import annotations

import ml_collections

METHODS = ("optpo", "ttrl")


def arithmetic_config(method: str = "optpo") -> ml_collections.ConfigDict:
    """Test-time RL of the shipped policy on the shifted arithmetic test prompts.

    ``optpo``: Dirichlet-posterior stopping at 0.95 (4 to 64 votes), GRPO on every
    rollout drawn. ``ttrl``: the fixed 64-vote budget, GRPO on 32 of them (arXiv 2504.16084).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 0
    config.task = "arithmetic"
    config.model_path = ""  # "" = the shipped policy (optpo_jax/tasks/arith_policy)
    config.data = ml_collections.ConfigDict({
        "mode": "transductive",  # or "held_out": adapt on one split, evaluate on another
        "num_prompts": 128, "seed": 0, "held_out_seed": 1,
    })
    config.steps = 16
    config.prompts_per_step = 32
    config.rows_per_wave = 256
    # Spare wave rows start the next batch's prompts (their early rollouts are one update stale).
    config.lookahead = True
    config.checkpoint_every = 4
    config.sprt = ml_collections.ConfigDict({
        "rule": "dirichlet" if method == "optpo" else "fixed", "threshold": 0.95, "prior": 1.0,
        "min_samples": 4, "max_samples": 64, "esc_window": 8,
    })
    config.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "prompt_buckets": (24,),
    })
    config.grpo = ml_collections.ConfigDict({
        "clip_eps": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.0, "loss_aggregation": "token-mean",
    })
    config.policy_update = ml_collections.ConfigDict({
        "train_samples_per_prompt": 0 if method == "optpo" else 32, "micro_batch_rows": 256, "epochs": 1,
        "advantage_mode": "grpo",
    })
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
    })
    config.eval = ml_collections.ConfigDict({
        "every_steps": 8, "samples": 16, "final_samples": 64, "temperature": 1.0,
    })
    return config
