"""Waves against continuous rollouts, replaying recorded generations through the real sampler.

    python experiments/bench_continuous.py --data ../shared/data/vote_samples/consol_gsm8k_gpt-4o-mini.jsonl \\
        --rows 256 --json

The policy is ``models.scripted``: the k-th rollout of question q generates exactly the
k-th recorded length of q (the file's ``tokens``, times ``--length_scale``) and answers
the k-th recorded answer, so both schedules draw the same rollouts and only the sampler
differs. Both run ``train.rollouts.collect_rollouts`` (allocation or refill, the decode
loop, vote counting) over every question of the file as one batch, with the stopping rule
of ``--config`` (default: the OptPO rule of configs/arith_optpo.py) and its budget capped
at the recorded count (40). A recorded length above ``--max_new_tokens`` is cut there, as
a real generation would be: that rollout ends without an answer, and the cuts are counted
(``truncated``).

One JSON line per schedule (``--json``; a table without it):
  decode_steps: one-token decode steps of the decode loop (the prefill's first token not counted).
  useful_row_fraction: sum over kept rollouts of (length - 1) / (rows x decode_steps).
  rollouts_per_question: rollouts kept, per question.
  agreement: fraction of questions whose final vote leader is the 40-vote majority.
  seconds: wall time of the replay, host round trips included, after a first untimed
    replay of the same questions has compiled every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import timed
from bench_stopping import rules_of_config
from flax import nnx
from vote_replay import load_vote_file

from optpo_jax import continuous
from optpo_jax.grpo import GRPOConfig
from optpo_jax.models import scripted
from optpo_jax.models.config import ModelConfig
from optpo_jax.models.decoder import init_decoder
from optpo_jax.sampler import TRACE_COUNTS, SamplingConfig
from optpo_jax.sprt import SPRTConfig, consensus
from optpo_jax.train.learner import Learner
from optpo_jax.train.rollouts import collect_rollouts
from optpo_jax.train.step_config import StepConfig, UpdateConfig


class ReplayTask:
    """The scripted policy's task: question q's prompt is the token q; an answer is its recorded slot."""

    pad_token_id = scripted.PAD

    def prompt_tokens(self, question: int) -> list[int]:
        return [question]

    def extract(self, completion) -> str | None:
        answers = [int(token) for token in completion if token >= scripted.FIRST_ANSWER]
        return str(answers[0] - scripted.FIRST_ANSWER) if answers else None


def script_lengths(tokens: np.ndarray, length_scale: float, max_new_tokens: int) -> tuple[np.ndarray, int]:
    """(scripted lengths [Q, N], rollouts cut at max_new_tokens): recorded lengths scaled, at least 2. A cut
    script is max_new_tokens + 2 long, so its answer (at length - 2) is never generated either."""
    lengths = np.maximum(np.ceil(tokens * length_scale).astype(np.int64), 2)
    return np.where(lengths > max_new_tokens, max_new_tokens + 2, lengths), int(np.sum(lengths > max_new_tokens))


def stopping_rule(config_path: str | None, budget: int) -> SPRTConfig:
    """The ``sprt`` rule of a config file (default configs/arith_optpo.py), its budget capped at ``budget``."""
    path = config_path or str(Path(__file__).resolve().parents[1] / "configs" / "arith_optpo.py")
    [(rule, knobs)] = rules_of_config(path, budget)
    return SPRTConfig(rule=rule, **knobs)


DECODERS = {
    "none": None,
    # One block of the embedded policy's architecture (optpo_jax/tasks/arith_policy has four), random weights.
    "one_block": ModelConfig(model_type="llama", vocab_size=16, hidden_size=128, intermediate_size=384, num_layers=1,
                             num_heads=4, num_kv_heads=4, head_dim=32, max_position_embeddings=1 << 16),
}


def replay(samples, schedule: str, rows: int, max_new_tokens: int, length_scale: float, sprt: SPRTConfig,
           on_stop: str = "finish", decoder: str = "one_block") -> dict:
    """One schedule over every question: the benchmark's JSON fields (see the module docstring)."""
    lengths, truncated = script_lengths(samples.tokens, length_scale, max_new_tokens)
    decoder_config = DECODERS[decoder]
    decoder_params = None if decoder_config is None else nnx.split(init_decoder(decoder_config))[1]
    params = scripted.script_params(lengths, samples.slots, decoder_params)
    model_config = scripted.ScriptedConfig(num_answers=samples.slots.shape[1], decoder=decoder_config)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=(scripted.STOP,),
                              pad_token_id=scripted.PAD, schedule=schedule, on_stop=on_stop)
    config = StepConfig(sprt=sprt, sampling=sampling, update=UpdateConfig(), grpo=GRPOConfig(), rows_per_wave=rows)
    learner = Learner(task=ReplayTask(), model_config=model_config, config=config)  # collects only: no update
    questions = list(range(len(samples.slots)))
    run = lambda questions: collect_rollouts(params, learner, questions, jax.random.key(0))[0]
    run(questions)  # compiles every shape the timed replay meets (the count below says if one was missed)
    traces_before = sum(TRACE_COUNTS.values()) + sum(continuous.TRACE_COUNTS.values())
    rollouts, seconds = timed(run, questions)
    compilations = sum(TRACE_COUNTS.values()) + sum(continuous.TRACE_COUNTS.values()) - traces_before
    leaders = np.asarray(consensus(rollouts.votes))
    leader_slots = np.array([-1 if slot < 0 else int(rollouts.answer_slots.answer(q, int(slot)))
                             for q, slot in enumerate(leaders)])
    return {
        "data": samples.name, "schedule": schedule, "rows": rows, "decode_steps": rollouts.decode_steps,
        "useful_row_fraction": round(rollouts.useful_row_fraction, 4),
        "rollouts_per_question": round(len(rollouts.prompt_index) / len(questions), 4),
        "agreement": round(float(np.mean(leader_slots == samples.full_majority)), 4),
        "seconds": round(seconds, 3), "on_stop": on_stop, "max_new_tokens": max_new_tokens,
        "length_scale": length_scale, "truncated": truncated, "round_trips": rollouts.waves, "decoder": decoder,
        "sampler_compilations_timed": compilations,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a vote file with `tokens` (../shared/data/vote_samples)")
    parser.add_argument("--rows", type=int, default=256, help="rows decoded at once (a wave's rows)")
    parser.add_argument("--max_new_tokens", type=int, default=1024, help="generation cap; longer scripts are cut")
    parser.add_argument("--length_scale", type=float, default=1.0, help="factor on the recorded lengths")
    parser.add_argument("--config", default=None, help="config file whose `sprt` rule is replayed")
    parser.add_argument("--on_stop", default="finish", choices=("finish", "cancel", "both"),
                        help="continuous: a stopped prompt's rollouts in flight finish or are cancelled")
    parser.add_argument("--decoder", default="one_block", choices=sorted(DECODERS),
                        help="the decoder computed underneath the script (none: the sampler's overhead alone)")
    parser.add_argument("--questions", type=int, default=0, help="replay only the first N questions (0: all)")
    parser.add_argument("--json", action="store_true", help="one JSON line per schedule")
    args = parser.parse_args(argv)
    samples = load_vote_file(Path(args.data))
    if samples.tokens is None:
        raise SystemExit(f"{args.data} has no `tokens` field: nothing to replay the lengths of")
    if args.questions:
        samples = dataclasses.replace(samples, slots=samples.slots[: args.questions],
                                      full_majority=samples.full_majority[: args.questions],
                                      tokens=samples.tokens[: args.questions])
    sprt = stopping_rule(args.config, samples.slots.shape[1])
    runs = [("waves", "finish")] + [("continuous", mode) for mode in
                                   (("finish", "cancel") if args.on_stop == "both" else (args.on_stop,))]
    results = [replay(samples, schedule, args.rows, args.max_new_tokens, args.length_scale, sprt, on_stop,
                      args.decoder)
               for schedule, on_stop in runs]
    for result in results:
        if args.json:
            print(json.dumps(result))
        else:
            print("  ".join(f"{key}={value}" for key, value in result.items()))
    waves = results[0]
    for result in results[1:]:
        print(f"continuous ({result['on_stop']}) / waves: decode_steps {result['decode_steps'] / waves['decode_steps']:.3f}x, "
              f"seconds {result['seconds'] / waves['seconds']:.3f}x, rollouts per question "
              f"{result['rollouts_per_question'] / waves['rollouts_per_question']:.3f}x", file=sys.stderr)


if __name__ == "__main__":
    main()
