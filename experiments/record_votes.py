"""Records k answers per prompt of the embedded task's policy as a vote file for bench_stopping.py.

The file has the format of ../shared/data/vote_samples (one prompt a line: ``answers`` in
sampling order, "" where no answer was found, and ``truth``), so the stopping rules can be
replayed on the policy that OptPO trains:

    python experiments/record_votes.py --out experiments/out/arith_votes.jsonl [--samples 64] [--workdir runs/optpo]
    python experiments/bench_stopping.py --data experiments/out/arith_votes.jsonl

With ``--workdir`` the policy is the run's latest checkpoint (a sharpened policy; LoRA runs included) under
the run's own config, else the shipped one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from optpo_jax.default_config import arithmetic_config
from optpo_jax.train.evaluation import run_eval
from optpo_jax.train.setup import build_setup
from optpo_jax.train.trained import load_run_config, load_trained


def policy_to_record(workdir: str | None):
    """(Setup, policy params): the latest checkpoint of the run in ``workdir`` under the run's own config (LoRA
    adapters merged into their base), or the shipped policy under the OptPO config."""
    if not workdir:
        setup = build_setup(arithmetic_config("optpo"))
        return setup, setup.policy.params
    trained = load_trained(load_run_config(workdir), workdir)
    return trained.setup, trained.policy_params()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--workdir", help="a training run whose latest checkpoint to record (default: shipped policy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup, params = policy_to_record(args.workdir)
    result = run_eval(setup, params, args.samples, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as lines:
        for index, (problem, answers) in enumerate(zip(setup.eval_problems, result.answers, strict=True)):
            row = {"question_id": f"arith-{index}", "answers": ["" if a is None else str(a) for a in answers],
                   "truth": str(problem.answer)}
            lines.write(json.dumps(row) + "\n")
    print(f"{len(setup.eval_problems)} prompts x {args.samples} answers -> {out} (pass@1 {result.pass_at_1:.3f})")


if __name__ == "__main__":
    main()
