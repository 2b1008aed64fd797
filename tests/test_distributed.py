"""Data-parallel training: two CPU processes (gloo) with half the batch each follow the loss trajectory and end at
the weights of one process with the whole batch; without torchrun every helper is a no-op."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from minidiffprompt.utils import distributed as D
from minidiffprompt.utils.checkpoint import read_state_dict
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


# A real stage under torchrun: train_vae.main on 32² masks (the default Mask-VAE, latents 4×4²), 32 train masks,
# global batch 16, 3 epochs = 6 Adam steps. Two changes make one process and two comparable step by step:
# the posterior mean stands in for the sample (each rank draws its own noise by design, so the posterior sample the
# authors' VAE training decodes is not reproducible across world sizes), and the single-process run uses the
# distributed sampler's order (its default loader keeps its own generator so that existing runs and resumes stay
# bit-identical).
DRIVER = """
import json, os, sys
import torch
from minidiffprompt import train_vae
from minidiffprompt.utils import distributed
from minidiffprompt.config import get_preset
from minidiffprompt.vae import DiagonalGaussian

torch.set_num_threads(1)
masks = torch.load(sys.argv[1], weights_only=True)
preset = get_preset("tiny")
preset.device = "cpu"                              # gloo, whatever GPUs the machine has
preset.data.mask_size, preset.data.num_workers = 32, 0
preset.vae.epochs, preset.vae.batch_size = 3, 16
DiagonalGaussian.sample = lambda self, generator=None: self.mode()
real_loader = train_vae.mask_loader

def mask_loader(root, split, size, batch_size, shuffle, cache, workers, device, generator=None):
    if not shuffle:
        return real_loader(root, split, size, batch_size, shuffle, cache, workers, device, generator)
    return distributed.distributed_loader(torch.utils.data.TensorDataset(masks[split]), batch_size, shuffle=True,
                                          seed=preset.vae.seed)

train_vae.load_mask_tensors = lambda root, split, size: masks[split]
train_vae.mask_loader = mask_loader
metrics = train_vae.main(preset, "unused", sys.argv[2])
rank = os.environ.get("RANK", "0")
with open(os.path.join(sys.argv[2], f"returned_{rank}.json"), "w") as f:
    json.dump(metrics["history"], f)
"""


def _run_stage(tmp_path: Path, name: str, processes: int) -> tuple[list, str]:
    """Runs the driver (one process, or `processes` under torch.distributed.run); (history, stdout)."""
    out = tmp_path / name
    out.mkdir()
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MDP_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, *launch, str(tmp_path / "driver.py"), str(tmp_path / "masks.pt"),
                           str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    returned = [json.loads((out / f"returned_{r}.json").read_text()) for r in range(processes)]
    assert all(r == returned[0] for r in returned), "the ranks returned different metrics"
    stored = json.loads((out / "vae" / "metrics.json").read_text())["history"]
    assert stored == returned[0]
    return stored, done.stdout


@pytest.mark.slow    # three fresh Python processes importing torch: ~15 s on an idle 2-core machine
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
def test_train_vae_under_torchrun_follows_the_single_process_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    coarse = lambda n: (torch.rand(n, 1, 4, 4, generator=g) > 0.5).float()           # noqa: E731
    soft = lambda n: torch.nn.functional.interpolate(coarse(n), size=(32, 32), mode="bilinear")   # noqa: E731
    torch.save({"train": soft(32), "val": soft(8)}, tmp_path / "masks.pt")
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    one, _ = _run_stage(tmp_path, "one", 1)
    two, log = _run_stage(tmp_path, "two", 2)
    assert [h["epoch"] for h in one] == [h["epoch"] for h in two] == [1, 2, 3]
    # rank 0 alone logs: one line per epoch (plus the banner), not one per process
    assert sum(line.startswith("epoch ") for line in log.splitlines()) == 3, log
    for key in ("loss", "mse", "kl", "val_loss", "val_mse"):
        a, b = torch.tensor([h[key] for h in one]), torch.tensor([h[key] for h in two])
        # float summation orders only (a batch of 8+8 instead of 16, the gloo all-reduce): measured ≤ 7e-6
        # relative over the 6 steps. (Adam hides a gradient scale, so summed-vs-averaged gradients are the SGD
        # test's job above; this one catches unsynchronised ranks, a wrong shard or order, per-rank logging.)
        assert torch.allclose(b, a, rtol=1e-4, atol=1e-7), (key, a.tolist(), b.tolist())
    assert one[-1]["loss"] < one[0]["loss"]                  # it did train
    w1 = read_state_dict(tmp_path / "one" / "vae" / "model.safetensors")
    w2 = read_state_dict(tmp_path / "two" / "vae" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        if key.endswith("to_k.bias"):
            continue   # softmax ignores a key bias: its gradient is round-off, which Adam scales to lr-sized steps
        # measured ≤ 1e-4 of each tensor's scale (Adam divides by √v, so weights differ more than losses)
        assert (w2[key] - w1[key]).abs().max() <= 1e-3 * w1[key].abs().max(), key


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
