"""Data-parallel training: two CPU processes (gloo) with half the batch each follow the loss trajectory and end at
the weights of one process with the whole batch; without torchrun every helper is a no-op."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from minidiffprompt import distributed as D
from minidiffprompt.train_vae import vae_loss
from minidiffprompt.vae import MaskVAE

GLOBAL_BATCH, EPOCHS, ITEMS = 8, 2, 32      # 4 steps per epoch, 8 optimiser steps in all


def _masks() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = (torch.rand(ITEMS, 1, 4, 4, generator=g) > 0.5).float()
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")   # (N, 1, 16, 16) soft masks


def _train(out_file: str) -> None:
    """The tiny stage-1 loop written with the helpers, as a trainer under torchrun would run it."""
    torch.set_num_threads(1)
    device = D.init_distributed("cpu")
    torch.manual_seed(0)                                      # same initial weights on every rank
    vae = MaskVAE(block_out_channels=(4, 8), layers_per_block=1, latent_channels=4, norm_num_groups=2).to(device)
    model = D.wrap_ddp(vae, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)   # not Adam: it hides a gradient scale
    loader = D.distributed_loader(TensorDataset(_masks()), GLOBAL_BATCH, shuffle=True, seed=0)
    losses = []
    for epoch in range(EPOCHS):
        D.set_epoch(loader, epoch)
        for (x,) in loader:
            recon, posterior = model(x, sample=False)         # deterministic: the posterior mean
            loss = vae_loss(recon, x, posterior, 3.7732e-4)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()                                   # DDP averages the gradients over the ranks
            opt.step()
            losses.append(D.all_reduce_mean(loss).item())
    if D.is_main():
        weights = {k: v.flatten().tolist() for k, v in D.unwrap(model).state_dict().items()}
        with open(out_file, "w") as f:
            json.dump({"losses": losses, "weights": weights, "world": D.world_size(),
                       "local_batch": loader.batch_size}, f)
    D.barrier()
    D.cleanup()


def _worker(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _train(out_file)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow    # two fresh Python processes importing torch: ~10 s on an idle 2-core machine, more when busy
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    try:
        _train(str(tmp_path / "one.json"))                   # one process, batch 8
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two.json")), nprocs=2, join=True)   # 2 x batch 4
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world"], one["local_batch"], two["world"], two["local_batch"]) == (1, 8, 2, 4)
    assert len(one["losses"]) == len(two["losses"]) == EPOCHS * ITEMS // GLOBAL_BATCH
    # the only differences are float summation orders (a conv's batch reduction over 4+4 items instead of 8,
    # the gloo all-reduce): ~1e-7 relative per step over 8 SGD steps -> 1e-4 is ample, and tight enough to catch
    # a different item order, gradients summed instead of averaged (2x the step) or an unsharded loader
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-6), \
        (one["losses"], two["losses"])
    assert one["losses"][-1] < one["losses"][0]               # it did train
    for key, w in one["weights"].items():
        assert torch.allclose(torch.tensor(two["weights"][key]), torch.tensor(w), rtol=1e-4, atol=1e-5), key


def test_helpers_are_no_ops_in_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed("cpu") == torch.device("cpu") and not D.is_distributed()
    assert (D.world_size(), D.rank(), D.is_main()) == (1, 0, True)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_ddp(model) is model and D.unwrap(model) is model
    assert D.all_reduce_mean(torch.tensor(3.0)).item() == 3.0 and D.all_reduce_sum(2).item() == 2.0
    loader = D.distributed_loader(TensorDataset(torch.arange(10)), 4, shuffle=True, seed=1)
    D.set_epoch(loader, 0)
    first = torch.cat([b for (b,) in loader]).tolist()
    D.set_epoch(loader, 1)
    second = torch.cat([b for (b,) in loader]).tolist()
    assert sorted(first) == sorted(second) == list(range(10)) and first != second   # a new order every epoch
    D.set_epoch(loader, 0)
    assert torch.cat([b for (b,) in loader]).tolist() == first                        # reproducible on resume
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed("cpu")
