"""Stage-3 training: a paper-size Diff-Prompt step back-propagates GLIP's grounding loss into the adapters only;
the harness trains, resumes and evaluates reproducibly on a tiny synthetic set."""
import dataclasses
import time

import pytest
import torch

from minidiffprompt.conditions import TinyConditionEncoder
from minidiffprompt.config import GLIPConfig, PromptConfig
from minidiffprompt.data.datasets import glip_normalize
from minidiffprompt.diffusion import GaussianDiffusion, get_betas
from minidiffprompt.dit import DiT
from minidiffprompt.glip.model import GLIP
from minidiffprompt.prompting import DiffPromptGenerator, count_trainable
from minidiffprompt.train_prompts import prompt_loss
from minidiffprompt.vae import MaskVAE

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "small", "circle", "leftmost", "blue",
         "square", "big", "star", "of", "left"]


@pytest.mark.slow
def test_paper_size_step_updates_only_the_adapters(tmp_path):
    """GLIP-T(A), DiT-My/2 and the Mask-VAE at paper size with random weights, batch 2 at 224², on CPU."""
    torch.manual_seed(0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    # BERT-base-sized text encoder; only its vocabulary is small (no download in tests)
    glip = GLIP(dataclasses.replace(GLIPConfig(), text_model="", text_vocab=str(vocab)))
    cfg = PromptConfig()                                  # depth 9, length 8, 25 DDIM steps
    gen = DiffPromptGenerator(MaskVAE(), DiT(), GaussianDiffusion(get_betas("squaredcos_cap_v2", 100)),
                              TinyConditionEncoder(dim=512), cfg, vision_dim=96, text_dim=768, mask_size=224)
    for p in glip.parameters():
        p.requires_grad_(False)
    glip.train()                                          # frozen parts fall back to eval mode (as the authors' code)
    gen.train()
    assert count_trainable(gen) == 21_907_072 and count_trainable(glip) == 0
    assert not glip.backbone.body.training and not gen.dit.training
    captions = ["the small red circle", "the leftmost blue square"]
    batch = {"image": torch.rand(2, 3, 224, 224), "caption": captions, "spans": [[[4, 20]], [[13, 24]]],
             "box": torch.tensor([[20.0, 30.0, 90.0, 100.0], [120.0, 40.0, 200.0, 150.0]]),
             "size": [(640, 480), (500, 375)]}
    t0 = time.time()
    loss, parts = prompt_loss(glip, gen, batch, torch.device("cpu"))
    loss.backward()
    print(f"paper-size stage-3 step: {time.time() - t0:.1f}s, losses {parts}")
    assert set(parts) == {"loss_token", "loss_reg", "loss_centerness"} and torch.isfinite(loss)
    trainable = {n: p for n, p in gen.named_parameters() if p.requires_grad}
    assert all(p.grad is not None for p in trainable.values()), [n for n, p in trainable.items() if p.grad is None]
    # the generated tokens and the global tokens of every layer receive gradient
    assert gen.dit2vision.model[0].weight.grad.abs().sum() > 0 and gen.dit2language.model[11].weight.grad.abs().sum() > 0
    assert all(gen.dit2vision.global_prompt[d].prompt.grad.abs().sum() > 0 for d in range(9))
    assert all(gen.dit2language.global_prompt[d].prompt.grad.abs().sum() > 0 for d in range(9))
    frozen = [(n, p) for m in (glip, gen.dit, gen.vae) for n, p in m.named_parameters()]
    assert frozen and all(p.grad is None for _, p in frozen)


# ----------------------------------------------------------------------------------------------------------------
# The harness on a few synthetic images, with random stage-1/2 models and a random tiny GLIP


def make_run(tmp_path):
    """A run folder with randomly initialised vae/, dit/ and glip/ stages, and a small synthetic data root."""
    import json
    import shutil
    from minidiffprompt.utils.checkpoint import save_weights
    from minidiffprompt.config import get_preset
    from minidiffprompt.dit import dit_from_config
    from minidiffprompt.data.synthetic import ensure_synthetic
    from minidiffprompt.vae import diffusers_config
    from minidiffprompt.train_vae import build_vae
    data = ensure_synthetic(tmp_path / "synth", images=30, log=lambda *a: None)
    preset = get_preset("tiny")
    out = tmp_path / "run"
    torch.manual_seed(0)
    vae = build_vae(preset.vae)
    save_weights(vae.state_dict(), out / "vae" / "model.safetensors")
    (out / "vae" / "config.json").write_text(json.dumps(diffusers_config(vae)))
    dit = dit_from_config(preset.dit)
    for p in dit.parameters():   # adaLN-Zero would make ε̂ = 0: perturb so the masks depend on the condition
        torch.nn.init.normal_(p, std=0.02)
    save_weights(dit.state_dict(), out / "dit" / "model.safetensors")
    glip = GLIP(dataclasses.replace(preset.glip, text_vocab=str(data / "vocab.txt")))
    save_weights(glip.state_dict(), out / "glip" / "model.safetensors")
    (out / "glip" / "config.json").write_text(json.dumps({"glip": dataclasses.asdict(preset.glip)}))
    shutil.copyfile(data / "vocab.txt", out / "glip" / "vocab.txt")
    preset.prompt = dataclasses.replace(preset.prompt, epochs=1, max_steps=2, batch_size=8, micro_batch=4,
                                        glip_weights="", vae_weights="", dit_weights="")   # "": this run's stages
    preset.eval = dataclasses.replace(preset.eval, batch_size=8, max_items=6)
    return preset, data, out


def test_tiny_harness_trains_resumes_and_evaluates_reproducibly(tmp_path, monkeypatch):
    from minidiffprompt import evaluate, pipeline, train_prompts
    monkeypatch.setenv("MDP_QUIET", "1")
    preset, data, out = make_run(tmp_path)
    metrics = train_prompts.main(preset, data, out)
    folder = out / "prompts" / "diffprompt"
    assert len(metrics["step_losses"]) == 2 and all(l == l for l in metrics["step_losses"])   # finite
    assert metrics["trainable_parameters"] == count_trainable(pipeline.build_prompter(preset, out))
    assert all((folder / f).exists() for f in ("checkpoint.pt", "model.safetensors", "config.json", "metrics.json"))
    assert train_prompts.main(preset, data, out) == metrics                       # finished: reused, not retrained
    preset.prompt = dataclasses.replace(preset.prompt, method="vpt", val_items=4, val_every=1)
    checks = []
    evaluate_split = evaluate.evaluate_split                     # train_prompts imports it from there at each run
    monkeypatch.setattr(evaluate, "evaluate_split", lambda *a, **k: checks.append(1) or evaluate_split(*a, **k))
    vpt = train_prompts.main(preset, data, out)
    assert vpt["trainable_parameters"] == preset.prompt.depth * preset.prompt.length * preset.glip.embed_dim
    assert [p["step"] for p in vpt["val_curve"]] == [1, 2] and vpt["history"][-1]["val_R@1"] >= 0   # the curve
    assert len(checks) == 2     # step 2 ends the epoch: its curve point is the epoch's val R@1, not a third check
    assert vpt["history"][-1]["val_R@1"] == vpt["val_curve"][-1]["val_R@1"]
    monkeypatch.setattr(evaluate, "evaluate_split", evaluate_split)
    preset.prompt = dataclasses.replace(preset.prompt, val_items=0, val_every=0)
    preset.prompt = dataclasses.replace(preset.prompt, method="diffprompt", oracle_masks=True, tag="oracle")
    assert len(train_prompts.main(preset, data, out)["step_losses"]) == 2      # true masks, no DDIM
    first = evaluate.main(preset, data, out, resume=False)
    second = evaluate.main(preset, data, out, resume=False)
    assert set(first) == {"zeroshot", "diffprompt", "diffprompt-oracle", "vpt"} and set(first["diffprompt"]) == {"val", "testA", "testB"}
    assert first == second                                                        # same seed, same numbers
    val = first["vpt"]["val"]
    assert set(val["by_kind"]) <= {"attribute", "extreme", "relation", "all"}
    assert abs(val["by_kind"]["all"] - val["R@1"]) < 1e-4
    assert abs(val["vs_zeroshot"]["diff"] - (val["R@1"] - first["zeroshot"]["val"]["R@1"])) < 1e-4
    dp = first["diffprompt"]["val"]                  # Diff-Prompt against every other method, on the same items
    assert {k for k in dp if k.startswith("vs_")} == {"vs_zeroshot", "vs_vpt", "vs_diffprompt-oracle"}
    assert abs(dp["vs_vpt"]["diff"] - (dp["R@1"] - val["R@1"])) < 1e-4 and "vs_vpt" not in val
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("the evaluation cache missed"))
    assert evaluate.main(preset, data, out) == first                              # every method from its cache
    assert (out / "eval" / "results.md").exists() and (out / "eval" / "qualitative.png").exists()


def test_trained_text_prompts_change_the_token_features_and_the_scores(tmp_path):
    """A few steps of the deep text-prompt baseline on the shipped GLIP move the prompts, the caption's token
    features and the region-token scores away from zero-shot's (the baseline is not a no-op)."""
    from minidiffprompt.data.datasets import RefExpDataset, collate
    from minidiffprompt.glip.model import load_glip_checkpoint
    from minidiffprompt.prompting import LearnablePrompts, freeze
    from minidiffprompt.utils.shipped import shipped
    from minidiffprompt.data.synthetic import ensure_synthetic
    torch.manual_seed(0)
    data = ensure_synthetic(tmp_path / "synth", images=30, log=lambda *a: None)
    glip = freeze(load_glip_checkpoint(shipped("tiny_glip")))
    prompts = LearnablePrompts(depth=4, length=8, text_dim=glip.cfg.text_hidden)
    start = [p.detach().clone() for p in prompts.parameters()]
    batch = collate([RefExpDataset(data, "train", 96)[i] for i in range(8)])
    opt = torch.optim.AdamW(prompts.parameters(), lr=3e-3)
    for _ in range(5):
        loss, _ = prompt_loss(glip, prompts, batch, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(start, prompts.parameters()))
    with torch.no_grad():
        plain, mask = glip.encode_text(batch["caption"])
        _, textual = prompts(batch["image"])
        prompted, _ = glip.encode_text(batch["caption"], textual)
        real = mask.bool()
        change = (prompted - plain)[real].norm(dim=-1) / plain[real].norm(dim=-1)
        assert change.mean() > 1e-2                               # every real token's feature moved
        feats = glip.backbone.fpn(glip.backbone.body(glip_normalize(batch["image"])))
        s0 = glip.rpn.head(feats, plain)["logits"]
        s1 = glip.rpn.head(feats, prompted)["logits"]
        assert (s1 - s0)[real[:, None, :].expand_as(s0)].abs().max() > 1e-2


def test_accumulated_micro_batches_give_the_whole_batchs_gradient():
    """One batch of 8 and 4 micro batches of 2 with accumulation (the trainer's `step_normalizers`, loss ÷ accum)
    give the same gradient: GLIP normalises by the whole batch's positives and centerness sum, not each micro
    batch's. Full fine-tuning of a random tiny GLIP on non-square originals; dropout off so both runs see the same
    network."""
    from minidiffprompt.config import get_preset
    from minidiffprompt.utils.shipped import shipped
    from minidiffprompt.train_prompts import chunks, step_normalizers
    torch.manual_seed(0)
    glip = GLIP(get_preset("tiny").glip, vocab_file=shipped("tiny_glip") / "vocab.txt").eval()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(8, 2, generator=g) * 50
    batch = {"image": torch.rand(8, 3, 96, 96, generator=g), "caption": ["the small red circle"] * 8,
             "spans": [[[4, 20]]] * 8, "box": torch.cat([xy, xy + 12 + torch.rand(8, 2, generator=g) * 30], 1),
             "size": [(640, 480), (300, 500)] * 4}
    cpu = torch.device("cpu")

    def gradient(accum: int) -> torch.Tensor:
        glip.zero_grad()
        micro = [{k: v[i:i + 8 // accum] for k, v in batch.items()} for i in range(0, 8, 8 // accum)]
        for group in chunks(micro, accum):
            normalizers = step_normalizers(glip, group, accum)
            for b in group:
                (prompt_loss(glip, None, b, cpu, normalizers)[0] / accum).backward()
        return torch.cat([p.grad.flatten() for p in glip.parameters() if p.grad is not None])

    whole, accumulated = gradient(1), gradient(4)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    # each micro batch normalised by its own counts (no `normalizers`) gives another gradient
    glip.zero_grad()
    for i in range(0, 8, 2):
        (prompt_loss(glip, None, {k: v[i:i + 2] for k, v in batch.items()}, cpu)[0] / 4).backward()
    own = torch.cat([p.grad.flatten() for p in glip.parameters() if p.grad is not None])
    assert (own - whole).norm() > 1e-3 * whole.norm()


def test_the_long_study_keeps_each_methods_best_learning_rate(tmp_path, monkeypatch):
    """`demo --budget long` in miniature: two methods × two learning rates, one step each; the copy in
    RUN/prompts/<name> is the run whose selection R@1 is the highest, and sweep.json says which."""
    import json
    from minidiffprompt import demo
    monkeypatch.setenv("MDP_QUIET", "1")
    preset, data, out = make_run(tmp_path)
    monkeypatch.setattr(demo, "LONG", {"epochs": 1, "max_steps": 1, "select_items": 4, "val_every": 1, "methods": {
        "vpt": ({"method": "vpt"}, (1e-3, 1e-1)),
        "oracle": ({"method": "diffprompt", "oracle_masks": True}, (1e-3, 1e-1))}})
    chosen = demo.long_study(preset, data, out, resume=True)
    assert json.loads((out / "sweep.json").read_text())["chosen"] == json.loads(json.dumps(chosen))
    for name, c in chosen.items():
        scores = {float(k): v for k, v in c["selection_R@1"].items()}
        assert c["lr"] == max(scores, key=scores.get)
        saved = json.loads((out / "prompts" / name / "config.json").read_text())["prompt"]
        assert saved["lr"] == c["lr"] and saved["max_steps"] == 1
    assert preset.prompt.method == "diffprompt" and preset.prompt.tag == ""          # the preset is restored


def test_a_dit_trained_with_another_parameterisation_is_refused(tmp_path):
    import json
    from minidiffprompt import pipeline, train_dit
    preset, _, out = make_run(tmp_path)
    assert preset.dit.prediction == "v"
    eps = dataclasses.replace(preset, dit=dataclasses.replace(preset.dit, prediction="eps"))
    (out / "dit" / "config.json").write_text(json.dumps({"train": train_dit.run_config(eps)}))   # as train-dit writes it
    with pytest.raises(SystemExit, match="--prediction eps"):
        pipeline.load_generator_parts(preset, out)
    preset.dit = dataclasses.replace(preset.dit, prediction="eps")
    assert pipeline.load_generator_parts(preset, out)[2].prediction == "eps"


def test_the_demo_measures_the_stages_it_is_given_and_reuses_the_measurement(tmp_path, monkeypatch):
    """Given (not trained) stages 1–2, `demo.check_stage` measures them as `train-dit` and `train-vae` do, keeps the
    figures in RUN/checks.json, reuses them while the files are unchanged and measures again when they change."""
    from minidiffprompt import demo, pipeline, train_dit, train_vae
    from minidiffprompt.vae import load_mask_vae
    monkeypatch.setenv("MDP_QUIET", "1")
    preset, data, run = make_run(tmp_path)
    preset.prompt = dataclasses.replace(preset.prompt, vae_weights=str(run / "vae"), dit_weights=str(run / "dit"))
    preset.dit = dataclasses.replace(preset.dit, eval_items=6)
    out = tmp_path / "demo"
    out.mkdir()
    got = demo.check_stage(preset, data, out, "dit")
    vae, dit, diffusion, encoder = pipeline.load_generator_parts(preset, out)
    val = train_dit.encode_split(data, "val", preset, vae, encoder, "cpu", max_items=6)
    from minidiffprompt.data.synthetic import expression_kind
    want = train_dit.evaluate_generation(dit.eval(), vae.eval(), diffusion, val, num_steps=preset.dit.ddim_steps,
                                         kinds=[expression_kind(c) for c in val["caption"]])
    assert set(want["hit50"]) <= {"attribute", "extreme", "relation", "all"} and 0 <= want["hit50"]["all"] <= 100
    assert {k: got[f"val_{k}"] for k in want} == want and got["weights"] == str(run / "dit")
    val_masks = train_vae.mask_loader(data, "val", preset.data.mask_size, preset.vae.batch_size, False,
                                      preset.vae.cache_masks, 0, torch.device("cpu"))
    assert demo.check_stage(preset, data, out, "vae")["val_iou"] == \
        train_vae.evaluate(load_mask_vae(run / "vae"), val_masks, torch.device("cpu"))["val_iou"]

    def measured_again(*args, **kwargs):
        raise RuntimeError("measured again")
    monkeypatch.setattr(train_dit, "evaluate_generation", measured_again)
    assert demo.check_stage(preset, data, out, "dit") == got                          # reused from checks.json
    weights = run / "dit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")                      # other files: measured again
    with pytest.raises(RuntimeError, match="measured again"):
        demo.check_stage(preset, data, out, "dit")


@pytest.mark.parametrize("trained", ["vae", "dit"])
def test_the_demo_takes_or_trains_the_mask_vae_and_the_dit_together(tmp_path, trained):
    from minidiffprompt import demo
    from minidiffprompt.config import get_preset
    preset = get_preset("tiny")
    setattr(preset.prompt, f"{trained}_weights", "")                # the other one stays the shipped one
    with pytest.raises(ValueError, match="give both"):
        demo.main(preset, tmp_path / "data", tmp_path / "run")
    assert not (tmp_path / "data").exists()                         # refused before any work


def test_val_checks_leave_the_training_trajectory_alone(tmp_path, monkeypatch):
    """Diff-Prompt trains on fresh DDIM noise from the global generator; the learning curve's val checks must not
    draw from it, so that a run with `--val_every` trains the same weights as one without."""
    from minidiffprompt import train_prompts
    from minidiffprompt.utils.checkpoint import read_state_dict
    monkeypatch.setenv("MDP_QUIET", "1")
    preset, data, out = make_run(tmp_path)
    preset.prompt = dataclasses.replace(preset.prompt, max_steps=3, batch_size=4, micro_batch=4)
    train_prompts.main(preset, data, out)
    preset.prompt = dataclasses.replace(preset.prompt, val_items=4, val_every=1, tag="curve")
    assert len(train_prompts.main(preset, data, out)["val_curve"]) == 3
    plain = read_state_dict(out / "prompts" / "diffprompt" / "model.safetensors")
    curve = read_state_dict(out / "prompts" / "diffprompt-curve" / "model.safetensors")
    assert plain.keys() == curve.keys() and all(torch.equal(plain[k], curve[k]) for k in plain)


def test_agreement_counts_mask_hits_where_the_base_misses_and_where_it_hits():
    """Six items, two kinds, counted by hand: the masks hit 2 of the 3 items the base misses and 1 of the 3 it hits."""
    from minidiffprompt.evaluate import agreement
    mask = torch.tensor([1, 1, 0, 0, 1, 0])
    base = torch.tensor([0, 0, 0, 1, 1, 1])
    kinds = ["extreme", "extreme", "attribute", "attribute", "extreme", "attribute"]
    got = agreement(mask, base, kinds)
    assert got["all"] == {"n": 6, "mask": 50.0, "base": 50.0, "mask_where_base_misses": pytest.approx(200 / 3),
                          "mask_where_base_hits": pytest.approx(100 / 3)}
    assert got["extreme"]["mask_where_base_misses"] == 100.0 and got["extreme"]["mask_where_base_hits"] == 100.0
    assert got["attribute"]["mask"] == 0.0 and got["attribute"]["n"] == 3
