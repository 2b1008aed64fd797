"""Reading, checking and writing weights: atomic writes, strict loads with errors that name the keys.

Every file this package writes goes to a temporary file of its own next to `path` first and is renamed into
place, so a run killed mid-write leaves the previous checkpoint intact. Every file it reads is opened with
`weights_only=True` (no arbitrary unpickling) or through safetensors. `run_lock` keeps a second process out of a
run folder that one is writing.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import read_json, replace_atomically, write_json, write_text


class CheckpointMismatch(RuntimeError):
    """A state dict does not fit the model: lists the missing, unexpected and mis-shaped keys."""


class RunLocked(RuntimeError):
    """Another live process is writing to the same run folder."""


@contextmanager
def run_lock(folder):
    """Hold `folder/.lock` while writing a run: a second process gets `RunLocked` naming the holder (pid, host).
    The operating system releases the lock when its process dies, so a killed run's lock is simply taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    owner = folder / ".lock.owner"
    lock = FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        held = owner.read_text().strip() if owner.exists() else "another process"
        raise RunLocked(f"{folder} is being written by {held}; wait for it to finish or use another --out") from None
    try:
        owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def atomic_save(obj, path) -> Path:
    """torch.save `obj` to `path` atomically (tmp file + rename)."""
    return replace_atomically(lambda tmp: torch.save(obj, tmp), path)


class RunMismatch(ValueError):
    """A run folder holds a run (finished or not) made with other settings, data or upstream weights."""


def _json(obj):
    return json.loads(json.dumps(obj))


def config_diff(stored, wanted, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted field, stored value, wanted value) for every leaf where two JSON-like configs differ."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for k in sorted(set(stored) | set(wanted), key=str)
                for d in config_diff(stored.get(k), wanted.get(k), f"{prefix}{k}.")]
    return [] if stored == wanted else [(prefix.rstrip("."), stored, wanted)]


def match_run(stored: dict, wanted: dict, where, section: str | None = None, done: int | None = None) -> str:
    """How a run found in `where` relates to the one asked for: "same", or "extend" when the two differ only in
    `section`'s epochs and more than the `done` epochs are asked for (a resumable run is continued). Anything else
    is a `RunMismatch` naming every differing field: a run is never replaced or shortened unasked."""
    diff = config_diff(_json(stored), _json(wanted))
    if not diff:
        return "same"
    if section and done is not None and [d[0] for d in diff] == [f"{section}.epochs"] and diff[0][2] > done:
        return "extend"
    fields = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:6]) + (" ..." if len(diff) > 6 else "")
    raise RunMismatch(f"{where} holds a run made with other settings ({fields}); pass --no-resume to replace it, "
                      "or choose another --out")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_FINGERPRINTS: dict = {}


def _image_stats(root: Path, names: list[str]) -> str:
    """One digest of the name, size and modification time of every image the split files of data root `root` name
    (a missing one counts as such): a cheap check that the images a run saw are still those, without reading
    them. Image paths are relative to the root's parent, or absolute (`data.datasets.resolve_image`). The list of
    images is cached per split-file version; the images are looked at on every call."""
    key = ("images", *((str((root / n).resolve()), (root / n).stat().st_mtime_ns) for n in names))
    if key not in _FINGERPRINTS:
        images = set()
        for n in names:
            try:
                d = json.loads((root / n).read_text(encoding="utf-8")) if n.endswith(".json") else {}
            except (ValueError, UnicodeDecodeError):    # a damaged split file: reading it names it, not this
                continue
            items = (d.get("records") or d.get("images")) if isinstance(d, dict) else None
            images.update(x["image"] for x in items or [] if isinstance(x, dict) and isinstance(x.get("image"), str))
        _FINGERPRINTS[key] = sorted(images)
    h, base = hashlib.sha256(), root.resolve().parent
    for image in _FINGERPRINTS[key]:
        f = base / image
        st = f.stat() if f.is_file() else None
        h.update(f"{image}\t{st.st_size if st else 'missing'}\t{st.st_mtime_ns if st else ''}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(path) -> dict | str | None:
    """What a run's result depends on in an input, as sha256 digests (16 hex digits): a data root's split files
    and, under "images", the names, sizes and times of the images they name ({name: digest}); a weights file; or a
    weights folder's weight files and vocabulary. None for a missing path. Digests are cached per (file, size,
    mtime) within a process."""
    path = Path(path)
    if not path.exists():
        return None

    def digest(f: Path) -> str:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = sha256_file(f)[:16]
        return _FINGERPRINTS[key]
    if path.is_file():
        return digest(path)
    data = ("train.json", "val.json", "testA.json", "testB.json", "detection.json")
    if any((path / n).exists() for n in data):     # a data root: its split files and vocabulary
        names = [n for n in (*data, "vocab.txt") if (path / n).exists()]
        return {**{n: digest(path / n) for n in names}, "images": _image_stats(path, names)}
    names = sorted(f.name for f in path.iterdir()   # a weights folder: its weights and vocabulary
                   if f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name == "vocab.txt")
    return {n: digest(path / n) for n in names}


def check_weights_file(path) -> None:
    """Refuse a damaged safetensors file (cut short by a copy, say) by reading only its header, which states where
    every tensor ends: `CheckpointMismatch` naming the file."""
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatch(f"{path}: damaged weights file ({e}); pass --no-resume to train the run again, "
                                 "or copy the file again") from None


def stored_run(folder, files=("model.safetensors", "config.json", "metrics.json")) -> tuple[dict, dict] | None:
    """(config.json, metrics.json) of the finished run in `folder`, or None when one of `files` is missing. A damaged
    weights file or JSON file is an error that names it, never a run reused in silence."""
    folder = Path(folder)
    if not all((folder / f).exists() for f in files):
        return None
    if (folder / "model.safetensors").exists():
        check_weights_file(folder / "model.safetensors")
    return read_json(folder / "config.json"), read_json(folder / "metrics.json")


def finished_run(folder, config: dict) -> dict | None:
    """The metrics of the finished run in `folder` (weights, config.json and metrics.json present) when its stored
    config equals `config`; None when there is none; a `RunMismatch` naming the fields when it differs."""
    if (run := stored_run(folder)) is None:
        return None
    match_run(run[0], config, folder)
    return run[1]


def write_run(folder, state_dict: dict, config: dict, metrics: dict, vocab=None) -> None:
    """A finished run: model.safetensors, vocab.txt (a copy of `vocab`), config.json, then metrics.json, whose
    presence marks the run complete."""
    folder = Path(folder)
    save_weights(state_dict, folder / "model.safetensors")
    if vocab is not None:
        write_text(folder / "vocab.txt", Path(vocab).read_text(encoding="utf-8"))
    write_json(folder / "config.json", config)
    write_json(folder / "metrics.json", metrics)


def save_weights(state_dict: dict, path) -> Path:
    """Write a state dict as safetensors, atomically. Shared storage (tied weights) is cloned apart."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    return replace_atomically(lambda tmp: save_file(tensors, str(tmp)), path)


def read_state_dict(path, key: str | None = None) -> dict:
    """Load tensors from .safetensors, or .bin/.pt/.pth/.ckpt with weights_only=True.

    `key` picks an entry of a dict checkpoint (e.g. "model", "ema", "state_dict"); a diffusers/HF folder is
    resolved to the weights file inside it.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                     "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_dict(path / name, key)
        raise FileNotFoundError(f"{path}: no weights file (expected model.safetensors, "
                                f"diffusion_pytorch_model.safetensors or a .bin) in this folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, wrong format, pickled objects that are not plain tensors
        raise CheckpointMismatch(
            f"{path}: could not be read as a weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "The file may be truncated (re-download it) or hold pickled Python objects; this package only reads "
            "tensors (safetensors, or torch files loadable with weights_only=True).") from None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointMismatch(f"{path}: has no entry {key!r} (top-level entries: {have})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointMismatch(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def check_state(own: dict, state_dict: dict, source: str, what: str) -> None:
    """Raise `CheckpointMismatch` listing every missing, unexpected, mis-shaped or wrongly typed key of `state_dict`
    against the reference `own` (a float tensor stored as integers, or the reverse, counts as wrongly typed; float
    precisions may differ), and refuse weights that hold NaN or infinite values."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    common = [k for k in own if k in state_dict]
    misshaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in common if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    mistyped = [f"{k}: checkpoint {state_dict[k].dtype} vs model {own[k].dtype}" for k in common
                if state_dict[k].is_floating_point() != own[k].is_floating_point()]
    nonfinite = [k for k in common if state_dict[k].is_floating_point() and not torch.isfinite(state_dict[k]).all()]
    if nonfinite:    # a diverged run's weights: they would give NaN boxes (and crash torchvision's deform_conv2d)
        more = " ..." if len(nonfinite) > 4 else ""
        raise CheckpointMismatch(f"{source}: {len(nonfinite)} tensors hold NaN or infinite values "
                                 f"({', '.join(nonfinite[:4])}{more}); the run that wrote them diverged: train it "
                                 "again with a lower --lr")
    if missing or unexpected or misshaped or mistyped:
        def show(title, items):
            more = f" ... and {len(items) - 12} more" if len(items) > 12 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + more if items else ""
        raise CheckpointMismatch(
            f"{source} does not match {what}:"
            + show("missing keys", missing) + show("unexpected keys", unexpected)
            + show("mis-shaped keys", misshaped) + show("wrongly typed keys", mistyped)
            + "\n  Check that the file is the right model and that the preset/architecture options match it.")


def load_strict(module: nn.Module, state_dict: dict, source: str = "checkpoint") -> nn.Module:
    """`module.load_state_dict(state_dict, strict=True)` with an error that lists every offending key."""
    check_state(module.state_dict(), state_dict, source, type(module).__name__)
    module.load_state_dict(state_dict, strict=True)
    return module


def keys_from_tsv(path) -> dict[str, tuple]:
    """Read a key manifest (`key<TAB>shape` per line; shapes written as (a, b) or [a,b])."""
    shapes = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or "\t" not in line:
            continue
        key, shape = line.split("\t")[:2]
        if key == "key":
            continue
        shape = shape.strip().replace("[", "(").replace("]", ")")
        if shape in ("()", ""):
            shapes[key] = ()
        else:
            value = ast.literal_eval(shape if shape.endswith(",)") or "," in shape else shape[:-1] + ",)")
            shapes[key] = tuple(int(s) for s in value)
    return shapes


def save_training(path, **state) -> Path:
    """Atomically write a resumable training state (model/optimizer/scheduler state dicts, counters, config)."""
    return atomic_save(state, path)


def restore_training(state: dict, generator: torch.Generator | None = None, source="checkpoint", **stateful) -> None:
    """Resume from a `save_training` state: each keyword's object loads `state[keyword]` (model, optimizer,
    scheduler, EMA...); with `generator`, the data-order generator and torch's global RNG are restored too
    (saved as `shuffle_rng` and `torch_rng`). Strictly: a module's keys, shapes and kinds of dtype must match
    (`check_state`), and any part that does not fit is a `CheckpointMismatch` naming the file and the part."""
    for name, obj in stateful.items():
        if name not in state:
            raise CheckpointMismatch(f"{source}: no {name!r} state in it; was it written by this stage?")
        if isinstance(obj, nn.Module):
            check_state(obj.state_dict(), state[name], source, f"this run's {name}")
        try:
            obj.load_state_dict(state[name])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:   # e.g. an optimizer of other parameters
            raise CheckpointMismatch(f"{source}: its {name!r} state does not fit this run ({e}); pass --no-resume "
                                     "to start afresh") from None
    if generator is not None:
        generator.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])


def load_training(path) -> dict | None:
    """The training state written by `save_training`, or None when there is none yet (fresh run)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointMismatch(f"{path}: unreadable training checkpoint ({type(e).__name__}). Delete it to "
                                 "start this stage afresh, or pass --no-resume.") from None
