"""Misuse gives the right result or a one-line error that names the fix, and loses nothing: `data_prep.py` refuses
to write where it could destroy its inputs or a user's files, replaces only what it wrote itself and completes a
killed run; bad settings, damaged inputs and damaged runs stop before any work with the file or option named; a run
is reused only on the same data, images and upstream weights; non-finite values stop a stage. Where files are at
stake, the case checks that the inputs and unrelated files are byte-for-byte untouched."""
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


def test_its_own_output_is_replaced_and_a_killed_runs_folder_completed(raw, tmp_path, monkeypatch):
    import json
    from minidiffprompt.data import refcoco
    out = tmp_path / "processed"
    convert(raw, out)
    assert refcoco.is_complete(out) and json.loads((out / MARKER).read_text())["files"] == sorted(refcoco.OUTPUTS)
    (out / "notes.txt").write_text("mine")
    written, write_text = [], refcoco.files.write_text

    def killed_after_two(path, text):                           # the marker-to-be and train.json, then killed
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        write_text(path, text)
    monkeypatch.setattr(refcoco.files, "write_text", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        convert(raw, out)
    monkeypatch.undo()
    assert written == [refcoco.PENDING, "train.json"]
    assert not (out / MARKER).exists() and not refcoco.is_complete(out)   # a half-written folder is not a data root
    (out / ".val.json.999999999-0a1b2c3d.tmp").write_text("{cut")   # a temp file of a run killed mid-write
    neighbour = tmp_path / "other.txt"
    neighbour.write_text("unrelated")
    before = tree(raw)
    convert(raw, out)                                           # completes it: the partial marker keeps it ours
    assert refcoco.is_complete(out) and not (out / refcoco.PENDING).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*refcoco.OUTPUTS, MARKER, "notes.txt"])
    assert (out / "notes.txt").read_text() == "mine"
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
    from minidiffprompt.utils.files import replace_atomically, write_json
    names = []
    replace_atomically(lambda tmp: names.append(tmp) or tmp.write_text("a"), tmp_path / "x.json")
    replace_atomically(lambda tmp: names.append(tmp) or tmp.write_text("b"), tmp_path / "x.json")
    assert names[0] != names[1] and (tmp_path / "x.json").read_text() == "b"
    with pytest.raises(ZeroDivisionError):                      # a failed write leaves the old file and no temp file
        replace_atomically(lambda tmp: tmp.write_text("c") and 1 / 0, tmp_path / "x.json")
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
    saved = {"config": {"upstream": {"glip": shipped_glip}},
             "prompt": {"method": "vpt", "glip_weights": "shipped:tiny_glip"}}
    check_base(preset, tmp_path, tmp_path / "prompts" / "vpt", saved)                 # the same GLIP: fine
    other = {**saved, "config": {"upstream": {"glip": {"model.safetensors": "0" * 16}}}}
    with pytest.raises(CheckpointMismatch, match=r"was trained on another GLIP .*'shipped:tiny_glip' then"):
        check_base(preset, tmp_path, tmp_path / "prompts" / "vpt", other)
    check_base(preset, tmp_path, tmp_path, {**other, "prompt": {"method": "full"}})   # holds its own whole GLIP


def test_a_users_files_inside_a_converted_folder_survive_a_rerun(raw, tmp_path):
    """Re-running the conversion into its data root replaces its own files in place, never the folder: a training
    run or notes stored there survive."""
    out = tmp_path / "processed"
    convert(raw, out)
    (out / "runs" / "x").mkdir(parents=True)
    (out / "runs" / "x" / "model.safetensors").write_bytes(b"weights")
    (out / "notes.txt").write_text("mine")
    mine = {k: v for k, v in tree(out).items() if k in ("notes.txt", "runs/x/model.safetensors")}
    (out / "train.json").write_text("{}")                       # its own file, changed: rewritten
    convert(raw, out)
    assert {k: tree(out)[k] for k in mine} == mine
    assert len((out / "train.json").read_text()) > 2


def test_a_users_files_inside_a_synthetic_set_survive_force(tmp_path):
    """`synthetic --force` overwrites the set's files by name and drops only the images a larger set made before."""
    d = tmp_path / "synth"
    ensure_synthetic(d, seed=1, images=14, size=64, **quiet)
    (d / "processed" / "runs" / "x").mkdir(parents=True)
    (d / "processed" / "runs" / "x" / "model.safetensors").write_bytes(b"weights")
    (d / "train2014" / "mine.jpg").write_bytes(b"a photo")
    (d / "refcoco" / "notes.txt").write_text("mine")
    mine = {k: v for k, v in tree(d).items() if k.endswith(("model.safetensors", "mine.jpg", "notes.txt"))}
    assert len(mine) == 3
    ensure_synthetic(d, seed=1, images=12, size=64, force=True, **quiet)
    assert {k: tree(d)[k] for k in mine} == mine
    images = sorted(p.name for p in (d / "train2014").iterdir())
    assert images == sorted(["mine.jpg", *(f"COCO_train2014_{100000 + i:012d}.jpg" for i in range(12))])


def test_a_regeneration_killed_midway_is_redone_not_reused(tmp_path, monkeypatch):
    from minidiffprompt.data import synthetic
    d = tmp_path / "synth"
    ensure_synthetic(d, seed=1, images=12, size=64, **quiet)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(synthetic, "convert_refcoco", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(d, seed=2, images=12, size=64, force=True, **quiet)
    monkeypatch.undo()
    ensure_synthetic(d, seed=1, images=12, size=64, **quiet)    # not the old conversion over the new raw files
    assert (d / "synthetic.json").read_text().strip() == '{"seed": 1, "images": 12, "size": 64}'
    again = tmp_path / "again"
    ensure_synthetic(again, seed=1, images=12, size=64, **quiet)
    assert tree(d / "train2014") == tree(again / "train2014")


@pytest.mark.parametrize("fault, message", [
    ("a list", 'instances.json: the top level is a list, not an object; expected COCO\'s format {"images": [...], '
               '"annotations": [...], "categories": [...]}'),
    ("images null", 'instances.json: "images" is null, not a list'),
    ("no categories", 'instances.json: "categories" is missing'),
    ("a nameless category", 'instances.json: categories[0] needs an integer "id" and a string "name", got {"id": 1'),
    ("a string category id", 'instances.json: categories[0] needs an integer "id"'),
])
def test_a_malformed_instances_json_is_one_error_naming_the_problem(raw, tmp_path, fault, message):
    import json
    path = raw / "refcoco" / "instances.json"
    d = json.loads(path.read_text())
    if fault == "a list":
        d = d["images"]
    elif fault == "images null":
        d["images"] = None
    elif fault == "no categories":
        del d["categories"]
    elif fault == "a nameless category":
        del d["categories"][0]["name"]
    else:
        d["categories"][0]["id"] = "1"
    path.write_text(json.dumps(d))
    before = tree(raw)
    with pytest.raises(DataError) as e:
        convert(raw, tmp_path / "out")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert tree(raw) == before and not (tmp_path / "out").exists()


def test_bad_annotations_are_dropped_with_their_own_reason(raw, tmp_path):
    """A polygon wholly outside its image and a category id written as a string are bad records, counted."""
    import json
    path = raw / "refcoco" / "instances.json"
    d = json.loads(path.read_text())
    refs = __import__("pickle").loads((raw / "refcoco" / "refs(unc).p").read_bytes())
    by_id = {a["id"]: a for a in d["annotations"]}
    outside, string_cat = by_id[refs[0]["ann_id"]], by_id[refs[-1]["ann_id"]]          # two referred objects
    outside["segmentation"] = [[v + 1000 for v in p] for p in outside["segmentation"]]   # its box stays inside
    string_cat["category_id"] = str(string_cat["category_id"])
    path.write_text(json.dumps(d))
    expect = {r: sum(ref["ann_id"] == a["id"] for ref in refs) for r, a in
              (("polygon_outside_image", outside), ("unknown_category", string_cat))}
    with pytest.raises(DataError, match="refs are bad"):       # the default 1 % is exceeded: nothing written
        convert(raw, tmp_path / "out")
    summary = convert_refcoco(raw / "refcoco", raw / "train2014", tmp_path / "out",
                              mdetr_dir=raw / "mdetr_annotations", max_bad_fraction=0.5, **quiet)
    assert summary["bad"] == expect
    det = json.loads((tmp_path / "out" / "detection.json").read_text())
    assert all(o["polygons"][0][0] < 1000 for im in det["images"] for o in im["objects"])


@pytest.mark.parametrize("command, message", [
    (["refcoco", "--max-bad-fraction", "nan"], "error: --max-bad-fraction nan: must be a fraction in [0, 1]"),
    (["refcoco", "--max-bad-fraction", "-0.1"], "error: --max-bad-fraction -0.1: must be a fraction in [0, 1]"),
    (["refcoco", "--max-bad-fraction", "1.5"], "error: --max-bad-fraction 1.5: must be a fraction in [0, 1]"),
    (["refcoco", "--mdetr-dir", "{raw}/mdetr_anotations"],
     "error: --mdetr-dir {raw}/mdetr_anotations is not a folder; give the folder with MDETR's "
     "finetune_refcoco_train.json"),
    (["refcoco", "--mdetr-dir", "{raw}/refcoco"],
     "error: --mdetr-dir {raw}/refcoco holds no finetune_refcoco_*.json; give the folder with MDETR's"),
    (["refcoco", "empty refs"], "error: {raw}/refcoco/refs(unc).p: holds no refs (an empty list)"),
    (["synthetic", "--images", "0"], "error: --images 0: the synthetic set needs at least 1 image"),
    (["synthetic", "--size", "0"], "error: --size 0: images must be at least 32 px a side"),
])
def test_data_prep_misuses_are_one_line_errors(raw, tmp_path, command, message):
    if command[1] == "empty refs":
        (raw / "refcoco" / "refs(unc).p").write_bytes(__import__("pickle").dumps([], protocol=2))
        command = command[:1]
    if command[0] == "refcoco":
        command = [*command, "--refer-dir", str(raw / "refcoco"), "--coco-images", str(raw / "train2014")]
    before = tree(raw)
    r = subprocess.run([sys.executable, "data_prep.py", *(a.format(raw=raw) for a in command),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(message.format(raw=raw)), r.stderr
    assert tree(raw) == before and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Runs and their inputs: what a run depends on is checked, damaged files are named, non-finite values stop a stage


def small_root(tmp_path, split_text: dict | None = None):
    """A data root of the synthetic set (30 images), copied so that a test may damage it."""
    from minidiffprompt.data.synthetic import ensure_synthetic
    root = ensure_synthetic(tmp_path / "synth", images=30, **quiet)
    for name, text in (split_text or {}).items():
        (root / name).write_text(text)
    return root


def test_a_changed_image_changes_the_run_identity_and_the_eval_cache(tmp_path):
    """The fingerprint of a data root covers the names, sizes and times of the images its split files name, so a
    finished run or an evaluation cache made on other images is not reused."""
    import os
    from minidiffprompt.utils.checkpoint import fingerprint
    root = small_root(tmp_path)
    first = fingerprint(root)
    assert set(first) >= {"train.json", "val.json", "images"}
    image = sorted((root.parent / "train2014").glob("*.jpg"))[3]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))          # the same bytes, touched
    assert fingerprint(root)["images"] != first["images"]
    assert {k: v for k, v in fingerprint(root).items() if k != "images"} == \
        {k: v for k, v in first.items() if k != "images"}


def test_evaluating_on_other_data_never_replaces_the_runs_results(tmp_path):
    """RUN/eval belongs to the data the run's methods were trained on; other data gets RUN/eval-NAME."""
    import json
    from minidiffprompt.evaluate import eval_folder
    from minidiffprompt.utils.checkpoint import fingerprint
    root = small_root(tmp_path)
    other = tmp_path / "other" / "processed"
    other.mkdir(parents=True)
    for name in ("train.json", "val.json"):
        (other / name).write_text((root / name).read_text().replace('"sent": "', '"sent": "the '))
    out = tmp_path / "run"
    trained_on = [json.loads(json.dumps(fingerprint(root)))]
    assert eval_folder(out, root, trained_on) == out / "eval"
    assert eval_folder(out, other, trained_on) == out / "eval-other"
    assert eval_folder(out, other, []) == out / "eval"                        # nothing there yet: RUN/eval


@pytest.mark.parametrize("text, message", [
    ('[1, 2]', 'not a split file of data_prep.py'),
    ('{"records": null}', 'not a split file of data_prep.py'),
    ('{"records": []}', 'the val split holds no records'),
    ('{"records": [{"image": "x.jpg"}]}', 'record 0 is not a record of data_prep.py'),
    ('{"records": [', 'not valid JSON'),
])
def test_split_files_of_the_wrong_shape_are_data_errors_naming_the_file(tmp_path, text, message):
    """Including an empty val split, which `--val_items` reads: refused before training, not scored 0.0."""
    import dataclasses
    from minidiffprompt import train_prompts
    from minidiffprompt.config import get_preset
    from minidiffprompt.data.datasets import RefExpDataset
    root = small_root(tmp_path, {"val.json": text})
    with pytest.raises(DataError, match=f"val.json: .*{message}"):
        RefExpDataset(root, "val", 32)
    preset = get_preset("tiny")
    preset.prompt = dataclasses.replace(preset.prompt, method="vpt", val_items=10)
    with pytest.raises(DataError, match=message):
        train_prompts.main(preset, root, tmp_path / "run")
    assert not (tmp_path / "run" / "prompts" / "vpt" / "checkpoint.pt").exists()


def test_unreadable_and_oversized_images_are_data_errors_naming_the_file(tmp_path, monkeypatch):
    """A cut-short image, and one past PIL's decompression-bomb limit (whether PIL warns or refuses), name the file
    instead of a bare decoder message or a machine brought down by a huge decode."""
    import numpy as np
    from PIL import Image
    from minidiffprompt.data.datasets import load_image
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    assert load_image(path, 32).shape == (3, 32, 32)
    for limit in (3000, 1500):              # 64² = 4096 pixels: a warning above the limit, an error above twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(DataError, match=f"{path}: cannot use this image"):
            load_image(path, 32)
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=f"{path}: cannot use this image"):
        load_image(path, 32)


def test_a_finished_run_with_damaged_weights_or_json_is_not_reused(tmp_path):
    import torch
    from minidiffprompt.utils.checkpoint import CheckpointMismatch, save_weights, stored_run, write_json
    run = tmp_path / "vae"
    save_weights({"w": torch.randn(1000)}, run / "model.safetensors")
    write_json(run / "config.json", {"a": 1})
    write_json(run / "metrics.json", {"loss": 0.5})
    assert stored_run(run) == ({"a": 1}, {"loss": 0.5})
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])          # a copy cut short
    with pytest.raises(CheckpointMismatch, match="model.safetensors: damaged weights file.*--no-resume"):
        stored_run(run)
    (run / "model.safetensors").write_bytes(data)
    (run / "config.json").write_text('{"a": ')
    with pytest.raises(ValueError, match="config.json: not valid JSON .*damaged or cut short"):
        stored_run(run)


def test_non_finite_weights_are_refused_and_nan_offsets_do_not_crash_the_deformable_conv():
    """A diverged run's NaN weights are refused at load; NaN reaching the DyHead's offsets (which made torchvision's
    kernel segfault) gives NaN out, which the training loop's check turns into a one-line error."""
    import torch
    from minidiffprompt.glip.dyhead import ModulatedDeformConv
    from minidiffprompt.prompting import LearnablePrompts
    from minidiffprompt.utils.checkpoint import CheckpointMismatch, load_strict
    from minidiffprompt.utils.runtime import check_finite
    prompts = LearnablePrompts(depth=2, length=4, vision_dim=8)
    state = prompts.state_dict()
    state["visual.1.prompt"] = state["visual.1.prompt"].clone().fill_(float("nan"))
    with pytest.raises(CheckpointMismatch, match="NaN or infinite values \\(visual.1.prompt\\).*lower --lr"):
        load_strict(prompts, state, source="diverged.safetensors")
    conv = ModulatedDeformConv(4, 4)
    x, offset, mask = torch.randn(1, 4, 8, 8), torch.zeros(1, 18, 8, 8), torch.ones(1, 9, 8, 8)
    clean = conv(x, offset, mask)
    offset[0, :, 2, 3] = float("nan")
    out = conv(x, offset, mask)
    assert out[0, :, 2, 3].isnan().all() and torch.equal(out[0, :, :2], clean[0, :, :2])
    with pytest.raises(FloatingPointError, match="train-prompts: the gradient norm is nan at step 7.*lower --lr"):
        check_finite(out.sum(), "train-prompts", 7, 0.1, "the gradient norm")


def test_a_mask_vae_of_another_shape_is_refused_by_name(tmp_path):
    """`--mask_size 63` for a VAE that halves the mask twice, and a paper-size Mask-VAE given to the tiny DiT, are
    one-line errors naming the sizes instead of a shape error deep in a matmul."""
    from minidiffprompt.__main__ import main
    from minidiffprompt.config import get_preset
    from minidiffprompt.dit import dit_from_config
    from minidiffprompt.pipeline import check_latents
    from minidiffprompt.train_vae import build_vae
    from minidiffprompt.vae import MaskVAE
    with pytest.raises(SystemExit, match="--mask_size 63: this Mask-VAE halves a mask 2 times, so the size must be "
                                         "a multiple of 4 \\(e.g. 64\\)"):
        main(["train-vae", "--mask_size", "63", "--out", str(tmp_path / "run")])
    tiny = get_preset("tiny")
    dit = dit_from_config(tiny.dit)
    check_latents(build_vae(tiny.vae), dit, tiny.data.mask_size, "tiny_vae")
    with pytest.raises(ValueError, match="paper_vae: this Mask-VAE turns 64² masks into 4×8² latents, but the DiT "
                                         "works on 4×16²"):
        check_latents(MaskVAE(), dit, tiny.data.mask_size, "paper_vae")
