"""The `optpo-jax` command: train, eval and compare experiment configs.

    optpo-jax train   --config configs/arith_optpo.py --workdir runs/optpo [--resume [--resume_step=N] | --overwrite]
                      [--config.sprt.threshold=0.99]
    optpo-jax eval    --workdir runs/optpo [--config.eval.final_samples=16]   (--workdir='': --config's initial policy)
    optpo-jax compare [--config configs/arith_optpo.py] [--baseline_config configs/arith_ttrl.py] --workdir runs/compare
                      [--seeds N [--seed_from K]] [--match rollouts] [--resume | --overwrite]
    optpo-jax export  --workdir runs/optpo --out models/optpo [--adapters_only]
                      [--export_dtype float32]
    optpo-jax plan    --config configs/qwen2p5_math_1p5b_math500_lora.py [--device_memory 16GB] [--devices 1]

A config, workdir or checkpoint error ends the command with one line naming the cause.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _default(name: str) -> str | None:
    """The repository's config file when running from a checkout (so overrides work without --config)."""
    path = CONFIG_DIR / name
    return str(path) if path.exists() else None


def _missing_field_exit(error: Exception, argv: list[str]):
    """Ends the command in one line for an override of a field the config lacks (ml_collections raises a bare
    AttributeError / KeyError naming only the last part of the field)."""
    missing = str(error).strip("'\"")
    named = [argument.split("=")[0] for argument in argv[1:]
             if argument.startswith("--") and "config." in argument and argument.split("=")[0].split(".")[-1] == missing]
    sys.exit(f"optpo-jax: error: {named[0] if named else missing}: the config has no such field "
             "(the fields are in optpo_jax/default_config.py)")


def _define_config(name: str, default: str | None, help_text: str):
    """``DEFINE_config_file``, which already applies the command line's overrides of this config."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_text)
    except (AttributeError, KeyError) as error:
        _missing_field_exit(error, sys.argv)


_CONFIG = _define_config("config", _default("arith_optpo.py"), "experiment config file (ml_collections)")
_BASELINE = _define_config("baseline_config", _default("arith_ttrl.py"), "baseline config for compare")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "directory for metrics, checkpoints and the summary")
_RESUME = flags.DEFINE_bool("resume", False, "continue the run in --workdir from its latest checkpoint")
_RESUME_STEP = flags.DEFINE_integer("resume_step", None, "with --resume: continue from this checkpoint step instead")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "remove the run already in --workdir, then start afresh")
_SEEDS = flags.DEFINE_integer("seeds", 1, "compare: training seeds 0..N-1 per method, in --workdir/seed{s}/{method}, "
                              "with paired statistics; 1 = one run per method with its config.seed, in "
                              "--workdir/{method}", lower_bound=1)
_SEED_FROM = flags.DEFINE_integer("seed_from", None, "compare: the first training seed (--seeds N runs seed_from.."
                                  "seed_from+N-1, in the seed{s}/ layout even for N = 1), to spread one study's "
                                  "seeds over processes or machines and merge the seed{s}/ folders afterwards",
                                  lower_bound=0)
_MATCH = flags.DEFINE_enum("match", "steps", ["steps", "rollouts"],
                           "compare: steps = each method runs its config's steps; rollouts = also run the first "
                           "method on until it has drawn the second's rollouts, per seed (needs --seeds >= 2)")
_DEVICE_MEMORY = flags.DEFINE_string("device_memory", None, "plan: the device's memory (16GB, 16GiB), to say "
                                     "whether the run fits and what to change if not")
_OUT = flags.DEFINE_string("out", None, "export: directory for the model (or, with --adapters_only, the adapters)")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "export: a LoRA run's adapters alone, in PEFT's layout")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", "params", ["params", "float32"],
                                  "export: the weights' dtype. params: as trained (bfloat16 runs write bfloat16); "
                                  "float32: the run's float32 master weights (optimizer.float32_master), else the "
                                  "params widened to float32 (exact; LoRA merges in float32)")
_DEVICES = flags.DEFINE_integer("devices", None, "plan: devices of the mesh (default: the devices here)")


def _one_line_errors(command):
    """Config, workdir and checkpoint errors end the command with their message, not a traceback."""

    @functools.wraps(command)
    def run(argv):
        from optpo_jax.train.checkpoints import CheckpointError
        from optpo_jax.train.config_checks import ConfigError
        from optpo_jax.train.workdir import WorkdirError

        try:
            return command(argv)
        except (ConfigError, WorkdirError, CheckpointError) as error:
            sys.exit(f"optpo-jax: error: {error}")

    return run


def _config_or_default(flag, name: str):
    if flag.value is not None:
        return flag.value
    from optpo_jax.default_config import arithmetic_config

    return arithmetic_config(name)


def _start(config):
    """Joins the other hosts first when ``config.distributed`` is set (TPU pod slices, multi-node GPU)."""
    from optpo_jax.train.distributed import initialize_distributed

    initialize_distributed(bool(config.get("distributed", False)))
    return config


@_one_line_errors
def command_train(_):
    """Trains --config in --workdir (a new run, --resume of the run there, or --overwrite of it); prints the summary."""
    from optpo_jax.train import train

    summary = train(_start(_config_or_default(_CONFIG, "optpo")), _WORKDIR.value, resume=_RESUME.value,
                    overwrite=_OVERWRITE.value, resume_step=_RESUME_STEP.value)
    print(json.dumps(summary, indent=1))


# Fields eval and export may set differently from the run (how and where it is evaluated, not what was trained).
FREE_FIELDS = ("eval.", "mesh.", "distributed", "remat", "attention")


def _config_of_run(command: str, free=FREE_FIELDS):
    """The config the run in --workdir saved, with --config.eval.* (and the other ``free`` fields) applied.

    A --config file or override that differs from the run in any other field is refused with the fields:
    a different LoRA rank, model or dtype would evaluate or export another model than the one trained.
    """
    from ml_collections import config_flags as flags_of_config

    from optpo_jax.train.config_checks import ConfigError
    from optpo_jax.train.trained import load_run_config
    from optpo_jax.train.workdir import config_differences, flatten, in_fields

    saved = load_run_config(_WORKDIR.value)
    saved_json = json.loads(saved.to_json_best_effort())
    given = {}
    if flags.FLAGS["config"].present:  # a whole config file: its free fields apply, the rest must match
        given = flatten(json.loads(_CONFIG.value.to_json_best_effort()))
    given.update(flags_of_config.get_override_values(flags.FLAGS["config"]))
    given = {field: json.loads(json.dumps(value)) for field, value in given.items()}  # as config.json: (128,) is [128]
    saved.update_from_flattened_dict({field: value for field, value in given.items() if in_fields(field, free)})
    differing = config_differences(saved_json, {**flatten(saved_json), **given}, free)
    if differing:
        raise ConfigError(f"{command} uses the run's own config ({Path(_WORKDIR.value) / 'config.json'}); these "
                          f"differ from it: {'; '.join(differing)}. Leave them out (only {', '.join(free)} may "
                          "differ)")
    return saved


@_one_line_errors
def command_eval(_):
    """pass@1 / maj@k / pass@k of the run in --workdir (its latest checkpoint, under its own config.json) on its
    evaluation prompts; --workdir='' evaluates the initial policy of --config."""
    from optpo_jax.train.evaluation import run_eval
    from optpo_jax.train.setup import build_setup
    from optpo_jax.train.trained import load_trained

    if _WORKDIR.value:
        run = load_trained(_start(_config_of_run("eval")), _WORKDIR.value, doing="eval")
        setup, params = run.setup, run.policy_params()
        print(f"evaluating {_WORKDIR.value} at step {run.step}")
    else:
        setup = build_setup(_start(_config_or_default(_CONFIG, "optpo")))
        params = setup.policy.params
        print("evaluating the initial policy of the config")
    config = setup.config
    summary = run_eval(setup, params, config.eval.final_samples, config.seed + 1).summary()
    print(json.dumps(summary, indent=1))


@_one_line_errors
def command_compare(_):
    """Both configs, one run each (``--seeds 1``) or seeds 0..N-1 each; prints and writes the comparison."""
    from optpo_jax.report.compare import compare_methods

    configs = [_start(_config_or_default(_CONFIG, "optpo")), _config_or_default(_BASELINE, "ttrl")]
    first = _SEED_FROM.value or 0
    seeds = None if _SEEDS.value == 1 and _SEED_FROM.value is None else list(range(first, first + _SEEDS.value))
    if seeds is not None and any(config.seed != 0 for config in configs):
        from optpo_jax.train.config_checks import ConfigError

        raise ConfigError(f"--seeds {_SEEDS.value} runs config.seed {seeds[0]}..{seeds[-1]} for both methods: leave "
                          "config.seed at 0 (it would be replaced)")
    report = compare_methods(configs, _WORKDIR.value, seeds, resume=_RESUME.value, overwrite=_OVERWRITE.value,
                             match=_MATCH.value)
    print(report["markdown"])


@_one_line_errors
def command_export(_):
    """The latest checkpoint of --workdir as a Hugging Face model (merged) or, with LoRA, PEFT adapters.

    ``--export_dtype float32`` writes the float32 master copy that ``optimizer.float32_master`` keeps
    in the optimizer state (the trained values; bfloat16 params are their rounding). A run without
    one has its params widened to float32: exact, so allowed, and said in the printed line.
    """
    from optpo_jax.models import save_hf
    from optpo_jax.optim import float32_master_params
    from optpo_jax.train.config_checks import ConfigError
    from optpo_jax.train.trained import load_trained
    from optpo_jax.train.workdir import holds_run, model_type_in

    if not _OUT.value:
        raise ConfigError("export needs --out, the directory to write the model to")
    out = Path(_OUT.value)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: --out {out} is a file, not a directory")
    if holds_run(out) and model_type_in(out) is None:
        raise ConfigError(f"export: --out {out} holds a training run; writing a model there would replace its "
                          "config.json: choose another --out")
    config = _config_of_run("export")
    run = load_trained(config, _WORKDIR.value, doing="export")
    setup, state, step = run.setup, run.state, run.step
    if _ADAPTERS_ONLY.value and state.lora is None:
        raise ConfigError("--adapters_only needs a LoRA run (config.lora.rank > 0)")
    trained, dtype, source = state.params, None, "as trained"
    if _EXPORT_DTYPE.value == "float32":
        master = float32_master_params(state.opt_state)
        dtype = "float32"
        if master is None:
            source = "float32: no float32 master copy in the run, its params widened"
        else:
            trained, source = master, "the float32 master weights"
    if state.lora is None:
        save_hf(dataclasses.replace(setup.policy, params=trained), _OUT.value, dtype=dtype)
    else:
        save_hf(setup.policy, _OUT.value, adapters=trained, lora=state.lora, adapters_only=_ADAPTERS_ONLY.value,
                base_model=config.model_path, dtype=dtype)
    print(f"wrote {_OUT.value} ({'PEFT adapters' if _ADAPTERS_ONLY.value else 'merged model'}, {source}) from "
          f"{_WORKDIR.value} at step {step}")


@_one_line_errors
def command_plan(_):
    """The memory plan of --config per device (no weights loaded, nothing compiled)."""
    import jax

    from optpo_jax.train.config_checks import ConfigError
    from optpo_jax.train.memory_plan import format_plan, parse_bytes, plan_memory, run_shape

    config = _config_or_default(_CONFIG, "optpo")
    device_bytes = parse_bytes(_DEVICE_MEMORY.value) if _DEVICE_MEMORY.value else None
    if _DEVICES.value is not None and not 1 <= _DEVICES.value <= 2**20:
        raise ConfigError(f"--devices must be a positive number of devices (at most 2**20), got {_DEVICES.value}")
    shape = run_shape(config, num_devices=_DEVICES.value or jax.device_count())
    print(f"{shape.model.model_type}, {shape.model.num_params() / 1e9:.3f}B parameters ({shape.model.param_dtype}), "
          f"LoRA rank {shape.lora_rank or 'off'}; waves of {shape.rows_per_wave} rows x "
          f"{shape.prompt_tokens}+{shape.max_new_tokens} tokens; micro-batches of "
          f"{shape.micro_batch_rows // shape.grad_accumulation} rows; {shape.batch_shards} batch shard(s), "
          f"{shape.model_shards} weight shard(s)")
    print(format_plan(plan_memory(shape), device_bytes))


COMMANDS = {"train": command_train, "eval": command_eval, "compare": command_compare, "plan": command_plan,
            "export": command_export}
# The flags each command reads (config overrides, --config.x=..., come on top of --config and --baseline_config).
COMMAND_FLAGS = {
    "train": ("config", "workdir", "resume", "resume_step", "overwrite"),
    "eval": ("config", "workdir"),
    "compare": ("config", "baseline_config", "workdir", "seeds", "seed_from", "resume", "overwrite", "match"),
    "export": ("config", "workdir", "out", "adapters_only", "export_dtype"),
    "plan": ("config", "device_memory", "devices"),
}
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


def command_help(name: str | None) -> str:
    """The usage of one command (its docstring and its flags with their defaults), or of all of them."""
    if name is None:
        return f"{__doc__}\nusage: optpo-jax {{{','.join(COMMANDS)}}} [flags];  optpo-jax COMMAND --help for its flags"
    lines = [f"usage: optpo-jax {name} [flags]", "", (COMMANDS[name].__doc__ or "").strip(), "", "flags:"]
    for flag_name in COMMAND_FLAGS[name]:
        flag = flags.FLAGS[flag_name]
        default = flag.default_as_str if flag.default is not None else "none"
        lines.append(f"  --{flag_name}: {flag.help} (default: {default})")
    if "config" in COMMAND_FLAGS[name]:
        lines.append("  --config.FIELD=VALUE: override one field of the config (e.g. --config.sprt.threshold=0.99)")
    return "\n".join(lines)


def main():
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    arguments = sys.argv[1:]
    name = arguments[0] if arguments and arguments[0] in COMMANDS else None
    if any(argument in HELP_FLAGS for argument in arguments):
        print(command_help(name))
        sys.exit(0)
    if name is None:
        print(__doc__)
        sys.exit(f"usage: optpo-jax {{{','.join(COMMANDS)}}} [flags]")
    command = COMMANDS[sys.argv.pop(1)]
    remaining = _parse_flags_or_exit(sys.argv)
    app.run(command, flags_parser=lambda _: remaining)


def _parse_flags_or_exit(argv: list[str]) -> list[str]:
    """Parses the flags, once (a second parse of ``--config FILE`` would define its override flags again), so
    that an unknown flag or an override of a field the config lacks (``--config=other.py
    --config.sprt.nonexistent=1``) ends in one line; returns the arguments left."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"optpo-jax: error: {error}")
    except (AttributeError, KeyError) as error:
        _missing_field_exit(error, argv)


if __name__ == "__main__":
    main()
