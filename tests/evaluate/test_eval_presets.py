"""Every shipped pretrain/probe/finetune preset resolves to a valid config."""

from __future__ import annotations

from importlib import resources

import pytest

from mkdt.config import resolve
from mkdt.evaluate import FinetuneConfig, PretrainConfig, ProbeConfig
from mkdt.evaluate.pretraining import KINDS
from mkdt.evaluate.probing import PROTOCOLS

STAGES = {"pretrain": PretrainConfig, "probe": ProbeConfig, "finetune": FinetuneConfig}
PRESETS = [(stage, p.name[:-5]) for stage in STAGES
           for p in (resources.files("mkdt") / "presets" / stage).iterdir() if p.name.endswith(".yaml")]


def test_every_stage_has_presets():
    assert {s for s, _ in PRESETS} == set(STAGES)
    assert ("probe", "cifar10-cpu") in PRESETS and ("pretrain", "cifar10-cpu") in PRESETS


@pytest.mark.parametrize("stage,name", PRESETS)
def test_preset_resolves(stage, name):
    cfg = resolve(STAGES[stage], preset=name, section=stage)
    if stage == "pretrain":
        assert cfg.kind in KINDS and cfg.schedule.epochs == 20 and cfg.schedule.batch_size == 256
    elif stage == "probe":
        assert set(cfg.protocols) <= set(PROTOCOLS) and cfg.reg == 1e-3 and cfg.paper_iterations == 20
        assert cfg.seeds == [0, 1, 2] and cfg.downstream
    else:
        assert cfg.lr == 0.01 and cfg.weight_decay == 5e-4 and cfg.crop_padding == 4
