"""Where and how training runs: device choice, seeding, mixed precision, progress bars, loader settings."""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm


def command_line() -> str:
    """The command that is running, as a user would type it (recorded in the metrics of runs that ship)."""
    return " ".join(["python -m minidiffprompt"] + sys.argv[1:])


def pick_device(name: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; asking for cuda without one is an error, not a silent fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        enable_tf32()
    return device


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: ~2x faster fp32 work at 10-bit mantissa precision."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPU (the authors trained stage 3 with mixed precision, SOLVER.USE_AMP); full fp32 on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _LogLines:
    """A progress bar's stream for a file or a pipe: a redraw becomes one whole line, at most one every `every`
    seconds (a bar also redraws when its postfix changes), blank ones dropped."""

    def __init__(self, stream, every: float = 30.0):
        self.stream, self.every, self.last = stream, every, -float("inf")

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and time.monotonic() - self.last >= self.every:
            self.stream.write(text + "\n")
            self.last = time.monotonic()

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """tqdm progress bar; MDP_QUIET=1 silences it (tests, notebooks in CI). On a terminal it redraws in place; into
    a file or a pipe (`make demo > log`) it writes one plain line at most every 30 s, so a log stays readable."""
    kwargs.setdefault("disable", os.environ.get("MDP_QUIET") == "1")
    stream = kwargs.pop("file", sys.stderr)
    if stream.isatty() or tqdm.__module__ == "tqdm.notebook":   # a terminal, or Jupyter's own widget
        kwargs.setdefault("dynamic_ncols", True)
    else:
        stream = _LogLines(stream)
        kwargs.update(mininterval=30.0, ncols=100, ascii=True)
    return tqdm(iterable, file=stream, **kwargs)


def loader_kwargs(num_workers: int, device: torch.device) -> dict:
    """DataLoader settings: worker processes, pinned memory on GPU, workers kept alive between epochs."""
    kw = {"num_workers": num_workers, "pin_memory": device.type == "cuda"}
    if num_workers > 0:
        kw["persistent_workers"] = True
    return kw


def check_finite(value: torch.Tensor, stage: str, step: int, lr: float, what: str = "the loss") -> None:
    """Stop a diverged run before its non-finite weights are saved or reach the next stage: a FloatingPointError
    that the command line reports in one line."""
    if not torch.isfinite(value):
        raise FloatingPointError(f"{stage}: {what} is {float(value.detach())} at step {step}; nothing was saved "
                                 f"for this epoch, lower --lr (now {lr:g})")
