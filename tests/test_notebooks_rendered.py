"""The notebooks as they are committed: with their outputs, rendered by `python -m tools.render_notebooks` on the
checkpoints of README's quick start, and never stale. Fast: the files are read as JSON, no kernel starts.
tests/test_notebooks.py (slow) executes them, and the tool itself in a kernel."""
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import visualize
from tools import render_notebooks as render

NOTEBOOKS = sorted(render.NOTEBOOKS.glob("*.ipynb"))
COMMAND = "python -m tools.render_notebooks"


def test_every_notebook_of_the_series_is_here():
    names = [path.name for path in NOTEBOOKS]
    assert names[:6] == ["1_data.ipynb", "2_baseline.ipynb", "3_enhancement.ipynb", "4_raf_loss.ipynb",
                         "5_training_and_results.ipynb", "6_no_target.ipynb"]
    assert set(render.GRES_NOTEBOOKS) <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_the_notebook_is_rendered_from_its_own_code(path):
    nb = json.loads(path.read_text())
    rendered = nb["metadata"].get("segvlm", {}).get("rendered")
    again = f"render it: {COMMAND} --only {path.name}"
    assert rendered, f"notebooks/{path.name} holds no rendered outputs; {again}"
    assert set(rendered) == {"commit", "ckpt", "code_sha256"}, rendered
    assert rendered["code_sha256"] == render.code_sha256(nb), (
        f"notebooks/{path.name}: its code changed since it was rendered (at {rendered['commit']}), so its outputs may "
        f"no longer be what the code gives; {again}")
    cells = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), f"notebooks/{path.name}: cells not all run, in order ({counts}); {again}"
    outputs = [output for cell in cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], f"notebooks/{path.name} holds an error; {again}"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"notebooks/{path.name} shows no figure"
    size = path.stat().st_size
    assert size <= render.MAX_BYTES, f"notebooks/{path.name} is {size / 1e6:.2f} MB, over {render.MAX_BYTES / 1e6} MB"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_notebook_of_a_model_shows_the_trained_checkpoint_and_says_what_it_knows(path):
    nb = json.loads(path.read_text())
    rendered = nb["metadata"].get("segvlm", {}).get("rendered")
    assert rendered, f"notebooks/{path.name} holds no rendered outputs; render it: {COMMAND} --only {path.name}"
    ckpt = rendered["ckpt"]
    if not render.reads_a_checkpoint(nb):
        assert ckpt is None  # a notebook that loads no model names no checkpoint
        return
    expected = "runs/demo-gres/best.pth" if path.name in render.GRES_NOTEBOOKS else "runs/demo/best.pth"
    assert ckpt["path"] == expected, f"rendered on {ckpt['path']}, not README's quick start's {expected}"
    assert ckpt["trained_on"].startswith("trained on synthetic shapes and colours") and ckpt["test"].startswith("test ")
    text = "".join("".join(o.get("text", "")) for cell in nb["cells"] for o in cell.get("outputs", []))
    assert f"{expected}: {ckpt['trained_on']}; {ckpt['test']}" in text  # the notebook itself says it
    assert "random weights" not in text and "no demo run found" not in text


def test_code_sha256_is_that_of_the_code_cells_joined_as_the_issue_defines_it():
    nb = {"cells": [{"cell_type": "code", "source": ["import torch\n", "x = 1"]},
                    {"cell_type": "markdown", "source": "# not code"},
                    {"cell_type": "code", "source": "print(x)  # é"}]}
    assert render.code_sha256(nb) == hashlib.sha256("import torch\nx = 1\n\nprint(x)  # é".encode("utf-8")).hexdigest()
    nb["cells"][1]["source"] = "# markdown may change"
    same = render.code_sha256(nb)
    nb["cells"][2]["source"] = ["print(x)  # é"]  # a list of lines or one string: the same source
    assert render.code_sha256(nb) == same
    nb["cells"][2]["source"] = "print(x)  # e"
    assert render.code_sha256(nb) != same


def test_an_output_that_names_this_machines_folders_is_found():
    def notebook(text):
        return {"cells": [{"cell_type": "markdown", "source": "x"},
                          {"cell_type": "code", "outputs": [{"output_type": "stream", "text": ["ok\n", text]}]}]}
    assert render.leaked_folder(notebook("runs/demo/best.pth: trained on ...")) is None
    assert render.leaked_folder(notebook(f"saved to {render.ROOT}/notebooks/x.png")) == (2, str(render.ROOT))
    error = {"cells": [{"cell_type": "code", "execution_count": 3, "outputs": [
        {"output_type": "error", "ename": "AssertionError", "evalue": "no head\nmore", "traceback": []}]}]}
    assert render.failed_cell(error) == "cell 1 (In [3]) failed: AssertionError: no head"


def test_a_missing_checkpoint_or_an_unknown_notebook_is_refused_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        render.parse_args(["--ckpt", str(tmp_path / "none.pth"), "--only", "2_baseline.ipynb"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"python -m tools.render_notebooks: error: --ckpt {tmp_path / 'none.pth'} is not a file "
                   f"(2_baseline.ipynb shows it); train it with `python train.py --preset demo` (README's quick start) "
                   f"or name another with --ckpt")
    # only the demo-gres notebook: the demo's checkpoint is not needed, the demo-gres one is
    with pytest.raises(SystemExit):
        render.parse_args(["--ckpt", str(tmp_path / "none.pth"), "--gres-ckpt", str(tmp_path / "g.pth"),
                           "--only", "6_no_target.ipynb"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"python -m tools.render_notebooks: error: --gres-ckpt {tmp_path / 'g.pth'} is not a file "
                   f"(6_no_target.ipynb shows it); train it with `python train.py --preset demo-gres` (README's quick "
                   f"start) or name another with --gres-ckpt")
    with pytest.raises(SystemExit):
        render.parse_args(["--only", "7_nothing.ipynb"])
    assert "--only 7_nothing.ipynb is not a notebook of notebooks/ (those are: 1_data.ipynb, " in capsys.readouterr().err


def test_a_palette_png_keeps_the_shapes_colours_in_a_fraction_of_the_bytes():
    from matplotlib.figure import Figure
    rng = np.random.default_rng(0)
    picture = np.clip(0.55 + 0.08 * rng.standard_normal((192, 192, 3)), 0, 1)  # a textured background
    picture[40:100, 40:100] = np.array([215, 40, 40]) / 255                    # a red square
    picture[120:170, 110:160] = np.array([145, 60, 195]) / 255                  # a purple one
    fig = Figure(figsize=(4, 4), dpi=90)
    ax = fig.subplots()
    ax.imshow(picture)
    ax.axis("off")
    full = io.BytesIO()
    fig.savefig(full, format="png", bbox_inches="tight")
    small = visualize.palette_png(fig)
    image = Image.open(io.BytesIO(small))
    assert small[:8] == b"\x89PNG\r\n\x1a\n" and image.mode == "P" and len(image.getcolors(256)) <= 256
    assert len(small) < len(full.getvalue()) / 3
    rgb = np.asarray(image.convert("RGB"), dtype=int)
    reference = np.asarray(Image.open(full).convert("RGB"), dtype=int)
    assert rgb.shape == reference.shape
    for colour in ((215, 40, 40), (145, 60, 195)):  # each flat colour is still there, within a few levels
        assert (np.abs(rgb - colour).max(axis=-1) <= 6).sum() > 1000, colour


def test_the_training_curves_can_carry_the_notebooks_caption(tmp_path):
    import matplotlib
    before = matplotlib.get_backend()
    row = {"epoch": 1, "loss": 1.0, "bce": 0.5, "focal": 0.2, "dice": 0.3, "val_mIoU": 0.1, "val_oIoU": 0.2,
           "val_prec@0.5": 0.0}
    visualize.plot_curves([row, {**row, "epoch": 2}], tmp_path / "curves.png")
    visualize.plot_curves([row, {**row, "epoch": 2}], tmp_path / "captioned.png", caption="runs/demo/best.pth: ...")
    plain, captioned = Image.open(tmp_path / "curves.png"), Image.open(tmp_path / "captioned.png")
    assert captioned.height > plain.height + 10  # a line of text under the curves: which checkpoint, what it knows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captioned.png", "curves.png"]  # nothing half-written
    assert matplotlib.get_backend() == before
