"""minidiffprompt: a compact from-scratch implementation of Diff-Prompt (ICLR 2025)."""
__version__ = "0.1.0"
