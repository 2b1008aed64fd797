"""Files written whole or not at all, and JSON read with errors that name the file: no torch, so that
`data_prep.py` stays quick to start.

Every file this package writes goes to a temporary file of its own next to `path` first and is renamed into
place, so a run killed mid-write leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def replace_atomically(write, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")   # unique per writer
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text: str) -> Path:
    """Write a text file atomically: a reader sees the old file or the new one, never half of one."""
    return replace_atomically(lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), path)


def write_json(path, obj) -> Path:
    """Write `obj` as indented JSON, atomically (a config.json written last marks a stage as complete)."""
    return write_text(path, json.dumps(obj, indent=2))


def read_json(path, error: type[Exception] = ValueError,
              fix: str = "the file is damaged or cut short: delete it, or pass --no-resume to redo the run"):
    """A JSON file, or `error` naming it, where it breaks and `fix` when it is damaged or cut short."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None
