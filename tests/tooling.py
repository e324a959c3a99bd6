"""What many tests share: running one of the project's tools as a user does, and writing a checkpoint
through the project's own writer (helpers.runs.checkpoint_dict), so that no test spells the format by hand."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The tools in tools/ run as modules from the root (`python -m tools.cris`); the rest are root scripts.
MODULES = {"ablation.py": "tools.ablation", "agree.py": "tools.agree", "benchmark.py": "tools.benchmark",
           "cris.py": "tools.cris", "export.py": "tools.export", "render_notebooks.py": "tools.render_notebooks"}


def command(script, *args) -> list:
    """The argv that runs a tool as README shows it: `script` is a root script ("train.py"), a tool's
    short name ("cris.py" -> -m tools.cris) or any path; args are turned into strings."""
    script = str(script)
    head = ["-m", MODULES[script]] if script in MODULES else [script]
    return [sys.executable, *head, *map(str, args)]


def tool_env(extra=None) -> dict:
    """The environment a tool runs in: the root importable from any folder, one thread (2-core CI)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra or {})}


def run_tool(script, *args, cwd=ROOT, timeout=300, env=None, check=False, **kwargs):
    """Run a tool to its end and return the CompletedProcess (text output captured). check=True fails
    the test with the tool's output when it exits non-zero."""
    proc = subprocess.run(command(script, *args), cwd=cwd, env=tool_env(env), capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def start_tool(script, *args, cwd=ROOT, env=None):
    """Start a tool in the background (stdout, stderr piped as text): for the Ctrl-C and lock tests."""
    return subprocess.Popen(command(script, *args), cwd=cwd, env=tool_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(proc, code=2):
    """The process failed with `code` and one line on stderr, no traceback; returns stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def save_model_checkpoint(model, path, **fields) -> Path:
    """`model` saved as train.py saves best.pth (helpers.runs.checkpoint_dict), plus any extra fields."""
    from helpers.runs import checkpoint_dict
    path = Path(path)
    torch.save({**checkpoint_dict(model), **fields}, path)
    return path


def smoke_checkpoint(out, photo: str, size: tuple) -> Path:
    """The files the tools' tests run on: a smoke-preset model with random weights (seed 0) saved as out/best.pth,
    and a random RGB picture of size (height, width) saved as out/<photo>. Returns out."""
    import numpy as np
    from PIL import Image

    import model
    out = Path(out)
    torch.manual_seed(0)
    save_model_checkpoint(model.build_model("smoke"), out / "best.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(out / photo)
    return out
