"""The tiny preset's stand-ins for the downloaded pretrained parts: a small BERT (train_bert.py), the tiny GLIP
(train_glip.py), a small CLIP-like condition encoder (train_clip.py; its model is conditions.TinyCLIP) and the frozen
base's own evaluation (base_eval.py). Their shipped weights are in minidiffprompt/pretrained, checked against their
sha256 by utils/shipped.py.
"""
