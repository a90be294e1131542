import json

import pytest
import torch

from mkdt.baselines import VarianceConfig, analyze_variance
from mkdt.baselines.variance import OptimConfig, _Inputs, encoder_parameters, run_trajectory, spread
from mkdt.data import load_dataset
from mkdt.errors import MkdtError
from mkdt.models import ModelConfig, build_model
from mkdt.models.functional import flat_parameters
from mkdt.runtime import seeded
from mkdt.ssl.augment import AugmentConfig, BatchAugment
from mkdt.training import RegressionSchedule, train_regression


def _config(run, **kw):
    base = dict(data=run.data, out=str(run.out), device="cpu", model=ModelConfig(width=4, depth=1),
                num_trajectories=3, lengths=[2, 4], unit="iterations", max_images=256,
                ssl=OptimConfig("adam", lr=1e-3, weight_decay=0.0, batch_size=64),
                kd=OptimConfig("sgd", lr=0.05, momentum=0.9, batch_size=64))
    base.update(kw)
    return VarianceConfig(**base)


def test_analysis_writes_numbers_and_plot_and_resumes(digits_run):
    result = analyze_variance(_config(digits_run))
    stage = digits_run.out / "variance"
    report = json.loads((stage / "variance.json").read_text())
    png = (stage / "variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert report["images"] == 256 and report["lengths"] == [2, 4]
    for objective in ("kd", "ssl"):
        res = report["objectives"][objective]
        assert res["iterations"] == [2, 4]
        for part in ("encoder", "all"):
            assert all(v > 0 for v in res[part]["variance"]) and all(v > 0 for v in res[part]["displacement"])
            assert all(0 < v < 1.5 for v in res[part]["normalized"])  # <= K/(K-1) by construction
    assert result.summary["kd"]["variance"] == report["objectives"]["kd"]["encoder"]["variance"]
    assert len(list(stage.glob("kd_*.safetensors"))) == 3 and len(list(stage.glob("ssl_*.safetensors"))) == 3
    again_result = analyze_variance(_config(digits_run))  # finished: no-op
    assert again_result.status == "reused" and again_result.summary == result.summary
    # The report lost after the trajectories: re-running re-uses them and reproduces the numbers.
    (stage / "variance.json").unlink()
    assert analyze_variance(_config(digits_run)).status == "repaired"
    again = json.loads((stage / "variance.json").read_text())
    assert again["objectives"] == report["objectives"]


def test_epoch_lengths_and_bad_settings(digits_run):
    out = analyze_variance(_config(digits_run, objectives=["kd"], lengths=[1], unit="epochs", num_trajectories=2,
                                   max_images=250))
    report = json.loads(open(out.outputs["report"]).read())
    assert report["objectives"]["kd"]["iterations"] == [4]  # ceil(250 / 64): the short batch counts
    with pytest.raises(MkdtError, match="at least 2"):
        analyze_variance(_config(digits_run, num_trajectories=1))
    with pytest.raises(MkdtError, match="increasing"):
        analyze_variance(_config(digits_run, lengths=[5, 2]))


def test_spread_statistics():
    init = torch.zeros(4)
    runs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    s = spread(runs, init)
    assert s["variance"] == pytest.approx(2.0 / 4)  # var of (1, -1) is 2 (unbiased), other params 0
    assert s["displacement"] == pytest.approx(1.0 / 4)
    assert s["normalized"] == pytest.approx(2.0)
    same = spread(torch.ones(3, 4), init)  # identical runs: no spread at all
    assert same["variance"] == 0 and same["normalized"] == 0


def test_kd_trajectory_is_the_shared_regression_loop(digits_run):
    """The KD trajectories use exactly the experts' training loop (same batches, same updates)."""
    data = load_dataset(digits_run.data)
    with seeded(1):
        model = build_model(ModelConfig(width=4, depth=1), in_channels=1, resolution=8, head_dim=8)
    twin = build_model(ModelConfig(width=4, depth=1), in_channels=1, resolution=8, head_dim=8)
    twin.load_state_dict(model.state_dict())
    x, y = data.normalize(), digits_run.targets
    sched = RegressionSchedule(epochs=2, lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=256)
    train_regression(twin, x, y, sched, torch.Generator().manual_seed(9))
    inputs = _Inputs(data.images, x, y, BatchAugment(AugmentConfig(), data.mean, data.std))
    per_epoch = -(-len(x) // 256)
    enc, head, _ = run_trajectory("kd", model, model.head, inputs,
                                  OptimConfig("sgd", 0.05, 0.9, 1e-4, 256), [per_epoch, 2 * per_epoch],
                                  torch.Generator().manual_seed(9))
    assert torch.allclose(enc[-1], torch.cat([p.detach().reshape(-1) for p in encoder_parameters(twin)]))
    assert torch.allclose(head[-1], flat_parameters(twin.head))
    assert not torch.equal(enc[0], enc[1])
