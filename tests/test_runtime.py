import pytest
import torch

from mkdt.errors import MkdtError
from mkdt.runtime import Meter, derive_seed, generator, resolve_device, seeded


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "expert", 3) == derive_seed(0, "expert", 3)
    assert derive_seed(0, "expert", 3) != derive_seed(0, "expert", 4)
    assert derive_seed(0, "expert", 3) != derive_seed(1, "expert", 3)
    assert 0 <= derive_seed(123, "x") < 2**63


def test_seeded_restores_global_state():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(1):
        a = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    with seeded(1):
        assert torch.equal(torch.rand(2), a)


def test_generator_reproducible():
    assert torch.equal(torch.randperm(10, generator=generator(3)), torch.randperm(10, generator=generator(3)))


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(MkdtError, match="CUDA is not available"):
            resolve_device("cuda")


def test_meter_measures_time_and_memory():
    with Meter() as m:
        x = torch.ones(20_000_000)  # 80 MB
        del x
    assert m.seconds > 0 and m.peak_mb > 0
    assert set(m.as_dict()) >= {"seconds", "peak_mb"}
