"""The whole tiny pipeline in one command, ending in a report: `python -m minidiffprompt demo [--out DIR]`.

    1. synthetic RefCOCO-format data                         (synthetic.ensure_synthetic)
    2. stage 1: the Mask-VAE, and                            (the shipped tiny_vae and tiny_dit, made once by
    3. stage 2: the DiT prompt generator                      `train-vae` and `train-dit --preset tiny` and
                                                              re-measured on val here, as the paper's stage 3
                                                              starts from the authors' released ones; with
                                                              `--vae_weights "" --dit_weights ""` the demo trains
                                                              both into the run folder: train_vae, train_dit)
    4. the base detector: the shipped tiny GLIP (`--glip_weights`; it was pre-trained once on the synthetic
       detection split by `train-glip`, as GLIP-T(A) comes pre-trained on Objects365)
    5. stage 3: VPT-deep, deep text prompts and Diff-Prompt tuning of the frozen GLIP (train_prompts)
    6. R@1 / R@5 / UB of zero-shot GLIP and every method on val, testA, testB (evaluate)
    7. RUN/report.md with figures, RUN/results.json (method -> split -> {"R@1", "R@5", "UB", "by_kind",
       "vs_zeroshot"} in percent)

Every stage resumes or reuses what a previous run left in the run folder, so a second call is instant. The last
line printed is the run folder.

`--budget long` (about an hour on two CPU cores) runs the longer study instead of step 5: every method, the oracle
diagnostic (`--oracle_masks true`: the true mask in place of the DDIM samples), the per-window prompt layout and full
fine-tuning, each for LONG["epochs"] passes over the train split at every learning rate of its grid, two runs at a
time on a multi-core CPU (`run_parallel`), with a val learning curve; per method the
learning rate with the best R@1 on the first LONG["select_items"] val expressions is kept (RUN/sweep holds all of
them, RUN/sweep.json the choice) and evaluated on the whole of val, testA and testB. testA and testB played no
part in the choice.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import torch

from . import evaluate, train_dit, train_prompts, train_vae
from .utils.checkpoint import fingerprint
from .utils.files import read_json, write_json, write_text
from .config import Preset
from .data.datasets import MaskDataset, RefExpDataset, collate
from .data.synthetic import ensure_synthetic
from .evaluate import LABELS, label_order, sample_seeds
from .utils.figures import plot_samples
from .metrics import results_table_markdown
from .pipeline import build_prompter, load_generator_parts, method_dir, stage_metrics, stage_path
from .utils.runtime import pick_device
from .vae import load_mask_vae

DEMO_METHODS = ("vpt", "textprompt", "diffprompt")

# the long study: two passes over the train split (758 steps of 16: where the true-mask oracle's val curve flattens),
# per method (name → prompt settings) a learning-rate grid; full fine-tuning gets its own. "windows" and
# "oracle-windows" are not the paper's: each Swin window's tokens come from the part of the mask under it
LONG = {"epochs": 2, "max_steps": 0, "select_items": 300, "val_every": 250,
        "methods": {"vpt": ({"method": "vpt"}, (1e-3, 3e-3)),
                    "textprompt": ({"method": "textprompt"}, (1e-3, 3e-3)),
                    "diffprompt": ({"method": "diffprompt"}, (1e-3, 3e-3)),
                    "windows": ({"method": "diffprompt", "prompt_layout": "windows"}, (1e-3, 3e-3)),
                    "oracle": ({"method": "diffprompt", "oracle_masks": True}, (1e-3, 3e-3)),
                    "oracle-windows": ({"method": "diffprompt", "oracle_masks": True, "prompt_layout": "windows"},
                                       (3e-3,)),
                    "full": ({"method": "full"}, (1e-5, 3e-5))}}


def _data_root(data: Path) -> Path:
    """The processed synthetic set: made under data's parent when `data` is a missing `.../processed` folder."""
    data = Path(data)
    if (data / "train.json").exists():
        return data
    return ensure_synthetic(data.parent if data.name == "processed" else data)


def main(preset: Preset, data: Path, out: Path, resume: bool = True, budget: str = "short") -> dict:
    if budget not in ("short", "long"):
        raise ValueError(f"--budget {budget!r}: choose short or long")
    if preset.name != "tiny":
        print(f"demo: preset {preset.name!r}: the demo is sized for the tiny preset; running it anyway")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.time()

    def timed(name, fn, *args):
        t0 = time.time()
        result = fn(*args)
        timings[name] = round(time.time() - t0, 1)
        print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)
        return result

    p = preset.prompt
    if bool(p.vae_weights) != bool(p.dit_weights):     # a DiT denoises the latents of the VAE it was trained with
        raise ValueError('--vae_weights and --dit_weights: give both (the DiT must come with its own Mask-VAE) or '
                         'set both to "" (the demo trains both)')
    root = timed("data", _data_root, data)
    for stage, name, train in (("vae", "stage 1 (Mask-VAE)", train_vae.main),
                               ("dit", "stage 2 (DiT)", train_dit.main)):
        given = getattr(p, f"{stage}_weights")
        if given:                                   # by default the shipped ones: measured on val, not trained
            timed(f"{name}: {given}, checked", check_stage, preset, root, out, stage, resume)
        else:                                       # "": the run folder's own, trained here
            timed(name, train, preset, root, out, resume)
    if budget == "long":
        timed("stage 3: the long study", long_study, preset, root, out, resume)
        preset.eval.max_items = 0                    # whole splits
    else:
        for method in DEMO_METHODS:
            preset.prompt.method = method
            timed(f"stage 3: {method}", train_prompts.main, preset, root, out, resume)
    preset.prompt.method = "diffprompt"
    results = timed("evaluation", evaluate.main, preset, root, out, resume)
    timed("report", write_report, preset, root, out, results, timings)
    total = round(time.time() - t_all, 1)
    print(f"[demo] total {total:.0f} s", flush=True)
    print(out.resolve(), flush=True)
    return results


def check_stage(preset: Preset, root: Path, out: Path, stage: str, resume: bool = True) -> dict:
    """A given Mask-VAE ("vae") or DiT ("dit") measured on val as its training command measured it: the VAE's
    reconstruction IoU on every val mask, the DiT's DDIM mask IoU (conditioned, shuffled conditions, shuffled
    captions) on the first `eval_items` val pairs. Kept in RUN/checks.json, reused while the files are the same."""
    path, record = stage_path(preset.prompt, out, stage), out / "checks.json"
    checks = read_json(record) if record.exists() else {}
    files = json.loads(json.dumps(fingerprint(path)))
    if resume and checks.get(stage, {}).get("files") == files:
        return checks[stage]
    device = pick_device(getattr(preset, "device", "auto"))
    if stage == "vae":
        val = train_vae.mask_loader(root, "val", preset.data.mask_size, preset.vae.batch_size, False,
                                    preset.vae.cache_masks, 0, device)
        measured = train_vae.evaluate(load_mask_vae(path).to(device), val, device)
    else:
        vae, dit, diffusion, encoder = load_generator_parts(preset, out)
        vae, dit, encoder = vae.to(device).eval(), dit.to(device).eval(), encoder.to(device)
        val = train_dit.encode_split(root, "val", preset, vae, encoder, device, max_items=preset.dit.eval_items)
        measured = train_dit.generation_metrics(dit, vae, diffusion, val, preset.dit, synthetic=preset.name == "tiny")
    checks[stage] = {**measured, "weights": getattr(preset.prompt, f"{stage}_weights"), "files": files}
    write_json(record, checks)
    print(f"[demo] {stage} ({checks[stage]['weights']}): val IoU {measured['val_iou']:.3f}", flush=True)
    return checks[stage]


def _train_one(preset: Preset, root: Path, out: Path, resume: bool, threads: int) -> float:
    """One stage-3 run in a worker process of `run_parallel`: its final val R@1."""
    torch.set_num_threads(threads)
    try:
        return train_prompts.main(preset, root, out, resume)["history"][-1]["val_R@1"]
    except FloatingPointError as e:         # a learning rate too high for the method: it takes no part in the choice
        print(f"[demo] {e}", flush=True)
        return float("nan")


def run_parallel(presets: list[Preset], root: Path, out: Path, resume: bool) -> list[float]:
    """Independent stage-3 runs, two at a time in worker processes on a CPU with two or more cores, each on half of
    the cores (small models keep one core busier than two threads keep two), one after another otherwise. Every
    run is the same computation either way: only the wall time changes."""
    jobs = 2 if (os.cpu_count() or 1) >= 2 and pick_device_type(presets[0]) == "cpu" else 1
    if jobs == 1:
        return [_train_one(p, root, out, resume, torch.get_num_threads()) for p in presets]
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_train_one, presets, *zip(*[(root, out, resume, threads)] * len(presets))))


def pick_device_type(preset: Preset) -> str:
    return pick_device(getattr(preset, "device", "auto")).type


def long_study(preset: Preset, root: Path, out: Path, resume: bool) -> dict:
    """Every method of LONG at every learning rate of its grid (in RUN/sweep), then the best one per method, chosen
    by R@1 on the first LONG["select_items"] val expressions, copied to RUN/prompts/<name> for the evaluation."""
    sweep, base, chosen = out / "sweep", preset.prompt, {}
    runs = [(name, settings, lr) for name, (settings, lrs) in LONG["methods"].items() for lr in lrs]
    presets = [dataclasses.replace(preset, prompt=dataclasses.replace(
        base, **settings, lr=lr, epochs=LONG["epochs"], max_steps=LONG["max_steps"], val_items=LONG["select_items"],
        val_every=LONG["val_every"], tag=f"{name}-lr{lr:g}",          # "" = OUT's stage, not RUN/sweep's
        **{f"{s}_weights": getattr(base, f"{s}_weights") or str(out / s) for s in ("glip", "vae", "dit")}))
        for name, settings, lr in runs]
    scores = run_parallel(presets, root, sweep, resume)
    for name, (settings, lrs) in LONG["methods"].items():
        mine = {lr: r for (n, _, lr), r in zip(runs, scores) if n == name}
        for lr, r in mine.items():
            print(f"[demo] {name} lr {lr:g}: val R@1 {r:.1f} (first {LONG['select_items']})", flush=True)
        finished = {lr: r for lr, r in mine.items() if r == r}
        if not finished:
            raise FloatingPointError(f"long study: {name} diverged at every learning rate of {lrs}")
        best = max(finished, key=finished.get)
        target = out / "prompts" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(method_dir(sweep, dataclasses.replace(base, **settings, tag=f"{name}-lr{best:g}")), target)
        chosen[name] = {"lr": best, "selection_R@1": mine}
    write_json(out / "sweep.json", {"epochs": LONG["epochs"], "select_items": LONG["select_items"], "chosen": chosen})
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# Report


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt  # late: matplotlib is needed only for the report's figures
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def figure_data(root: Path, preset: Preset, path: Path) -> None:
    ds = RefExpDataset(root, "val", preset.data.image_size, mask_size=preset.data.mask_size)
    _savefig(plot_samples(ds, n=6, seed=0), path)


@torch.no_grad()
def figure_vae(root: Path, preset: Preset, out: Path, path: Path) -> None:
    import matplotlib.pyplot as plt
    vae = load_mask_vae(stage_path(preset.prompt, out, "vae")).eval()
    ds = MaskDataset(root, "val", preset.data.mask_size)
    masks = torch.stack([ds[i]["mask"] for i in range(6)])
    recon = vae.decode(vae.encode(masks).mode())
    fig, axes = plt.subplots(2, 6, figsize=(12, 4.2))
    for j in range(6):
        axes[0, j].imshow(masks[j, 0], cmap="gray", vmin=0, vmax=1)
        axes[1, j].imshow(recon[j, 0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
    for a in axes.flat:
        a.set_axis_off()
    axes[0, 0].set_title("mask", fontsize=9, loc="left")
    axes[1, 0].set_title("VAE reconstruction (posterior mean)", fontsize=9, loc="left")
    _savefig(fig, path)


@torch.no_grad()
def figure_ddim_masks(root: Path, preset: Preset, out: Path, path: Path, n: int = 4) -> None:
    """Per expression: the image with its box, the true mask, and the decoded DDIM latent of every prompt layer."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    gen = build_prompter(preset, out).eval()    # preset.prompt is Diff-Prompt's here; its adapters go unused
    ds = RefExpDataset(root, "val", preset.data.image_size, mask_size=preset.data.mask_size)
    batch = collate([ds[i] for i in range(n)])
    masks = gen.sample_masks(batch["image"], batch["caption"], sample_seeds(batch["index"], preset.eval.seed))
    d = masks.shape[0]
    fig, axes = plt.subplots(n, d + 2, figsize=(1.9 * (d + 2), 2.0 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(batch["image"][i].permute(1, 2, 0))
        x1, y1, x2, y2 = batch["box"][i].tolist()
        axes[i, 0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.5))
        axes[i, 0].set_title(batch["caption"][i][:28], fontsize=7)
        axes[i, 1].imshow(batch["mask"][i, 0], cmap="gray", vmin=0, vmax=1)
        for layer in range(d):
            axes[i, 2 + layer].imshow(masks[layer, i, 0].clamp(0, 1), cmap="gray", vmin=0, vmax=1)
    axes[0, 1].set_title("true mask", fontsize=8)
    for layer in range(d):
        axes[0, 2 + layer].set_title(f"layer {layer}" + (" (x̂₀)" if layer == 0 else ""), fontsize=8)
    for a in axes.flat:
        a.set_axis_off()
    _savefig(fig, path)


def figure_curves(preset: Preset, out: Path, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, stage, title in zip(axes[:2], ("vae", "dit"), ("stage 1: Mask-VAE", "stage 2: DiT (MSE + VB)")):
        history = stage_metrics(preset.prompt, out, stage).get("history", [])
        if history:
            keys = ["loss"] if "loss" in history[0] else [k for k in history[0] if k.startswith("loss")]
            for k in keys:
                ax.plot([h["epoch"] for h in history], [h[k] for h in history], marker="o", ms=3, label=k)
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
    for folder in sorted((out / "prompts").glob("*")):
        metrics = folder / "metrics.json"
        steps = read_json(metrics).get("step_losses", []) if metrics.exists() else []
        if steps:
            k = max(1, len(steps) // 20)   # moving average over ~5 % of the steps
            smooth = [sum(steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1])
                      for i in range(len(steps))]
            axes[2].plot(range(1, len(steps) + 1), smooth, label=LABELS.get(folder.name, folder.name))
    axes[2].set_title("stage 3: grounding loss (frozen GLIP)", fontsize=9)
    axes[2].set_xlabel("optimiser step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)


def figure_results(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    splits = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / len(results)
    for k, (method, per_split) in enumerate(results.items()):
        xs = [i + k * width for i in range(len(splits))]
        ax.bar(xs, [per_split[s]["R@1"] for s in splits], width, label=LABELS.get(method, method))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(splits))], splits)
    ax.set_ylabel("R@1 (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    _savefig(fig, path)


def vs_table(table: dict) -> list[str]:
    """Report lines: Diff-Prompt minus every other method on every split, paired on the same expressions (± se)."""
    dp = table.get("diffprompt", {})
    others = [m for m in table if m != "diffprompt" and all(f"vs_{m}" in v for v in dp.values())]
    if not dp or not others:
        return []
    return ["Diff-Prompt minus each method, R@1 points on the same expressions (± the paired standard error; "
            "two standard errors or more is a difference the sample can tell):", "",
            "| Diff-Prompt minus | " + " | ".join(dp) + " |", "|---" * (len(dp) + 1) + "|",
            *[f"| {LABELS.get(m, m)} | " + " | ".join(f"{v[f'vs_{m}']['diff']:+.2f} ± {v[f'vs_{m}']['se']:.2f}"
                                                     for v in dp.values()) + " |" for m in others], ""]


def write_report(preset: Preset, root: Path, out: Path, results: dict, timings: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    figs = out / "figures"
    figs.mkdir(exist_ok=True)
    rounded = lambda d: {k: round(x, 2) for k, x in d.items()}   # noqa: E731
    table = {m: {s: {**rounded({k: v[k] for k in ("R@1", "R@5", "UB")}), "by_kind": rounded(v["by_kind"]),
                     **{k: rounded(x) for k, x in v.items() if k.startswith("vs_")}}
                 for s, v in per.items()} for m, per in sorted(results.items(), key=lambda kv: label_order(kv[0]))}
    write_json(out / "results.json", table)
    figure_data(root, preset, figs / "data_samples.png")
    figure_vae(root, preset, out, figs / "vae_reconstructions.png")
    figure_ddim_masks(root, preset, out, figs / "ddim_masks.png")
    figure_curves(preset, out, figs / "training_curves.png")
    figure_results(table, figs / "results.png")
    (figs / "qualitative.png").write_bytes((out / "eval" / "qualitative.png").read_bytes())
    stage = {s: stage_metrics(preset.prompt, out, s) for s in ("glip", "vae", "dit")}
    checks = read_json(out / "checks.json") if (out / "checks.json").exists() else {}
    given = {s: getattr(preset.prompt, f"{s}_weights") for s in ("vae", "dit")}
    measured = {s: {**stage[s], **checks.get(s, {})} if given[s] else stage[s] for s in ("vae", "dit")}
    origin = {s: (f"`{given[s]}`, made by `{stage[s].get('command', '?')}`, measured in this run" if given[s]
                  else "trained in this run") for s in ("vae", "dit")}
    prompts = {f.name: read_json(f / "metrics.json") for f in sorted((out / "prompts").glob("*"))
               if (f / "metrics.json").exists()}
    first = preset.eval.splits[0]
    sweep = read_json(out / "sweep.json") if (out / "sweep.json").exists() else None
    base, dp = table.get("zeroshot", {}), table.get("diffprompt", {})
    gain = {s: dp[s]["R@1"] - base[s]["R@1"] for s in dp if s in base}
    hit = "GIoU" if preset.eval.use_giou else "IoU"
    lines = [
        "# Diff-Prompt on the synthetic RefCOCO set (tiny preset)", "",
        f"Referring expression comprehension with a frozen tiny GLIP; a hit is {hit} ≥ {preset.eval.iou_threshold} "
        "with the ground-truth box. R@1: top box, R@5: top five, UB: any kept box. Every number is on a held-out "
        "split (val, testA: round shapes only, testB: angular shapes only); nothing is measured on train."
        + (f" The learning rate of every method was chosen on the first {sweep['select_items']} val expressions "
           "(sweep.json); testA and testB took no part in the choice." if sweep else ""), "",
        results_table_markdown({LABELS.get(m, m): v for m, v in table.items()}),
        "Diff-Prompt − zero-shot, R@1: " + ", ".join(f"{s} {g:+.2f}" for s, g in gain.items()) + " points.", "",
        f"R@1 on {first} by expression kind, and each method minus zero-shot on the same expressions (± the "
        "standard error of that paired difference):", "",
        results_table_markdown({LABELS.get(m, m): {**v[first]["by_kind"], **(
            {"minus zero-shot": v[first]["vs_zeroshot"]["diff"], "± se": v[first]["vs_zeroshot"]["se"]}
            if "vs_zeroshot" in v[first] else {})} for m, v in table.items()},
            metrics=(*table["zeroshot"][first]["by_kind"], "minus zero-shot", "± se")),
        *vs_table(table),
        "![R@1 per split](figures/results.png)", "",
        "## Trainable parameters (stage 3)", "",
        "| method | trainable parameters | steps | training time (s) |", "|---|---|---|---|",
        *[f"| {LABELS.get(m, m)} | {p['trainable_parameters']:,} | {len(p.get('step_losses', []))} | "
          f"{p['train_seconds']} |" for m, p in sorted(prompts.items(), key=lambda kv: label_order(kv[0]))], "",
        "## The stages", "",
        f"* Mask-VAE ({origin['vae']}): val IoU of the reconstructed masks "
        f"{measured['vae'].get('val_iou', float('nan')):.3f}.",
        f"* DiT ({origin['dit']}): IoU of DDIM-generated masks with the true mask on "
        f"{measured['dit'].get('val_items', '?')} val pairs {measured['dit'].get('val_iou', float('nan')):.3f} "
        f"(with shuffled conditions: {measured['dit'].get('val_iou_shuffled', float('nan')):.3f}; with shuffled "
        f"captions only: {measured['dit'].get('val_iou_caption_shuffled', float('nan')):.3f}; the x̂_0 of the "
        f"sampler's first step: {measured['dit'].get('val_iou_first_step', float('nan')):.3f}).",
        f"* Base GLIP ({preset.prompt.glip_weights or out / 'glip'}): held-out detection R@1 "
        f"{stage['glip'].get('detection_R@1', float('nan')):.1f}; zero-shot referring R@1 on val by kind: "
        + ", ".join(f"{k} {v:.1f}" for k, v in stage["glip"].get("referring_R@1", {}).items()) + ".", "",
        "![data](figures/data_samples.png)", "", "Data: validation samples (positive span in brackets).", "",
        "![VAE](figures/vae_reconstructions.png)", "", "Stage 1: masks and their reconstructions.", "",
        "![DDIM](figures/ddim_masks.png)", "",
        "Stage 3 input: the DDIM latents kept for each prompt layer, decoded by the VAE (layer 0 = the final "
        "sample x̂₀, deeper layers noisier), next to the true mask.", "",
        "![curves](figures/training_curves.png)", "",
        "Training curves of every stage (stages 1 and 2 as recorded when they were trained).", "",
        "![qualitative](figures/qualitative.png)", "",
        "The first val expressions that pick their object by position: each method's top box (dashed: the ground "
        "truth) and, in white, the mask the DiT generated for Diff-Prompt.", "",
        "## Time per stage (s)", "", "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in timings.items()], "",
    ]
    write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
