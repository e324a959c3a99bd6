"""Notebooks 2, 3, 5 and 6 on both of their paths: a trained checkpoint (SEGVLM_CKPT naming a smoke run made here,
as a demo run's runs/demo/best.pth would be found; for notebook 6 a smoke run with the no-target head, as
runs/demo-gres/best.pth) and random weights (SEGVLM_CKPT=none, as on a fresh clone); each notebook must say which
weights it used, with the checkpoint's test score, and notebook 5's short run prints no stray note. Then the tool
that renders them (tools/render_notebooks.py) on a small notebook. (`pytest --nbmake notebooks/` runs them as a
user's checkout finds them.) Slow: each runs in a kernel."""
import os
import re
from pathlib import Path

import pytest
from tooling import run_tool

from helpers import provenance

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("2_baseline.ipynb", "3_enhancement.ipynb", "5_training_and_results.ipynb", "6_no_target.ipynb")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    """A briefly trained smoke-preset run's best.pth (its data_dir holds test.lmdb, as a demo run's does)."""
    out = tmp_path_factory.mktemp("notebooks")
    run_tool("train.py", "--preset", "smoke", "--epochs", "2", "--milestones", "1", "--out", out / "run",
             "--cache-dir", out / "cache", check=True)
    return out / "run" / "best.pth"


@pytest.fixture(scope="module")
def smoke_gres_ckpt(tmp_path_factory):
    """A briefly trained demo-gres run at 64 px (the no-target head, synthetic data a fifth of whose phrases name
    nothing) on 40 images, so that its test split holds phrases that name nothing."""
    out = tmp_path_factory.mktemp("notebooks-gres")
    run_tool("train.py", "--preset", "demo-gres", "--input-size", "64", "--synth-images", "40", "--epochs", "2",
             "--milestones", "1", "--batch-size", "4", "--num-workers", "0", "--out", out / "run",
             "--cache-dir", out / "cache", check=True)
    return out / "run" / "best.pth"


def run_notebook(name, ckpt, monkeypatch) -> str:
    """Execute the notebook in a fresh kernel from notebooks/ (as nbmake does) -> every cell's text output."""
    import nbformat
    from nbclient import NotebookClient
    monkeypatch.setenv("SEGVLM_CKPT", ckpt)  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") or str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_shows_a_trained_checkpoint_and_says_so(name, request, monkeypatch):
    ckpt = request.getfixturevalue("smoke_gres_ckpt" if name.startswith("6") else "smoke_ckpt")
    text = run_notebook(name, str(ckpt), monkeypatch)
    assert "random weights" not in text and "no demo run found" not in text
    said = f"checkpoint: {ckpt}: trained on" if name.startswith("5") else f"trained weights from {ckpt}: trained on"
    assert said in text
    assert "trained on synthetic shapes and colours" in text  # what the checkpoint says it knows
    score = provenance.test_scores(ckpt)
    assert score.startswith("test gIoU " if name.startswith("6") else "test mean IoU ") and f"; {score}" in text
    if name.startswith("6"):  # the GRES figures of the notebook's own pass, of evaluate.py and of train.py agree
        figures = {line.split(":")[0]: dict(re.findall(r"(gIoU|cIoU|N_acc|T_acc) (\S+)", line))
                   for line in text.splitlines() if line.startswith(("evaluate.py:", "from tasks:", "train.py:"))}
        assert figures["evaluate.py"] == figures["from tasks"] == figures["train.py"], figures
        assert set(figures["train.py"]) == {"gIoU", "cIoU", "N_acc", "T_acc"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_without_a_checkpoint_the_notebook_says_it_uses_random_weights(name, monkeypatch):
    text = run_notebook(name, "none", monkeypatch)
    assert "trained weights from" not in text
    if name.startswith("5"):  # the short run trains in the notebook, with no note about its milestones
        assert "no demo run found: this is the short run above" in text and "note:" not in text
    else:
        assert f"random weights (the {'demo-gres' if name.startswith('6') else 'demo'} preset)" in text


def test_the_render_tool_writes_the_outputs_and_what_they_came_from_and_nothing_else(tmp_path, smoke_ckpt, monkeypatch):
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    from helpers.inference import load_model
    from tools import render_notebooks as render
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the kernel imports helpers as a notebook does from notebooks/
    monkeypatch.delenv("SEGVLM_CKPT", raising=False)
    cells = [new_markdown_cell("# a notebook"),
             new_code_cell("import os\nfrom helpers.inference import trained_checkpoint\n"
                           "print(trained_checkpoint().name, os.environ['OMP_NUM_THREADS'])"),
             new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()")]
    path = tmp_path / "x.ipynb"
    nbformat.write(new_notebook(cells=cells), str(path))
    render.render(path, str(smoke_ckpt), threads=1)
    nb = nbformat.read(str(path), as_version=4)
    rendered = nb.metadata["segvlm"]["rendered"]
    assert re.fullmatch(r"[0-9a-f]{40}( \(uncommitted changes\))?", rendered["commit"]), rendered["commit"]
    assert rendered["code_sha256"] == render.code_sha256(nb)
    trained_on = load_model(smoke_ckpt, "cpu", engine="eager", precision="fp32").trained_on
    assert rendered["ckpt"] == {"path": str(smoke_ckpt), "trained_on": provenance.describe(trained_on),
                                "test": provenance.test_scores(smoke_ckpt)}
    assert rendered["ckpt"]["test"].startswith("test mean IoU ")
    assert [c.execution_count for c in nb.cells if c.cell_type == "code"] == [1, 2]
    assert nb.cells[1].outputs[0]["text"] == "best.pth 1\n"  # SEGVLM_CKPT named it; one thread
    assert "image/png" in nb.cells[2].outputs[0]["data"] and "execution" not in nb.cells[2].metadata  # no timings
    assert "SEGVLM_CKPT" not in os.environ and sorted(p.name for p in tmp_path.iterdir()) == ["x.ipynb"]
    first = path.read_bytes()
    render.render(path, str(smoke_ckpt), threads=1)
    assert path.read_bytes() == first  # the same code on the same checkpoint: the same file

    for code, error in [("raise ValueError('no head\\nmore')", "x.ipynb: cell 4 (In [3]) failed: ValueError: no head"),
                        ("print(os.getcwd())", "x.ipynb: cell 4's output shows this machine's folder ")]:
        nb.cells.append(new_code_cell(code))
        nbformat.write(nb, str(path))
        before = path.read_bytes()
        with pytest.raises(ValueError, match=re.escape(error)):
            render.render(path, str(smoke_ckpt), threads=1)
        assert path.read_bytes() == before  # untouched: neither half-rendered nor written with the error
        nb.cells.pop()
