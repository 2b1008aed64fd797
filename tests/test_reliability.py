"""Bad output folders lose nothing: `data_prep.py` refuses to write where it could destroy its inputs or a user's
files, replaces only what it wrote itself, cleans up after a killed run, and never reuses a synthetic set made with
other settings. Every case checks that the input folders and unrelated files are byte-for-byte untouched."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from minidiffprompt.data.refcoco import MARKER, DataError, convert_refcoco
from minidiffprompt.data.synthetic import ensure_synthetic, generate

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(log=lambda *a: None)


def tree(folder: Path) -> dict:
    """Every file below `folder` with its sha256: what must not change."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def raw(tmp_path):
    generate(tmp_path / "set", seed=3, images=16, size=64)
    return tmp_path / "set"


def convert(raw: Path, out: Path):
    return convert_refcoco(raw / "refcoco", raw / "train2014", out, mdetr_dir=raw / "mdetr_annotations", **quiet)


@pytest.mark.parametrize("where", ["the folder holding the inputs", "an input folder", "inside an input folder"])
def test_an_output_overlapping_the_inputs_is_refused(raw, where):
    out = {"the folder holding the inputs": raw, "an input folder": raw / "train2014",
           "inside an input folder": raw / "refcoco" / "processed"}[where]
    before = tree(raw)
    with pytest.raises(DataError, match="is, contains or lies inside the input folder"):
        convert(raw, out)
    assert tree(raw) == before
    assert not list(raw.parent.glob(".*partial*"))


def test_a_folder_with_a_users_files_is_not_replaced(raw, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="did not write"):
        convert(raw, out)
    assert tree(out) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}


def test_its_own_output_is_replaced_and_a_killed_runs_staging_folder_cleaned(raw, tmp_path):
    out = tmp_path / "processed"
    convert(raw, out)
    assert (out / MARKER).exists()
    dead = tmp_path / ".processed.partial-999999999"             # left by a run killed while staging
    dead.mkdir()
    (dead / "train.json").write_text("{}")
    neighbour = tmp_path / "other.txt"
    neighbour.write_text("unrelated")
    before = tree(raw)
    convert(raw, out)                                           # replaces its own folder
    assert (out / "train.json").exists() and not dead.exists()
    assert tree(raw) == before and neighbour.read_text() == "unrelated"


def test_the_command_line_prints_one_line_and_exits_1(raw):
    before = tree(raw)
    r = subprocess.run([sys.executable, "data_prep.py", "refcoco", "--refer-dir", str(raw / "refcoco"),
                        "--coco-images", str(raw / "train2014"), "--out", str(raw)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: --out") and len(r.stderr.strip().splitlines()) == 1
    assert tree(raw) == before


def test_a_synthetic_set_made_with_other_settings_is_not_reused(tmp_path):
    d = tmp_path / "synth"
    root = ensure_synthetic(d, seed=1, images=12, size=64, **quiet)
    first = tree(root)
    assert ensure_synthetic(d, seed=1, images=12, size=64, **quiet) == root and tree(root) == first   # reused
    with pytest.raises(DataError, match="images 12 \\(asked 14\\)"):
        ensure_synthetic(d, seed=1, images=14, size=64, **quiet)
    assert tree(root) == first
    ensure_synthetic(d, seed=1, images=14, size=64, force=True, **quiet)   # --force regenerates
    assert tree(root) != first


def test_the_synthetic_set_is_not_written_over_a_users_folder(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match="holds other files"):
        ensure_synthetic(d, seed=1, images=12, size=64, force=True, **quiet)
    assert tree(d) == {"thesis.tex": hashlib.sha256(b"keep me").hexdigest()}


@pytest.mark.parametrize("args, message", [
    (["train-prompts", "--depth", "13"], "--depth 13: the prompts go into one layer each, so depth must be 1..4"),
    (["train-prompts", "--method", "vpt", "--depth", "0"], "depth must be 1..8 (8 Swin blocks)"),
    (["train-prompts", "--length", "3"], "--length 3: Diff-Prompt splits each layer's tokens"),
    (["train-prompts", "--method", "nope"], "unknown --method 'nope'"),
])
def test_bad_settings_stop_with_one_line_before_any_work(tmp_path, args, message):
    from minidiffprompt.__main__ import main
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "run")])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "prompts").exists()


def test_an_unknown_device_and_an_unwritable_out_are_one_line_errors(tmp_path, capsys):
    from minidiffprompt.__main__ import main
    with pytest.raises(SystemExit):
        main(["evaluate", "--device", "foo"])
    assert "unknown device 'foo'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--out", str(blocker / "run")])
    assert str(e.value).startswith(f"evaluate: --out {blocker / 'run'} is not a writable folder")
    with pytest.raises(OSError):                                 # --debug: the traceback instead
        main(["evaluate", "--out", str(blocker / "run"), "--debug"])
