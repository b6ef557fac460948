"""The running totals of a run, checkpointed with each step so that a resumed run counts on."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RunTotals:
    """Sums over the steps so far (evaluation excluded from ``seconds``).

    Attributes:
      step: steps done.
      rollouts, generated_tokens, trained_tokens: drawn rollouts, their sampled tokens, the tokens trained on.
      seconds: training wall time.
      label_accuracy_sum: the steps' pseudo-label accuracies, summed (their mean is the summary's).
      before: the evaluation before the first step (``EvalResult.summary()``), once done.
      prior: the learned prior (``prior.prior_to_json``) with ``sprt.learn_prior``, else None.
    """

    step: int = 0
    rollouts: int = 0
    generated_tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    label_accuracy_sum: float = 0.0
    before: dict | None = None
    prior: dict | None = None

    def after_step(self, metrics: dict, seconds: float, prior: dict | None) -> RunTotals:
        """The totals once a step with ``metrics`` (``metrics.step_metrics``) took ``seconds``."""
        return dataclasses.replace(
            self, step=self.step + 1, rollouts=self.rollouts + metrics["rollouts"],
            generated_tokens=self.generated_tokens + metrics["generated_tokens"],
            trained_tokens=self.trained_tokens + metrics["trained_tokens"], seconds=self.seconds + seconds,
            label_accuracy_sum=self.label_accuracy_sum + metrics["label_accuracy"], prior=prior)

    def to_json(self) -> dict:
        """The totals as a checkpoint keeps them (fields that are None left out)."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, saved: dict) -> RunTotals:
        """Inverse of ``to_json``; keys of other kinds (the checkpoint's checksums) are ignored and fields a run
        saved before they existed take their defaults."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in saved.items() if name in names})
