"""`ganpipe`: the command line of docs/contract.md.

Exit codes: 0 success; 2 bad input (one `error:` line naming the file, key or row); 1 any other
failure. `--json` makes the last line of stdout one JSON object. GANPIPE_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ganpipe import network
from ganpipe.config import CommandConfig, Config
from ganpipe.config_files import load_command_config, load_config
from ganpipe.errors import LINE_CHARS, EvaluationFailed, Failure, StageError, UserError, shorten
from ganpipe.summaries import metric_lines, pipeline_summary_lines


class Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one `error:` line and exit 2."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {message}")
        sys.exit(2)


def _add_config(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=100 (repeatable)")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")


def _emit(args: argparse.Namespace, result: dict[str, Any], summary: list[str]) -> None:
    for line in summary:
        print(line)
    if args.json:
        print(json.dumps(result, default=str))
    sys.stdout.flush()


def _load(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    cfg = load_config(args.config, list(args.overrides) + (extra or []))
    network.use(cfg.storage.timeout_s, cfg.storage.retries)
    return cfg


# Flags that are shorthands for config keys (argparse dest -> dotted key): they default to None and
# override the config file and --set only when given; every default lives in ganpipe.config.
EXPORT_FLAGS = {dest: f"export.{dest}" for dest in (
    "num_images", "out", "format", "shard_size", "class_balance", "class_counts", "seed", "num_processes",
    "drop_lowest_d", "memorisation_check", "near_copy_ratio", "input", "image_column")}
EVALUATE_FLAGS = {"seed": "seed", **{dest: f"eval.{dest}" for dest in (
    "metrics", "num_samples", "inception_weights", "bootstrap", "num_processes", "resolution")}}


def _command_config(args: argparse.Namespace, flags: dict[str, str]) -> CommandConfig:
    """The config sections of `ganpipe export` / `evaluate`: the optional config file, --set, then flags."""
    given = {key: (f"--{dest.replace('_', '-')}", getattr(args, dest)) for dest, key in flags.items()
             if getattr(args, dest) is not None}
    cfg = load_command_config(args.config, list(args.overrides), given)
    network.use(cfg.storage.timeout_s, cfg.storage.retries)
    return cfg


def _add_wait(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true",
                        help=f"when another ganpipe process is writing {what}, wait for it to finish "
                             "instead of exiting with code 2")


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _ratio(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of synthetic rows per real row, or auto") from None


def _class_counts(text: str) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError, TypeError):
        raise argparse.ArgumentTypeError("expected a JSON object like '{\"0\": 100, \"1\": 50}'") from None


def _command_parser(sub: Any, name: str, summary: str, section: str, sections: str) -> argparse.ArgumentParser:
    """A command whose settings are config keys: `evaluate` and `export` read `section` of an
    optional config file, then --set, then their flags (shorthands for keys)."""
    parser = sub.add_parser(name, help=summary, description=(
        f"{summary[0].upper()}{summary[1:]}. Settings come from {sections} of an optional config file, then "
        f"--set {section}.KEY=VALUE, then the flags, each a shorthand for a key (defaults: those of the keys)."))
    parser.add_argument("config", nargs="?", help=f"optional YAML config file (a pipeline config serves): {sections} "
                        "used, other sections ignored")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {section}.KEY=VALUE (repeatable)")
    return parser


# --- commands ----------------------------------------------------------------------------------
# Each command imports its stage inside its function, on purpose: torch, mlflow and prefect take
# seconds to import, and `ganpipe --help` or a bad config (exit 2) should not wait for them.

def cmd_ingest(args: argparse.Namespace) -> None:
    from ganpipe.data import ingest

    cfg = _load(args)
    result = ingest(cfg.data, cfg.storage.endpoint_url)
    state = "cache hit" if result.cached else "prepared"
    skipped = f"{result.num_skipped} skipped, listed in {result.report}" if result.num_skipped else "none skipped"
    summary = [f"{state}: {result.num_records} records ({skipped}) -> {result.location}",
               f"fingerprint {result.fingerprint}" + (f", classes: {', '.join(result.classes)}" if result.classes else "")]
    _emit(args, result.to_json(), summary)


def cmd_train(args: argparse.Namespace) -> None:
    from ganpipe.launch import launch_training

    extra = []
    if args.num_processes is not None:
        extra.append(f"train.num_processes={args.num_processes}")
    if args.mixed_precision is not None:
        extra.append(f"train.mixed_precision={args.mixed_precision}")
    cfg = _load(args, extra)
    result = launch_training(cfg, resume=args.resume, wait=args.wait)
    keys = ("run_dir", "steps", "checkpoint", "mlflow_run_id", "resumed_from_step")
    out = {k: result.get(k) for k in keys} | {k: v for k, v in result.items() if k not in keys}
    resumed = f" (resumed from step {result['resumed_from_step']})" if result.get("resumed_from_step") else ""
    _emit(args, out, [f"trained {result['steps']} steps{resumed}: {result['run_dir']}",
                      f"checkpoint {result['checkpoint']}, MLflow run {result['mlflow_run_id']}"])


def cmd_evaluate(args: argparse.Namespace) -> None:
    from ganpipe.evaluate import evaluate_sources

    cfg = _command_config(args, EVALUATE_FLAGS)
    e = cfg.eval
    results = evaluate_sources(args.real, args.fake, e.metrics, e.num_samples, bootstrap=e.bootstrap,
                               inception_weights=e.inception_weights, resolution=e.resolution, seed=cfg.seed,
                               endpoint_url=cfg.storage.endpoint_url, num_processes=e.num_processes, settings=e)
    _emit(args, results, metric_lines(results))
    if results and all(r.get("value") is None for r in results.values()):
        raise EvaluationFailed("no metric could be computed: " +
                               "; ".join(f"{name}: {r.get('error')}" for name, r in results.items()))


def cmd_register(args: argparse.Namespace) -> None:
    from ganpipe.registry import register_run

    result = register_run(Path(args.run), args.name, stage=args.stage)
    _emit(args, result, [f"registered {result['name']} version {result['version']} "
                         f"(aliases: {', '.join(result['aliases']) or 'none'})", result["decision"]])


def cmd_generate(args: argparse.Namespace) -> None:
    from ganpipe.generate import generate_to_file

    result = generate_to_file(args.model, Path(args.out), args.num_images, args.seed, args.labels, args.truncation)
    _emit(args, result, [f"wrote {args.num_images} samples to {args.out}"])


def cmd_export(args: argparse.Namespace) -> None:
    from ganpipe.export import export
    from ganpipe.quality_gates import GateSettings
    from ganpipe.sr_export import export_super_resolved

    cfg = _command_config(args, EXPORT_FLAGS)
    write = export_super_resolved if cfg.export.input else export  # --input: super-resolve, not sample
    result = write(args.model, cfg.export, cfg.storage.endpoint_url, wait=args.wait)
    summary = [f"exported {result['num_images']} rows in {result['num_shards']} shard(s) to {result['out']} "
               f"({result['shards_written']} shard(s) written now)", f"manifest: {result['manifest']}"]
    if GateSettings.from_config(cfg.export).enabled:
        summary.append(f"quality gates dropped {result['num_dropped']} row(s); see {result['out']}/gated_rows.jsonl")
    _emit(args, result, summary)


def cmd_augment(args: argparse.Namespace) -> None:
    from ganpipe.augment import augment

    result = augment(args.real, args.synthetic, args.ratio, args.out, shard_size=args.shard_size, seed=args.seed,
                     wait=args.wait)
    _emit(args, result, [f"wrote {result['num_images']} rows ({result['num_real']} real, {result['num_synthetic']} "
                         f"synthetic) in {result['num_shards']} shard(s) to {result['out']}",
                         f"manifest: {result['manifest']}"])


PREFECT_DEFAULTS = {
    # Without PREFECT_API_URL, Prefect starts a temporary local API. Its 20 s start-up limit is too
    # tight for a busy laptop or CI box.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # That temporary API's telemetry service writes a session row into its fresh sqlite database
    # while the server is still migrating it: "database is locked", and a long traceback at the top
    # of every run. ganpipe sends nothing to the internet anyway.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def set_prefect_defaults() -> None:
    """ganpipe's defaults for Prefect, set before Prefect is imported (it reads its settings then,
    and its temporary server inherits this environment); the user's own settings win."""
    for variable, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(variable, value)


def cmd_pipeline(args: argparse.Namespace) -> None:
    cfg = _load(args)  # bad input, evaluation settings included, is exit 2 before Prefect starts
    set_prefect_defaults()
    from flows.pipeline import check_evaluation, training_pipeline

    check_evaluation(cfg)  # the flow checks again: deployments start it without this command
    summary = training_pipeline(config_path=str(args.config), overrides=list(args.overrides))
    _emit(args, summary, pipeline_summary_lines(summary))


def cmd_deploy(args: argparse.Namespace) -> None:
    cfg = _load(args) if args.config else None  # its network budget is set before Prefect reads it
    set_prefect_defaults()  # without PREFECT_API_URL, deploying starts the temporary API too
    from flows.deploy import deploy

    result = deploy(args.config, list(args.overrides), cfg)
    schedule = result["schedule"]
    lines = [f"deployed {name}" for name in result["deployments"]]
    lines.append(f"  schedule:  {schedule['cron']} ({schedule['timezone']}) for the pipeline" if schedule
                 else "  schedule:  none (runs on demand)")
    lines.append(f"  work pool: {result['work_pool']} (start a worker: prefect worker start --pool "
                 f"{result['work_pool']})")
    if not os.environ.get("PREFECT_API_URL"):
        lines.append("  PREFECT_API_URL is not set: deployed to the local Prefect database; "
                     "`prefect server start` serves it")
    _emit(args, result, lines)


# --- parser --------------------------------------------------------------------------------------

def build_parser() -> Parser:
    defaults = CommandConfig()  # shown in --help; written once, in ganpipe.config
    parser = Parser(prog="ganpipe", description="Train, evaluate, register and export GANs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pipeline", help="ingest -> train -> evaluate -> register -> export, as a Prefect flow")
    _add_config(p)
    _add_json(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("ingest", help="validate and prepare the dataset")
    _add_config(p)
    _add_json(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="adversarial training through Accelerate")
    _add_config(p)
    _add_json(p)
    p.add_argument("--resume", choices=["auto", "never"], default="auto",
                   help="auto: continue this config's run from its last checkpoint; never: a fresh run")
    p.add_argument("--num-processes", type=int, help="processes (devices) to train on")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    _add_wait(p, "the same run directory")
    p.set_defaults(func=cmd_train)

    p = _command_parser(sub, "evaluate", "quality metrics of generated against real data", "eval",
                        "the `eval` and `storage` sections and `seed`")
    p.add_argument("--real", required=True, help="dataset: anything data.source accepts, or an image folder")
    p.add_argument("--fake", required=True, help="MODEL (models:/NAME@ALIAS, models:/NAME/VERSION, run dir) or dataset")
    p.add_argument("--metrics", type=_comma_list, help="eval.metrics, comma-separated: fid,kid,pr,cas,fd_domain,"
                   "uplift,coverage,density "
                   f"(default {','.join(defaults.eval.metrics)})")
    p.add_argument("--num-samples", type=int,
                   help=f"eval.num_samples: samples per side (default {defaults.eval.num_samples})")
    p.add_argument("--inception-weights", help="eval.inception_weights: pt_inception-2015-12-05 weights file (for "
                   "fid, kid, pr); default: $GANPIPE_INCEPTION_WEIGHTS, then the torch hub download cache")
    p.add_argument("--bootstrap", type=int, help="eval.bootstrap: resamples for uncertainty "
                   f"(default {defaults.eval.bootstrap})")
    p.add_argument("--num-processes", type=int,
                   help="eval.num_processes: extract features in N processes (devices) through accelerate "
                        f"(default {defaults.eval.num_processes})")
    p.add_argument("--resolution", type=int, help="eval.resolution: when both sides are datasets, the size both "
                   "are prepared at (default: the real data's own; a MODEL sets its own)")
    p.add_argument("--seed", type=int, help=f"the config's top-level seed (default {defaults.seed})")
    _add_json(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="log and register a run's generator in MLflow")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--name", help="registered model name (default: the run's register.name; <register.name>-psnr "
                   "with --stage psnr)")
    p.add_argument("--stage", default="final", help="final (default): the run's generator/; psnr: a super-resolution "
                   "run's PSNR-stage generator (generator-psnr/, the end of train.pretrain_steps)")
    _add_json(p)
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("generate", help="samples to a .png grid, .npy or .parquet")
    p.add_argument("--model", required=True)
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labels", help="class ids or names, comma-separated (cycled over the images)")
    p.add_argument("--truncation", type=float, help="truncation trick threshold (latent values beyond it are redrawn)")
    p.add_argument("--out", required=True)
    _add_json(p)
    p.set_defaults(func=cmd_generate)

    p = _command_parser(sub, "export", "bulk synthetic dataset (parquet shards or image folder)", "export",
                        "the `export` and `storage` sections")
    p.add_argument("--model", required=True, help="MODEL: models:/NAME@ALIAS, models:/NAME/VERSION or a run dir")
    p.add_argument("--num-images", type=int, help="export.num_images: rows to write (required unless --input)")
    p.add_argument("--input", help="export.input: super-resolution models: the dataset to super-resolve (a data.source)")
    p.add_argument("--image-column", help="export.image_column: --input's image column (default: its first)")
    p.add_argument("--out", help="export.out: local path or s3:// URI (required, here or in the config)")
    p.add_argument("--format", choices=["parquet", "imagefolder"],
                   help=f"export.format (default {defaults.export.format})")
    p.add_argument("--shard-size", type=int, help="export.shard_size: rows per shard "
                   f"(default {defaults.export.shard_size})")
    p.add_argument("--class-balance", action="store_true", default=None,
                   help="export.class_balance: equal rows per class (conditional models)")
    p.add_argument("--class-counts", type=_class_counts, help="export.class_counts: explicit rows per class as JSON, "
                   "e.g. '{\"0\": 500, \"1\": 500}'")
    p.add_argument("--seed", type=int, help=f"export.seed (default {defaults.export.seed})")
    p.add_argument("--num-processes", type=int, help="export.num_processes: generating processes, started with "
                   "accelerate launch (one per GPU, or CPU processes; default "
                   f"{defaults.export.num_processes})")
    p.add_argument("--drop-lowest-d", type=float, metavar="FRACTION", help="export.drop_lowest_d: quality gate: "
                   "drop about this fraction of rows, those the run's discriminator scores lowest (0: off; "
                   f"default {defaults.export.drop_lowest_d})")
    p.add_argument("--memorisation-check", choices=["off", "report", "drop"],
                   help="export.memorisation_check: quality gate: find rows that nearly copy a training example; "
                        f"list them, or drop them too (default {defaults.export.memorisation_check})")
    p.add_argument("--near-copy-ratio", type=float,
                   help="export.near_copy_ratio: memorisation check: near copy when the distance to the nearest "
                        "training example is below this times the median nearest-neighbour distance within the "
                        f"training data (default {defaults.export.near_copy_ratio})")
    _add_wait(p, "to the same --out")
    _add_json(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("augment", help="mix real and synthetic rows at a chosen ratio into one dataset")
    p.add_argument("--real", required=True, help="real dataset: anything data.source accepts")
    p.add_argument("--synthetic", required=True, help="a finished `ganpipe export` (path or s3:// URI), or a MODEL")
    p.add_argument("--ratio", type=_ratio, required=True, help="synthetic rows per real row, e.g. 0.5; auto: the "
                   "best ratio of the version's uplift measurement (--synthetic a registered MODEL)")
    p.add_argument("--out", required=True, help="local path or s3:// URI")
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="export seed of the generated rows when --synthetic is a MODEL")
    _add_wait(p, "to the same --out")
    _add_json(p)
    p.set_defaults(func=cmd_augment)

    p = sub.add_parser("deploy", help="create or update the Prefect deployments and their schedules")
    _add_config(p, optional=True)
    _add_json(p)
    p.set_defaults(func=cmd_deploy)
    return parser


def print_error(message: object) -> None:
    """The one `error:` line. Messages are bounded where they are made (errors.show); this is the
    safety net for any that are not: one line, at most LINE_CHARS characters."""
    text = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"error: {shorten(text, LINE_CHARS)}", file=sys.stderr)


def _run_command(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> None:
    """Run the command under the network budget (the environment's, until a config sets its own);
    an endpoint that timed out or refused, however deep below, becomes one failure naming it."""
    network.use()
    try:
        func(args)
    except Exception as exc:
        failure = network.unreachable(exc)
        if failure is None:
            raise
        raise failure from exc


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    debug = os.environ.get("GANPIPE_DEBUG") == "1"
    try:
        _run_command(func, args)
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except StageError as exc:
        if debug:
            traceback.print_exc()
        cause = exc.cause
        print_error(exc)
        return 2 if isinstance(cause, UserError) else 1
    except Failure as exc:
        if debug:
            traceback.print_exc()
        print_error(exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        if debug:
            traceback.print_exc()
        print_error(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
