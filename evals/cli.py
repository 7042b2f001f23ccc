"""The ``softguard`` command: sites, inject, campaign, ab, bench, replay and report.

Settings come from flags or from a YAML file (``--config``); a flag given on the command line
wins over the file. Every error that bad input can cause is printed as one line on stderr
with exit status 2, never as a traceback. This module is the only place that configures
logging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from guard.errors import ConfigError, SoftguardError

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_PROMPT = "What is 17 + 25? Answer with the number only."
DEFAULT_AB_ARMS = "none,mixed_precision,abft,dual_first_token,dynamic_shots,all"
BIT_FIELDS = ("sign", "exponent", "exponent_msb", "mantissa")
TASK_NAMES = ("arithmetic", "bigbench", "hf", "humaneval", "jsonl")
# The roles of injectors.sites.ROLES, spelled out so that --help does not import torch.
ROLE_NAMES = (
    "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "attention",
    "activation", "norm", "embedding", "lm_head", "router", "expert", "shared_expert", "kv_cache", "linear",
)
FAULT_HELP = (
    "fault description as inline YAML/JSON with three parts: site {kind: computation|weight|kv_cache, "
    "role, module (name glob), layers}, time {stage: prefill|first_token|decode, step} and corruption "
    "{bit: index or field name, field: sign|exponent|exponent_msb|mantissa}; parts left out are drawn "
    "from the seed. Example: '{site: {role: down_proj}, time: {stage: first_token}, corruption: {field: exponent}}'"
)
# Internal names in error messages, and the flags the user typed for them.
_FLAG_NAMES = {
    "n_shots": "--shots",
    "batch_size": "--batch-size",
    "max_new_tokens": "--max-new-tokens",
    "output_dir": "--output-dir",
    "limit": "--limit",
    "trials": "--trials",
    "seed": "--seed",
    "dtype": "--dtype",
    "device": "--device",
}


# ----- parser -----------------------------------------------------------------------------


def _add_model_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="smollm2-135m" if defaults else None,
        help="bundled model name (smollm2-135m, gemma3-270m), local folder or hub id "
        "(default: smollm2-135m)",
    )
    group.add_argument(
        "--dtype",
        default="float32" if defaults else None,
        help="number format of the weights and activations: float32, bfloat16 or float16 (default: float32)",
    )
    group.add_argument(
        "--device", default="cpu" if defaults else None, help="torch device, such as cpu or cuda:0 (default: cpu)"
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="YAML file of settings; flags given on the command line override it. Keys are this "
        "command's long option names without the dashes (trials, batch-size or batch_size, shots, "
        "mitigations, role, bit, ...) or the stored config fields (n_shots, task_options, arms as a list, "
        "fault as a mapping)",
    )
    parser.add_argument(
        "--seed", type=int, help="seed for the fault draws (integer, default: 0); task data has its own seed option"
    )
    parser.add_argument(
        "--output-dir", help="result folder; rerunning the same command into it resumes the run"
    )

    parser.add_argument(
        "--task",
        help="task name, NAME:PATH (e.g. jsonl:data.jsonl, bigbench:task.json) or a task file: a .jsonl "
        "file, a BIG-bench task.json or a folder containing one (default: arithmetic; names: "
        + ", ".join(TASK_NAMES) + ")",
    )
    parser.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option, repeatable (value parsed as YAML, e.g. digits=2)",
    )
    parser.add_argument("--shots", type=int, help="number of few-shot examples in each prompt (default: the task's)")
    parser.add_argument("--trials", type=int, help="number of faulty trials per arm (default: 64)")
    parser.add_argument("--limit", type=int, help="number of task inputs the trials are spread over (default: 8)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="rows per generate call: one fault-free reference row plus batch-size - 1 trials (default: 16)",
    )
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per row (default: the task's)")

    parser.add_argument(
        "--fault",
        metavar="YAML",
        help=FAULT_HELP,
    )
    _add_fault_shortcuts(parser)
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    _add_model_options(parser, defaults=False)


def _add_fault_shortcuts(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fault shortcuts (override parts of --fault)")
    group.add_argument("--kind", choices=("computation", "weight", "kv_cache"), help="fault site kind")
    group.add_argument("--role", help="module role: " + ", ".join(ROLE_NAMES) + " (see softguard sites)")
    group.add_argument("--module", help="module name glob, such as '*.mlp.down_proj'")
    group.add_argument("--layer", help="layer index, comma-separated indices, or 'all'")
    group.add_argument("--stage", choices=("prefill", "first_token", "decode"), help="inference stage of the fault")
    group.add_argument("--step", type=int, help="decode step (>= 1) for --stage decode")
    group.add_argument(
        "--bit",
        help="bit to flip: an index (0 = least significant bit of the number format) or a field: sign "
        "(the sign bit), exponent (a random exponent bit), exponent_msb (the top exponent bit) or mantissa "
        "(a random mantissa bit); random bits are drawn from the seed",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softguard",
        description="Fault injection, mitigation A/B evaluation and overhead benchmarks for causal LMs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    sites = commands.add_parser("sites", help="list the injectable sites of a model")
    _add_model_options(sites)
    sites.add_argument("--kind", choices=("computation", "weight", "kv_cache"), help="show only this site kind")
    sites.add_argument("--role", help="show only this role")
    sites.add_argument("--limit", type=int, default=None, help="print at most this many sites (default: all)")

    inject = commands.add_parser("inject", help="run one injected generation and print golden vs faulty text")
    _add_model_options(inject)
    _add_fault_shortcuts(inject)
    inject.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (the chat template is applied if the model has one)")
    inject.add_argument("--fault", metavar="YAML", help=FAULT_HELP)
    inject.add_argument("--seed", type=int, default=0, help="seed for the open fault choices (default: 0)")
    inject.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate (default: 24)")

    campaign = commands.add_parser("campaign", help="run or resume a fault-injection campaign")
    _add_run_options(campaign)
    campaign.add_argument(
        "--mitigations", help="comma-separated mitigations active during the campaign (default: none)"
    )

    ab = commands.add_parser("ab", help="compare mitigations on the same resolved faults")
    _add_run_options(ab)
    ab.add_argument(
        "--arms",
        help=f"comma-separated arms; an arm is 'none', a mitigation, names joined by '+', or 'all' "
        f"(default: {DEFAULT_AB_ARMS})",
    )

    bench = commands.add_parser("bench", help="time protected against unprotected generate, interleaved")
    _add_model_options(bench)
    bench.add_argument("--batch-size", type=int, default=8, help="rows per generate call for the overhead runs (default: 8)")
    bench.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens (default: 100)")
    bench.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default: 32)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per measurement (default: 5)")
    bench.add_argument(
        "--campaign-trials", type=int, default=62,
        help="trials for the campaign throughput runs (default: 62, two full batches of 31 trials and a reference row)",
    )
    bench.add_argument("--campaign-batch-size", type=int, default=32, help="rows per batch for the campaign runs (default: 32)")
    bench.add_argument("--sequential-trials", type=int, default=4, help="trials timed in the sequential loop (default: 4)")
    bench.add_argument(
        "--prefix-prompt-tokens", type=int, default=200,
        help="minimum prompt length in tokens for the prefix-reuse runs (default: 200)",
    )
    bench.add_argument(
        "--prefix-trials", type=int, default=15,
        help="trials per batch in the prefix-reuse runs; four batches are timed (default: 15)",
    )
    bench.add_argument("--only", help="comma-separated subset of: overhead, campaign, prefix (default: all)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as one JSON object to PATH")
    bench.add_argument("--seed", type=int, default=0, help="seed for prompts and faults (default: 0)")

    replay = commands.add_parser("replay", help="re-run one recorded trial and compare its tokens")
    replay.add_argument("folder", help="result folder of a campaign or ab run")
    replay.add_argument("--trial", type=int, required=True, help="trial id to replay")
    replay.add_argument("--arm", help="arm of the trial (default: the first arm of the run)")
    replay.add_argument("--device", help="torch device (default: the run's)")

    report = commands.add_parser("report", help="merge shards and re-render the summaries and plots of a folder")
    report.add_argument("folder", help="result folder of a campaign or ab run")
    return parser


# ----- settings ---------------------------------------------------------------------------


def _parse_yaml_value(text: str, option: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{option}={text!r} is not valid YAML/JSON: {getattr(error, 'problem', error)}.") from None


def _parse_bit(text: str) -> dict[str, Any]:
    if text.isdigit():
        return {"bit": int(text)}
    if text in BIT_FIELDS:
        return {"field": text}
    from guard.errors import unknown_choice

    raise ConfigError(unknown_choice("--bit", text, BIT_FIELDS) + " Or give a bit index such as 30.")


def _parse_layers(text: str) -> Any:
    if text == "all":
        return "all"
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--layer={text!r} is not valid. Give an index, comma-separated indices or 'all'.") from None
    return values[0] if len(values) == 1 else values


def fault_from_args(args: argparse.Namespace, base: dict | None) -> dict | None:
    """Return the fault description from ``--fault`` and the shortcut flags (None when none given)."""
    fault = json.loads(json.dumps(base)) if base else None
    if getattr(args, "fault", None):
        fault = _parse_yaml_value(args.fault, "--fault")
        if not isinstance(fault, dict):
            raise ConfigError(f"--fault={args.fault!r} must be a mapping: {{site: ..., time: ..., corruption: ...}}.")
    shortcuts = {
        "kind": ("site", "kind", args.kind),
        "role": ("site", "role", args.role),
        "module": ("site", "module", args.module),
        "layer": ("site", "layers", _parse_layers(args.layer) if args.layer else None),
        "stage": ("time", "stage", args.stage),
        "step": ("time", "step", args.step),
    }
    given = {name: item for name, item in shortcuts.items() if item[2] is not None}
    if not given and not args.bit:
        return fault
    from evals.config import DEFAULT_FAULT

    fault = fault or json.loads(json.dumps(DEFAULT_FAULT))
    for section, key, value in given.values():
        fault.setdefault(section, {})[key] = value
    if "module" in given:
        fault["site"].pop("role", None)
    if args.bit:
        corruption = fault.setdefault("corruption", {})
        corruption.pop("bit", None)
        corruption.pop("field", None)
        corruption.update(_parse_bit(args.bit))
    return fault


def _task_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--task-option={pair!r} is not KEY=VALUE. Example: --task-option digits=2.")
        key, value = pair.split("=", 1)
        options[key.strip()] = _parse_yaml_value(value, f"--task-option {key}")
    return options


def _subcommand_options(kind: str) -> dict[str, argparse.Action]:
    """Return the options of subcommand ``kind`` by destination (``batch_size``, ``shots``...)."""
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices[kind]
            return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}
    return {}


def _as_flag_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _apply_option_keys(settings: dict[str, Any], args: argparse.Namespace, kind: str) -> None:
    """Move the keys of a YAML file that are option names (shots, role, bit...) onto ``args``.

    A flag typed on the command line wins, so a key only fills an option that was not given.
    Keys that are config fields (trials, n_shots, fault...) stay in ``settings``. Unknown keys
    raise ConfigError with close matches among both spellings.
    """
    from evals.config import CampaignConfig

    fields = {f.name for f in dataclasses.fields(CampaignConfig)}
    options = _subcommand_options(kind)
    for key in list(settings):
        if key in fields:
            continue
        if key not in options:
            from guard.errors import unknown_choice

            choices = sorted(fields | {dest.replace("_", "-") for dest in options})
            raise ConfigError(f"{args.config}: " + unknown_choice("setting", key, choices))
        value = settings.pop(key)
        current = getattr(args, key, None)
        if key == "no_progress":
            if not current:
                args.no_progress = bool(value)
        elif key == "task_option":
            if isinstance(value, dict):
                settings["task_options"] = {**settings.get("task_options", {}), **value}
            else:
                items = value if isinstance(value, list) else [value]
                args.task_option = [str(item) for item in items] + list(current or [])
        elif current is None:
            action = options[key]
            text = _as_flag_text(value)
            if action.type is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{args.config}: {key.replace('_', '-')}={value!r} is invalid: give an integer.")
                setattr(args, key, value)
            else:
                if action.choices and text not in action.choices:
                    from guard.errors import unknown_choice

                    raise ConfigError(f"{args.config}: " + unknown_choice(key, text, action.choices))
                setattr(args, key, text)


def resolve_task_argument(task: Any) -> Any:
    """Turn a task file given as ``--task`` into the NAME:PATH form; check plain task names.

    A .jsonl file becomes ``jsonl:PATH``; a .json file (a BIG-bench task) or a folder containing a
    task.json becomes ``bigbench:PATH``. Registered names and NAME:PATH pass unchanged.
    """
    if not isinstance(task, str) or not task.strip():
        return task
    from evals.tasks import available_tasks

    name = task.strip()
    base = name.partition(":")[0]
    if base in available_tasks() and ":" in name:
        return name
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return f"jsonl:{path}"
    if path.is_file() and path.suffix == ".json":
        return f"bigbench:{path}"
    if path.is_dir():
        if (path / "task.json").is_file():
            return f"bigbench:{path}"
        raise ConfigError(
            f"--task={name!r} is a folder without a task.json. Give a BIG-bench task folder, "
            "a .jsonl file or a task name."
        )
    if name in available_tasks():
        return name
    if path.exists():
        raise ConfigError(
            f"--task={name!r} is neither a .jsonl file nor a BIG-bench .json task file. "
            "Use the NAME:PATH form for other files, e.g. jsonl:data.txt."
        )
    from guard.errors import close_matches

    looks_like_path = name.startswith(("/", ".", "~")) or os.sep in name or name.endswith((".json", ".jsonl"))
    what = f"--task={name!r} is a file or folder that does not exist" if looks_like_path else f"unknown task {name!r}"
    raise ConfigError(
        f"{what}.{close_matches(name, available_tasks())} "
        f"Task names: {', '.join(available_tasks())}; or give a .jsonl file, a BIG-bench task.json "
        "(or its folder), or NAME:PATH such as jsonl:data.jsonl or bigbench:task.json."
    )


def config_from_args(args: argparse.Namespace, kind: str):
    """Build a CampaignConfig from the YAML file (if any) and the flags given."""
    from evals.config import DEFAULT_FAULT, CampaignConfig, check_device, load_yaml_settings

    settings: dict[str, Any] = load_yaml_settings(args.config) if args.config else {}
    _apply_option_keys(settings, args, kind)
    flags = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "output_dir": args.output_dir,
        "task": args.task,
        "n_shots": args.shots,
        "trials": args.trials,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    settings.update({key: value for key, value in flags.items() if value is not None})
    if args.task_option:
        settings["task_options"] = {**settings.get("task_options", {}), **_task_options(args.task_option)}
    fault = fault_from_args(args, settings.get("fault") or DEFAULT_FAULT)
    if fault is not None:
        settings["fault"] = fault
    if args.no_progress:
        settings["progress"] = False
    if kind == "campaign" and args.mitigations is not None:
        names = [name.strip() for name in args.mitigations.split(",") if name.strip()]
        settings["arms"] = ["+".join(names) if names else "none"]
    if kind == "ab":
        if args.arms is not None:
            settings["arms"] = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
        elif "arms" not in settings:
            settings["arms"] = DEFAULT_AB_ARMS.split(",")
    settings.setdefault("output_dir", f"softguard-runs/{kind}")
    if "task" in settings:
        settings["task"] = resolve_task_argument(settings["task"])
    config = CampaignConfig.from_dict(settings, source=args.config or "settings")
    check_device(config.device)
    return config


# ----- commands ---------------------------------------------------------------------------


def _load(model: str, dtype: str, device: str):
    from evals.config import check_device
    from evals.models import load_model

    check_device(device)

    return load_model(model, dtype=dtype, device=device)


def command_sites(args: argparse.Namespace) -> int:
    from injectors import list_sites

    model, _tokenizer = _load(args.model, args.dtype, args.device)
    sites = list_sites(model)
    if args.kind:
        sites = [site for site in sites if site.kind == args.kind]
    if args.role:
        roles = sorted({site.role for site in sites})
        if args.role not in roles:
            from guard.errors import unknown_choice

            raise ConfigError(unknown_choice("--role", args.role, roles))
        sites = [site for site in sites if site.role == args.role]
    total = len(sites)
    if args.limit is not None:
        if args.limit < 0:
            raise ConfigError(f"--limit={args.limit} is negative. Give a number of sites >= 0.")
        sites = sites[: args.limit]
    print(f"{'kind':<12} {'role':<14} {'layer':>5}  {'shape':<16} {'dtype':<9} name")
    for site in sites:
        name = site.name + (f".{site.param}" if site.param else "")
        layer = "-" if site.layer is None else str(site.layer)
        shape = "x".join(str(size) for size in site.shape)
        dtype = str(site.dtype).replace("torch.", "")
        print(f"{site.kind:<12} {site.role:<14} {layer:>5}  {shape:<16} {dtype:<9} {name}")
    print(f"{len(sites)} of {total} sites shown")
    return 0


def format_prompt(tokenizer, prompt: str) -> str:
    """Apply the tokenizer's chat template when it has one, so instruct models see their format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def command_inject(args: argparse.Namespace) -> int:
    from injectors import resolve_faults

    from evals.campaign import encode_prompt, run_batch

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} is too small. Use 1 or more.")
    fault_spec = fault_from_args(args, None)
    if fault_spec is None:
        from evals.config import DEFAULT_FAULT

        fault_spec = json.loads(json.dumps(DEFAULT_FAULT))
    model, tokenizer = _load(args.model, args.dtype, args.device)
    prompt_ids = encode_prompt(tokenizer, format_prompt(tokenizer, args.prompt))
    faults = resolve_faults(
        model, fault_spec, seed=args.seed, n=1, prompt_length=prompt_ids.shape[1],
        max_new_tokens=args.max_new_tokens, batch_size=1,
    )
    fault = faults[0] if faults[0].kind == "weight" else faults[0].with_row(1)
    if fault.kind == "weight":
        # A weight fault hits every row of its batch, so the golden row runs alone.
        golden = run_batch(model, tokenizer, prompt_ids, [None], args.max_new_tokens).rows[0]
        faulty = run_batch(model, tokenizer, prompt_ids, [fault], args.max_new_tokens).rows[0]
    else:
        # Row 0 is the fault-free reference in the same batch, so the comparison is exact.
        golden, faulty = run_batch(model, tokenizer, prompt_ids, [None, fault], args.max_new_tokens).rows
    print("fault:", json.dumps(fault.to_dict(), sort_keys=True))
    if faulty.fired:
        fired = faulty.fired[0]
        print(f"fired: forward {fired.get('forward')}, {fired.get('dtype')}, value {fired.get('value_before')} -> {fired.get('value_after')}")
    else:
        print("fired: no (the fault's time or site was not reached)")
    print("golden:", json.dumps(golden.text))
    print("faulty:", json.dumps(faulty.text))
    if faulty.error:
        print("faulty run failed:", faulty.error)
    same = golden.tokens == faulty.tokens
    verdict = "identical (masked)" if same else "differ"
    if faulty.nonfinite:
        verdict += ", with non-finite logits"
    print("tokens:", verdict)
    return 0


def _silence_loading_bars() -> None:
    """Hide the progress bars transformers and the hub client draw while loading weights."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def command_campaign(args: argparse.Namespace, kind: str) -> int:
    from evals import report
    from evals.campaign import run_campaign

    config = config_from_args(args, kind)
    if not config.progress:
        _silence_loading_bars()
    result = run_campaign(config, kind=kind)
    if result.summary is None:
        return 0
    print(report.markdown_table(result.summary), end="")
    print(
        f"{result.trials_run} trials run, {result.trials_skipped} already recorded; results in {result.folder}"
    )
    return 0


def command_bench(args: argparse.Namespace) -> int:
    from evals import bench

    options = bench.BenchOptions(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        campaign_trials=args.campaign_trials,
        campaign_batch_size=args.campaign_batch_size,
        sequential_trials=args.sequential_trials,
        prefix_prompt_tokens=args.prefix_prompt_tokens,
        prefix_trials=args.prefix_trials,
        parts=tuple(part.strip() for part in args.only.split(",")) if args.only else bench.PARTS,
        seed=args.seed,
    )
    from evals.config import check_device

    check_device(args.device)
    if args.json:
        from evals.store import ensure_writable

        target = Path(args.json).expanduser().resolve()
        if target.is_dir():
            raise ConfigError(f"--json={args.json!r} is a directory. Give a file path such as {args.json}/bench.json.")
        ensure_writable(target.parent)
    results = bench.run_bench(options)
    print(bench.format_results(results), end="")
    if args.json:
        text = json.dumps(results, indent=2, sort_keys=True) + "\n"
        try:
            Path(args.json).write_text(text, encoding="utf-8")
        except OSError as error:
            # The run took minutes: print the results rather than lose them.
            print(text, end="")
            raise ConfigError(
                f"--json={args.json!r} could not be written ({error.strerror}). The JSON results are printed above."
            ) from None
        print(f"wrote {args.json}")
    return 0


def command_replay(args: argparse.Namespace) -> int:
    from evals.replay import replay_trial

    if args.device is not None:
        from evals.config import check_device

        check_device(args.device)
    outcome = replay_trial(args.folder, args.trial, arm=args.arm, device=args.device)
    print("fault:", json.dumps(outcome["fault"], sort_keys=True))
    print("recorded tokens:", outcome["recorded_tokens"])
    print("replayed tokens:", outcome["replayed_tokens"])
    print("replayed text:", json.dumps(outcome["replayed_text"]))
    print("outcome:", outcome["outcome"])
    print("matches the record:", "yes" if outcome["match"] else "no")
    return 0 if outcome["match"] else 1


def command_report(args: argparse.Namespace) -> int:
    from evals import report

    summary, recorded, planned = report.render_folder_with_counts(args.folder)
    if summary is None:
        print(
            f"softguard report: no trials recorded yet in {args.folder}; run the same campaign or ab "
            "command again to resume.",
            file=sys.stderr,
        )
        return 1
    print(report.markdown_table(summary), end="")
    print(f"rewrote the summaries and plots in {args.folder}")
    if recorded < planned:
        print(f"note: {recorded} of {planned} planned trials recorded; rerun the campaign command to finish.")
    return 0


# ----- entry point ------------------------------------------------------------------------


_INTERNAL_NAME = re.compile(r"(?<![\w.\-'\[])(" + "|".join(_FLAG_NAMES) + r")(?=(=| <=| >=| must))")


def flag_wording(message: str) -> str:
    """Replace config field names that stand before a value (``batch_size=1``) with their flags."""
    return _INTERNAL_NAME.sub(lambda match: _FLAG_NAMES[match.group(1)], message)


def _configure_logging(verbosity: int) -> None:
    if verbosity == 0:
        level = logging.WARNING
    elif verbosity == 1:
        level = logging.INFO
    else:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # transformers logs generation-config advice at WARNING for every call; keep it quiet by default.
    if verbosity == 0:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        # Campaigns provoke detections on purpose; they are recorded per trial, not logged.
        logging.getLogger("guard.report").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``softguard`` command and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {
        "sites": command_sites,
        "inject": command_inject,
        "campaign": lambda a: command_campaign(a, "campaign"),
        "ab": lambda a: command_campaign(a, "ab"),
        "bench": command_bench,
        "replay": command_replay,
        "report": command_report,
    }
    try:
        return handlers[args.command](args)
    except SoftguardError as error:
        message = str(error)
        if args.command in ("campaign", "ab"):
            message = flag_wording(message)
        print(f"softguard {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            f"softguard {args.command}: interrupted; rerun the same command to resume from the last finished batch.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
