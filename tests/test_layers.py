"""The package's modules form floors, and no module imports one on a floor above its own (function-level imports
included): tooling, data, the models, the frozen GLIP, the DiT's condition encoders, prompting, evaluation, the
stage commands, the tiny stand-ins' recipes, and the entry points on top."""
import ast
from pathlib import Path

import minidiffprompt

PACKAGE = Path(minidiffprompt.__file__).parent
FLOORS = [
    ("config", "utils"),                                    # settings and tooling
    ("data",),                                              # datasets, conversion, text
    ("vae", "diffusion", "adapters", "dit", "metrics"),     # the from-scratch models and the metrics
    ("glip",),                                              # the frozen base
    ("conditions",),                                        # the DiT's condition encoders (one reads GLIP's Swin)
    ("prompting", "pipeline"),                              # stage 3's prompts and a run folder's parts
    ("evaluate",),
    ("train_vae", "train_dit", "train_prompts"),            # the stage commands
    ("pretrain",),                                          # the tiny stand-ins' recipes and the base's evaluation
    ("demo", "bench", "__main__"),                          # entry points
]


def floor(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(FLOORS) if top in names)


def imports(path: Path, source: str | None = None) -> set[str]:
    """The package modules `path` (or `source` in its place) imports anywhere in the file, as dotted names relative
    to the package."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts[:-1])                            # the importing module's package
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = parts[:len(parts) - (node.level - 1)]
            if node.module:
                found.add(".".join(base + [node.module]))
            else:                                           # from . import train_vae
                found.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minidiffprompt."):
            found.add(node.module.split(".", 1)[1])
    return found


def test_every_module_has_a_floor():
    modules = [".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")]
    assert [m for m in modules if m != "__init__" and not any(m.split(".")[0] in f for f in FLOORS)] == []


def test_no_module_imports_one_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":
            continue
        for target in imports(path):
            if target and floor(target) > floor(module):
                upward.append(f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})")
    assert upward == []


def test_the_check_sees_an_upward_import():
    """The test above can fail: a data module that imported the evaluation inside a function would be reported."""
    path = PACKAGE / "data" / "datasets.py"
    source = path.read_text() + "\n\ndef late():\n    from ..evaluate import LABELS\n"
    assert "evaluate" not in imports(path) and "evaluate" in imports(path, source)
    assert floor("evaluate") > floor("data.datasets")
