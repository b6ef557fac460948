"""Default experiment configs (ml_collections), shared by the files in configs/."""

from __future__ import annotations

import ml_collections

from optpo_jax.models.lora import PROJECTIONS
from optpo_jax.tasks.math import CHOICE_INSTRUCTION, TTRL_INSTRUCTION

METHODS = ("optpo", "ttrl", "ttrl_random")


def lora_section(rank: int = 0, alpha: float = 16.0) -> ml_collections.ConfigDict:
    """LoRA settings: rank 0 trains every parameter; rank > 0 trains adapters on ``targets`` only."""
    return ml_collections.ConfigDict({"rank": rank, "alpha": alpha, "targets": ",".join(PROJECTIONS)})


def _add_task_and_data(config: ml_collections.ConfigDict) -> None:
    """The task, the model, the reward and where the prompts come from (the embedded task's defaults)."""
    # "arithmetic", "math" or "module:factory" (your own task: tasks/base.py)
    config.task = "arithmetic"
    config.model_path = ""  # "" = the shipped policy (optpo_jax/tasks/arith_policy); else a checkpoint directory
    config.model_dtype = "float32"  # of a checkpoint's params: "float32" or "bfloat16"
    # "consensus": the majority vote is the label (test-time RL); "ground_truth": the true answers (train/rewards.py)
    config.reward = "consensus"
    config.data = ml_collections.ConfigDict({
        "mode": "transductive",  # or "held_out": adapt on one split, evaluate on another
        # The embedded task generates num_prompts sums per split from these seeds; other tasks read problem files
        # (JSON list or JSONL of records with prompt_field and answer_field; num_prompts 0 = all).
        "num_prompts": 128, "seed": 0, "held_out_seed": 1,
        "path": "", "held_out_path": "", "prompt_field": "prompt", "answer_field": "answer",
    })
    # Task "math" (tasks/math.py): chat prompts of question + instruction, \boxed{} answers graded by math-verify.
    config.math = ml_collections.ConfigDict({
        "instruction": TTRL_INSTRUCTION, "max_prompt_tokens": 1024, "multiple_choice": False, "timeout_seconds": 2,
    })


def _policy_update_section(method: str) -> ml_collections.ConfigDict:
    """How a step's rollouts become optimizer steps (``UpdateConfig``): TTRL's subsample, or every rollout."""
    return ml_collections.ConfigDict({
        # TTRL trains on 32 of its 64 votes: the first 32 drawn, advantages over those ("first"), or a random 32
        # with advantages over all 64 ("random").
        "train_samples_per_prompt": 0 if method == "optpo" else 32,
        "subsample": "random" if method == "ttrl_random" else "first",
        # How much each trained rollout counts, from its prompt's final vote (train/vote_weights.py):
        # "all", "decided" (prompts whose vote reached the threshold), "per_prompt", "confidence".
        "vote_weights": "all",
        "micro_batch_rows": 256,
        # 0: one optimizer step per micro_batch_rows of rollouts; k: k steps per epoch of each training step.
        "optimizer_steps": 0,
        # Rollouts a prompt draws for the update after its vote stopped (the paper's N; 0 = votes only).
        "min_rollouts_per_prompt": 0,
        "grad_accumulation": 1, "epochs": 1,
        "advantage_estimator": "grpo",
        # Micro-batches train at their longest sequence (rounded up to 16) and at the
        # smallest of 256 / 128 / 64 rows that holds them; each prompt is packed once with
        # its completions into rows of 128 tokens (0: one rollout per row).
        "width_bucket": 16, "row_buckets": 3, "pack_width": 128,
    })


def arithmetic_config(method: str = "optpo") -> ml_collections.ConfigDict:
    """Test-time RL of the shipped policy on the shifted arithmetic test prompts.

    ``optpo``: Dirichlet-posterior stopping at 0.95 (4 to 64 votes), GRPO on every
    rollout drawn. ``ttrl``: the fixed 64-vote budget, GRPO on the first 32 of them with
    advantages over those 32 (arXiv 2504.16084; its code's ``select_top_k_per_prompt``).
    ``ttrl_random``: TTRL with advantages over all 64 votes and a random 32 trained on (this
    project's baseline before issue 29: a lower-variance baseline than TTRL publishes).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 0
    _add_task_and_data(config)
    config.steps = 16  # 0: one epoch of the training prompts
    # > 0: the run stops after the step at which it has drawn this many rollouts (or at `steps`, if first).
    config.rollout_budget = 0
    config.prompts_per_step = 32
    config.rows_per_wave = 256
    # Spare wave rows start the next batch's prompts (their early rollouts are one update stale).
    config.lookahead = True
    config.checkpoint_every = 4
    # Devices: (data, fsdp, tensor) sizes, one may be -1 for "the rest"; (1, 1, 1) = one device.
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    config.remat = False  # recompute each block's activations in the backward pass
    # "reference" (einsums, float32 scores) or "dot_product" (jax.nn.dot_product_attention: cuDNN on a GPU).
    config.attention = "reference"
    config.distributed = False  # jax.distributed.initialize() first: one process per host of a pod / cluster
    config.sprt = ml_collections.ConfigDict({
        "rule": "dirichlet" if method == "optpo" else "fixed", "threshold": 0.95, "prior": 1.0,
        "min_samples": 4, "max_samples": 64, "esc_window": 8, "margin_p0": 0.75,
        # Fit the prior's concentration to the votes of finished prompts, step after step (sprt.prior until then).
        "learn_prior": False,
    })
    config.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "prompt_buckets": (24,),
        # "waves": each sampler call decodes until its longest row stops (32-token answers waste little);
        # "continuous": rows refilled as rollouts finish (docs/architecture.md). on_stop: "finish" | "cancel".
        "schedule": "waves", "on_stop": "finish",
    })
    config.grpo = ml_collections.ConfigDict({
        "clip_eps": 0.2, "clip_eps_high": 0.2, "kl_coef": 0.0, "loss_aggregation": "token-mean",
    })
    config.policy_update = _policy_update_section(method)
    # "grpo": group advantages (policy_update.advantage_estimator: grpo, drgrpo, rloo, reinforce_pp);
    # "ppo": a critic (a copy of the policy with a value head) and GAE advantages, settings in config.ppo.
    config.algorithm = "grpo"
    config.ppo = ppo_section()
    config.lora = lora_section()
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "schedule": "constant", "warmup_fraction": 0.0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "float32_master": False,
    })
    config.eval = ml_collections.ConfigDict({
        "every_steps": 8, "samples": 16, "final_samples": 64, "temperature": 1.0, "top_p": 1.0,
    })
    return config


def ppo_section(critic_learning_rate: float = 1e-4) -> ml_collections.ConfigDict:
    """PPO's critic and advantages (``ppo.PPOConfig``), read with ``config.algorithm = "ppo"``: verl's GAE
    defaults (gamma = lam = 1, value clip 0.5, whitened advantages) and the critic's AdamW peak rate."""
    return ml_collections.ConfigDict({
        "gamma": 1.0, "lam": 1.0, "value_clip": 0.5, "whiten_advantages": True,
        "critic_learning_rate": critic_learning_rate,
    })


def study_config(method: str = "optpo") -> ml_collections.ConfigDict:
    """The embedded task as an instrument for comparing methods over seeds (docs/comparisons.md).

    ``arithmetic_config`` on 256 test prompts, 32 a step for 8 steps (one epoch: each prompt
    trained on once) at learning rate 5e-5, evaluated before and after on 16 samples per
    prompt. Twice the prompts of the default halve the part of a run's outcome that is each
    prompt's pseudo-label going one way or the other, and one epoch keeps a prompt's first
    label from being trained in again; the 128-prompt, two-epoch protocol of issue 29 had a
    per-seed standard deviation of the OptPO - TTRL difference of 4.2 points, this one 3.3
    over seeds 0-9 at the same cost (docs/comparisons.md). At 1e-4 the task's training is
    near its instability.
    """
    config = arithmetic_config(method)
    config.data.num_prompts = 256
    config.steps = 8
    config.optimizer.learning_rate = 5e-5
    config.eval.update({"every_steps": 8, "samples": 16, "final_samples": 16})
    return config


def math_config(benchmark: str, method: str = "optpo") -> ml_collections.ConfigDict:
    """TTRL's recipe (arXiv 2504.16084) for Qwen2.5-Math-1.5B on a benchmark file in ../shared/data.

    Rollouts at temperature 1.0 with up to 3072 new tokens; AdamW 5e-7, cosine with 3%
    warmup; k3 KL 0.001 to the initial policy; clip 0.2; evaluation avg@16 at temperature
    0.6, top-p 0.95. ``method`` picks the OptPO rule or the fixed 64/32 TTRL baseline.
    Full fine-tuning sized for one 80 GB device (``optpo-jax plan``: 52 GiB); for 16 GB see
    ``math_lora_config``.
    """
    files = {"aime": "aime_ttt.json", "amc": "amc_ttt.json", "math500": "math_ttt.json", "gpqa": "gpqa_ttt.json"}
    if benchmark not in files:
        raise ValueError(f"benchmark must be one of {tuple(files)}, got {benchmark!r}")
    config = arithmetic_config(method)
    config.task = "math"
    config.model_path = "Qwen/Qwen2.5-Math-1.5B"  # or a local checkpoint directory
    config.model_dtype = "bfloat16"
    # The benchmark files as TTRL publishes them (its repository's data/ folder: AIME 2024, AMC, MATH-500, GPQA),
    # a JSON list of {prompt, answer, source, id}; a checkout finds them in ../shared/data. For your own data,
    # --config.data.path=problems.jsonl with --config.data.prompt_field / answer_field.
    config.data = ml_collections.ConfigDict({
        "mode": "transductive", "path": f"../shared/data/{files[benchmark]}", "held_out_path": "",
        "prompt_field": "prompt", "answer_field": "answer", "num_prompts": 0, "seed": 0, "held_out_seed": 1,
    })
    config.math.update({"instruction": TTRL_INSTRUCTION if benchmark != "gpqa" else CHOICE_INSTRUCTION,
                        "multiple_choice": benchmark == "gpqa"})
    epochs = {"aime": 80, "amc": 30, "math500": 10, "gpqa": 10}[benchmark]
    num_prompts = {"aime": 30, "amc": 83, "math500": 500, "gpqa": 198}[benchmark]
    config.prompts_per_step = min(32, num_prompts)
    config.steps = epochs * max(num_prompts // config.prompts_per_step, 1)
    config.rows_per_wave = 256
    config.checkpoint_every = 20
    config.sampling = ml_collections.ConfigDict({
        "max_new_tokens": 3072, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "prompt_buckets": (256, 512, 1024),
        # Long-tailed generations: a wave would wait for its longest row (docs/results.md, continuous rollouts).
        "schedule": "continuous", "on_stop": "finish",
    })
    config.grpo.kl_coef = 0.001
    # 64 rows per optimizer step, one row (up to 4096 tokens) per micro-batch, blocks recomputed in the
    # backward: the 151,936-way float32 log-softmax alone is about 7 GiB per row (`optpo-jax plan`).
    config.policy_update.micro_batch_rows = 64
    config.policy_update.grad_accumulation = 64
    config.remat = True
    # bfloat16 params, float32 master weights and optimizer state.
    config.optimizer.update({"learning_rate": 5e-7, "schedule": "cosine", "warmup_fraction": 0.03,
                             "float32_master": True})
    config.eval.update({"every_steps": 50, "samples": 16, "final_samples": 16, "temperature": 0.6, "top_p": 0.95})
    return config


def math_lora_config(benchmark: str, method: str = "optpo") -> ml_collections.ConfigDict:
    """``math_config`` made to fit one 16 GB device (free Colab T4, TPU v5e chip): LoRA rank 32 on
    every projection over the frozen bfloat16 base, waves of 64 rows and 2048 new tokens (TTRL:
    256 rows, 3072). ``optpo-jax plan --config ...`` prints the bytes.
    """
    config = math_config(benchmark, method)
    config.lora = lora_section(rank=32, alpha=64.0)
    config.rows_per_wave = 64
    config.sampling.max_new_tokens = 2048
    # Adapters train in float32 (no master copy needed) and take a larger step than full fine-tuning.
    config.optimizer.update({"learning_rate": 1e-5, "float32_master": False})
    return config
