"""``--threads``: sets torch's CPU threads for the process; a bad value is a one-line error."""

import torch

from mkdt.cli import main


def test_threads_option_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["pretrain", "--threads", "1", "--print-config"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(capsys):
    assert main(["pretrain", "--threads", "0", "--print-config"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
