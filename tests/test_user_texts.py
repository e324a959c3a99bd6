"""The texts a user reads, read as the user reads them.

- A tool's first line is its own: clip's import of pkg_resources warns (setuptools' UserWarning), and the
  project imports clip with that one warning silenced (helpers/clip_weights.py); the tools run here as a user
  runs them, with Python's default warnings.
"""
import subprocess

import pytest
import torch
from tooling import ROOT, command, save_model_checkpoint, smoke_checkpoint, tool_env

import model
from helpers import provenance


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A smoke model that says it was trained on the synthetic set (so the tools show SYNTHETIC_NOTE): (its
    checkpoint, a picture)."""
    out = smoke_checkpoint(tmp_path_factory.mktemp("texts"), "photo.png", (40, 50))
    header = {"dataset": "phrasecut", "split": "train", "num_tasks": 40, "num_images": 10, "synthetic": {"seed": 0}}
    torch.manual_seed(0)
    path = save_model_checkpoint(model.build_model("smoke"), out / "synthetic.pth",
                                 trained_on=provenance.run_record("smoke", 1, 1, 0.2, header, header))
    return path, out / "photo.png"


def run_as_a_user(*commands):
    """Each command (script, *args) in its own process, all at once, as a shell runs it: Python's default warnings
    (no PYTHONWARNINGS), stdout and stderr in one stream. Returns what each printed."""
    env = {k: v for k, v in tool_env().items() if k != "PYTHONWARNINGS"}
    procs = [subprocess.Popen(command(*c), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in commands]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for c, proc, out in zip(commands, procs, outputs):
        assert proc.returncode == 0, (c, out[-3000:])
    return outputs


@pytest.fixture(scope="module")
def first_outputs(synthetic, tmp_path_factory):
    """What predict.py on the synthetic model, train.py --help and data.py --help print (three processes: the
    others import what these do)."""
    out = tmp_path_factory.mktemp("predicted") / "overlay.png"
    commands = [("predict.py", "--ckpt", synthetic[0], "--image", synthetic[1], "--phrase", "red circle", "--out", out,
                 "--device", "cpu"), ("train.py", "--help"), ("data.py", "--help")]
    return dict(zip(("predict", "train", "data"), run_as_a_user(*commands)))


def test_a_tools_first_line_is_its_own(first_outputs):
    assert first_outputs["predict"].splitlines()[0] == f"predict.py: note: {provenance.SYNTHETIC_NOTE}"
    for tool in ("train", "data"):
        assert first_outputs[tool].splitlines()[0].startswith(f"usage: {tool}.py "), first_outputs[tool][:500]
    assert not any("pkg_resources" in out or "Warning" in out for out in first_outputs.values())
