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
    # one range check for every numeric option of every command
    (["train-prompts", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["train-prompts", "--max_steps", "-5"], "--max_steps: must be at least 0, got -5"),
    (["train-prompts", "--val_every", "-1"], "--val_every: must be at least 0, got -1"),
    (["train-prompts", "--batch_size", "0"], "--batch_size: must be at least 1, got 0"),
    (["train-prompts", "--micro_batch", "0"], "--micro_batch: must be at least 1, got 0"),
    (["train-prompts", "--ddim_steps", "0"], "--ddim_steps: must be at least 1, got 0"),
    (["train-prompts", "--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["train-vae", "--kl_weight", "nan"], "--kl_weight: must be a finite number, got nan"),
    (["train-vae", "--image_size", "0"], "--image_size: must be at least 1, got 0"),
    (["evaluate", "--iou_threshold", "2"], "--iou_threshold: must lie in [0, 1], got 2.0"),
    (["evaluate", "--iou_threshold", "0"], "--iou_threshold: must be > 0, got 0.0"),
    (["evaluate", "--splits", ""], "--splits is empty"),
    (["train-prompts", "--tag", "../../x"], "--tag '../../x': a plain name"),
    (["train-prompts", "--tag", "a/b"], "--tag 'a/b': a plain name"),
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


def test_a_second_writer_is_refused_and_a_dead_writers_lock_taken_over(tmp_path):
    from minidiffprompt.utils.checkpoint import RunLocked, run_lock
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from minidiffprompt.utils.checkpoint import run_lock\n"
        f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} on"):
            with run_lock(run):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run):                                         # the killed holder's lock is free again
        assert (run / ".lock.owner").read_text().startswith(f"pid {__import__('os').getpid()}")


def test_temporary_files_have_unique_names_and_do_not_linger(tmp_path):
    from minidiffprompt.utils.checkpoint import _replace_atomically, write_json
    names = []
    _replace_atomically(lambda tmp: names.append(tmp) or tmp.write_text("a"), tmp_path / "x.json")
    _replace_atomically(lambda tmp: names.append(tmp) or tmp.write_text("b"), tmp_path / "x.json")
    assert names[0] != names[1] and (tmp_path / "x.json").read_text() == "b"
    with pytest.raises(ZeroDivisionError):                      # a failed write leaves the old file and no temp file
        _replace_atomically(lambda tmp: tmp.write_text("c") and 1 / 0, tmp_path / "x.json")
    write_json(tmp_path / "y.json", {"k": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "y.json"]
    assert (tmp_path / "x.json").read_text() == "b"


def test_16_bit_images_load_with_their_grey_levels_and_truncated_jpegs_are_refused(tmp_path, raw):
    import numpy as np
    from PIL import Image
    from minidiffprompt.data.datasets import load_image
    grey = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)        # 0 .. 65472
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    img = load_image(tmp_path / "grey16.png", 32)
    assert img.shape == (3, 32, 32) and abs(img.mean().item() - grey.mean() / 65535) < 2e-3   # not all white
    # a truncated JPEG among the inputs: the default full decode drops that image's refs as corrupt
    victim = sorted((raw / "train2014").glob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    summary = convert_refcoco(raw / "refcoco", raw / "train2014", tmp_path / "out",
                              mdetr_dir=raw / "mdetr_annotations", max_bad_fraction=0.5, **quiet)
    assert summary["bad"].get("corrupt_image", 0) >= 1
    header_only = convert_refcoco(raw / "refcoco", raw / "train2014", tmp_path / "out2",
                                  mdetr_dir=raw / "mdetr_annotations", max_bad_fraction=0.5, check_images="open",
                                  **quiet)
    assert "corrupt_image" not in header_only["bad"]           # what the old default let through


def test_prompt_weights_load_strictly(tmp_path):
    """A checkpoint of other prompts (another depth), or one with integer weights, is refused by name instead of
    silently leaving fresh prompts."""
    import torch
    from minidiffprompt.pipeline import load_trainable_state
    from minidiffprompt.prompting import LearnablePrompts
    from minidiffprompt.utils.checkpoint import CheckpointMismatch
    prompts = LearnablePrompts(depth=2, length=4, vision_dim=8)
    good = {k: v.clone() + 1 for k, v in prompts.trainable_state_dict().items()}
    load_trainable_state(None, prompts, good, source="good.pt")
    assert all(torch.equal(prompts.trainable_state_dict()[k], v) for k, v in good.items())
    deeper = LearnablePrompts(depth=3, length=4, vision_dim=8).trainable_state_dict()
    with pytest.raises(CheckpointMismatch, match="unexpected keys"):
        load_trainable_state(None, prompts, deeper, source="deeper.pt")
    as_int = {k: v.long() for k, v in good.items()}
    with pytest.raises(CheckpointMismatch, match="wrongly typed keys"):
        load_trainable_state(None, prompts, as_int, source="int.pt")


def test_a_run_is_reused_only_on_the_same_data_and_upstream_weights(tmp_path, monkeypatch):
    """Run identity: the data's split files and the weights a stage builds on are part of what must match; a
    mismatch names the differing field and leaves the finished run as it was."""
    import torch
    from minidiffprompt import train_vae
    from minidiffprompt.config import get_preset
    from minidiffprompt.pipeline import run_config
    from minidiffprompt.utils.checkpoint import RunMismatch
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.json").write_text(f'{{"records": [], "split": "{split}"}}')
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train_vae, "load_mask_tensors",
                        lambda root, split, size: (torch.rand(8, 1, size, size, generator=g) > 0.7).float())
    preset = get_preset("tiny")
    preset.data.mask_size, preset.vae.epochs, preset.vae.batch_size = 32, 1, 8
    train_vae.main(preset, data, tmp_path / "run")
    before = tree(tmp_path / "run")
    (data / "train.json").write_text('{"records": [], "split": "train", "edited": true}')
    with pytest.raises(RunMismatch, match="data.train.json"):
        train_vae.main(preset, data, tmp_path / "run")
    assert tree(tmp_path / "run") == before
    # stage 3's identity holds the base GLIP's files: other weights at the same path are another run, also when
    # the folder holds a vocab.txt, as every GLIP and BERT folder does (a data root has one too)
    out = tmp_path / "run"
    (out / "glip").mkdir()
    (out / "glip" / "model.safetensors").write_bytes(b"one")
    (out / "glip" / "vocab.txt").write_text("[PAD]\n")
    preset.prompt.glip_weights, preset.prompt.method = "", "vpt"
    first = run_config(preset, preset.prompt, data, out)
    (out / "glip" / "model.safetensors").write_bytes(b"two")
    assert run_config(preset, preset.prompt, data, out)["upstream"]["glip"] != first["upstream"]["glip"]


@pytest.mark.parametrize("fault, message", [
    ("empty refs", "not a readable refs pickle"),
    ("instances not JSON", "instances.json: not valid JSON"),
    ("MDETR file not JSON", "finetune_refcoco_val.json: not valid JSON"),
])
def test_unreadable_inputs_are_one_line_errors_naming_the_file(raw, tmp_path, fault, message):
    if fault == "empty refs":
        (raw / "refcoco" / "refs(unc).p").write_bytes(b"")
    elif fault == "instances not JSON":
        (raw / "refcoco" / "instances.json").write_text("{cut sho")
    else:
        (raw / "mdetr_annotations" / "finetune_refcoco_val.json").write_text("")
    with pytest.raises(DataError, match=message):
        convert(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_resumed_checkpoint_with_wrong_weights_is_refused(tmp_path, monkeypatch):
    """A checkpoint whose model weights were stored as integers, or whose optimizer belongs to other parameters,
    is a CheckpointMismatch naming it, not a silently broken resume."""
    import torch
    from minidiffprompt import train_vae
    from minidiffprompt.config import get_preset
    from minidiffprompt.utils.checkpoint import CheckpointMismatch
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train_vae, "load_mask_tensors",
                        lambda root, split, size: (torch.rand(8, 1, size, size, generator=g) > 0.7).float())
    preset = get_preset("tiny")
    preset.data.mask_size, preset.vae.epochs, preset.vae.batch_size = 32, 1, 8
    out = tmp_path / "run"
    train_vae.main(preset, tmp_path / "data", out)
    ckpt = out / "vae" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    for f in ("model.safetensors", "metrics.json"):              # as if killed before the final files
        (out / "vae" / f).unlink()
    torch.save({**state, "model": {k: v.long() for k, v in state["model"].items()}}, ckpt)
    with pytest.raises(CheckpointMismatch, match="wrongly typed keys"):
        train_vae.main(preset, tmp_path / "data", out)
    torch.save({**state, "optimizer": {"state": {}, "param_groups": []}}, ckpt)
    with pytest.raises(CheckpointMismatch, match="'optimizer' state does not fit"):
        train_vae.main(preset, tmp_path / "data", out)


def test_progress_into_a_file_writes_a_few_whole_lines(monkeypatch):
    """Into a file or a pipe a progress bar writes plain lines, at most one every 30 s: a 2,000-step loop that
    takes a moment leaves its first line and none of tqdm's carriage-return redraws."""
    import io
    from minidiffprompt.utils.runtime import progress
    monkeypatch.delenv("MDP_QUIET", raising=False)
    log = io.StringIO()
    for i in (bar := progress(range(2000), desc="stage", leave=False, file=log)):
        bar.set_postfix(loss=i)                  # redraws at once on a terminal
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 1 <= len(lines) <= 2 and lines[0].startswith("stage")


def test_missing_data_is_built_for_the_tiny_default_and_named_otherwise(tmp_path, monkeypatch):
    """The tiny preset's synthetic default is built when absent (as the demo does); a missing --data folder is a
    one-line error naming data_prep.py."""
    from minidiffprompt.__main__ import data_root, main as cli
    with pytest.raises(SystemExit, match="data_prep.py refcoco"):
        cli(["eval-base", "--preset", "tiny", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b.json")])
    made = []
    monkeypatch.setattr("minidiffprompt.data.synthetic.ensure_synthetic", lambda d: made.append(d) or d / "processed")
    assert data_root(tmp_path / "synth" / "processed", default=True) == tmp_path / "synth" / "processed"
    assert made == [tmp_path / "synth"]
    assert data_root(tmp_path, default=True) == tmp_path and len(made) == 1     # an existing folder is used as is


def test_a_diverged_vae_or_dit_stops_before_anything_is_saved(tmp_path, monkeypatch):
    """A non-finite loss stops the stage with a one-line FloatingPointError naming --lr; no finished run is left."""
    import torch
    from minidiffprompt import train_vae
    from minidiffprompt.config import get_preset
    from minidiffprompt.utils.runtime import check_finite
    with pytest.raises(FloatingPointError, match=r"train-dit: the loss is nan at step 7; .* lower --lr \(now 0.1\)"):
        check_finite(torch.tensor(float("nan")), "train-dit", 7, 0.1)
    check_finite(torch.tensor(1.0), "train-dit", 7, 0.1)
    preset = get_preset("tiny")
    preset.vae.epochs = 1
    monkeypatch.setattr(train_vae, "vae_loss", lambda recon, x, post, w: (recon.mean() * float("inf"),) * 3)
    data = ensure_synthetic(tmp_path / "synth", seed=1, images=12, size=64, **quiet)
    with pytest.raises(FloatingPointError, match="train-vae: the loss is"):
        train_vae.main(preset, data, tmp_path / "run")
    assert not (tmp_path / "run" / "vae" / "model.safetensors").exists()


def test_an_empty_out_a_missing_ship_folder_and_ctrl_c_are_one_line_errors(tmp_path, monkeypatch):
    from minidiffprompt import __main__ as cli
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--out is empty"):
        cli.main(["train-vae", "--out", ""])
    with pytest.raises(SystemExit, match="holds no finished run"):
        cli.main(["ship", str(tmp_path / "nowhere"), "tiny_x"])
    assert not any(tmp_path.iterdir())                       # nothing written in the current folder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("minidiffprompt.train_vae.main", interrupted)
    with pytest.raises(SystemExit, match="interrupted; the same command resumes"):
        cli.main(["train-vae", "--out", str(tmp_path / "run"), "--data", str(tmp_path)])



def test_a_run_is_evaluated_only_on_the_glip_it_was_trained_on(tmp_path):
    """evaluate --glip_weights OTHER over runs tuned on the shipped GLIP: a one-line error, not a silent 0 %."""
    import json
    from minidiffprompt.config import get_preset
    from minidiffprompt.pipeline import check_base, stage_path
    from minidiffprompt.utils.checkpoint import CheckpointMismatch, fingerprint
    preset = get_preset("tiny")
    shipped_glip = json.loads(json.dumps(fingerprint(stage_path(preset.prompt, tmp_path, "glip"))))
    saved = {"config": {"upstream": {"glip": shipped_glip}}, "prompt": {"method": "vpt", "glip_weights": "shipped:tiny_glip"}}
    check_base(preset, tmp_path, tmp_path / "prompts" / "vpt", saved)                 # the same GLIP: fine
    other = {**saved, "config": {"upstream": {"glip": {"model.safetensors": "0" * 16}}}}
    with pytest.raises(CheckpointMismatch, match=r"was trained on another GLIP .*'shipped:tiny_glip' then"):
        check_base(preset, tmp_path, tmp_path / "prompts" / "vpt", other)
    check_base(preset, tmp_path, tmp_path, {**other, "prompt": {"method": "full"}})   # holds its own whole GLIP
