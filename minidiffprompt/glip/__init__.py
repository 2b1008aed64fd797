"""GLIP-T(A), the frozen base model: Swin-T (swin.py) + FPN (fpn.py) + DyHead (dyhead.py) + the grounding head and its
anchors, box coder and decoding (head.py), ATSS assignment and losses (atss.py), BERT (bert.py), assembled under the
official checkpoint's names in model.py (`GLIP`, `load_glip_checkpoint`).
"""
