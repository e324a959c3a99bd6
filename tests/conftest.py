"""Fixtures shared by the data tests: a small synthetic PhraseCut, converted once per session."""
import pytest

import phrasecut
import synthetic


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """(a 40-image synthetic PhraseCut root, its train.lmdb, build_lmdb's stats)."""
    root = tmp_path_factory.mktemp("synth") / "VGPhraseCut_v0"
    synthetic.synthesize(root, num_images=40, seed=0, size=96)
    out = root.parent / "train.lmdb"
    stats = phrasecut.build_lmdb(root, "train", out, progress=False)
    return root, out, stats
