"""The package's shape: a library that stands without its training app's dependencies."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import lowrank_kernels

PKG = Path(lowrank_kernels.__file__).parent


def test_top_level_holds_at_most_twelve_modules():
    modules = sorted(p.name for p in PKG.glob("*.py"))
    assert len(modules) <= 12, modules


def test_library_imports_without_the_app_extras():
    """Every library module imports, and the main APIs run, with the app's extras unavailable."""
    library = sorted(m.name for m in pkgutil.walk_packages([str(PKG)], "lowrank_kernels.")
                     if not m.name.startswith("lowrank_kernels.app")
                     # the HF Trainer callback needs transformers, whose hub client itself needs pyyaml
                     and m.name != "lowrank_kernels.rank.callback")
    assert "lowrank_kernels.q3r.optim" in library and "lowrank_kernels.rank.controller" in library
    code = f"""
import sys
for blocked in ("sklearn", "matplotlib", "yaml"):
    sys.modules[blocked] = None  # import of it raises ImportError
import importlib, torch
for name in {library!r}:
    importlib.import_module(name)
assert not any(m.startswith("lowrank_kernels.app") for m in sys.modules), "the library imported the app"
from lowrank_kernels import AdamQ3R, extract_linear, ops
from lowrank_kernels.nn import replace_linear
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
opt = AdamQ3R(model.parameters(), extract_linear(model), target_rank=2, lmbda=0.1)
model(torch.randn(3, 8)).sum().backward()
opt.step()
replace_linear(model, 2)
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


def test_the_library_never_imports_the_app():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if rel.parts[0] == "app":
            continue
        if re.search(r"^\s*(from|import)\s+(\.+app\b|lowrank_kernels\.app\b)", path.read_text(), re.MULTILINE):
            offenders.append(str(rel))
    assert not offenders, offenders
