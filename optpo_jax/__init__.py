"""optpo-jax: test-time RL of language models with optimal rollout allocation."""

from optpo_jax.allocation import allocate_wave, refill
from optpo_jax.grpo import GRPOBatch, GRPOConfig, group_advantages, grpo_step, policy_loss
from optpo_jax.posterior import posterior_mode_prob
from optpo_jax.ppo import PPOConfig, gae_advantages, ppo_step
from optpo_jax.sprt import SPRTConfig, VoteState, consensus, init_vote_state, sprt_update

__all__ = [
    "AnswerSlots",
    "GRPOBatch",
    "GRPOConfig",
    "PPOConfig",
    "SPRTConfig",
    "VoteState",
    "allocate_wave",
    "consensus",
    "gae_advantages",
    "group_advantages",
    "grpo_step",
    "init_vote_state",
    "policy_loss",
    "posterior_mode_prob",
    "ppo_step",
    "refill",
    "sprt_update",
]


def __getattr__(name):
    """``AnswerSlots`` on first use: it lives in ``optpo_jax.train``, whose package imports the
    training loop (models, TensorBoard: seconds) that the pure API does not need."""
    if name == "AnswerSlots":
        from optpo_jax.train.answer_slots import AnswerSlots

        globals()["AnswerSlots"] = AnswerSlots
        return AnswerSlots
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
