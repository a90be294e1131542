"""``mkdt run`` / ``mkdt demo``: the whole pipeline in one run directory, composed from the stages.

teacher (or imported) -> targets -> experts -> initial sets -> distillation -> baselines -> pre-training
and linear probes for every method -> report. The pipeline holds no stage logic: it resolves each
stage's typed config from one YAML document (a section per stage, shared top-level keys such as
``data``, ``seed``, ``device``, ``out``), calls the stage function, and keeps ``pipeline.json`` with a
chained digest per step: when a step's configuration (or anything before it) changes, that step's old
folder is moved aside to ``<folder>.stale`` and the step and everything after it are redone.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mkdt.artifacts import atomic_write_text, config_digest, load_json, save_json
from mkdt.config import dump_yaml, merge, parse_override, read_preset, read_yaml, resolve, to_dict
from mkdt.errors import MkdtError
from mkdt.runtime import Meter

METHODS = ("none", "random", "high_loss", "sas", "krr_st", "mkdt_random_init", "mkdt", "full", "mtt_ssl",
           "krr_st_own_recipe")


@dataclass
class RunSettings:
    """The ``run:`` section: which methods to evaluate (names as in the benchmark JSON), how many seeds
    the evaluation uses, and how many processes the stages that support torchrun get."""

    methods: list[str] = field(default_factory=lambda: ["none", "random", "high_loss", "mkdt"])
    report: bool = True
    # Evaluation seeds: for each seed s, a fresh encoder is pre-trained with seed s and probed on the labelled
    # subsets of seed s, so the reported spread includes the pre-training's randomness (not only the labelled
    # subset's). None: one encoder (the run's seed), probed with the probe section's seeds.
    eval_seeds: list[int] | None = None
    # Processes for teacher, experts, distill and probe: > 1 launches those steps with
    # `torchrun --standalone --nproc_per_node=<processes>` (each worker gets cpu cores / processes threads).
    processes: int = 1

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise MkdtError(f"run.methods: unknown method '{unknown[0]}'; choose from {', '.join(METHODS)}")
        if self.eval_seeds is not None and (not self.eval_seeds or len(set(self.eval_seeds)) != len(self.eval_seeds)):
            raise MkdtError(f"run.eval_seeds must be a non-empty list of distinct seeds (or null), got {self.eval_seeds}")
        if not isinstance(self.processes, int) or self.processes < 1:
            raise MkdtError(f"run.processes must be an integer >= 1, got {self.processes!r}")


@dataclass
class Step:
    """One call of a stage function with its resolved config."""

    name: str  # unique within the run, e.g. "pretrain/mkdt"
    module: str
    config_class: str
    function: str
    section: str
    values: dict[str, Any] = field(default_factory=dict)  # fixed by the pipeline (kind, source, ...)
    folders: tuple[str, ...] = ()  # folders under out that hold this step's outputs
    after: tuple[str, ...] = ()  # steps whose outputs this step reads
    command: str | None = None  # the `mkdt` subcommand, for steps that can run under torchrun
    # the document section with settings for this step only (default: its name); the per-seed steps of a
    # method share their method's, e.g. `pretrain/full:` applies to pretrain/full_seed0, _seed1, ...
    own_section: str | None = None


def _split_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        node = tree
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = value
    return tree


def load_run_document(preset: str | None, files: list[str], overrides: list[str],
                      values: Mapping[str, Any]) -> dict:
    """preset < files < command-line overrides < flags (--seed/--device/--out) as one mapping."""
    doc: dict = {}
    if preset:
        # the stages then also read their own presets/<stage>/<preset>.yaml (see step_config)
        doc = merge({"preset": preset}, read_preset(preset))
    for f in files:
        doc = merge(doc, read_yaml(f))
    doc = merge(doc, _split_overrides(overrides))
    doc = merge(doc, {k: v for k, v in values.items() if v is not None})
    return doc


PRETRAIN_INPUT = {"none": (), "full": ("targets",), "random": ("init",), "high_loss": ("init",),
                  "sas": ("subset/sas",), "krr_st": ("krr_st",), "krr_st_own_recipe": ("krr_st",),
                  "mkdt": ("distill",),
                  "mkdt_random_init": ("distill/random_init",), "mtt_ssl": ("distill/mtt_ssl",)}


def _pretrain_step(method: str, out: Path, distilled: Callable[[str], str], seed: int | None = None) -> Step:
    kinds = {
        "none": dict(kind="none"),
        "full": dict(kind="full"),
        "random": dict(kind="subset", source=str(out / "init" / "random.safetensors")),
        "high_loss": dict(kind="subset", source=str(out / "init" / "high_loss.safetensors")),
        "sas": dict(kind="subset", source=str(out / "subsets" / "sas.safetensors")),
        "krr_st": dict(kind="subset", source=distilled("krr_st")),
        # KRR-ST's set pre-trained with KRR-ST's own schedule (1000 epochs), recorded in the set file
        "krr_st_own_recipe": dict(kind="subset", source=distilled("krr_st"), recipe="krr_st"),
        "mkdt": dict(kind="distilled", source=distilled("mkdt")),
        "mkdt_random_init": dict(kind="distilled", source=distilled("mkdt_random_init")),
        "mtt_ssl": dict(kind="distilled", source=distilled("mtt_ssl")),
    }
    name = method if seed is None else seeded_name(method, seed)
    values = {"name": name, **kinds[method], **({} if seed is None else {"seed": seed})}
    return Step(f"pretrain/{name}", "mkdt.evaluate", "PretrainConfig", "pretrain", "pretrain", values,
                (f"pretrain/{name}",), PRETRAIN_INPUT[method], own_section=f"pretrain/{method}")


def seeded_name(method: str, seed: int) -> str:
    """The pretrain/probe folder of one evaluation seed of a method, e.g. ``mkdt_seed1``."""
    return f"{method}_seed{seed}"


def _evaluation_steps(method: str, out: Path, distilled: Callable[[str], str],
                      eval_seeds: list[int] | None) -> list[Step]:
    """Pre-training and probe of one method: one encoder, or one per evaluation seed (probed on that
    seed's labelled subsets only; ``combine_probe_results`` merges them into ``probe/<method>``)."""
    steps = []
    for seed in eval_seeds if eval_seeds is not None else [None]:
        pre = _pretrain_step(method, out, distilled, seed)
        name = pre.values["name"]
        values = {"name": name, "encoder": str(out / "pretrain" / name / "encoder.safetensors")}
        if seed is not None:
            values["seeds"] = [seed]
        steps += [pre, Step(f"probe/{name}", "mkdt.evaluate", "ProbeConfig", "probe", "probe", values,
                            (f"probe/{name}",), (pre.name,), command="probe", own_section=f"probe/{method}")]
    return steps


def _mtt_ssl_steps(out: Path) -> list[Step]:
    """The naive MTT-SSL baseline: SSL experts (the ``experts`` settings with objective ssl; a section
    ``experts/ssl:`` adjusts them) and distillation with the SSL inner objective from MKDT's high-loss
    initial set, both under ``<out>/mtt_ssl/``, so it differs from MKDT only in the objective."""
    root = out / "mtt_ssl"
    return [
        Step("experts/ssl", "mkdt.experts", "ExpertsConfig", "train_experts", "experts",
             {"objective": "ssl", "out": str(root)}, ("mtt_ssl/experts",), command="experts"),
        Step("distill/mtt_ssl", "mkdt.distill", "DistillConfig", "distill", "distill",
             {"inner_objective": "ssl", "init": str(out / "init" / "high_loss.safetensors"),
              "experts_dir": str(root / "experts"), "out": str(root), "augment": False, "memory_saving": False},
             ("mtt_ssl/distill",), ("init", "experts/ssl"), command="distill"),
    ]


def plan(doc: Mapping[str, Any]) -> tuple[RunSettings, Path, list[Step]]:
    """The ordered steps for a run document."""
    settings = resolve(RunSettings, section="run", docs=[{}],
                       values=dict(doc.get("run", {})) if isinstance(doc.get("run"), Mapping) else None)
    settings.check()
    out = Path(str(doc.get("out", "runs/default")))
    methods = settings.methods
    needs_experts = any(m in methods for m in ("random", "high_loss", "mkdt", "mkdt_random_init", "mtt_ssl"))

    def distilled(method: str) -> str:
        folder = {"mkdt": out / "distill", "mkdt_random_init": out / "mkdt_random_init" / "distill",
                  "mtt_ssl": out / "mtt_ssl" / "distill", "krr_st": out / "krr_st"}[method]
        return f"@stage:{folder}"  # resolved after the step has run (file name = number of updates)

    steps = [
        Step("teacher", "mkdt.teacher", "TeacherConfig", "train_teacher", "teacher", folders=("teacher",),
             command="teacher"),
        Step("targets", "mkdt.teacher", "TargetsConfig", "compute_targets", "targets", folders=("targets",),
             after=("teacher",)),
    ]
    if needs_experts:
        steps += [
            Step("experts", "mkdt.experts", "ExpertsConfig", "train_experts", "experts", folders=("experts",),
                 after=("targets",), command="experts"),
            Step("init", "mkdt.experts", "InitConfig", "select_initial_set", "init", folders=("init",),
                 after=("experts", "targets")),
        ]
    if "mkdt" in methods:
        steps.append(Step("distill", "mkdt.distill", "DistillConfig", "distill", "distill",
                          {"init": "high_loss"}, ("distill",), ("init", "experts"), command="distill"))
    if "mkdt_random_init" in methods:
        steps.append(Step("distill/random_init", "mkdt.distill", "DistillConfig", "distill", "distill",
                          {"init": str(out / "init" / "random.safetensors"),
                           "experts_dir": str(out / "experts"), "out": str(out / "mkdt_random_init")},
                          ("mkdt_random_init",), ("init", "experts"), command="distill"))
    if "mtt_ssl" in methods:
        steps += _mtt_ssl_steps(out)
    if "sas" in methods:
        steps.append(Step("subset/sas", "mkdt.baselines", "SubsetConfig", "select_subset", "subset",
                          {"method": "sas", "name": "sas"}, ("subsets",), ("targets",)))
    if "krr_st" in methods or "krr_st_own_recipe" in methods:
        steps.append(Step("krr_st", "mkdt.baselines", "KrrStConfig", "distill_krr_st", "krr_st",
                          folders=("krr_st",), after=("targets",)))
    for method in methods:
        steps += _evaluation_steps(method, out, distilled, settings.eval_seeds)
    return settings, out, steps


def _resolve_stage_file(value: Any) -> Any:
    """``@stage:<folder>`` -> the artifact file named in that stage's ``stage.json``."""
    if not (isinstance(value, str) and value.startswith("@stage:")):
        return value
    folder = Path(value[len("@stage:"):])
    record = load_json(folder / "stage.json")
    name = record.get("file") or record.get("summary", {}).get("file")
    if not name:
        raise MkdtError(f"{folder / 'stage.json'}: names no output file; re-run that stage")
    return str(folder / name)


def step_config(step: Step, doc: Mapping[str, Any], resolve_files: bool = True) -> Any:
    """The step's typed config: the stage preset named by the document's ``preset`` key (if any, e.g.
    ``cifar10-cpu`` -> ``presets/<stage>/cifar10-cpu.yaml``) < the document (its stage section, then a
    section named after the step itself, e.g. ``pretrain/full:``, for settings of that step only) < the
    pipeline's fixed values."""
    cls = getattr(importlib.import_module(step.module), step.config_class)
    values = {k: _resolve_stage_file(v) if resolve_files else v for k, v in step.values.items()}
    preset = doc.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise MkdtError(f"run document: 'preset' must be a preset name such as cifar10-cpu, not {preset!r}")
    docs: list[Mapping[str, Any]] = [doc]
    own_section = step.own_section or step.name
    own = doc.get(own_section) if own_section != step.section else None
    if own is not None:
        if not isinstance(own, Mapping):
            raise MkdtError(f"run document: '{own_section}' must be a mapping of {step.section} settings")
        docs.append({step.section: own})
    return resolve(cls, preset=preset, section=step.section, docs=docs, values=values)


def _move_aside(out: Path, folders: tuple[str, ...], log: Callable[[str], None]) -> None:
    for rel in folders:
        folder = out / rel
        if folder.exists():
            stale = folder.with_name(folder.name + ".stale")
            if stale.exists():
                shutil.rmtree(stale)
            folder.rename(stale)
            log(f"  moved the old outputs to {stale}")


def run_pipeline(doc: Mapping[str, Any], log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every step of a run document; returns the summary written to pipeline.json.

    Each step's key digests its own resolved config and the keys of the steps it reads from, so a
    change redoes exactly that step and the steps that depend on it.
    """
    settings, out, steps = plan(doc)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pipeline.json"
    state = load_json(state_path) if state_path.is_file() else {"steps": {}}
    keys: dict[str, str] = {}
    redone: set[str] = set()
    t_start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        prefix = f"[{i}/{len(steps)}] {step.name}"
        # Inputs named "@stage:<folder>" are digested as that placeholder; their file is read at run time.
        key = config_digest({"step": step.name, "config": to_dict(step_config(step, doc, resolve_files=False)),
                             "inputs": {dep: keys.get(dep, "") for dep in step.after}})
        keys[step.name] = key
        previous = state["steps"].get(step.name, {})
        if previous.get("key") and previous["key"] != key:
            changed_inputs = [dep for dep in step.after if dep in redone]
            why = f"its input {changed_inputs[0]} was redone" if changed_inputs else "its configuration changed"
            log(f"{prefix}: {why}; redoing it and the steps that depend on it")
            _move_aside(out, step.folders, log)
            previous = {}
        finished = previous.get("key") == key and previous.get("finished")
        config = step_config(step, doc)
        # an imported teacher is a file copy: not worth starting processes for
        launch = (settings.processes > 1 and step.command is not None and not finished
                  and not getattr(config, "import_path", None))
        log(f"{prefix}: {'done before' if finished else 'running'}"
            f"{f' ({settings.processes} processes)' if launch else ''}")
        if not finished:
            redone.add(step.name)
            # remember the key now, so a change to an interrupted step is detected too
            state["steps"][step.name] = {"key": key, "finished": False}
            save_json(state_path, state)
        function = getattr(importlib.import_module(step.module), step.function)
        with Meter(children=True) as meter:
            if launch:
                launch_torchrun(step, config, settings.processes, out / "launch")
            # after a torchrun launch the stage is done: the call only reads its recorded result
            result = function(config)
        entry = {"key": key, "finished": True, "summary": (result or {}).get("summary", {}),
                 "measure": previous.get("measure") if finished and previous.get("measure") else meter.as_dict()}
        if launch:
            entry["processes"] = settings.processes
        state["steps"][step.name] = entry
        save_json(state_path, state)
    if settings.eval_seeds is not None:
        from mkdt.evaluate import combine_probe_results

        for method in settings.methods:
            combine_probe_results([out / "probe" / seeded_name(method, s) / "results.json" for s in settings.eval_seeds],
                                  out / "probe" / method / "results.json", name=method)
    state["order"] = [step.name for step in steps]
    state["methods"] = settings.methods
    state["eval_seeds"] = settings.eval_seeds
    state["seconds"] = round(time.perf_counter() - t_start, 2)
    save_json(state_path, state)
    if settings.report:
        from mkdt.report import write_report

        paths = write_report(out, state)
        state["report"] = {k: str(v) for k, v in paths.items()}
        log(f"report: {paths['html']}")
    return state


def launch_torchrun(step: Step, config: Any, processes: int, folder: Path) -> None:
    """Run ``mkdt <step.command>`` with ``config`` under ``torchrun --standalone`` and wait for it.

    The resolved config goes to ``<folder>/<step>.yaml`` and is read back here first: the workers must
    resolve exactly this config (the in-process call after the launch then finds the stage done).
    Each worker gets ``cpu cores / processes`` torch threads unless ``OMP_NUM_THREADS`` is set.
    """
    path = folder / f"{step.name.replace('/', '__')}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_yaml(config))
    if to_dict(resolve(type(config), section=step.section, files=[path])) != to_dict(config):
        raise MkdtError(f"{path}: the config does not survive a YAML round trip, so {step.name} cannot be "
                        f"launched with torchrun; set run.processes=1")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "mkdt", step.command or "", "--config", str(path)]
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise MkdtError(f"{step.name}: torchrun exited with code {code} (its workers' errors are printed above); "
                        f"re-run to resume, or set run.processes=1")


def run_from_cli(preset: str | None, files: list[str], overrides: list[str], values: Mapping[str, Any],
                 print_config: bool = False) -> dict:
    from mkdt.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise MkdtError("mkdt run/demo is single-process for now; launch the stages themselves with torchrun "
                        "(see docs/distributed.md)")
    doc = load_run_document(preset, files, overrides, values)
    if not files and not preset:
        raise MkdtError("mkdt run needs --config FILE (a run document) or --preset NAME (e.g. demo)")
    if print_config:
        import yaml

        print(yaml.safe_dump(doc, sort_keys=False), end="")
        return {}
    return run_pipeline(doc)


__all__ = ["RunSettings", "Step", "plan", "run_pipeline", "load_run_document", "run_from_cli", "launch_torchrun",
           "seeded_name"]
