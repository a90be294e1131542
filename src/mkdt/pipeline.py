"""``mkdt run`` / ``mkdt demo``: the whole pipeline in one run folder, composed from the stage registry.

teacher (or imported) -> targets -> experts -> initial sets -> distillation -> baselines -> pre-training
and linear probes for every method -> report. The pipeline holds no stage logic and no bookkeeping of
its own: it resolves every step's typed config from one YAML document (a section per stage, shared
top-level keys such as ``data``, ``seed``, ``device``, ``out``), checks the whole run before anything
starts (unknown sections and keys, types, values, devices, inputs that must already exist), then calls
each stage; the stage contract (:mod:`mkdt.engine`) decides whether a step is reused, resumed, extended,
restored or run, so a changed setting redoes exactly the steps whose inputs or settings changed.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mkdt import stages
from mkdt.artifacts import atomic_write_text, save_json
from mkdt.config import (did_you_mean, dump_yaml, merge, overrides_tree, read_preset, read_yaml, require, resolve,
                         to_dict)
from mkdt.engine import ENV_KEEP_VERSIONS, Decision, Stage, decide, keep_versions, missing_inputs
from mkdt.errors import ConfigError, MkdtError
from mkdt.layout import RESULTS_FILE, RunLayout
from mkdt.metrics import ENV_LOG, configured_loggers, parse_loggers
from mkdt.progress import log
from mkdt.runtime import Meter, resolve_device


@dataclass(frozen=True)
class Method:
    """How a pipeline method's set is made and pre-trained on: the pretrain ``kind``, the step that makes
    the set and where that step puts it, and a recipe recorded in the set file (if any)."""

    kind: str
    made_by: str | None = None
    set_file: Callable[[RunLayout], Path] | None = None
    recipe: str | None = None
    needs_experts: bool = False


METHODS: dict[str, Method] = {
    "none": Method("none"),
    "random": Method("subset", "init", lambda lay: lay.init_set("random"), needs_experts=True),
    "high_loss": Method("subset", "init", lambda lay: lay.init_set("high_loss"), needs_experts=True),
    "sas": Method("subset", "subset/sas", lambda lay: lay.subset("sas")),
    "krr_st": Method("subset", "krr_st", lambda lay: lay.krr_st_set),
    # KRR-ST's set pre-trained with KRR-ST's own schedule (1000 epochs), recorded in the set file
    "krr_st_own_recipe": Method("subset", "krr_st", lambda lay: lay.krr_st_set, recipe="krr_st"),
    "mkdt_random_init": Method("distilled", "distill/random_init", lambda lay: lay.distilled("random_init"),
                               needs_experts=True),
    "mkdt": Method("distilled", "distill", lambda lay: lay.distilled(), needs_experts=True),
    "full": Method("full"),
    "mtt_ssl": Method("distilled", "distill/mtt_ssl", lambda lay: lay.distilled("mtt_ssl"), needs_experts=True),
    # beyond MKDT (docs/RESULTS.md): cluster-balanced hard real images, 4x as many at half resolution
    "balanced_lowres": Method("subset", "subset/balanced_lowres", lambda lay: lay.subset("balanced_lowres"),
                              needs_experts=True),
    # its control: as many random images at the same resolution
    "random_lowres": Method("subset", "subset/random_lowres", lambda lay: lay.subset("random_lowres")),
}
# The settings of balanced_lowres, chosen on the validation protocol on CIFAR-10 (docs/RESULTS.md);
# a document's subset: or subset/balanced_lowres: section overrides them.
LOWRES = {"image_scale": 2}
BALANCED_LOWRES = {**LOWRES, "clusters": 40, "within": "high_loss"}
SHARED_KEYS = ("preset", "out", "seed", "device", "run")


@dataclass
class RunSettings:
    """The ``run:`` section: which methods to evaluate, with how many seeds, in how many processes."""

    methods: list[str] = field(default_factory=lambda: ["none", "random", "high_loss", "mkdt"])  # see README
    report: bool = True  # write report.html / report.md at the end
    # Evaluation seeds: for each seed s, a fresh encoder is pre-trained with seed s and probed on the labelled
    # subsets of seed s, so the reported spread includes the pre-training's randomness (not only the labelled
    # subset's). null: one encoder (the run's seed), probed with the probe section's seeds.
    eval_seeds: list[int] | None = None
    # Processes for the stages that support torchrun: > 1 launches them with `torchrun --standalone
    # --nproc_per_node=<processes>` (each worker gets cpu cores / processes threads). Results do not depend on it.
    processes: int = 1
    keep_versions: int | None = None  # earlier outputs kept per stage (null: MKDT_KEEP_VERSIONS, default 3)
    # experiment loggers of every training loop, comma-separated: csv, tensorboard, wandb or none
    # (null: --log / MKDT_LOG, default csv); a runtime setting, it changes no step's identity
    log: str | None = None

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        require(not unknown, "methods", f"a list of {', '.join(METHODS)}", unknown[0] if unknown else None,
                did_you_mean(str(unknown[0]), METHODS).strip(" ()") if unknown else None)
        require(self.eval_seeds is None or (self.eval_seeds and len(set(self.eval_seeds)) == len(self.eval_seeds)),
                "eval_seeds", "a non-empty list of distinct seeds (or null)", self.eval_seeds)
        require(self.processes >= 1, "processes", "an integer >= 1", self.processes)
        require(self.keep_versions is None or self.keep_versions >= 0, "keep_versions", ">= 0 or null",
                self.keep_versions)
        if self.log is not None:
            from mkdt.metrics import parse_loggers

            parse_loggers(self.log, "run.log")


@dataclass
class Step:
    """One call of a stage with its resolved config."""

    name: str  # unique within the run, e.g. "pretrain/mkdt_seed0"
    stage: Stage
    values: dict[str, Any] = field(default_factory=dict)  # fixed by the pipeline (kind, source, ...)
    # the document section with settings for this step only (default: its name); the per-seed steps of a
    # method share their method's, e.g. `pretrain/full:` applies to pretrain/full_seed0, _seed1, ...
    own_section: str | None = None
    # the pipeline's defaults for this step: above the stage preset, below the document
    defaults: dict[str, Any] = field(default_factory=dict)
    config: Any = None


@dataclass
class Plan:
    settings: RunSettings
    layout: RunLayout
    steps: list[Step]
    doc: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# the run document
# ----------------------------------------------------------------------------------------------
def load_run_document(preset: str | None, files: list[str], overrides: list[str],
                      values: Mapping[str, Any]) -> dict:
    """preset < files < command-line overrides < flags (--seed/--device/--out) as one mapping."""
    doc: dict = {}
    if preset:
        # the stages then also read their own presets/<stage>/<preset>.yaml (see step_config)
        doc = merge({"preset": preset}, read_preset(preset))
    for f in files:
        doc = merge(doc, read_yaml(f))
    doc = merge(doc, overrides_tree(overrides))
    doc = merge(doc, {k: v for k, v in values.items() if v is not None})
    return doc


def seeded_name(method: str, seed: int) -> str:
    """The pretrain/probe folder of one evaluation seed of a method, e.g. ``mkdt_seed1``."""
    return f"{method}_seed{seed}"


def _evaluation_steps(method: str, layout: RunLayout, eval_seeds: list[int] | None) -> list[Step]:
    """Pre-training and probe of one method: one encoder, or one per evaluation seed (probed on that
    seed's labelled subsets only; ``combine_probe_results`` merges them into ``probe/<method>``)."""
    how = METHODS[method]
    steps = []
    for seed in eval_seeds if eval_seeds is not None else [None]:
        name = method if seed is None else seeded_name(method, seed)
        values: dict[str, Any] = {"name": name, "kind": how.kind}
        if how.set_file is not None:
            values["source"] = str(how.set_file(layout))
        if how.recipe:
            values["recipe"] = how.recipe
        probe_values: dict[str, Any] = {"name": name, "encoder": str(layout.encoder(name))}
        if seed is not None:
            values["seed"] = seed
            probe_values["seeds"] = [seed]
        steps += [Step(f"pretrain/{name}", stages.get("pretrain"), values, f"pretrain/{method}"),
                  Step(f"probe/{name}", stages.get("probe"), probe_values, f"probe/{method}")]
    return steps


def _set_steps(methods: list[str], layout: RunLayout, budget: float) -> list[Step]:
    """The steps that make the methods' sets, in dependency order; ``budget`` is the size of the distilled
    set (the init section's), the pixel budget of the low-resolution sets."""
    get = stages.get
    steps = [Step("teacher", get("teacher")), Step("targets", get("targets"))]
    if any(METHODS[m].needs_experts for m in methods):
        steps += [Step("experts", get("experts")), Step("init", get("init"))]
    made = {METHODS[m].made_by for m in methods}
    if "distill" in made:
        steps.append(Step("distill", get("distill"), {"init": "high_loss"}))
    if "distill/random_init" in made:
        steps.append(Step("distill/random_init", get("distill"), {"init": "random", "name": "random_init"}))
    if "distill/mtt_ssl" in made:
        # the naive MTT-SSL baseline: SSL experts and the SSL inner objective from MKDT's high-loss initial
        # set, so it differs from MKDT only in the objective (a section experts/ssl: adjusts the experts)
        steps += [Step("experts/ssl", get("experts"), {"objective": "ssl", "name": "ssl"}),
                  Step("distill/mtt_ssl", get("distill"),
                       {"inner_objective": "ssl", "init": "high_loss", "experts_dir": str(layout.experts_dir("ssl")),
                        "name": "mtt_ssl", "augment": False, "memory_saving": False})]
    if "subset/sas" in made:
        steps.append(Step("subset/sas", get("subset"), {"method": "sas", "name": "sas"}))
    if "krr_st" in made:
        steps.append(Step("krr_st", get("krr-st")))
    if "subset/balanced_lowres" in made:
        steps.append(Step("subset/balanced_lowres", get("subset"), {"method": "balanced", "name": "balanced_lowres"},
                          defaults={**BALANCED_LOWRES, "size": budget}))
    if "subset/random_lowres" in made:
        steps.append(Step("subset/random_lowres", get("subset"), {"method": "random", "name": "random_lowres"},
                          defaults={**LOWRES, "size": budget}))
    return steps


def own_sections() -> set[str]:
    """Every step section a run document may hold (for any method, selected or not)."""
    names = {"experts/ssl", "distill/random_init", "distill/mtt_ssl", "subset/sas", "subset/balanced_lowres",
             "subset/random_lowres"}
    for method in METHODS:
        names |= {f"pretrain/{method}", f"probe/{method}"}
    return names


def _check_sections(doc: Mapping[str, Any]) -> None:
    """Every top-level key must be a shared key, a stage section, a step section or a setting some stage
    has (such keys apply to every stage that has them, e.g. ``data``)."""
    fields = {f.name for stage in stages.STAGES.values() for f in dataclasses.fields(stage.config)}
    known = set(SHARED_KEYS) | set(stages.SECTIONS) | own_sections() | fields
    for key in doc:
        if key not in known:
            raise ConfigError(f"run document: unknown section '{key}'{did_you_mean(str(key), known)}; sections are "
                              f"the stages ({', '.join(stages.SECTIONS)}), run, step sections such as "
                              f"pretrain/full, and shared settings (seed, device, out, data, ...)")
    for key in own_sections() & set(doc):
        if not isinstance(doc[key], Mapping):
            raise ConfigError(f"run document: '{key}' must be a mapping of {key.split('/')[0]} settings")


def step_config(step: Step, doc: Mapping[str, Any]) -> Any:
    """The step's typed, validated config: the stage preset named by the document's ``preset`` key (if any,
    e.g. ``cifar10-cpu`` -> ``presets/<stage>/cifar10-cpu.yaml``) < the pipeline's defaults for the step
    < the document (its stage section, then a section for this step only, e.g. ``pretrain/full:``) < the
    pipeline's fixed values."""
    stage = step.stage
    preset = doc.get("preset")
    docs: list[Mapping[str, Any]] = [{stage.section: step.defaults}, doc]
    own_section = step.own_section or step.name
    own = doc.get(own_section) if own_section != stage.section else None
    if isinstance(own, Mapping):
        docs.append({stage.section: own})
    try:
        return resolve(stage.config, preset=preset, section=stage.section, docs=docs, values=step.values)
    except ConfigError as exc:
        raise ConfigError(f"step {step.name}: {exc}") from None


def plan(doc: Mapping[str, Any]) -> Plan:
    """The ordered, resolved and validated steps of a run document. Raises ConfigError before anything runs."""
    doc = dict(doc)
    _check_sections(doc)
    run = doc.get("run", {})
    if run is not None and not isinstance(run, Mapping):
        raise ConfigError("run document: 'run' must be a mapping (methods, eval_seeds, processes, ...)")
    settings = resolve(RunSettings, section="run", docs=[{"run": dict(run or {})}])
    layout = RunLayout(str(doc.get("out", "runs/default")))
    budget = step_config(Step("init", stages.get("init")), doc).size
    steps = _set_steps(settings.methods, layout, budget)
    for method in settings.methods:
        steps += _evaluation_steps(method, layout, settings.eval_seeds)
    for step in steps:
        step.config = step_config(step, doc)
    # stage sections no step uses are still checked, so a typo there is not silently ignored
    used = {step.stage.section for step in steps}
    for section in set(stages.SECTIONS) & set(doc) - used:
        step_config(Step(section, stages.SECTIONS[section]), doc)
    return Plan(settings, layout, steps, doc)


def preflight(run: Plan) -> list[str]:
    """Check what can be known before anything runs: devices, the run folder, inputs that no step makes.

    Returns the missing inputs as lines; the real run refuses them, a dry run lists them.
    """
    root = run.layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: --out points at a file; give a folder for the run")
    missing: list[str] = []
    made: list[Path] = []
    for step in run.steps:
        resolve_device(step.config.device)
        missing += [f"{step.name}: {name} {path}" for name, path in missing_inputs(step.stage, step.config,
                                                                                   tuple(made))]
        made.append(step.stage.folder(step.config, run.layout))
    return sorted(set(missing), key=missing.index)


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def processes_for(step: Step, processes: int) -> int:
    """How many processes a step gets: 1 for stages without torchrun support and for imports; for
    distillation the largest count that divides its trajectories per update (so results never depend on it)."""
    if processes <= 1 or not step.stage.torchrun or getattr(step.config, "import_path", None):
        return 1
    trajectories = getattr(step.config, "trajectories", None)
    if trajectories is not None:
        return max(p for p in range(1, processes + 1) if trajectories % p == 0)
    return processes


def run_pipeline(doc: Mapping[str, Any], log_line: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every step of a run document; returns the summary written to ``pipeline.json``."""
    say = log_line or log.info
    run = plan(doc)
    missing = preflight(run)
    if missing:
        raise ConfigError(f"missing input: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                             else "") + "; create it or fix the path")
    if run.settings.keep_versions is not None:
        os.environ[ENV_KEEP_VERSIONS] = str(run.settings.keep_versions)
    keep_versions()
    if run.settings.log is not None:
        os.environ[ENV_LOG] = ",".join(parse_loggers(run.settings.log, "run.log")) or "none"
    configured_loggers()
    layout = run.layout
    state_path = layout.pipeline_state
    state: dict[str, Any] = {"steps": {}}
    t_start = time.perf_counter()
    for i, step in enumerate(run.steps, 1):
        procs = processes_for(step, run.settings.processes)
        decision = decide(step.stage, step.config)
        launch = procs > 1 and decision.action not in ("reuse", "restore")
        say(f"[{i}/{len(run.steps)}] {step.name}" + (f" ({procs} processes)" if launch else ""))
        with Meter(children=True) as meter:
            if launch:
                launch_torchrun(step, procs, layout.launch_dir)
            result = step.stage(step.config)
        entry = {"status": result.status, "folder": layout.rel(result.folder), "summary": result.summary,
                 "measure": result.measure if result.status in ("reused", "restored") else meter.as_dict()}
        if launch:
            entry["processes"] = procs
        state["steps"][step.name] = entry
        save_json(state_path, {**state, "order": [s.name for s in run.steps]})
    results = {method: results_path(run, method) for method in run.settings.methods}
    if run.settings.eval_seeds is not None:
        from mkdt.evaluate import combine_probe_results

        for method in run.settings.methods:
            probes = [step for step in run.steps if step.stage.name == "probe" and step.own_section == f"probe/{method}"]
            combine_probe_results([step.stage.folder(step.config, layout) / RESULTS_FILE for step in probes],
                                  results[method], name=results[method].parent.name)
    state.update(results={method: layout.rel(path) for method, path in results.items()},
                 order=[s.name for s in run.steps], methods=run.settings.methods,
                 eval_seeds=run.settings.eval_seeds, seconds=round(time.perf_counter() - t_start, 2))
    save_json(state_path, state)
    if run.settings.report:
        from mkdt.report import write_report

        paths = write_report(layout.root, state)
        state["report"] = {k: str(v) for k, v in paths.items()}
        say(f"report: {paths['html']}")
    return state


def results_path(run: Plan, method: str) -> Path:
    """A method's probe results: its probe's, or with evaluation seeds the file merged from theirs
    (``probe/<method>``, with the probe's ``-validation`` suffix in validation mode)."""
    probe = next(step for step in run.steps if step.stage.name == "probe" and step.own_section == f"probe/{method}")
    return probe.stage.folder(dataclasses.replace(probe.config, name=method), run.layout) / RESULTS_FILE


def launch_torchrun(step: Step, processes: int, folder: Path) -> None:
    """Run ``mkdt <command>`` with the step's config under ``torchrun --standalone`` and wait for it.

    The resolved config goes to ``<folder>/<step>.yaml`` and is read back here first: the workers must
    resolve exactly this config (the in-process call after the launch then finds the stage done).
    Each worker gets ``cpu cores / processes`` torch threads unless ``OMP_NUM_THREADS`` is set.
    """
    config = step.config
    path = folder / f"{step.name.replace('/', '__')}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_yaml(config))
    if to_dict(resolve(type(config), section=step.stage.section, files=[path])) != to_dict(config):
        raise MkdtError(f"{path}: the config does not survive a YAML round trip, so {step.name} cannot be "
                        f"launched with torchrun; set run.processes=1")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "mkdt", step.stage.name, "--config", str(path)]
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise MkdtError(f"{step.name}: torchrun exited with code {code} (its workers' errors are printed above); "
                        f"re-run to resume, or set run.processes=1")


def _setting(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def _estimates(run: Plan, step: Step) -> list[str]:
    """Memory (distillation: plain vs memory-saving, measured on one step) and time where measured."""
    from mkdt import estimates
    from mkdt.distill.memory import memory_budget_bytes

    if step.stage.name != "distill":
        return []
    teacher = next((s.config for s in run.steps if s.stage.name == "teacher"), None)
    data = teacher.data if teacher is not None else None
    if data is None or step.config.inner_objective != "kd":
        return []
    from mkdt.models import build_model

    channels, resolution = estimates.source_shape(data)
    target_dim = build_model(teacher.model, in_channels=channels, resolution=resolution).feature_dim
    gb = estimates.distill_memory_gb(step.config, channels, resolution, target_dim)
    device = resolve_device(step.config.device)
    budget = memory_budget_bytes(device, step.config.memory_budget_gb) / 2**30
    mode = step.config.memory_mode
    saving = mode == "on" or (mode == "auto" and gb["plain_gb"] > budget)
    lines = [f"memory: plain path ~{gb['plain_gb']} GB, memory-saving ~{gb['memory_saving_gb']} GB extra per update "
             f"(budget {budget:.1f} GB) -> {'memory-saving' if saving else 'plain'} path"]
    rate = estimates.distill_seconds_per_iteration(step.config, device, saving)
    if rate is not None:
        hours = rate[0] * step.config.iterations / 3600
        lines.append(f"time: ~{hours:.1f} h for {step.config.iterations} iterations on this CPU (measured: {rate[1]})")
    else:
        lines.append(f"time: no measured rate for this shape on {device.type} (benchmarks/distill_speed.py, "
                     f"benchmarks/gpu_check.py measure one)")
    return lines


def describe_plan(run: Plan) -> str:
    """The plan as text: each step, what the engine would do with it, its key settings, where its outputs
    go, and for distillation its memory (and time, where measured)."""
    lines = [f"run folder: {run.layout.root}", f"methods: {', '.join(run.settings.methods)}",
             f"evaluation seeds: {run.settings.eval_seeds}; processes: {run.settings.processes}"]
    for i, step in enumerate(run.steps, 1):
        try:
            d: Decision | None = decide(step.stage, step.config)
            what = f"{d.action} ({d.reason})"
        except MkdtError as exc:
            what = f"run once its inputs exist ({exc})"
        folder = run.layout.rel(step.stage.folder(step.config, run.layout))
        lines.append(f"[{i}/{len(run.steps)}] {step.name}: {what} -> {folder}/")
        shown = ", ".join(f"{key} {_setting(step.config, key)}" for key in step.stage.shown
                          if _setting(step.config, key) is not None)
        if shown:
            lines.append(f"      {shown}")
        lines += [f"      {line}" for line in _estimates(run, step)]
    missing = preflight(run)
    if missing:
        lines.append("missing inputs the real run will need (it refuses to start without them):")
        lines += [f"  {m}" for m in missing]
    return "\n".join(lines)


def resolved_document(run: Plan) -> dict[str, Any]:
    """Every step's full config (defaults included) and the run settings, for ``--print-config``."""
    return {"out": str(run.layout.root), "run": to_dict(run.settings),
            "steps": {step.name: to_dict(step.config) for step in run.steps}}


def run_from_cli(preset: str | None, files: list[str], overrides: list[str], values: Mapping[str, Any],
                 print_config: bool = False, dry_run: bool = False) -> dict:
    from mkdt.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError("mkdt run/demo starts torchrun itself (run.processes); launch only single stages with "
                          "torchrun (see docs/distributed.md)")
    if not files and not preset:
        raise ConfigError("mkdt run needs --config FILE (a run document) or --preset NAME (e.g. demo)")
    doc = load_run_document(preset, files, overrides, values)
    if print_config or dry_run:
        run = plan(doc)
        if print_config:
            import yaml

            print(yaml.safe_dump(resolved_document(run), sort_keys=False), end="")
        if dry_run:
            print(describe_plan(run))
        return {}
    return run_pipeline(doc)


__all__ = ["METHODS", "Plan", "RunSettings", "Step", "describe_plan", "launch_torchrun", "load_run_document",
           "plan", "preflight", "run_from_cli", "run_pipeline", "seeded_name"]
