"""The texts a user reads, read as the user reads them: the page as the browser gets it, predict.py's output, every
tool's --help, the docs and README.

- None claims a release of CRIS's weights: CRIS's authors published no checkpoints (CRIS.pytorch issue #3), and
  what loads here is a file written by CRIS's training code (docs/cris.md). The claim is looked for in every
  sentence that names CRIS, whatever the source lines did to split it.
- A tool's first line is its own: clip's import of pkg_resources warns (setuptools' UserWarning), and the
  project imports clip with that one warning silenced (helpers/clip_weights.py); the tools run here as a user
  runs them, with Python's default warnings.
"""
import contextlib
import html
import io
import json
import os
import re
import subprocess

import pytest
import torch
from tooling import ROOT, command, save_model_checkpoint, smoke_checkpoint, tool_env

import app
import data
import evaluate
import model
import predict
import train
from helpers import inference, provenance
from tools import ablation, benchmark, cris, export

RELEASED = r"(?:releas\w*|publish\w*|official|pre-?trained|downloadable|download\w*|provided|available)"
THING = r"(?:weights?|checkpoints?|models?|files?)"
# "CRIS's released weights", "the official CRIS checkpoint", "pretrained CRIS models", "weights CRIS's authors
# released", "checkpoints published by CRIS": a release word within three words of what would be released.
CLAIMS = (re.compile(rf"\b{RELEASED}\W+(?:\w+\W+){{0,3}}?{THING}\b", re.IGNORECASE),
          re.compile(rf"\b{THING}\W+(?:\w+\W+){{0,3}}?{RELEASED}(?:\s+(?:by|on|online|at|in|with)\b|\s*(?:[.,;:)]|$))",
                     re.IGNORECASE))  # "released by", "released.": not "CRIS's published scores"
# What is true, and says so with the same words.
TRUE = ("CRIS's authors published no checkpoints", "CRIS's authors published none", "there is no published checkpoint",
        '"Pretrained CRIS model"')  # the title of CRIS.pytorch's issue #3, quoted


def claims(text) -> list:
    """The sentences of `text` that name CRIS and claim a release of its weights (the true ones of TRUE excepted)."""
    text = re.sub(r"\s+", " ", html.unescape(text).replace("\u2019", "'").replace("**", ""))
    for true in TRUE:
        text = text.replace(true, "")
    sentences = re.split(r"(?<=[.;!?])\s|\\n", text)
    return [s for s in sentences if "CRIS" in s and any(claim.search(s) for claim in CLAIMS)]


def test_the_claim_is_found_and_the_truth_is_not():
    old_note = ("For photos, use a checkpoint trained on real data (PhraseCut, RefCOCO; docs list the commands) or CRIS's "
                "\n    released weights.")
    for claim in (old_note, "Download the official CRIS checkpoint.", "Pretrained CRIS models work here.",
                  "Load the weights CRIS's authors released.", "CRIS checkpoints published by its authors load."):
        assert claims(claim), claim
    assert claims(old_note.replace("released weights", "weights")) == []
    for truth in ("**CRIS's authors published no checkpoints.** Its issue #3 (\"Pretrained CRIS model\") asks.",
                  provenance.SYNTHETIC_NOTE, "there is no published checkpoint to measure in CRIS's table",
                  "CRIS-format checkpoints (CRIS's authors published none) and CRIS's published scores."):
        assert claims(truth) == [], truth


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
    first, second = first_outputs["predict"].splitlines()[:2]
    assert first.startswith("predict.py: engine ") and second == f"predict.py: note: {provenance.SYNTHETIC_NOTE}"
    for tool in ("train", "data"):
        assert first_outputs[tool].splitlines()[0].startswith(f"usage: {tool}.py "), first_outputs[tool][:500]
    assert not any("pkg_resources" in out or "Warning" in out for out in first_outputs.values())


def helps() -> dict:
    """{command: its --help} of every tool and subcommand, through each tool's own main (what argparse prints)."""
    mains = {"train.py": train.main, "evaluate.py": evaluate.main, "predict.py": predict.main, "data.py": data.main,
             "app.py": app.main, "tools.benchmark": benchmark.main, "tools.ablation": ablation.main,
             "tools.cris": cris.main, "tools.export": export.main}
    subcommands = {"data.py": ("synth", "build", "bench"), "tools.cris": ("convert",)}
    texts = {}
    for name, main in mains.items():
        for sub in ("", *subcommands.get(name, ())):
            argv = [sub, "--help"] if sub else ["--help"]
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
                main(argv)
            assert exit_info.value.code == 0 and out.getvalue().startswith("usage: "), (name, sub, out.getvalue())
            texts[f"{name} {sub} --help"] = out.getvalue()
    return texts


def test_no_text_a_user_reads_claims_a_cris_release(synthetic, first_outputs):
    net = inference.load_model(synthetic[0], "cpu", precision="fp32")
    page = json.dumps(app.build_app(net).get_config_file(), ensure_ascii=False)  # what the browser renders
    texts = {"the page": page, "predict.py's output": first_outputs["predict"], **helps()}
    texts.update({str(path.relative_to(ROOT)): path.read_text() for path in [ROOT / "README.md",
                                                                             *sorted((ROOT / "docs").glob("*.md"))]})
    assert len(texts) > 20 and all(texts.values())
    assert html.escape(provenance.SYNTHETIC_NOTE) in page  # the note is among what was read
    assert provenance.SYNTHETIC_NOTE in first_outputs["predict"]
    found = {where: claims(text) for where, text in texts.items() if claims(text)}
    assert not found, found
    assert "CRIS's authors published no checkpoints" in texts[os.path.join("docs", "cris.md")]
