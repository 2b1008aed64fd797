"""The tiny preset's stand-ins for the downloaded pretrained parts: a small BERT (train_bert.py), the tiny GLIP
(train_glip.py), a small CLIP-like condition encoder (train_clip.py), the frozen base's own evaluation
(base_eval.py) and the shipped weights with their sha256 checks (shipped.py; files in minidiffprompt/pretrained).
"""
