"""The pipeline's ``mtt_ssl`` method: SSL experts and SSL-inner distillation under ``<out>/mtt_ssl/``,
then pre-training and probing like MKDT (plan only; the stages themselves are tested on their own)."""

from pathlib import Path

from mkdt.pipeline import METHODS, PRETRAIN_INPUT, plan, step_config


def document(out: Path) -> dict:
    student = {"name": "convnet", "depth": 1, "width": 8}
    return {
        "out": str(out), "seed": 0, "device": "cpu",
        "data": {"name": "digits", "split": "train", "resolution": 8},
        "run": {"methods": ["mtt_ssl"]},
        "experts": {"model": student, "num_experts": 2, "epochs": 3, "lr": 0.05},
        "experts/ssl": {"lr": 0.01, "ssl": {"objective": {"projector_out": 16}}},
        "distill": {"model": student, "iterations": 3, "augment": True, "memory_saving": True},
    }


def test_mtt_ssl_plans_ssl_experts_and_ssl_distillation(tmp_path: Path):
    out = tmp_path / "run"
    doc = document(out)
    assert "mtt_ssl" in METHODS and PRETRAIN_INPUT["mtt_ssl"] == ("distill/mtt_ssl",)
    _, _, steps = plan(doc)
    by_name = {s.name: s for s in steps}
    assert [s.name for s in steps] == ["teacher", "targets", "experts", "init", "experts/ssl", "distill/mtt_ssl",
                                       "pretrain/mtt_ssl", "probe/mtt_ssl"]
    assert by_name["distill/mtt_ssl"].after == ("init", "experts/ssl")
    assert by_name["pretrain/mtt_ssl"].after == ("distill/mtt_ssl",)

    experts = step_config(by_name["experts/ssl"], doc, resolve_files=False)
    assert experts.objective == "ssl" and experts.out == str(out / "mtt_ssl")
    assert experts.lr == 0.01 and experts.num_experts == 2  # shared experts settings + its own section
    assert experts.ssl.objective.projector_out == 16
    assert step_config(by_name["experts"], doc, resolve_files=False).objective == "kd"

    distill = step_config(by_name["distill/mtt_ssl"], doc, resolve_files=False)
    assert distill.inner_objective == "ssl" and distill.learn_targets is False
    assert distill.init == str(out / "init" / "high_loss.safetensors")
    assert distill.experts_dir == str(out / "mtt_ssl" / "experts") and distill.out == str(out / "mtt_ssl")
    assert distill.augment is False and distill.memory_saving is False  # MKDT's settings that ssl cannot use
    distill.check()

    pretrain = step_config(by_name["pretrain/mtt_ssl"], doc, resolve_files=False)
    assert pretrain.kind == "distilled" and pretrain.name == "mtt_ssl"
    assert pretrain.source == f"@stage:{out / 'mtt_ssl' / 'distill'}"
