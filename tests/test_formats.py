import pytest
import torch

from mkdt.errors import MkdtError
from mkdt.formats import (SyntheticSet, load_synthetic, load_targets, load_trajectory, save_synthetic, save_targets,
                          save_trajectory)
from mkdt.models import build_model
from mkdt.models.functional import ParamLayout


def _layout(width=4):
    return ParamLayout.of(build_model("convnet", depth=1, width=width, in_channels=1, resolution=8, head_dim=2))


def test_targets_refused_for_other_data(tmp_path):
    path = tmp_path / "targets.safetensors"
    save_targets(path, torch.randn(10, 4), "abc", data_name="digits:train")
    assert load_targets(path, fingerprint="abc").values.shape == (10, 4)
    with pytest.raises(MkdtError, match="run `mkdt targets`"):
        load_targets(path, fingerprint="xyz")
    with pytest.raises(MkdtError, match="shape"):
        load_targets(path, count=11)


def test_trajectory_round_trip_and_checks(tmp_path):
    layout = _layout()
    params = torch.randn(3, layout.numel)
    path = tmp_path / "expert_0000.safetensors"
    save_trajectory(path, params, [0, 1, 2], layout, expert=0)
    traj = load_trajectory(path, layout=layout)
    assert torch.equal(traj.at(2), params[2]) and traj.meta["expert"] == 0
    with pytest.raises(MkdtError, match="epoch 5 not stored"):
        traj.at(5)
    with pytest.raises(MkdtError, match="does not match the configured student") as err:
        load_trajectory(path, layout=_layout(8))
    assert "expert_0000" in str(err.value)


def test_trajectory_without_displacement_is_refused(tmp_path):
    layout = _layout()
    frozen = torch.randn(layout.numel)
    path = tmp_path / "expert_0001.safetensors"
    save_trajectory(path, torch.stack([frozen, frozen.clone()]), [0, 1], layout)
    with pytest.raises(MkdtError, match="no displacement") as err:
        load_trajectory(path)
    assert "expert_0001" in str(err.value)


def test_synthetic_round_trip(tmp_path):
    syn = SyntheticSet(torch.randn(4, 1, 8, 8), torch.randn(4, 3), (0.5,), (0.2,), lr=0.3,
                       indices=torch.tensor([3, 1, 4, 9]), meta={"method": "mkdt"})
    path = tmp_path / "s.safetensors"
    save_synthetic(path, syn)
    back = load_synthetic(path)
    assert torch.equal(back.images, syn.images) and back.lr == pytest.approx(0.3)
    assert back.mean == (0.5,) and back.meta["method"] == "mkdt" and torch.equal(back.indices, syn.indices)
    with pytest.raises(MkdtError, match="NaN"):
        save_synthetic(tmp_path / "n.safetensors", SyntheticSet(torch.full((1, 1, 8, 8), float("nan")),
                                                                 torch.zeros(1, 3), (0.5,), (0.2,)))
