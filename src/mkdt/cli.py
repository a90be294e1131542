"""``mkdt <stage>``: the command line composes stage functions; it holds no stage logic.

Every stage subcommand takes ``--config FILE`` (repeatable), ``--preset NAME``, ``--set key=value``
(repeatable, dotted keys into the stage's config), ``--device``, ``--seed`` and ``--out``, resolves
the stage's typed config in that order and calls the stage's plain Python function.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from mkdt.errors import MkdtError


@dataclass(frozen=True)
class StageCommand:
    """Where a subcommand's config class and function live, and its extra flags (flag -> config key)."""

    module: str
    config: str
    function: str
    help: str
    section: str | None = None
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)


COMMANDS: dict[str, StageCommand] = {
    "smoke": StageCommand("mkdt.smoke", "SmokeConfig", "run_smoke",
                          "load a data set, build a model and run one forward pass (installation check)",
                          section="smoke"),
    "teacher": StageCommand("mkdt.teacher", "TeacherConfig", "train_teacher",
                            "train (or import) the self-supervised teacher", section="teacher",
                            flags={"--import": ("import_path", "import a teacher state dict instead of training")}),
    "targets": StageCommand("mkdt.teacher", "TargetsConfig", "compute_targets",
                            "encode the source set with the teacher into targets", section="targets"),
    "experts": StageCommand("mkdt.experts", "ExpertsConfig", "train_experts",
                            "train knowledge-distillation expert trajectories", section="experts"),
    "init": StageCommand("mkdt.experts", "InitConfig", "select_initial_set",
                         "choose the initial synthetic set (high-loss or random)", section="init"),
    "distill": StageCommand("mkdt.distill", "DistillConfig", "distill",
                            "learn the synthetic set by matching expert trajectories", section="distill"),
    "export": StageCommand("mkdt.distill", "ExportConfig", "export_distilled",
                           "export a distilled set to PNGs or the images.pt/labels.pt/lr.pt layout",
                           section="export"),
    "subset": StageCommand("mkdt.baselines", "SubsetConfig", "select_subset",
                           "select a real subset baseline (random or SAS)", section="subset"),
    "distill-krr-st": StageCommand("mkdt.baselines", "KrrStConfig", "distill_krr_st",
                                   "distill with the KRR-ST baseline", section="krr_st"),
    "analyze-variance": StageCommand("mkdt.baselines", "VarianceConfig", "analyze_variance",
                                     "trajectory variance of KD vs SSL training (the paper's Figure 1)",
                                     section="variance"),
    "pretrain": StageCommand("mkdt.evaluate", "PretrainConfig", "pretrain",
                             "pre-train a fresh encoder on a distilled set or subset", section="pretrain"),
    "probe": StageCommand("mkdt.evaluate", "ProbeConfig", "probe",
                          "linear-probe an encoder on downstream sets", section="probe"),
    "finetune": StageCommand("mkdt.evaluate", "FinetuneConfig", "finetune",
                             "fine-tune an encoder on a downstream set", section="finetune"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (repeatable; later files win)")
    parser.add_argument("--preset", help="named preset shipped with mkdt (see `mkdt list`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set data.name=cifar10 (repeatable)")
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--seed", type=int, help="the one seed that fixes every random choice")
    parser.add_argument("--out", help="run directory (artifacts go to <out>/<stage>/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads for this process (default: torch's choice; on a busy few-core "
                             "machine 1 is often faster); a stage's own `threads` setting still applies inside it")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides, like --set")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkdt",
        description="Dataset distillation for self-supervised pre-training (MKDT).",
    )
    from mkdt import __version__

    parser.add_argument("--version", action="version", version=f"mkdt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="list data sources, models and presets")
    for name, text in (("run", "run the whole pipeline from a run document (--config FILE or --preset)"),
                       ("demo", "the whole pipeline on the embedded digits set (no download, a few minutes)")):
        p = sub.add_parser(name, help=text, description=text)
        _add_common(p)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        _add_common(p)
        for flag, (dest, text) in cmd.flags.items():
            p.add_argument(flag, dest=f"flag_{dest}", help=text)
        if name == "distill":
            p.add_argument("--method", choices=("mkdt", "krr-st"), default="mkdt",
                           help="mkdt (trajectory matching, default) or krr-st (the KRR-ST baseline)")
    return parser


def resolve_stage_config(cmd: StageCommand, args: argparse.Namespace) -> Any:
    from mkdt.config import resolve

    module = importlib.import_module(cmd.module)
    cls = getattr(module, cmd.config)
    values: dict[str, Any] = {"device": args.device, "seed": args.seed, "out": args.out}
    for _flag, (dest, _text) in cmd.flags.items():
        values[dest] = getattr(args, f"flag_{dest}", None)
    return resolve(cls, preset=args.preset, section=cmd.section, files=args.config,
                   overrides=[*args.overrides, *args.extra], values=values)


def _list() -> int:
    from mkdt.config import available_presets
    from mkdt.data import available_sources
    from mkdt.models import available_models

    print("data sources:", ", ".join(available_sources()))
    print("models:      ", ", ".join(available_models()))
    print("presets:     ", ", ".join(available_presets()))
    return 0


def _run(args: argparse.Namespace) -> int:
    from mkdt.pipeline import run_from_cli

    preset = args.preset or ("demo" if args.command == "demo" else None)
    out = args.out or ("runs/demo" if args.command == "demo" and not args.config else None)
    values = {"seed": args.seed, "device": args.device, "out": out}
    state = run_from_cli(preset, args.config, [*args.overrides, *args.extra], values, args.print_config)
    report = state.get("report", {})
    if report.get("markdown"):
        from pathlib import Path

        print(Path(report["markdown"]).read_text("utf-8"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise MkdtError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        if args.command == "list":
            return _list()
        if args.command in ("run", "demo"):
            return _run(args)
        name = args.command
        if name == "distill" and args.method == "krr-st":
            name = "distill-krr-st"
        cmd = COMMANDS[name]
        config = resolve_stage_config(cmd, args)
        if args.print_config:
            from mkdt.config import dump_yaml

            print(dump_yaml(config), end="")
            return 0
        function = getattr(importlib.import_module(cmd.module), cmd.function)
        result = function(config)
        from mkdt.distributed import is_main_process

        if is_main_process() and isinstance(result, dict) and result.get("summary"):
            print(json.dumps(result["summary"], indent=2, default=str))
        return 0
    except MkdtError as exc:
        print(f"mkdt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mkdt {args.command}: interrupted; finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
