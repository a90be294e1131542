"""``mkdt probe``: linear-probe a frozen encoder on downstream sets with few labels (the paper, Section 5).

For every downstream set: the train and test splits are resized to the encoder's source resolution,
converted to its channel count and normalised with the encoder's pre-training mean/std; features are
``model.features(x)`` in eval mode (cached per encoder file hash + data fingerprint). For every
protocol, labelled percent and seed, a labelled subset of the train split is drawn, a logistic
regression fitted (see :mod:`mkdt.evaluate.logistic` for the objective and its scaling) and the test
accuracy recorded.

Protocols:
  ``paper``      the authors': raw features, uniform random labelled subset, LBFGS stopped after 20
                 iterations (fixed step, no line search), reg 1e-3 on the weights.
  ``converged``  standardised features (train-subset statistics), stratified labelled subset (every
                 class present), strong-Wolfe LBFGS run until the gradient's largest entry is below
                 the tolerance (or the iteration cap; the final gradient is recorded).

A probe that predicts one class for >= 90% of the test examples is flagged ``collapsed``.

Evaluations (``evaluation``): ``test`` as above; ``validation`` scores on a fixed, seeded, stratified
``validation_fraction`` of the *train* split instead and draws the labelled subsets from the rest of it
(as many images as ``percent`` of the whole split), so settings and variants can be chosen without ever
reading the test split. Its results go to ``probe/<name>-validation`` and record the mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import torch

from mkdt.artifacts import load_json, save_json
from mkdt.config import StageConfig, require, to_dict
from mkdt.data import DataConfig, ImageSet, holdout_split, labelled_split, load_dataset
from mkdt.distributed import DistContext, barrier, broadcast_object, gather_records, shard
from mkdt.engine import Stage, StageResult, StageRun, run_stage
from mkdt.errors import MkdtError
from mkdt.evaluate.features import Encoder, adapt, cached_features, extract_features, load_encoder
from mkdt.evaluate.logistic import fit_logistic
from mkdt.layout import RESULTS_FILE, RunLayout
from mkdt.runtime import derive_seed

PROTOCOLS = ("paper", "converged")
EVALUATIONS = ("test", "validation")
SPLIT_MODE = {"paper": "uniform", "converged": "stratified"}


@dataclasses.dataclass
class ProbeConfig(StageConfig):
    """Encoder file, downstream sets and the probe protocols/fractions/seeds to run."""

    encoder: str | None = None  # the encoder file (default: the run's pretrain/<name>/encoder.safetensors)
    name: str | None = None  # results folder <out>/probe/<name>; default: the encoder's folder name
    downstream: list[DataConfig] = dataclasses.field(default_factory=lambda: [DataConfig(name="digits")])  # sets
    train_split: str = "train"  # the split the labelled subsets are drawn from
    test_split: str = "test"  # the split accuracy is measured on
    protocols: list[str] = dataclasses.field(default_factory=lambda: ["paper", "converged"])  # see the module doc
    percents: list[float] = dataclasses.field(default_factory=lambda: [1.0, 5.0, 10.0, 50.0])  # labelled %
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  # one labelled subset each
    reg: float = 1e-3  # L2 weight on ||W||^2 added to the mean cross-entropy
    paper_iterations: int = 20  # LBFGS iterations of the paper protocol
    converged_max_iterations: int = 2000  # LBFGS iteration cap of the converged protocol
    converged_tolerance: float = 1e-5  # max |gradient entry| at convergence
    feature_batch_size: int = 512  # encoding batch size (no effect on the results)
    collapse_threshold: float = 0.9  # flag a probe predicting one class for this share of the test set
    # test: labelled subsets from train_split, accuracy on test_split. validation: accuracy on a held-out
    # validation_fraction of train_split (stratified; drawn with validation_seed, the same for every probe
    # seed and method), labelled subsets from the rest; test_split is never read. The one to tune on.
    evaluation: str = "test"
    validation_fraction: float = 0.1
    validation_seed: int = 0

    def check(self) -> None:
        require(self.protocols and all(p in PROTOCOLS for p in self.protocols), "protocols",
                f"a non-empty list of {', '.join(PROTOCOLS)}", self.protocols)
        require(self.percents and all(0 < p <= 100 for p in self.percents), "percents",
                "a non-empty list of numbers in (0, 100]", self.percents)
        require(self.seeds, "seeds", "a non-empty list", self.seeds)
        require(self.downstream, "downstream", "a non-empty list of data sets", self.downstream)
        require(self.reg >= 0, "reg", ">= 0", self.reg)
        require(self.paper_iterations >= 1, "paper_iterations", "at least 1", self.paper_iterations)
        require(self.converged_max_iterations >= 1, "converged_max_iterations", "at least 1",
                self.converged_max_iterations)
        require(0 < self.collapse_threshold <= 1, "collapse_threshold", "in (0, 1]", self.collapse_threshold)
        require(self.feature_batch_size >= 1, "feature_batch_size", "at least 1", self.feature_batch_size)
        require(self.evaluation in EVALUATIONS, "evaluation", " or ".join(EVALUATIONS), self.evaluation)
        require(0 < self.validation_fraction < 1, "validation_fraction", "in (0, 1)", self.validation_fraction)


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------
def encoder_path(cfg: Any) -> Path:
    if cfg.encoder:
        return Path(cfg.encoder)
    return RunLayout(cfg.out).encoder(cfg.name or "distilled")


def probe_name(cfg: Any, path: Path) -> str:
    """The encoder's results name: ``cfg.name``, else the encoder's folder (or file stem)."""
    name = cfg.name or (path.parent.name if path.name == "encoder.safetensors" else path.stem)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "encoder"


def probe_folder(cfg: ProbeConfig) -> str:
    """The probe's folder: validation results get their own (``<name>-validation``), so they never replace
    a test probe of the same encoder."""
    name = probe_name(cfg, encoder_path(cfg))
    return f"{name}-validation" if cfg.evaluation == "validation" else name


def downstream_label(cfg: DataConfig) -> str:
    """A readable key for a downstream set: the source name, or the root's name for folders/archives."""
    if cfg.root:
        base = Path(cfg.root).name
        for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
            if base.lower().endswith(suffix):
                base = base[: -len(suffix)]
                break
        return base or cfg.name
    return cfg.name


def unique_labels(configs: list[DataConfig]) -> list[str]:
    labels: list[str] = []
    for cfg in configs:
        label = downstream_label(cfg)
        if label in labels:
            k = 2
            while f"{label}#{k}" in labels:
                k += 1
            label = f"{label}#{k}"
        labels.append(label)
    return labels


def percent_key(p: float) -> str:
    """``1.0 -> "1"``, ``2.5 -> "2.5"``: JSON keys that read like the paper's fractions."""
    return str(int(p)) if float(p).is_integer() else repr(float(p))


def run_key(label: str, protocol: str, percent: float, seed: int) -> str:
    return f"{label}|{protocol}|{percent_key(percent)}|{seed}"


# ----------------------------------------------------------------------------------------------
# data and features
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
    """Features of a split's images at ``rows`` (sorted indices; ``None`` = all images, in order) and
    the labels of ALL its images."""

    features: torch.Tensor
    labels: torch.Tensor
    rows: torch.Tensor | None = None

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """The features of the images at ``indices`` (which must be among ``rows``)."""
        if self.rows is None:
            return self.features[indices]
        return self.features[torch.searchsorted(self.rows, indices)]


def load_split_set(cfg: DataConfig, split: str, encoder: Encoder) -> ImageSet:
    data = load_dataset(cfg, split=split)
    if data.labels is None:
        raise MkdtError(f"downstream {cfg.name} split '{split}' has no labels; a probe needs labelled data")
    return adapt(data, encoder.in_channels, encoder.resolution)


def split_features(cfg: ProbeConfig, data_cfg: DataConfig, split: str, encoder: Encoder, cache: Path,
                   labelled_only: bool = False) -> Split:
    """Features of a split, cached in the folder ``cache``; with ``labelled_only`` (the train split) only of
    the images some labelled subset of ``cfg`` uses, when those are under half of the split (a 1% / 5%
    probe of CIFAR-10 then encodes ~6,000 of the 50,000 training images)."""
    data = load_split_set(data_cfg, split, encoder)
    assert data.labels is not None
    rows = labelled_rows(cfg, data.labels) if labelled_only else None
    if rows is not None and 2 * len(rows) >= len(data):
        rows = None

    def compute(indices: torch.Tensor) -> torch.Tensor:
        return extract_features(encoder.model, data.images[indices], encoder.mean, encoder.std,
                                batch_size=cfg.feature_batch_size, desc=f"features {data.name}")

    feats, _ = cached_features(cache, encoder.digest, data, compute, rows)
    return Split(feats, data.labels, rows)


def labelled_indices(cfg: ProbeConfig, labels: torch.Tensor, protocol: str, percent: float, seed: int) -> torch.Tensor:
    """The labelled subset of one (protocol, percent, seed) evaluation: sorted indices into the train split
    (in validation mode from the images not held out, as many as ``percent`` of the whole split)."""
    mode = SPLIT_MODE[protocol]
    seed = derive_seed(cfg.seed, "labelled", mode, percent_key(percent), seed)
    if cfg.evaluation == "test":
        return labelled_split(labels, percent, seed, mode=mode)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out_rows(cfg, labels)] = False
    pool = torch.nonzero(keep).flatten()
    pool_percent = min(100.0, float(percent) * len(labels) / len(pool))
    return pool[labelled_split(labels[pool], pool_percent, seed, mode=mode)]


def held_out_rows(cfg: ProbeConfig, labels: torch.Tensor) -> torch.Tensor:
    """Validation mode: the train images the probe is scored on (sorted indices)."""
    return holdout_split(labels, cfg.validation_fraction, derive_seed(cfg.validation_seed, "probe-validation"))


def labelled_rows(cfg: ProbeConfig, labels: torch.Tensor) -> torch.Tensor:
    """Every train image some evaluation of ``cfg`` reads: its labelled subsets (and the held-out images)."""
    parts = [labelled_indices(cfg, labels, p, q, s) for p in cfg.protocols for q in cfg.percents for s in cfg.seeds]
    if cfg.evaluation == "validation":
        parts.append(held_out_rows(cfg, labels))
    return torch.unique(torch.cat(parts))


def evaluation_splits(cfg: ProbeConfig, data_cfg: DataConfig, encoder: Encoder, cache: Path) -> tuple[Split, Split]:
    """(labelled-from, scored-on): the train and test splits, or in validation mode the train split and
    its held-out images."""
    train = split_features(cfg, data_cfg, cfg.train_split, encoder, cache, labelled_only=True)
    if cfg.evaluation == "test":
        return train, split_features(cfg, data_cfg, cfg.test_split, encoder, cache)
    held = held_out_rows(cfg, train.labels)
    return train, Split(train.take(held), train.labels[held])


def evaluation_record(cfg: ProbeConfig) -> dict[str, Any]:
    """Where the labelled subsets and the scored images came from (``results.json["evaluation"]``)."""
    if cfg.evaluation == "test":
        return {"mode": "test", "labelled_from": cfg.train_split, "scored_on": cfg.test_split}
    return {"mode": "validation", "labelled_from": f"{cfg.train_split} without the held-out images",
            "scored_on": f"held-out {cfg.validation_fraction:g} of {cfg.train_split} (stratified)",
            "validation_fraction": cfg.validation_fraction, "validation_seed": cfg.validation_seed}


# ----------------------------------------------------------------------------------------------
# one evaluation
# ----------------------------------------------------------------------------------------------
def split_digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:12]


def majority_fraction(pred: torch.Tensor, num_classes: int) -> float:
    return float(torch.bincount(pred.cpu(), minlength=num_classes).max()) / max(1, len(pred))


def evaluate_one(cfg: ProbeConfig, train: Split, test: Split, num_classes: int, protocol: str, percent: float,
                 seed: int, device: torch.device) -> dict[str, Any]:
    """Draw the labelled subset, fit the probe under ``protocol`` and score it on the test split."""
    idx = labelled_indices(cfg, train.labels, protocol, percent, seed)
    x = train.take(idx).to(device)
    y = train.labels[idx].to(device)
    if protocol == "paper":
        fit = fit_logistic(x, y, num_classes, reg=cfg.reg, max_iter=cfg.paper_iterations)
    else:
        fit = fit_logistic(x, y, num_classes, reg=cfg.reg, max_iter=cfg.converged_max_iterations,
                           line_search="strong_wolfe", standardise=True, tolerance_grad=cfg.converged_tolerance,
                           tolerance_change=1e-12)
    record: dict[str, Any] = {"protocol": protocol, "percent": float(percent), "seed": int(seed),
                              "train_size": int(len(idx)), "classes_seen": int(torch.unique(y).numel()),
                              "split_digest": split_digest(idx), "iterations": fit.iterations,
                              "grad_max": fit.grad_max if math.isfinite(fit.grad_max) else None,
                              "loss": fit.loss if math.isfinite(fit.loss) else None}
    if not fit.finite:
        record.update(accuracy=None, diverged=True, collapsed=False, majority_fraction=None)
        return record
    pred = torch.cat([fit.predict(chunk.to(device)).cpu() for chunk in test.features.split(8192)])
    accuracy = 100.0 * float((pred == test.labels).float().mean())
    share = majority_fraction(pred, num_classes)
    record.update(accuracy=accuracy, diverged=False, majority_fraction=share,
                  collapsed=share >= cfg.collapse_threshold)
    if protocol == "converged":
        record["converged"] = fit.grad_max <= cfg.converged_tolerance
    return record


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{downstream: {protocol: {percent: {mean, std, n, accuracies, collapsed, diverged}}}}``."""
    out: dict[str, Any] = {}
    for r in runs:
        cell = (out.setdefault(r["downstream"], {}).setdefault(r["protocol"], {})
                .setdefault(percent_key(r["percent"]), {"accuracies": [], "seeds": [], "collapsed": False,
                                                        "diverged": False}))
        cell["seeds"].append(r["seed"])
        if r.get("accuracy") is not None:
            cell["accuracies"].append(r["accuracy"])
        cell["collapsed"] = cell["collapsed"] or bool(r.get("collapsed"))
        cell["diverged"] = cell["diverged"] or bool(r.get("diverged"))
    for by_protocol in out.values():
        for by_percent in by_protocol.values():
            for cell in by_percent.values():
                cell["mean"], cell["std"] = mean_std(cell["accuracies"])
                cell["n"] = len(cell["accuracies"])
    return out


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
def partial_files(folder: Path) -> list[Path]:
    """``partial.json`` (merged) and ``partial-rank<k>.json`` (one per rank of a torchrun launch)."""
    return [p for p in [folder / "partial.json", *sorted(folder.glob("partial-rank*.json"))] if p.is_file()]


def load_done(run: StageRun) -> dict[str, dict]:
    """Finished jobs of this stage identity, keyed by job key: the runs of the previous result (when the
    stage is extended with more seeds/percents/sets) and of an interrupted run (``partial*.json``, the
    per-rank files of a torchrun launch merged into ``partial.json`` before they are removed)."""
    done: dict[str, dict] = {}
    results = run.path(RESULTS_FILE)
    if run.resumed and results.is_file():
        with contextlib.suppress(MkdtError):
            previous = load_json(results)
            if isinstance(previous, dict) and previous.get("identity") == run.key:
                done.update(previous.get("jobs", {}))
    files = partial_files(run.folder)
    for path in files:
        with contextlib.suppress(MkdtError):
            data = load_json(path)
            if isinstance(data, dict) and data.get("identity") == run.key:
                done.update(data.get("runs", {}))
    rank_files = [p for p in files if p.name != "partial.json"]
    if rank_files:
        save_json(run.path("partial.json"), {"identity": run.key, "runs": done})
        for path in rank_files:
            path.unlink(missing_ok=True)
    return done


def save_partial(run: StageRun, done: dict[str, dict], new: dict[str, dict]) -> None:
    """One process: everything in ``partial.json``; under torchrun: this rank's new runs in its own file."""
    if run.dist.distributed:
        save_json(run.path(f"partial-rank{run.dist.rank}.json"), {"identity": run.key, "runs": new})
    else:
        save_json(run.path("partial.json"), {"identity": run.key, "runs": {**done, **new}})


def remove_partial(folder: Path) -> None:
    for path in partial_files(folder):
        path.unlink(missing_ok=True)


def prepare_features(config: ProbeConfig, pending: list[str], encoder: Encoder, cache: Path,
                     ctx: DistContext) -> None:
    """Under torchrun, rank 0 loads (or downloads) each pending set and writes its feature cache first;
    the others wait, then read the complete, atomically written files instead of racing to write them."""
    if not ctx.distributed:
        return
    if ctx.is_main:
        for label, data_cfg in zip(unique_labels(list(config.downstream)), config.downstream):
            if label in pending:
                evaluation_splits(config, data_cfg, encoder, cache)
    barrier(ctx)


def _probe(config: ProbeConfig, run: StageRun) -> dict[str, Any]:
    """Probe one encoder on every downstream set / protocol / percent / seed; writes ``results.json``.

    Launched by torchrun, the (set, protocol, percent, seed) jobs are shared round-robin between the
    ranks and gathered to rank 0, which alone writes; every job's numbers depend only on its own
    seeds, so they equal a one-process run's. Extended with more seeds / percents / sets, only the new
    jobs run.
    """
    ctx = run.dist
    path = encoder_path(config)
    encoder = load_encoder(path, ctx.device)
    # outside the stage folder, so a probe with other settings (kept versions) reuses the features
    cache = run.layout.feature_cache(run.folder.name)
    done: dict[str, dict] = {}
    if ctx.is_main:
        for stale in cache.glob("*.safetensors"):  # features of an earlier encoder under this name
            if not stale.name.startswith(encoder.digest + "_"):
                stale.unlink()
        done = load_done(run)
    done = broadcast_object(done, ctx)
    labels = unique_labels(list(config.downstream))
    jobs = [(lab, p, q, s) for lab in labels for p in config.protocols for q in config.percents for s in config.seeds
            if run_key(lab, p, q, s) not in done]
    mine = shard(jobs, ctx)
    new: dict[str, dict] = {}
    with run.progress(len(mine), f"probe {run.folder.name}", unit="fit") as bar:
        prepare_features(config, sorted({job[0] for job in jobs}), encoder, cache, ctx)
        for label, data_cfg in zip(labels, config.downstream):
            todo = [job for job in mine if job[0] == label]
            if not todo:
                continue
            train, test = evaluation_splits(config, data_cfg, encoder, cache)
            num_classes = int(max(train.labels.max(), test.labels.max())) + 1
            for _, protocol, percent, seed in todo:
                result = evaluate_one(config, train, test, num_classes, protocol, percent, seed, ctx.device)
                new[run_key(label, protocol, percent, seed)] = {"downstream": label, **result}
                save_partial(run, done, new)
                bar.update(1, accuracy=result.get("accuracy"))
    done.update(gather_records(new, ctx))
    if not ctx.is_main:
        return {}
    keys = [run_key(lab, p, q, s) for lab in labels for p in config.protocols for q in config.percents
            for s in config.seeds]
    runs = [done[k] for k in keys]
    results = {
        "name": run.folder.name, "encoder": run.rel(path), "encoder_digest": encoder.digest,
        "encoder_meta": encoder.meta,
        "downstream": {lab: to_dict(c) for lab, c in zip(labels, config.downstream)},
        "evaluation": evaluation_record(config), "protocols": protocol_descriptions(config), "percents": [float(p) for p in config.percents],
        "seeds": list(config.seeds), "std_ddof": 1, "runs": runs, "summary": summarise(runs),
        "identity": run.key, "jobs": {k: done[k] for k in keys},
    }
    save_json(run.output("results", RESULTS_FILE), results)
    remove_partial(run.folder)
    return {"name": run.folder.name, "results": run.rel(run.path(RESULTS_FILE)), "summary": results["summary"]}


STAGE = Stage(
    "probe", ProbeConfig, _probe, "linear-probe an encoder on downstream sets",
    folder=lambda config, layout: layout.probe_dir(probe_folder(config)),
    inputs=lambda config, layout: {"encoder": encoder_path(config)}, input_fields=("encoder",),
    runtime=("feature_batch_size",), units=("downstream", "protocols", "percents", "seeds"),
    extends=lambda old, new: True, torchrun=True, shown=("protocols", "percents", "seeds"),
)


def probe(config: ProbeConfig) -> StageResult:
    """Probe one encoder; ``<out>/probe/<name>/results.json``."""
    return run_stage(STAGE, config)


def probe_results(result: StageResult) -> dict[str, Any]:
    """The ``results.json`` a probe (or fine-tuning) stage recorded."""
    return load_json(result.output("results"))


def combine_probe_results(paths: list[Path], dest: Path, name: str) -> dict:
    """Merge the ``results.json`` of several probes (e.g. one per evaluation seed, each of its own encoder)
    into one file at ``dest`` whose summary has a cell per (set, protocol, percent) over all their runs."""
    parts = []
    for path in paths:
        if not path.is_file():
            raise MkdtError(f"{path}: probe results not found; run the probe first")
        parts.append(load_json(path))
    runs = [{**run, "encoder": part["encoder"]} for part in parts for run in part["runs"]]
    first = parts[0]
    modes = {part.get("evaluation", {}).get("mode", "test") for part in parts}
    if len(modes) > 1:
        raise MkdtError(f"{dest}: cannot merge test and validation probe results ({', '.join(map(str, paths))})")
    combined = {"name": name, "encoders": [part["encoder"] for part in parts],
                "encoder_meta": first.get("encoder_meta"), "downstream": first.get("downstream"),
                "evaluation": first.get("evaluation", {"mode": "test"}),
                "protocols": first.get("protocols"), "percents": first.get("percents"),
                "seeds": sorted({run["seed"] for run in runs}), "std_ddof": 1, "runs": runs,
                "summary": summarise(runs), "combined_from": [str(p) for p in paths]}
    save_json(dest, combined)
    return combined


def protocol_descriptions(cfg: ProbeConfig) -> dict[str, dict[str, Any]]:
    """What each protocol did, in the results file, so a table can never be misread."""
    objective = "mean cross-entropy + reg * ||W||_F^2 (bias unpenalised); sklearn C = 1 / (2 * n * reg)"
    return {
        "paper": {"split": "uniform", "features": "raw", "optimizer": "LBFGS lr 1, no line search",
                  "max_iterations": cfg.paper_iterations, "reg": cfg.reg, "objective": objective},
        "converged": {"split": "stratified", "features": "standardised (labelled-subset mean/std)",
                      "optimizer": "LBFGS strong-Wolfe", "max_iterations": cfg.converged_max_iterations,
                      "tolerance": cfg.converged_tolerance, "reg": cfg.reg, "objective": objective},
    }
