"""Checkpoint I/O: atomic writes, strict loads whose errors name the keys, unreadable files, presets and the CLI."""
import pytest
import torch
from torch import nn

from minidiffprompt.__main__ import parse_overrides
from minidiffprompt.utils.checkpoint import (CheckpointMismatch, atomic_save, load_strict, load_training,
                                             read_state_dict, save_weights)
from minidiffprompt.config import apply_overrides, get_preset


def test_save_and_read_roundtrip(tmp_path):
    net = nn.Linear(3, 2)
    save_weights(net.state_dict(), tmp_path / "w.safetensors")
    atomic_save({"model": net.state_dict()}, tmp_path / "w.pt")
    for sd in (read_state_dict(tmp_path / "w.safetensors"), read_state_dict(tmp_path / "w.pt", key="model")):
        other = load_strict(nn.Linear(3, 2), sd)
        assert torch.equal(other.weight, net.weight)
    assert not list(tmp_path.glob("*.tmp"))


def test_strict_load_names_the_offending_keys():
    sd = nn.Linear(3, 2).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    sd["weight"] = torch.zeros(5, 3)
    del sd["bias"]
    with pytest.raises(CheckpointMismatch) as e:
        load_strict(nn.Linear(3, 2), sd, source="w.pt")
    msg = str(e.value)
    assert "missing keys (1): bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert "weight: checkpoint (5, 3) vs model (2, 3)" in msg


def test_truncated_or_pickled_files_are_refused(tmp_path):
    atomic_save({"model": nn.Linear(3, 2).state_dict()}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatch, match="truncated"):
        read_state_dict(tmp_path / "cut.pt")
    torch.save({"model": nn.Linear(3, 2)}, tmp_path / "module.pt")  # a pickled module, not tensors
    with pytest.raises(CheckpointMismatch):
        read_state_dict(tmp_path / "module.pt")
    with pytest.raises(CheckpointMismatch, match="no entry 'ema'"):
        read_state_dict(tmp_path / "w.pt", key="ema")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.pt")
    assert load_training(tmp_path / "absent.pt") is None


def test_presets_and_overrides():
    tiny, paper = get_preset("tiny"), get_preset("paper")
    assert paper.vae.lr == 5e-3 and paper.dit.depth == 12 and paper.prompt.depth == 9 and paper.glip.window_size == 7
    assert tiny.data.image_size < paper.data.image_size
    apply_overrides([tiny.data, tiny.vae], parse_overrides(["--epochs", "3", "--block-out-channels=2,4,8,8"]))
    assert tiny.vae.epochs == 3 and tiny.vae.block_out_channels == (2, 4, 8, 8)
    apply_overrides([tiny.eval], {"use_giou": "true"})
    assert tiny.eval.use_giou is True
    with pytest.raises(SystemExit, match="unknown option --nope"):
        apply_overrides([tiny.vae], {"nope": "1"})
    with pytest.raises(SystemExit):
        apply_overrides([tiny.vae], {"epochs": "many"})
    with pytest.raises(ValueError):
        get_preset("huge")
