"""The one table of stages: ``mkdt <command>`` and the steps of ``mkdt run`` both come from it.

Each entry is the stage's :class:`~mkdt.engine.Stage` (command, config class, body, run-document
section, torchrun support), imported by reference, so the whole run can be resolved and checked before
anything starts and a reader can follow every call.
"""

from __future__ import annotations

from mkdt import smoke
from mkdt.baselines import krr_st, subsets, variance
from mkdt.distill import export, loop
from mkdt.engine import Stage
from mkdt.errors import ConfigError
from mkdt.evaluate import finetuning, pretraining, probing
from mkdt.experts import init, trajectories
from mkdt.teacher import targets, train

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    smoke.STAGE, train.STAGE, targets.STAGE, trajectories.STAGE, init.STAGE, loop.STAGE, export.STAGE,
    subsets.STAGE, krr_st.STAGE, variance.STAGE, pretraining.STAGE, probing.STAGE, finetuning.STAGE,
)}
# earlier command names, still accepted on the command line
ALIASES = {"distill-krr-st": "krr-st", "analyze-variance": "variance"}
SECTIONS: dict[str, Stage] = {stage.section: stage for stage in STAGES.values()}


def get(name: str) -> Stage:
    """A stage by command or section name."""
    name = ALIASES.get(name, name)
    found = STAGES.get(name) or SECTIONS.get(name)
    if found is None:
        from mkdt.config import did_you_mean

        raise ConfigError(f"unknown stage '{name}'{did_you_mean(name, STAGES)}; stages: {', '.join(STAGES)}")
    return found
