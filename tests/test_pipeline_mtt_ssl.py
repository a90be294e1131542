"""The pipeline's ``mtt_ssl`` method: SSL experts and SSL-inner distillation in their own folders
(``experts-ssl``, ``distill-mtt_ssl``), then pre-training and probing like MKDT (plan only; the stages
themselves are tested on their own)."""

from pathlib import Path

from mkdt.pipeline import METHODS, plan


def document(out: Path) -> dict:
    student = {"name": "convnet", "depth": 1, "width": 8}
    return {
        "out": str(out), "seed": 0, "device": "cpu",
        "data": {"name": "digits", "split": "train", "resolution": 8},
        "run": {"methods": ["mtt_ssl"]},
        "experts": {"model": student, "num_experts": 2, "schedule": {"epochs": 3, "lr": 0.05}},
        "experts/ssl": {"schedule": {"lr": 0.01}, "ssl": {"objective": {"projector_out": 16}}},
        "distill": {"model": student, "iterations": 3, "augment": True, "memory_saving": True},
    }


def test_mtt_ssl_plans_ssl_experts_and_ssl_distillation(tmp_path: Path):
    out = tmp_path / "run"
    run = plan(document(out))
    assert METHODS["mtt_ssl"].made_by == "distill/mtt_ssl"
    by_name = {s.name: s for s in run.steps}
    assert [s.name for s in run.steps] == ["teacher", "targets", "experts", "init", "experts/ssl",
                                           "distill/mtt_ssl", "pretrain/mtt_ssl", "probe/mtt_ssl"]
    experts = by_name["experts/ssl"].config
    assert experts.objective == "ssl" and experts.name == "ssl"
    assert run.layout.experts_dir("ssl") == out / "experts-ssl"
    assert experts.schedule.lr == 0.01 and experts.num_experts == 2  # shared experts settings + its own section
    assert experts.schedule.epochs == 3 and experts.ssl.objective.projector_out == 16
    assert by_name["experts"].config.objective == "kd"

    distill = by_name["distill/mtt_ssl"].config
    assert distill.inner_objective == "ssl" and not distill.targets_learned and distill.name == "mtt_ssl"
    assert distill.init == "high_loss" and distill.experts_dir == str(out / "experts-ssl")
    assert distill.augment is False and distill.memory_saving is False  # MKDT's settings that ssl cannot use

    pretrain = by_name["pretrain/mtt_ssl"].config
    assert pretrain.kind == "distilled" and pretrain.name == "mtt_ssl"
    assert pretrain.source == str(out / "distill-mtt_ssl" / "distilled.safetensors")
