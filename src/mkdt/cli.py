"""``mkdt <command>``: the command line composes the stages of :mod:`mkdt.stages`; it holds no stage logic.

Every stage subcommand takes ``--config FILE`` (repeatable), ``--preset NAME``, ``--set key=value``
(repeatable, dotted keys into the stage's config), ``--device``, ``--seed`` and ``--out``, resolves and
checks the stage's typed config in that order and runs it under the stage contract. ``mkdt <stage>
--help`` lists the stage's settings. Exit codes: 0 done, 1 a failure during work, 2 a usage or
configuration error (found before any stage starts), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

from mkdt.errors import ConfigError, MkdtError, Terminated

RUN_COMMANDS = {
    "run": "run the whole pipeline from a run document (--config FILE or --preset)",
    "demo": "the whole pipeline on the embedded digits set (no download, a few minutes)",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files win)")
    parser.add_argument("--preset", help="named preset shipped with mkdt (see `mkdt list`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.name=cifar10 (repeatable)")
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--seed", type=int, help="the one seed that fixes every random choice")
    parser.add_argument("--out", help="run folder (a stage writes into its own folder inside it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads for this process (default: torch's choice; on a busy few-core "
                             "machine 1 is often faster); a stage's own `threads` setting still applies inside it")
    parser.add_argument("--keep-versions", type=int, metavar="N",
                        help="earlier outputs kept per stage as <folder>.stale.<n> when settings change "
                             "(default 3, or MKDT_KEEP_VERSIONS)")
    parser.add_argument("--log", metavar="LOGGERS",
                        help="experiment loggers of the training loops, comma-separated: csv (default, "
                             "<stage>/metrics.csv), tensorboard (<stage>/tensorboard/), wandb (offline unless "
                             "WANDB_MODE=online), or none; also run.log or MKDT_LOG")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print debug lines too")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides, like --set")


def settings_help(config_class: type, section: str) -> str:
    """The settings of a stage as an aligned text table (``mkdt <stage> --help``)."""
    from mkdt.config import describe

    rows = describe(config_class)
    width = min(34, max(len(key) for key, *_ in rows))
    lines = [f"settings (--set KEY=VALUE, or in a run document under '{section}:'):"]
    for key, type_name, default, text in rows:
        shown = "" if type_name == "section" else f" [{type_name}, default {json.dumps(default, default=str)}]"
        lines.append(f"  {key:<{width}} {text}{shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from mkdt import __version__
    from mkdt.stages import ALIASES, STAGES

    parser = argparse.ArgumentParser(prog="mkdt", description="Dataset distillation for self-supervised "
                                                              "pre-training (MKDT).")
    parser.add_argument("--version", action="version", version=f"mkdt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list data sources, models and presets")
    for name, text in RUN_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
        p.add_argument("--dry-run", action="store_true",
                       help="resolve and check every step, print the plan and exit without running anything")
    for name, stage in STAGES.items():
        aliases = [old for old, new in ALIASES.items() if new == name]
        p = sub.add_parser(name, aliases=aliases, help=stage.help, description=stage.help,
                           epilog=settings_help(stage.config, stage.section),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(p)
        if name == "teacher":
            p.add_argument("--import", dest="flag_import_path", metavar="FILE",
                           help="import a teacher state dict instead of training")
        if name == "distill":
            p.add_argument("--method", choices=("mkdt", "krr-st"), default="mkdt",
                           help="mkdt (trajectory matching, default) or krr-st (the KRR-ST baseline)")
    return parser


def resolve_stage_config(stage: Any, args: argparse.Namespace) -> Any:
    from mkdt.config import resolve

    values: dict[str, Any] = {"device": args.device, "seed": args.seed, "out": args.out}
    if getattr(args, "flag_import_path", None):
        values["import_path"] = args.flag_import_path
    return resolve(stage.config, preset=args.preset, section=stage.section, files=args.config,
                   overrides=[*args.overrides, *args.extra], values=values)


def _list() -> int:
    from mkdt.config import available_presets
    from mkdt.data import available_sources
    from mkdt.models import available_models
    from mkdt.stages import STAGES

    print("stages:      ", ", ".join(STAGES))
    print("data sources:", ", ".join(available_sources()))
    print("models:      ", ", ".join(available_models()))
    print("presets:     ", ", ".join(available_presets()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mkdt.pipeline import run_from_cli

    preset = args.preset or ("demo" if args.command == "demo" else None)
    out = args.out or ("runs/demo" if args.command == "demo" and not args.config else None)
    values = {"seed": args.seed, "device": args.device, "out": out}
    overrides = [*args.overrides, *args.extra] + ([f"run.log={args.log}"] if args.log is not None else [])
    state = run_from_cli(preset, args.config, overrides, values, args.print_config,
                         args.dry_run)
    report = state.get("report", {})
    if report.get("markdown"):
        print(Path(report["markdown"]).read_text("utf-8"))
    return 0


def _stage(args: argparse.Namespace) -> int:
    from mkdt.distributed import is_main_process
    from mkdt.engine import check_inputs, decide
    from mkdt.stages import get

    name = "krr-st" if args.command == "distill" and args.method == "krr-st" else args.command
    stage = get(name)
    config = resolve_stage_config(stage, args)
    if args.print_config:
        from mkdt.config import dump_yaml

        print(dump_yaml(config), end="")
        return 0
    check_inputs(stage, config)  # missing inputs, an unavailable device: exit 2 before anything is written
    decide(stage, config)  # a file in the way of the stage folder, an unreadable record
    result = stage(config)
    if is_main_process():
        print(json.dumps({"stage": result.stage, "status": result.status, "folder": str(result.folder),
                          "summary": result.summary}, indent=2, default=str))
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    command: list[str] = []  # the subcommand, once parsed (for the error line)

    def body() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        command.append(args.command)
        return _dispatch(args)

    return guarded(body, lambda: f"mkdt {command[0]}" if command else "mkdt")


def guarded(body: Callable[[], int], where: Callable[[], str]) -> int:
    """``body()`` under mkdt's error contract (also for scripts such as the benchmarks): a failure is one line
    prefixed by ``where()`` and an exit code, never a traceback; SIGTERM is handled as Ctrl-C, and both say
    that finished work is kept."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # first: a SIGTERM while importing is handled too
    try:
        return body()
    except MkdtError as exc:
        print(f"{where()}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file-system failure outside the artifact writer: still one line
        print(f"{where()}: error: {exc.filename or 'file system'}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(f"{where()}: {how}; finished work is kept, re-run the same command to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    from mkdt.progress import setup_logging

    rank = int(os.environ.get("RANK", "0") or 0)
    level = logging.WARNING if getattr(args, "quiet", False) else (
        logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    setup_logging(level, rank=rank)
    keep = getattr(args, "keep_versions", None)
    if keep is not None:
        if keep < 0:
            raise ConfigError(f"--keep-versions must be >= 0, got {keep}")
        os.environ["MKDT_KEEP_VERSIONS"] = str(keep)
    from mkdt.metrics import ENV_LOG, configured_loggers, parse_loggers

    chosen = getattr(args, "log", None)
    if chosen is not None:
        os.environ[ENV_LOG] = ",".join(parse_loggers(chosen)) or "none"
    configured_loggers()  # a typo in MKDT_LOG or a logger that is not installed: exit 2 before anything runs
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    if args.command == "list":
        return _list()
    if args.command in RUN_COMMANDS:
        return _run(args)
    return _stage(args)


if __name__ == "__main__":
    raise SystemExit(main())
