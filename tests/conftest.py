"""Shared by the tests: a small synthetic PhraseCut, converted once per session, and Ctrl-C that reaches the tools."""
import os
import signal

import pytest

import helpers.clip_weights  # noqa: F401  (clip imported as the tools import it, before a test imports it itself)
from sources import phrasecut, synthetic

# The Ctrl-C tests send SIGINT to the tools they start. A shell that starts a job in the background
# (`pytest &`, nohup) ignores SIGINT for it, and an ignored signal stays ignored in every child, so
# the tools would never see it: give this process Python's own handler, which children reset to the
# default and then install their own.
signal.signal(signal.SIGINT, signal.default_int_handler)

# "auto" means the PyTorch engine in the tests and the tools they start: OpenVINO converts the model first (seconds
# a test); tests/test_engines.py runs OpenVINO by name, and with "auto" where the choice itself is tested.
os.environ.setdefault("SEGVLM_ENGINE", "torch")


def pytest_collection_modifyitems(config, items):
    """The notebooks (nbmake runs each as one test) belong to the slow tier: `python -m pytest -m slow`. Those that
    tests/test_notebooks.py executes on both their paths are left to it when it runs in the same session (the whole
    slow tier), so that no notebook runs twice there; `pytest --nbmake notebooks/` alone still runs every one."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
    if any(item.path.name == "test_notebooks.py" for item in items):
        from test_notebooks import NOTEBOOKS
        twice = [item for item in items if item.path.suffix == ".ipynb" and item.path.name in NOTEBOOKS]
        if twice:
            config.hook.pytest_deselected(items=twice)
            items[:] = [item for item in items if item not in twice]


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """(a 40-image synthetic PhraseCut root, its train.lmdb, build_lmdb's stats)."""
    root = tmp_path_factory.mktemp("synth") / "VGPhraseCut_v0"
    synthetic.synthesize(root, num_images=40, seed=0, size=96)
    out = root.parent / "train.lmdb"
    stats = phrasecut.build_lmdb(root, "train", out, progress=False)
    return root, out, stats
