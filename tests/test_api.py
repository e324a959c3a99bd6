"""The Python API for many phrases at once (inference.predict / predict_proba): a path, a PIL image
and an (H, W, 3) uint8 array give the same masks; a list of phrases gives the masks of the phrases
one at a time, at the image's size, with one image-encoder call; bad arguments get a clear error.
overlay draws one colour per phrase and its legend."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import save_model_checkpoint

import predict
from helpers import inference

ROOT = Path(__file__).resolve().parents[1]

PHRASES = ["red circle", "small blue square", "all green shapes", "triangle left of the circle"]


@pytest.fixture(scope="module")
def net():
    import model
    torch.manual_seed(0)
    return model.build_model("smoke").eval()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    return path


def count_image_encodings(monkeypatch, net):
    """A list that gets one entry per call of the model's image encoder."""
    calls, encode = [], net.backbone.encode_image

    def counted(image):
        calls.append(tuple(image.shape))
        return encode(image)
    monkeypatch.setattr(net.backbone, "encode_image", counted)
    return calls


def test_path_pil_and_numpy_give_the_same_masks(net, photo):
    with Image.open(photo) as im:
        pil = im.copy()
    array = np.asarray(pil)
    by_path = predict.predict(net, photo, PHRASES)
    for image in (str(photo), pil, array, pil.convert("RGBA")):
        masks = predict.predict(net, image, PHRASES)
        assert all(np.array_equal(a, b) for a, b in zip(masks, by_path))
    assert [m.shape for m in by_path] == [(37, 53)] * len(PHRASES) and all(m.dtype == bool for m in by_path)
    assert np.array_equal(inference.predict_proba(net, array, PHRASES[0]),
                          inference.predict_proba(net, photo, PHRASES[0]))


def test_a_list_encodes_the_image_once_and_matches_the_phrases_one_at_a_time(net, photo, monkeypatch):
    calls = count_image_encodings(monkeypatch, net)
    together = inference.predict_proba(net, photo, PHRASES)
    assert calls == [(1, 3, net.config.input_size, net.config.input_size)]  # once, for four phrases
    alone = [inference.predict_proba(net, photo, phrase) for phrase in PHRASES]
    assert len(calls) == 1 + len(PHRASES)
    assert isinstance(together, list) and len(together) == len(PHRASES)
    for a, b in zip(together, alone):
        assert a.shape == b.shape == (37, 53) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(together[0], together[2], atol=1e-3)  # each phrase its own map, not one repeated
    masks = predict.predict(net, photo, PHRASES, threshold=0.5)
    assert all(np.array_equal(m, p > 0.5) for m, p in zip(masks, together))


def test_one_phrase_gives_one_mask_and_a_list_of_one_a_list(net, photo):
    one = predict.predict(net, photo, "red circle")
    assert isinstance(one, np.ndarray) and one.shape == (37, 53)
    listed = predict.predict(net, photo, ["red circle"])
    assert isinstance(listed, list) and len(listed) == 1 and np.array_equal(listed[0], one)


def test_the_fast_model_takes_a_list_too(net, photo):
    fast = inference.FastSegVLM(net, cuda_graphs=False)  # on the CPU: the eager model behind the same API
    for a, b in zip(inference.predict_proba(fast, photo, PHRASES), inference.predict_proba(net, photo, PHRASES)):
        assert np.array_equal(a, b)


def test_bad_arguments_are_refused_clearly(net, photo):
    cases = [((np.zeros((8, 8, 3), np.float32), "x"), "must be \\(H, W, 3\\) uint8"),
             ((np.zeros((8, 8), np.uint8), "x"), "must be \\(H, W, 3\\) uint8"),
             ((np.zeros((0, 8, 3), np.uint8), "x"), "the image is empty"),
             ((torch.zeros(3, 8, 8), "x"), "got Tensor"),
             ((photo, []), "no phrase given"),
             ((photo, ["red", "  "]), "the phrase is empty"),
             ((photo, 3), "phrases must be a string or a list"),
             ((photo.parent / "missing.png", "x"), "image not found")]
    for (image, phrases), message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            predict.predict(net, image, phrases)


def test_overlay_gives_each_phrase_its_colour_and_a_legend():
    image = Image.new("RGB", (60, 80), (0, 0, 0))
    a, b = np.zeros((80, 60), bool), np.zeros((80, 60), bool)
    a[60:, :20], b[60:, 40:] = True, True
    out = np.asarray(inference.overlay(image, [a, b])).astype(int)  # no phrases: no legend
    red, blue = [np.array(c) * 0.55 for c in inference.PALETTE[:2]]  # alpha 0.55 over black, rounded to uint8
    assert np.abs(out[70, 5] - red).max() < 1 and np.abs(out[70, 50] - blue).max() < 1
    assert (out[5, 30] == 0).all()
    with_legend = np.asarray(inference.overlay(image, [a, b], ["one", "two"])).astype(int)
    assert (with_legend[60:] == out[60:]).all() and (with_legend[:40] != out[:40]).any()  # written top left
    swatches = {tuple(p) for p in with_legend[:40, :16].reshape(-1, 3)}
    assert set(inference.PALETTE[:2]) <= swatches  # each phrase beside its colour
    prob = np.full((80, 60), 0.5, np.float32)  # a probability map tints by its value
    half = np.asarray(inference.overlay(image, [prob])).astype(int)
    assert np.abs(half[40, 30] - np.array(inference.PALETTE[0]) * 0.275).max() <= 1
    with pytest.raises(ValueError, match="2 masks but 1 phrases"):
        inference.overlay(image, [a, b], ["one"])
    with pytest.raises(ValueError, match="mask of shape"):
        inference.overlay(image, np.zeros((4, 4), bool))


def test_readme_three_lines_run(tmp_path, photo, monkeypatch):
    """README's Python API block, as written, on a smoke checkpoint and a picture at its paths."""
    import re

    import model
    block = re.search(r"## Try it\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    net = model.build_model("smoke")
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    save_model_checkpoint(net, tmp_path / "runs" / "demo" / "best.pth")
    Image.open(photo).convert("RGB").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(block, scope)
    assert [m.shape for m in scope["masks"]] == [(37, 53)] * 2 and all(m.dtype == bool for m in scope["masks"])


def test_a_missing_checkpoint_names_the_newest_run_or_how_to_make_one(tmp_path, monkeypatch):
    """README's commands use runs/demo/best.pth; when it is missing, the error says what exists instead."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint runs/demo/best\.pth does not exist; no run has written a "
                                                r"best\.pth under runs/ yet \(train one: python train\.py --preset demo\)"):
        predict.load_model("runs/demo/best.pth", "cpu")
    for name, mtime in (("demo-20260101-000000", 1000), ("smoke", 1005), ("paper", 1003)):  # smoke's is the newest
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.pth").write_bytes(b"")
        os.utime(tmp_path / "runs" / name / "best.pth", (mtime, mtime))
    with pytest.raises(FileNotFoundError, match=r"does not exist; the newest run's checkpoint is runs/smoke/best\.pth$"):
        predict.load_model("runs/demo/best.pth", "cpu")
