"""Notebooks 2, 3 and 5 on both of their paths: a trained checkpoint (SEGVLM_CKPT naming a smoke run made
here, as a demo run's runs/demo/best.pth would be found) and random weights (SEGVLM_CKPT=none, as on a fresh
clone); each notebook must say which weights it used, and notebook 5's short run prints no stray note.
(`pytest --nbmake notebooks/` runs them as a user's checkout finds them.) Slow: each runs in a kernel."""
from pathlib import Path

import pytest
from tooling import run_tool

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("2_baseline.ipynb", "3_enhancement.ipynb", "5_training_and_results.ipynb")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    """A briefly trained smoke-preset run's best.pth (its data_dir holds test.lmdb, as a demo run's does)."""
    out = tmp_path_factory.mktemp("notebooks")
    run_tool("train.py", "--preset", "smoke", "--epochs", "2", "--milestones", "1", "--out", out / "run",
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
def test_the_notebook_shows_a_trained_checkpoint_and_says_so(name, smoke_ckpt, monkeypatch):
    text = run_notebook(name, str(smoke_ckpt), monkeypatch)
    assert "random weights" not in text and "no demo run found" not in text
    if name.startswith("5"):
        assert f"checkpoint: {smoke_ckpt}" in text
    else:
        assert f"trained weights from {smoke_ckpt}" in text
    assert "trained on synthetic shapes and colours" in text  # what the checkpoint says it knows


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_without_a_checkpoint_the_notebook_says_it_uses_random_weights(name, monkeypatch):
    text = run_notebook(name, "none", monkeypatch)
    assert "trained weights from" not in text
    if name.startswith("5"):  # the short run trains in the notebook, with no note about its milestones
        assert "no demo run found: this is the short run above" in text and "note:" not in text
    else:
        assert "random weights (the demo preset)" in text
