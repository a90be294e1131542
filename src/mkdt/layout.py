"""The one place that knows where things live in a run folder.

Every stage writes into its own folder and reads other stages' artifacts only through these paths, so
no stage spells out another's folder or file name. Names are fixed (a distilled set is always
``distilled.safetensors``; its iteration count is in its metadata), so finding an artifact never needs
a glob or a record. Paths recorded inside a run folder are relative to it (:meth:`RunLayout.rel`), so a
moved or copied run folder is the same run.
"""

from __future__ import annotations

import os
from pathlib import Path

STAGE_RECORD = "stage.json"
CONFIG_FILE = "config.yaml"

TEACHER_FILE = "teacher.safetensors"
TARGETS_FILE = "targets.safetensors"
EXPERT_FILE = "expert_{:04d}.safetensors"
SET_FILE = {"distill": "distilled.safetensors", "krr_st": "distilled.safetensors", "subset": "subset.safetensors"}
ENCODER_FILE = "encoder.safetensors"
RESULTS_FILE = "results.json"


def _variant(base: str, name: str | None) -> str:
    """``experts`` / ``experts-ssl``: variants of a stage are sibling folders, never nested, so moving one
    aside never moves another."""
    return base if not name else f"{base}-{name}"


class RunLayout:
    """Paths of one run folder ``root``: one method or property per artifact."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the run folder when it lies inside it (else unchanged), for records."""
        p = Path(path)
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(p)

    def at(self, recorded: str | os.PathLike) -> Path:
        """A path read from a record: relative ones are relative to the run folder."""
        p = Path(recorded)
        return p if p.is_absolute() else self.root / p

    # -- the run as a whole ---------------------------------------------------------------------------
    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def log_file(self) -> Path:
        return self.root / "mkdt.log"

    @property
    def launch_dir(self) -> Path:
        """Resolved configs handed to torchrun workers."""
        return self.root / "launch"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_files(self) -> Path:
        return self.root / "report_files"

    # -- teacher and targets --------------------------------------------------------------------------
    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher(self) -> Path:
        return self.teacher_dir / TEACHER_FILE

    @property
    def targets_dir(self) -> Path:
        return self.root / "targets"

    @property
    def targets(self) -> Path:
        return self.targets_dir / TARGETS_FILE

    # -- experts and the initial sets -----------------------------------------------------------------
    def experts_dir(self, name: str | None = None) -> Path:
        return self.root / _variant("experts", name)

    def expert(self, index: int, name: str | None = None) -> Path:
        return self.experts_dir(name) / EXPERT_FILE.format(index)

    @property
    def init_dir(self) -> Path:
        return self.root / "init"

    def init_set(self, kind: str) -> Path:
        """``high_loss`` or ``random``."""
        return self.init_dir / f"{kind}.safetensors"

    @property
    def init_losses(self) -> Path:
        return self.init_dir / "losses.safetensors"

    # -- distilled sets and subsets -------------------------------------------------------------------
    def distill_dir(self, name: str | None = None) -> Path:
        return self.root / _variant("distill", name)

    def distilled(self, name: str | None = None) -> Path:
        return self.distill_dir(name) / SET_FILE["distill"]

    @property
    def krr_st_dir(self) -> Path:
        return self.root / "krr_st"

    @property
    def krr_st_set(self) -> Path:
        return self.krr_st_dir / SET_FILE["krr_st"]

    def subset_dir(self, name: str) -> Path:
        return self.root / "subsets" / name

    def subset(self, name: str) -> Path:
        return self.subset_dir(name) / SET_FILE["subset"]

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    # -- evaluation -----------------------------------------------------------------------------------
    def pretrain_dir(self, name: str) -> Path:
        return self.root / "pretrain" / name

    def encoder(self, name: str) -> Path:
        return self.pretrain_dir(name) / ENCODER_FILE

    def probe_dir(self, name: str) -> Path:
        return self.root / "probe" / name

    def probe_results(self, name: str) -> Path:
        return self.probe_dir(name) / RESULTS_FILE

    def feature_cache(self, name: str) -> Path:
        """Cached encoder features of the probe ``name`` (outside its folder: kept across its versions;
        ``cache/`` may be deleted at any time)."""
        return self.root / "cache" / "probe-features" / name

    def finetune_dir(self, name: str) -> Path:
        return self.root / "finetune" / name

    # -- analyses and checks --------------------------------------------------------------------------
    @property
    def variance_dir(self) -> Path:
        return self.root / "variance"

    @property
    def smoke_dir(self) -> Path:
        return self.root / "smoke"
