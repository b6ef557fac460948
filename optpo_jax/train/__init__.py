"""The host side of test-time RL: three nested loops around the pure core.

- steps (``loop.py``): batches of prompts, evaluation, metrics, checkpoints, resume;
  ``setup.py`` turns an experiment config into the objects a run needs, ``state.py`` holds
  what a step changes and ``trained.py`` reads a finished run back.
- waves (``step.py`` -> ``rollouts.py``, ``update.py``): one training step draws waves until
  every prompt's vote has stopped, then rewards agreement and updates the policy with GRPO.
- tokens (``waves.py`` -> ``optpo_jax.sampler``): one wave is one jitted sampler call,
  a ``lax.while_loop`` over tokens; the same driver serves evaluation (``evaluation.py``).

``distributed.py`` (meshes, per-process shares and sums) is used by this package only.
"""

from optpo_jax.train.loop import train

__all__ = ["train"]
