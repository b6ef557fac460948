"""Runs two methods over training seeds and reports them side by side (``optpo-jax compare``).

    compare_methods([optpo_config, ttrl_config], workdir, seeds=range(3))
      for seed:                          workdir/seed{s}/{method}: one ``train`` run each
        for method: skip (finished) | resume (started) | start
      -> report: per method mean +- stderr over seeds; paired differences (first - second
         method) per seed and per prompt; the compute-matched row; comparison.md + .json

With ``seeds=None`` each config runs once with its own ``config.seed`` in
``workdir/{method}`` (the single-run layout ``make demo`` uses) and the printed table is
``summary_table``'s. The statistics are in ``seed_stats``; docs/comparisons.md says what
every number means.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from optpo_jax.report import rollout_match, seed_stats
from optpo_jax.train.checkpoints import Checkpointer
from optpo_jax.train.config_checks import ConfigError
from optpo_jax.train.distributed import is_lead_process
from optpo_jax.train.loop import train
from optpo_jax.train.setup import check_config
from optpo_jax.train.workdir import WorkdirError, WorkdirLock, check_resumable, holds_run, read_json, write_atomically

# Per-run values reported for each method: name -> (column title, reads it off a run's summary).
RUN_VALUES = {
    "pass@1_before": ("pass@1 before", lambda s: s["before"]["pass@1"] if s.get("before") else None),
    "pass@1": ("pass@1 after", lambda s: s["after"]["pass@1"]),
    "maj@k": ("maj@k after", lambda s: s["after"][_maj_key(s)]),
    "label_accuracy": ("label accuracy", lambda s: s["label_accuracy"]),
    "rollouts": ("rollouts", lambda s: s["total_rollouts"]),
    "generated_tokens": ("generated tokens", lambda s: s["total_generated_tokens"]),
    "trained_tokens": ("trained tokens", lambda s: s.get("total_trained_tokens")),
    "train_seconds": ("train wall-clock (s)", lambda s: s["train_seconds"]),
}
PERCENT = ("pass@1_before", "pass@1", "maj@k", "label_accuracy")
MATCHES = ("steps", "rollouts")


def _maj_key(summary: dict) -> str:
    return next(name for name in summary["after"] if name.startswith("maj@"))


def machine_line() -> str:
    import jax

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}"


def run_dir(workdir: str | Path, method: str, seed: int | None) -> Path:
    """Where one run lives: ``workdir/seed{seed}/{method}``, or ``workdir/{method}`` for a single-run compare."""
    return Path(workdir) / method if seed is None else Path(workdir) / f"seed{seed}" / method


def seed_configs(configs: Sequence, seeds: Sequence[int] | None) -> list[tuple[int | None, object]]:
    """(seed, config) of every run, seed-major (both methods of seed 0 first, so results pair up early).

    Each config is copied with ``config.seed = seed``; data.seed, the policy and the test
    prompts stay as configured. ``seeds=None``: each config once, as it is.
    """
    if seeds is None:
        return [(None, config) for config in configs]
    runs = []
    for seed in seeds:
        for config in configs:
            copy = config.copy_and_resolve_references()
            copy.seed = int(seed)
            runs.append((int(seed), copy))
    return runs


def run_action(directory: Path, config, resume: bool, overwrite: bool) -> str:
    """What to do with one run's workdir: ``start``, ``skip`` (finished), ``resume`` or ``restart``.

    ``overwrite``: start every run afresh (``train(overwrite=True)`` removes the old one).
    Otherwise a workdir that holds a run needs ``resume``; then the saved config must define
    the same run (``check_resumable``), and a finished run (summary.json of as many steps)
    is skipped, a run with a checkpoint resumes, and one that saved no checkpoint yet (stopped
    in its first steps) starts again; a run that stopped at its ``rollout_budget`` before
    ``config.steps`` is finished too. Raises WorkdirError for anything else.
    """
    if overwrite:
        return "start"
    if not holds_run(directory):
        return "start"
    if not resume:
        raise WorkdirError(f"{directory} holds a run already: pass --resume to skip finished runs and continue "
                           "started ones, or --overwrite to start every run again (or choose another --workdir)")
    check_resumable(directory, config)
    done = _finished_steps(directory)
    if done is not None:
        if done == config.steps or config.steps == 0:  # 0: one epoch of the data, as the saved run resolved it
            return "skip"
        budget = int(config.get("rollout_budget", 0))
        if done < config.steps and budget and read_json(directory / "summary.json", "")["total_rollouts"] >= budget:
            return "skip"  # it stopped at its rollout budget
        if done > config.steps:
            raise WorkdirError(f"{directory} holds a finished run of {done} steps and the config asks for "
                               f"{config.steps}: use --overwrite to run it again with fewer steps")
        return "resume"
    checkpoints = directory / "checkpoints"
    if checkpoints.is_dir() and Checkpointer(checkpoints).latest_step() is not None:
        return "resume"
    return "restart"


def _finished_steps(directory: Path) -> int | None:
    """The steps of the finished run in ``directory`` (its summary.json), or None when it has not finished:
    no summary.json, or a summary.json / final_eval.json cut by an interrupted write (the run then resumes
    from its last checkpoint, which repeats only the final evaluation, and writes both again)."""
    summary, final_eval = directory / "summary.json", directory / "final_eval.json"
    if not summary.exists():
        return None
    try:
        if final_eval.exists():
            read_json(final_eval, "")
        return read_json(summary, "")["steps"]
    except WorkdirError:
        return None


def compare_methods(configs: Sequence, workdir: str | Path, seeds: Sequence[int] | None = None,
                    resume: bool = False, overwrite: bool = False, progress: bool = True,
                    match: str = "steps") -> dict:
    """Trains every config for every seed and returns the report (also comparison.md / .json in ``workdir``).

    Args:
      configs: [method A, method B] experiment configs; differences are A - B (OptPO - TTRL).
        Both are validated, and every run's workdir checked, before the first run starts.
      workdir: holds ``seed{s}/{method}`` per run (``{method}`` when ``seeds`` is None).
      seeds: training seeds (each run gets ``config.seed = s``), or None for one run per
        config with its own seed.
      resume: skip finished runs and resume started ones (see ``run_action``).
      overwrite: start every run afresh (passed to ``train``).
      progress: tqdm bars.
      match: ``"steps"``: both methods run their configs' steps; ``"rollouts"``: besides that,
        after each seed's pair, A runs on until it has drawn B's rollouts (``rollout_match``)
        and the report adds the paired difference at equal rollouts. Needs ``seeds``.

    Returns ``build_report``'s dict plus ``actions`` (run dir -> what was done) and ``markdown``.
    """
    if resume and overwrite:
        raise WorkdirError("--resume continues the runs in the workdir and --overwrite removes them: choose one")
    methods = [config.method for config in configs]
    if len(configs) != 2 or len(set(methods)) != 2:
        raise ConfigError(f"compare needs two configs with different config.method, got {methods}")
    if seeds is not None and (len(seeds) == 0 or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if match not in MATCHES or (match == "rollouts" and seeds is None):
        raise ConfigError(f"match must be one of {MATCHES} ('rollouts' with seeds), got {match!r} "
                          f"with seeds {seeds}")
    workdir = Path(workdir)
    runs = [(seed, config, run_dir(workdir, config.method, seed)) for seed, config in seed_configs(configs, seeds)]
    for _, config, _ in runs:  # every run's config, once, before the first run starts
        check_config(config)
    if match == "rollouts":
        rollout_match.check_matchable(configs[0])
    with WorkdirLock(workdir) if is_lead_process() else contextlib.nullcontext():
        actions = [run_action(directory, config, resume, overwrite) for _, config, directory in runs]  # all first
        done = {}
        for (seed, config, directory), action in zip(runs, actions, strict=True):
            if action != "skip":
                train(config, directory, resume=action == "resume", overwrite=overwrite or action == "restart",
                      progress=progress, config_checked=True)
            done[str(directory)] = action
            if match == "rollouts" and config.method == methods[1]:  # the seed's pair is done: A runs on
                a_config, a_dir = next((c, d) for s, c, d in runs if s == seed and c.method == methods[0])
                target = rollout_match.matched_dir(workdir, methods, seed)
                done[str(target)] = rollout_match.run_matched(a_config, a_dir, directory, target, resume, overwrite,
                                                              progress)
        report = build_report(workdir, methods, seeds if seeds is not None else [configs[0].seed],
                              single=seeds is None, rollouts_matched=match == "rollouts")
        report["actions"] = done
        report["markdown"] = report_markdown(report)
        if is_lead_process():
            write_atomically(workdir / "comparison.md", report["markdown"] + "\n")
            write_atomically(workdir / "comparison.json", json.dumps(seed_stats.json_ready(report), indent=1))
    return report


def _seed_runs(workdir: Path, methods: Sequence[str], seeds: Sequence[int], single: bool) -> list[list[dict]]:
    """[method][seed] ``seed_stats.read_run`` of every run (single: one run per method, seeds its config seeds)."""
    if single:
        return [[seed_stats.read_run(run_dir(workdir, method, None))] for method in methods]
    return [[seed_stats.read_run(run_dir(workdir, method, seed)) for seed in seeds] for method in methods]


def build_report(workdir: str | Path, methods: Sequence[str], seeds: Sequence[int], single: bool = False,
                 rollouts_matched: bool = False) -> dict:
    """The comparison of finished runs in ``workdir`` (see ``compare_methods``; docs/comparisons.md).

    Keys: methods, seeds, mode, machine, maj_key; ``runs`` [method][seed index] values of
    ``RUN_VALUES`` (fractions, counts, seconds); ``per_method`` mean / stderr / n over seeds of
    each; ``ratios`` A / B per seed of the compute values, mean / stderr; ``paired``:
    ``pass@1`` and ``maj@k`` per seed (``paired_difference``), ``pass@1_per_prompt`` pooled over
    seeds (``pooled_prompt_difference``, None when the runs were evaluated on different prompts
    or lack final_eval.json); ``compute_matched`` (``seed_stats.compute_matched`` on training
    seconds: B read at A's total seconds) with the evaluated steps B's value was interpolated
    from; ``compute_matched_reverse``: A read at B's total seconds, ``difference`` A there - B final.
    ``rollouts_matched`` (``compare --match rollouts``): ``equal_rollouts`` holds the runs of A run on to B's
    rollouts (``rollout_match``): ``runs`` [seed] values, ``per_method``, ``ratios`` to B per seed and
    ``paired`` pass@1 / maj@k differences to B; else None.
    """
    workdir = Path(workdir)
    runs = _seed_runs(workdir, methods, seeds, single)
    values = [[_run_values(run["summary"]) for run in method_runs] for method_runs in runs]
    per_method = {method: _over_seeds(method_values) for method, method_values in zip(methods, values, strict=True)}
    ratios = _ratios_per_seed(values[0], values[1])
    paired = _paired(values[0], values[1])
    paired["pass@1_per_prompt"] = _per_prompt(runs)
    curves = [[run["curve"] for run in method_runs] for method_runs in runs]
    matched = seed_stats.compute_matched(curves[0], curves[1], "train_seconds")
    matched["b_evaluated_steps"] = sorted({int(s) for c in curves[1] for s in c["step"]})
    # The other way round: A read at B's total seconds (meaningful when A ran at least as long as B).
    reverse = seed_stats.compute_matched(curves[1], curves[0], "train_seconds")
    reverse = {"budget": reverse["budget"], "a_at_budget": reverse["b_at_budget"], "b_final": reverse["a_final"],
               "a_ran_shorter": reverse["beyond_b"],
               "a_evaluated_steps": sorted({int(s) for c in curves[0] for s in c["step"]}),
               "difference": seed_stats.paired_difference(reverse["b_at_budget"], reverse["a_final"])}
    equal_rollouts = _equal_rollouts(workdir, methods, seeds, values[1]) if rollouts_matched else None
    return {"methods": list(methods), "seeds": [int(s) for s in seeds], "single": single,
            "equal_rollouts": equal_rollouts,
            "mode": sorted({run["config"]["data"]["mode"] for method_runs in runs for run in method_runs}),
            "steps": {method: method_runs[0]["config"]["steps"] for method, method_runs in zip(methods, runs, strict=True)},
            "machine": machine_line(), "maj_key": _maj_key(runs[0][0]["summary"]),
            "dirs": [[run["dir"] for run in method_runs] for method_runs in runs], "runs": values,
            "per_method": per_method, "ratios": ratios, "paired": paired, "compute_matched": matched,
            "compute_matched_reverse": reverse}


def _run_values(summary: dict) -> dict:
    return {name: read(summary) for name, (_, read) in RUN_VALUES.items()}


def _equal_rollouts(workdir: Path, methods: Sequence[str], seeds: Sequence[int], b_values: list[dict]) -> dict:
    """The rollout-matched runs of A against B's runs (``build_report``'s ``equal_rollouts``)."""
    summaries = [read_json(rollout_match.matched_dir(workdir, methods, seed) / "summary.json",
                           "run `optpo-jax compare --match rollouts --resume` to finish it") for seed in seeds]
    values = [_run_values(summary) for summary in summaries]
    return {"name": rollout_match.matched_dir(workdir, methods, 0).name, "runs": values,
            "steps": [int(summary["steps"]) for summary in summaries], "per_method": _over_seeds(values),
            "ratios": _ratios_per_seed(values, b_values), "paired": _paired(values, b_values)}


def _over_seeds(values: list[dict]) -> dict:
    """Mean / stderr over seeds (and the values) of each ``RUN_VALUES`` entry every run has."""
    return {name: {**seed_stats.mean_stderr([v[name] for v in values]), "values": [v[name] for v in values]}
            for name in RUN_VALUES if all(v[name] is not None for v in values)}


def _ratios_per_seed(a_values: list[dict], b_values: list[dict]) -> dict:
    """A / B per seed of each compute axis, mean / stderr over seeds."""
    return {name: seed_stats.mean_stderr([a[name] / b[name] for a, b in zip(a_values, b_values, strict=True)])
            for name in seed_stats.COMPUTE_AXES if all(v[name] for v in a_values + b_values)}


def _paired(a_values: list[dict], b_values: list[dict]) -> dict:
    """The paired differences A - B of pass@1 and maj@k over seeds."""
    return {name: seed_stats.paired_difference([v[name] for v in a_values], [v[name] for v in b_values])
            for name in ("pass@1", "maj@k")}


def _per_prompt(runs: list[list[dict]]) -> dict | None:
    """pass@1 per prompt, A - B pooled over seeds; None unless every pair was evaluated on the same prompts."""
    evals = [[run["final_eval"] for run in method_runs] for method_runs in runs]
    if any(e is None for method_evals in evals for e in method_evals):
        return None
    if any(a["prompts_sha256"] != b["prompts_sha256"] for a, b in zip(*evals, strict=True)):
        return None
    return seed_stats.pooled_prompt_difference([e["per_prompt_pass@1"] for e in evals[0]],
                                               [e["per_prompt_pass@1"] for e in evals[1]])


def summary_table(summaries: list[dict]) -> str:
    """The markdown table of one run per method (what ``compare`` without ``--seeds`` prints)."""
    k = None
    rows = []
    for summary in summaries:
        before, after = summary["before"], summary["after"]
        k = next(name for name in before if name.startswith("maj@"))
        rows.append(
            f"| {summary['method']} | {100 * before['pass@1']:.1f} | {100 * after['pass@1']:.1f} "
            f"± {100 * after['pass@1_stderr']:.1f} | {100 * before[k]:.1f} | {100 * after[k]:.1f} "
            f"| {100 * summary['label_accuracy']:.1f} | {summary['total_rollouts']:,} "
            f"| {summary['total_generated_tokens']:,} | {summary['train_seconds']:.0f} |"
        )
    header = (f"| method | pass@1 before | pass@1 after | {k} before | {k} after | label accuracy | rollouts "
              "| generated tokens | train wall-clock (s) |\n|---|---|---|---|---|---|---|---|---|")
    return "\n".join([header, *rows])


def _number(value, name: str) -> str:
    if value is None:
        return "n/a"
    if name in PERCENT:
        return f"{100 * value:.1f}"
    if name == "train_seconds":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def _mean_pm(stat: dict, name: str) -> str:
    text = _number(stat["mean"], name)
    return text if stat["stderr"] is None else f"{text} ± {_number(stat['stderr'], name)}"


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _difference_row(title: str, stat: dict | None) -> str:
    if stat is None:
        return f"| {title} | n/a | n/a | n/a | n/a |"
    interval = "n/a" if stat["ci_low"] is None else f"[{_points(stat['ci_low'])}, {_points(stat['ci_high'])}]"
    stderr = "n/a" if stat["stderr"] is None else f"{100 * stat['stderr']:.1f}"
    return f"| {title} | {stat['n']} | {_points(stat['mean'])} | {stderr} | {interval} |"


def report_markdown(report: dict) -> str:
    """What ``compare`` prints and writes to comparison.md: one table per part of ``report``."""
    footer = f"mode: {', '.join(report['mode'])}; machine: {report['machine']}"
    if report["single"]:
        summaries = [read_json(Path(dirs[0]) / "summary.json", "resume the run with `compare --resume`")
                     for dirs in report["dirs"]]
        return f"{summary_table(summaries)}\n\n{footer}"
    return "\n\n".join([_methods_table(report), _paired_table(report), _seeds_table(report),
                        *_notes(report), footer])


def _methods_table(report: dict) -> str:
    a, b = report["methods"]
    k = report["maj_key"]
    names = list(RUN_VALUES)
    titles = [RUN_VALUES[name][0].replace("maj@k", k) for name in names]
    lines = [f"Final values over seeds {_seed_list(report['seeds'])} (mean ± standard error over seeds):", "",
             f"| method | {' | '.join(titles)} |", "|---|" + "---:|" * len(names)]
    rows = [(method, report["per_method"][method]) for method in report["methods"]]
    equal = report.get("equal_rollouts")
    if equal:
        rows.append((f"{equal['name']} ({_step_range(equal['steps'])} steps)", equal["per_method"]))
    for title, stats in rows:
        lines.append(f"| {title} | " + " | ".join(_mean_pm(stats[n], n) if n in stats else "n/a" for n in names) + " |")
    lines.append(f"| {a} / {b} (per seed) | " + " | ".join(_ratios(report["ratios"], names)) + " |")
    if equal:
        lines.append(f"| {equal['name']} / {b} (per seed) | " + " | ".join(_ratios(equal["ratios"], names)) + " |")
    return "\n".join(lines)


def _ratios(ratios: dict, names: Sequence[str]) -> list[str]:
    return [f"{ratios[n]['mean']:.2f}" + (f" ± {ratios[n]['stderr']:.2f}" if ratios[n]["stderr"] is not None else "")
            if n in ratios else "" for n in names]


def _step_range(steps: Sequence[int]) -> str:
    return f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"


def _paired_table(report: dict) -> str:
    a, b = report["methods"]
    k = report["maj_key"]
    paired, reverse = report["paired"], report["compute_matched_reverse"]
    shorter = sum(reverse["a_ran_shorter"])
    caveat = f" ({shorter} of {len(report['seeds'])} seeds: {a} ran shorter, its final stands in)" if shorter else ""
    return "\n".join([
        f"Paired difference {a} - {b} in points (95% interval: t distribution, n - 1 degrees of freedom):", "",
        "| difference | n | mean | stderr | 95% interval |", "|---|---:|---:|---:|---|",
        _difference_row("pass@1, per seed (primary)", paired["pass@1"]),
        _difference_row("pass@1, per prompt pooled over seeds (too narrow: see below)", paired["pass@1_per_prompt"]),
        _difference_row(f"{k}, per seed", paired["maj@k"]),
        _difference_row(f"compute-matched: {a} final - {b} at {a}'s training seconds (interpolated)",
                        report["compute_matched"]["difference"]),
        _difference_row(f"compute-matched: {a} at {b}'s training seconds (interpolated) - {b} final{caveat}",
                        reverse["difference"]),
        *([_difference_row(f"equal rollouts: {report['equal_rollouts']['name']} - {b}, pass@1",
                           report["equal_rollouts"]["paired"]["pass@1"]),
           _difference_row(f"equal rollouts: {report['equal_rollouts']['name']} - {b}, {k}",
                           report["equal_rollouts"]["paired"]["maj@k"])] if report.get("equal_rollouts") else []),
    ])


def _seeds_table(report: dict) -> str:
    a, b = report["methods"]
    matched = report["compute_matched"]
    header = (f"| seed | {a} pass@1 | {b} pass@1 | {a} - {b} | {a} train s | {b} train s | {b} pass@1 at {a}'s s "
              f"| {a} - that |")
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for index, seed in enumerate(report["seeds"]):
        va, vb = report["runs"][0][index], report["runs"][1][index]
        at = matched["b_at_budget"][index]
        beyond = " (final: ran shorter)" if matched["beyond_b"][index] else ""
        lines.append(f"| {seed} | {100 * va['pass@1']:.1f} | {100 * vb['pass@1']:.1f} "
                     f"| {_points(va['pass@1'] - vb['pass@1'])} | {va['train_seconds']:.0f} | {vb['train_seconds']:.0f} "
                     f"| {100 * at:.1f}{beyond} | {_points(matched['a_final'][index] - at)} |")
    return "\n".join(lines)


def _notes(report: dict) -> list[str]:
    a, b = report["methods"]
    notes = [
        (f"Seeds set config.seed (data order, sampling, update and evaluation keys); the initial policy, data.seed "
         f"and the test prompts are the same in every run, and run pairs share the seed. pass@1 is avg@k over the "
         f"test prompts after {_steps_of(report['steps'])}."),
        (f"Compute-matched: no run was stopped at a time budget; {b}'s pass@1 at {a}'s total training seconds is "
         f"read off {b}'s own evaluations (steps {_steps(report['compute_matched']['b_evaluated_steps'])}), linearly "
         f"between them, and the other way round {a}'s at {b}'s seconds off {a}'s evaluations (steps "
         f"{_steps(report['compute_matched_reverse']['a_evaluated_steps'])}).")
        + (f" Where {a} trained longer than {b}'s whole run, {b}'s final value stands in (marked above): then "
           f"{a} had more time, not the same." if any(report["compute_matched"]["beyond_b"]) else ""),
        ("The per-prompt interval pools every (seed, prompt) pair as if independent, but a seed's prompts share one "
         "training run, so the seed-to-seed spread is missing and the interval is too narrow; the per-seed interval "
         "is the primary one."),
        ("Training seconds exclude evaluation, include the first step's compilations (the update step is compiled "
         "in every run), and move with the machine's load."),
    ]
    if report.get("equal_rollouts"):
        notes.append(f"Equal rollouts: {report['equal_rollouts']['name']} is {a}'s run of each seed continued (same "
                     f"prompts per step, the batches in order) until it had drawn {b}'s rollouts of the same seed; it "
                     f"stops after the step that reaches them, so it may overshoot by part of a step (the ratio row).")
    return notes


def _steps_of(steps: dict) -> str:
    counts = set(steps.values())
    if len(counts) == 1:
        return f"{counts.pop()} steps"
    return " and ".join(f"{count} ({method})" for method, count in steps.items()) + " steps"


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(str(step) for step in steps)


def _seed_list(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1 else \
        ", ".join(str(s) for s in seeds)


def discover(workdir: str | Path, methods: Sequence[str] | None = None) -> tuple[list[int] | None, list[str]]:
    """The seeds and methods of a compare workdir: (seeds of ``seed{s}/`` folders holding every method's
    finished run, or None for the single-run layout; ``methods`` as given, else those of the last
    compare (comparison.json), else optpo and ttrl)."""
    workdir = Path(workdir)
    saved = workdir / "comparison.json"
    if methods is None:
        remedy = "run `optpo-jax compare --resume` on this workdir again to write it anew, or name the methods"
        methods = read_json(saved, remedy)["methods"] if saved.exists() else ("optpo", "ttrl")
    folders = sorted(workdir.glob("seed*"), key=lambda p: p.name)
    seeds = sorted(int(p.name[4:]) for p in folders if p.name[4:].isdigit()
                   and all((p / m / "summary.json").exists() for m in methods))
    return (seeds or None), list(methods)


def load_curves(workdir: str | Path, methods: Sequence[str], seeds: Sequence[int] | None) -> list[list[dict]]:
    """[method][seed] ``evaluation_curve`` of every finished run of a compare workdir."""
    if seeds is None:
        return [[seed_stats.read_run(run_dir(workdir, m, None))["curve"]] for m in methods]
    return [[seed_stats.read_run(run_dir(workdir, m, s))["curve"] for s in seeds] for m in methods]

