"""The wheel: it builds, installs with --no-deps, and its public API imports without transformers."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What a vision user runs: the public API, with transformers and peft made unimportable.
USE = """
import sys
sys.modules["transformers"] = None  # any import of it now raises ImportError
sys.modules["peft"] = None
import torch
from torch import nn
import snake_flower
from snake_flower import SnakeStrategy, Task, make_client_app, segment_model, train_window
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
segments = segment_model(model)
SnakeStrategy(segments, window=1)
make_client_app(lambda: model, lambda context: [])
print(snake_flower.__file__)
"""


def test_wheel_installs_without_dependencies_and_imports_without_transformers(tmp_path):
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("snake_flower-*.whl"))
    # a fresh venv that sees this venv's packages through a .pth file (--system-site-packages
    # would only see the system's); the .pth files in here (the editable install) are not read
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    used = subprocess.run([str(python), "-c", USE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert used.returncode == 0, used.stderr[-2000:]
    assert used.stdout.strip().startswith(str(site)), used.stdout  # the wheel's copy, not the checkout
    listed = subprocess.run([str(python), "-m", "pip", "show", "-f", "snake-flower"], capture_output=True,
                            text=True, timeout=120).stdout
    assert "strategies/snake.py" in listed and "snake_flower/node.py" in listed
