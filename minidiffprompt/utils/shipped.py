"""The tiny preset's pretrained parts, shipped inside the package and checked against their recorded sha256.

    folder = shipped("tiny_glip")              # minidiffprompt/pretrained/tiny_glip, every file verified
    resolve_weights("shipped:tiny_glip")       # what a config value such as --glip_weights may name
    python -m minidiffprompt ship runs/tiny/glip tiny_glip      # copy a finished run in, record its hashes

Shipped: tiny_bert (MLM-pretrained text encoder), tiny_glip (the base detector), tiny_clip (a CLIP-like condition
encoder, not the default), tiny_vae and tiny_dit (stages 1 and 2 of the tiny preset, which the tiny stage 3 and
notebooks 02-06 build on, as the paper's stage 3 can start from the authors' released Mask-VAE and DiT).

The real pipeline starts from downloaded weights (GLIP-T(A)'s `glip_a_tiny_o365.pth`, bert-base-uncased, CLIP);
the tiny pipeline starts from these, made once by the package's own commands: the BERT, GLIP and CLIP with a budget
far beyond the demo's, the Mask-VAE and DiT with the tiny preset's own recipes (the DiT's 80 epochs take longer than
the demo's 10 minutes; `demo --vae_weights "" --dit_weights ""` runs them).
Each folder holds the run's weights and config, and a `metrics.json` with the command that made them, its wall
time, what they reach, and the sha256 and size of every other file. A file that does not match is an error that
names it: the package never runs on altered or truncated weights.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import CheckpointMismatch, sha256_file
from .files import read_json, write_json

ROOT = Path(__file__).parent.parent / "pretrained"
PREFIX = "shipped:"
FILES = ("model.safetensors", "config.json", "vocab.txt")   # what a shipped folder may hold besides metrics.json


def verify(folder: Path) -> Path:
    """Check every file recorded in `folder/metrics.json` against its size and sha256; returns the folder."""
    folder = Path(folder)
    record = folder / "metrics.json"
    if not record.exists():
        raise FileNotFoundError(f"{folder}: no metrics.json; a shipped folder records its files' sha256 there")
    files = read_json(record).get("files", {})
    if "model.safetensors" not in files:
        raise CheckpointMismatch(f"{record}: records no model.safetensors hash")
    for name, want in files.items():
        path = folder / name
        if not path.exists():
            raise CheckpointMismatch(f"{path}: missing (the shipped weights are incomplete; reinstall the package)")
        if path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise CheckpointMismatch(
                f"{path}: does not match its recorded sha256 ({want['sha256'][:12]}…, {want['bytes']} bytes), "
                "so it was altered or truncated. Reinstall the package, or re-make it with the command recorded in "
                f"{record}.")
    return folder


def shipped(name: str) -> Path:
    """The verified folder of a shipped part ("tiny_bert", "tiny_glip", ...)."""
    folder = ROOT / name
    if not folder.is_dir():
        have = sorted(p.name for p in ROOT.iterdir() if p.is_dir()) if ROOT.is_dir() else []
        raise FileNotFoundError(f"no shipped weights named {name!r} (the package ships {have})")
    return verify(folder)


def resolve_weights(given: str | Path) -> Path:
    """A config value naming weights: "shipped:NAME" → the verified shipped folder; anything else is a path."""
    given = str(given)
    return shipped(given[len(PREFIX):]) if given.startswith(PREFIX) else Path(given)


def ship(run: Path, name: str, extra: dict | None = None) -> Path:
    """Copy a finished run folder's weights into the package and record their hashes (`ship` command).

    The run's own metrics.json (command, wall time, metrics) is kept, with `extra` (e.g. eval-base's numbers)
    merged in and a `files` table of sha256 and size added.
    """
    run, dest = Path(run), ROOT / name
    metrics = read_json(run / "metrics.json")   # with its per-epoch history: notebooks plot it
    dest.mkdir(parents=True, exist_ok=True)
    files = {}
    for f in FILES:
        if (run / f).exists():
            shutil.copyfile(run / f, dest / f)
            files[f] = {"sha256": sha256_file(dest / f), "bytes": (dest / f).stat().st_size}
    write_json(dest / "metrics.json", {**metrics, **(extra or {}), "files": files})
    return verify(dest)
