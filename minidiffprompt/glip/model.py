"""GLIP-T(A): Swin-T + FPN + DyHead + ATSS grounding head + BERT, assembled under the checkpoint's names.

    glip = GLIP(GLIPConfig())                                   # or load_glip_checkpoint("glip_a_tiny_o365.pth")
    dets = glip.eval()(images01, ["a cat. a dog."], spans=[[[2, 5]]])   # [{"boxes": (K,4), "scores": (K,)}]
    losses = glip.train()(images01, captions, targets=[{"boxes": (G,4), "spans": [[[b, e]], ...]}])

Images are RGB in [0, 1] (B, 3, S, S); `glip_normalize` turns them into GLIP's BGR-255 input (`TO_BGR255` and
`PIXEL_MEAN/STD` in GLIP's `data/transforms/build.py`). Visual prompts (B, P, embed_dim) join Swin block g's
windows (swin.py), textual prompts (B, P, hidden) BERT layer i's input (bert.py). Module tree as GLIP's
`GeneralizedVLRCNN`: backbone.{body, fpn}, language_backbone.body.model, rpn.{head, anchor_generator}.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .atss import grounding_losses, loss_normalizers
from .bert import PromptedBert, build_bert, build_tokenizer, drop_legacy_bert_keys, tokenize
from ..utils.checkpoint import CheckpointMismatch, load_strict, read_state_dict
from ..utils.files import read_json
from ..config import GLIPConfig
from ..data.datasets import glip_normalize
from .fpn import FPN
from .head import AnchorGenerator, BoxCoder, GroundingHead, decode_detections
from .swin import SwinTransformer
from ..data.text import load_tokenizer, positive_map


class GroundingRPN(nn.Module):
    """`rpn`: the grounding head and the anchor generator (GLIP's RPN_ONLY detector has no ROI heads)."""

    def __init__(self, cfg: GLIPConfig):
        super().__init__()
        self.head = GroundingHead(cfg.fpn_channels, cfg.text_hidden, cfg.dyhead_blocks, cfg.gn_groups,
                                  cfg.num_cls_logits, num_levels=len(cfg.anchor_strides), sincos=cfg.head_sincos)
        self.anchor_generator = AnchorGenerator(cfg.anchor_strides, cfg.anchor_scale)


class GLIP(nn.Module):
    """The grounding detector: images + captions → ranked boxes (inference) or ATSS losses (training)."""

    def __init__(self, cfg: GLIPConfig | None = None, vocab_file=None):
        super().__init__()
        self.cfg = cfg = cfg or GLIPConfig()
        self.vocab_file = vocab_file = vocab_file or cfg.text_vocab or None
        swin = SwinTransformer(cfg.patch_size, cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size,
                               drop_path_rate=cfg.drop_path_rate, ape_grid=cfg.swin_ape,
                               sincos=cfg.swin_sincos)
        fpn = FPN(swin.num_features[1:], cfg.fpn_channels, drop_block_prob=cfg.fpn_drop_block,
                  sincos=cfg.fpn_sincos)
        self.backbone = nn.Sequential(OrderedDict(body=swin, fpn=fpn))
        self.language_backbone = nn.Sequential(OrderedDict(body=PromptedBert(build_bert(cfg, vocab_file))))
        self.rpn = GroundingRPN(cfg)
        self.box_coder = BoxCoder()
        # None: a part whose parameters are all frozen stays in eval mode under .train(); True: all parts do
        self.frozen: bool | None = None
        self._tokenizer = None

    # ------------------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """uncased WordPiece: bert-base-uncased from the HF cache (paper) or the data's vocab.txt (tiny)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.cfg) if self.cfg.text_model else load_tokenizer(self.vocab_file)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        self._tokenizer = tok

    def train(self, mode: bool = True):
        """nn.Module.train, then frozen parts back to eval: no DropPath/DropBlock/dropout in them.

        The authors' `GeneralizedVLRCNN.train` (`GLIP/maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`)
        does the same with prompts on: Swin, FPN, head and BERT run exactly as at inference while prompts train.
        """
        super().train(mode)
        if mode:
            for part in (self.backbone.body, self.backbone.fpn, self.language_backbone, self.rpn.head):
                if self.frozen or (self.frozen is None and not any(p.requires_grad for p in part.parameters())):
                    part.eval()
        return self

    def encode_text(self, captions: list[str], textual_prompts=None, device=None):
        """(embedded (B, T, H) with padding rows zeroed, attention mask (B, T)) (GLIP's `BertEncoder`)."""
        ids, mask = tokenize(self.tokenizer, captions, self.cfg.max_query_len, device=device)
        hidden = self.language_backbone.body(ids, mask, textual_prompts)
        return hidden * mask[..., None].to(hidden.dtype), mask

    def token_map(self, caption: str, spans) -> torch.Tensor:
        """(T,) binary positive map of the character spans (`text.positive_map`)."""
        return positive_map(self.tokenizer, caption, spans, self.cfg.max_query_len)

    def forward(self, images01: torch.Tensor, captions: list[str], targets: list[dict] | None = None,
                visual_prompts=None, textual_prompts=None, spans=None, normalizers=None):
        """images01 (B, 3, S, S) RGB in [0, 1]; captions: B strings.

        targets (training): per image {"boxes": (G, 4) xyxy in the S×S frame, "spans": per box a list of [b, e)}
        → {"loss_token", "loss_reg", "loss_centerness"}; `normalizers`: see `atss.grounding_losses`.
        Otherwise → per image {"boxes": (K, 4), "scores": (K,)}, best first, K ≤ detections_per_img; `spans`
        (per image a list of [b, e) of the phrase) pick the tokens whose mean probability scores a box
        (GLIP's `SCORE_AGG` MEAN); None, or spans that hit no token, use every caption token except [CLS]/[SEP].
        """
        cfg, device = self.cfg, images01.device
        if len(captions) != images01.shape[0]:
            raise ValueError(f"GLIP.forward: {images01.shape[0]} images but {len(captions)} captions")
        embedded, mask = self.encode_text(list(captions), textual_prompts, device)     # (B, T, H), (B, T)
        feats = self.backbone.fpn(self.backbone.body(glip_normalize(images01), visual_prompts))  # P3..P7
        out = self.rpn.head(feats, embedded)
        anchors = self.rpn.anchor_generator(out["sizes"])                               # per level (A_l, 4)
        if targets is not None:
            gt_boxes = [t["boxes"].to(device).float().reshape(-1, 4) for t in targets]
            gt_tokens = [torch.stack([self.token_map(c, s) for s in t["spans"]]).to(device)
                         if len(t["spans"]) else torch.zeros(0, cfg.max_query_len, device=device)
                         for c, t in zip(captions, targets)]                            # (G, T) each
            return grounding_losses(out, anchors, gt_boxes, gt_tokens, mask, self.box_coder, cfg.atss_topk,
                                    normalizers=normalizers)
        token_masks = self._phrase_tokens(captions, spans, mask)
        return decode_detections(out, anchors, token_masks, tuple(images01.shape[-2:]), self.box_coder,
                                 cfg.inference_th, cfg.pre_nms_top_n, cfg.nms_th, cfg.detections_per_img,
                                 cfg.nms_rule)

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(H_l, W_l) of P3..P7 for an image, without running the network: the patch embedding pads to a multiple
        of the patch, each Swin patch merging and the stride-2 3×3 convolutions of P6, P7 round up."""
        up = lambda n, k: -(-n // k)   # noqa: E731   ceil(n / k)
        h, w = up(height, self.cfg.patch_size), up(width, self.cfg.patch_size)
        sizes = []
        for _ in range(5):
            h, w = up(h, 2), up(w, 2)
            sizes.append((h, w))
        return sizes

    def loss_normalizers(self, targets: list[dict], height: int, width: int) -> torch.Tensor:
        """(positives, centerness-target sum) of `targets` (as `forward` takes them) on height × width images,
        counted without a forward pass (`atss.loss_normalizers`)."""
        anchors = self.rpn.anchor_generator(self.feature_sizes(height, width))
        boxes = [t["boxes"].float().reshape(-1, 4) for t in targets]
        return loss_normalizers(anchors, boxes, self.box_coder, self.cfg.atss_topk)

    def _phrase_tokens(self, captions, spans, mask) -> torch.Tensor:
        real = mask.bool().clone()
        real[:, 0] = False                                                 # [CLS]
        real[torch.arange(len(captions)), mask.sum(1) - 1] = False         # [SEP]
        if spans is None:
            return real
        rows = []
        for b, (c, s) in enumerate(zip(captions, spans)):
            row = self.token_map(c, s).to(mask.device).bool() if s is not None and len(s) else None
            rows.append(row if row is not None and row.any() else real[b])
        return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# Loading


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def glip_config_from_dict(d: dict) -> GLIPConfig:
    fields = {f.name for f in dataclasses.fields(GLIPConfig)}
    return GLIPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def reconcile_glip_state_dict(obj: dict) -> dict:
    """Official GLIP checkpoint → our names: take ["model"], strip `module.`, drop BERT's position_ids/pooler.

    Everything else has the official names; `bert.drop_legacy_bert_keys` says why the two BERT extras may be there.
    """
    state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    state, _ = drop_legacy_bert_keys(state)
    return state


def load_glip_checkpoint(path, cfg: GLIPConfig | None = None, vocab_file=None) -> GLIP:
    """A GLIP with strictly loaded weights.

    `path` is a run folder written by `train_glip` (model.safetensors + config.json + vocab.txt; its config wins
    over `cfg` for the architecture) or an official checkpoint file such as `glip_a_tiny_o365.pth` (built with
    `cfg`, default the paper's GLIP-T(A)). `cls_logits` is built with the checkpoint's channel count (unused).
    """
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if config_file.exists():
            saved = read_json(config_file)
            cfg = glip_config_from_dict(saved.get("glip", saved))
        vocab_file = vocab_file or (path / "vocab.txt" if (path / "vocab.txt").exists() else None)
        obj = read_state_dict(path)
    else:
        obj = read_state_dict(path)
    cfg = dataclasses.replace(cfg or GLIPConfig())
    state = reconcile_glip_state_dict(obj)
    if "rpn.head.cls_logits.weight" in state:
        cfg.num_cls_logits = int(state["rpn.head.cls_logits.weight"].shape[0])
    if not cfg.text_model and vocab_file is None and not cfg.text_vocab:
        raise FileNotFoundError(f"{path}: a small-BERT GLIP needs its vocab.txt (next to the weights, or pass "
                                "vocab_file=)")
    model = GLIP(cfg, vocab_file=vocab_file)
    own = model.state_dict()
    # deterministic buffers (relative_position_index, cell_anchors) may be left out of a checkpoint: recompute them
    for k, v in own.items():
        if k not in state and (k.endswith("relative_position_index") or ".cell_anchors." in k):
            state[k] = v
    try:
        load_strict(model, state, source=str(path))
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{e}\n  GLIP config used: {dataclasses.asdict(cfg)}") from None
    return model
