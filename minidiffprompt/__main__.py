"""Command line: `python -m minidiffprompt <command> --preset tiny|paper [--data DIR] [--out RUN] [--key value ...]`.

    python -m minidiffprompt demo                              # the whole tiny pipeline, report in runs/demo
    python -m minidiffprompt train-vae --preset tiny --epochs 3
    python -m minidiffprompt train-prompts --preset paper --data data/refcoco/processed --method vpt
    python -m minidiffprompt evaluate --preset tiny --use_giou true

Any field of the command's stage configs (see minidiffprompt/config.py) can be set with `--field value`.
Every stage writes into the run folder (`--out`, default runs/<preset>) and resumes from its last checkpoint
unless `--no-resume` is given; a run made with other settings, data or upstream weights is never reused or
replaced silently. Errors are one line that names the file or setting; `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

import torch

from .utils.checkpoint import CheckpointMismatch, RunLocked, run_lock
from .utils.files import read_json
from .config import apply_overrides, get_preset
from .data import synthetic  # synthetic.ensure_synthetic looked up at call time: the tests patch it
from .data.refcoco import DataError
from .utils.shipped import ship

# command -> (module with main(preset, data, out, resume), the preset sections its --key value options may set)
COMMANDS = {
    "train-vae": ("train_vae", ("data", "vae"), "stage 1: train the Mask-VAE"),
    "train-dit": ("train_dit", ("data", "dit"), "stage 2: train the DiT prompt generator"),
    "train-bert": ("pretrain.train_bert", ("data", "bert", "glip"),
                   "pre-train the tiny GLIP's small BERT (masked LM)"),
    "train-clip": ("pretrain.train_clip", ("data", "clip", "dit"), "train the tiny CLIP-like condition encoder"),
    "train-glip": ("pretrain.train_glip", ("data", "glip"), "pre-train the tiny GLIP on the detection split"),
    "train-prompts": ("train_prompts", ("data", "prompt"), "stage 3: prompt tuning (Diff-Prompt or a baseline)"),
    "evaluate": ("evaluate", ("data", "eval", "prompt"), "R@1 / R@5 / UB on val, testA, testB"),
    "demo": ("demo", ("data", "vae", "dit", "glip", "prompt", "eval"), "the whole tiny pipeline with a report"),
    "eval-base": ("pretrain.base_eval", ("data", "prompt", "glip"),
                  "the frozen base GLIP: detection, zero-shot referring"),
    "bench": ("bench", ("data", "vae", "dit", "glip", "prompt", "eval"), "throughput and memory of every stage"),
}


def parse_overrides(rest: list[str]) -> dict[str, str]:
    overrides, i = {}, 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: options are written --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            value, i = rest[i + 1], i + 2
        else:
            raise SystemExit(f"--{key} needs a value")
        overrides[key] = value
    return overrides


def ship_main(argv: list[str]):
    """`python -m minidiffprompt ship RUN/STAGE NAME [--extra FILE.json]`: copy a finished run into the package."""
    parser = argparse.ArgumentParser(prog="python -m minidiffprompt ship", description=ship.__doc__)
    parser.add_argument("run", type=Path, help="a finished stage folder, e.g. runs/tiny/glip")
    parser.add_argument("name", help="the shipped name, e.g. tiny_glip")
    parser.add_argument("--extra", type=Path, help="a JSON file whose entries join metrics.json (eval-base's)")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.json").exists():
        raise SystemExit(f"ship: {args.run} holds no finished run (metrics.json); give a stage folder such as "
                         "runs/tiny/glip")
    extra = read_json(args.extra) if args.extra else None
    print(ship(args.run, args.name, extra))


def device_name(name: str) -> str:
    """argparse type of --device: auto, cpu, cuda or cuda:N."""
    if name != "auto":
        try:
            torch.device(name)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    return name


def writable_folder(out: Path) -> None:
    """Create `out` (and its parents) and check that files can be written there, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"--out {out} is not a writable folder ({e.strerror}); choose another --out") from None


def data_root(data: Path, default: bool) -> Path:
    """The processed data folder: the tiny preset's synthetic default is built when absent (as the demo does);
    any other missing folder is an error that names the command that makes it."""
    if data.exists():
        return data
    if default:
        return synthetic.ensure_synthetic(data.parent if data.name == "processed" else data)
    raise FileNotFoundError(f"--data {data}: no such folder; make it with `python data_prep.py "
                            "refcoco ... --out DIR` (or `python data_prep.py synthetic --out DIR`, then DIR/processed)")


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ship"]:
        return ship_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m minidiffprompt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--data", type=Path, default=None, help="processed data folder (default: the preset's)")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/<preset>, demo: runs/demo); eval-base: the JSON file to write; "
                             "bench: a FILE.json, or a folder that gets bench.json")
    parser.add_argument("--device", default="auto", type=device_name, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-resume", action="store_true", help="start the stage afresh")
    parser.add_argument("--batch", type=int, default=None, help="bench: items per measured step")
    parser.add_argument("--compile", action="store_true", help="bench: also measure torch.compile")
    parser.add_argument("--probe", action="store_true", help="eval-base: also fit the linear position probe")
    parser.add_argument("--budget", choices=("short", "long"), default="short",
                        help="demo: short (≤ 10 min on 2 cores) or the long study (about an hour)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args, rest = parser.parse_known_args(argv)

    module_name, sections, _ = COMMANDS[args.command]
    preset = get_preset(args.preset)
    preset.device = args.device
    data = args.data or Path(preset.data.root)
    if args.out is not None and not args.out.strip():         # Path("") would be the current folder
        raise SystemExit(f"{args.command}: --out is empty; name a run folder, or leave --out out for the default")
    args.out = Path(args.out) if args.out is not None else None
    out = args.out or Path("runs") / ({"short": "demo", "long": "demo-long"}[args.budget] if args.command == "demo"
                                      else preset.name)
    try:
        apply_overrides([getattr(preset, s) for s in sections], parse_overrides(rest))
        if args.command == "evaluate" and not preset.eval.splits:
            raise ValueError("--splits is empty; name at least one of val,testA,testB")
        if args.command not in ("demo", "bench"):      # the demo builds its data itself; bench needs none
            data = data_root(data, default=args.data is None and preset.name == "tiny")
        preset.prompt.check(preset.glip)
        # eval-base and `bench --out FILE.json` write one file; every other command writes a run folder
        to_file = args.command == "eval-base" or (args.command == "bench" and out.suffix == ".json")
        writable_folder(out.parent if to_file else out)
        module = importlib.import_module(f"minidiffprompt.{module_name}")
        if args.command == "eval-base":
            if args.out is None:
                raise SystemExit("eval-base: give --out FILE.json")
            return module.main(preset, data, out, probe=args.probe)
        # one writer per run folder (under torchrun the ranks of one run share it: rank 0 holds the lock)
        locked = not to_file and os.environ.get("RANK", "0") == "0"
        with run_lock(out) if locked else contextlib.nullcontext():
            if args.command == "bench":
                return module.main(preset, data, out, resume=False, batch=args.batch, compile=args.compile or None)
            if args.command == "demo":
                return module.main(preset, data, out, resume=not args.no_resume, budget=args.budget)
            return module.main(preset, data, out, resume=not args.no_resume)
    except KeyboardInterrupt:      # every stage checkpoints atomically after each epoch
        raise SystemExit(f"{args.command}: interrupted; the same command resumes after the last finished "
                         "epoch") from None
    except (OSError, ValueError, FloatingPointError, CheckpointMismatch, DataError, RunLocked) as e:
        # a missing or unreadable input, a wrong file, a bad setting: one line that names it (--debug: traceback)
        if args.debug:
            raise
        message = str(e)      # a message that starts with the command's name already says where it comes from
        prefix = "" if message.startswith(f"{args.command}:") else f"{args.command}: "
        raise SystemExit(prefix + message) from None


if __name__ == "__main__":
    main()
