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
from helpers import engines, inference

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


def test_many_phrases_go_through_the_model_a_bounded_number_at_a_time(net, photo, monkeypatch):
    """70 phrases: two forward passes of at most PAIRS_PER_PASS (64) phrases, the image encoded once each, the
    maps made one at a time and equal to the phrases' own maps (10,000 phrases in one pass took > 5 GB)."""
    calls = count_image_encodings(monkeypatch, net)
    passes, forward = [], net.forward
    monkeypatch.setattr(net, "forward", lambda image, tokens, image_index=None: passes.append(len(tokens)) or
                        forward(image, tokens, image_index=image_index))
    phrases = [f"shape number {i}" for i in range(70)]
    maps = inference.iter_proba(net, photo, phrases)
    first = next(maps)
    assert passes == [inference.PAIRS_PER_PASS] == [64]  # one group run, only when its first map is asked for
    rest = list(maps)
    assert passes == [64, 6] and len(calls) == 2 and len(rest) == 69
    for k in (0, 63, 64, 69):
        np.testing.assert_allclose(([first] + rest)[k], inference.predict_proba(net, photo, phrases[k]), atol=1e-5)


def test_one_phrase_gives_one_mask_and_a_list_of_one_a_list(net, photo):
    one = predict.predict(net, photo, "red circle")
    assert isinstance(one, np.ndarray) and one.shape == (37, 53)
    listed = predict.predict(net, photo, ["red circle"])
    assert isinstance(listed, list) and len(listed) == 1 and np.array_equal(listed[0], one)


def test_the_fast_model_takes_a_list_too(net, photo):
    fast = engines.FastSegVLM(net, amp=False, cuda_graphs=False)  # float32 on the CPU: the eager model, same API
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


def test_a_threshold_outside_0_1_and_a_phrase_that_is_no_string_are_named(net, photo, monkeypatch):
    monkeypatch.setattr(net, "forward", lambda *a, **k: pytest.fail("the model ran"))  # refused before any work
    for threshold in (float("nan"), -1, 2, 0, 1.0, "0.5", None, True, float("inf")):
        with pytest.raises(ValueError, match=f"^threshold must be .*between 0 and 1, got {threshold!r}"):
            inference.predict(net, photo, "red circle", threshold=threshold)
    for phrases, shown in (([1, "a"], "int 1"), (["a", None], "NoneType None"), ((b"x",), "bytes b'x'")):
        with pytest.raises(ValueError, match=f"^a phrase must be a string, got {shown}"):
            inference.predict(net, photo, phrases)
    monkeypatch.undo()
    assert inference.predict(net, photo, "red circle", threshold=np.float32(0.5)).dtype == bool  # numpy numbers too


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


# ----------------------------------------------------------------------------- what the model knows

SYNTH_HEADER = {"format": "segvlm-phrasecut", "dataset": "phrasecut", "split": "train", "num_tasks": 4520,
                "num_images": 1280, "synthetic": {"generator": "sources/synthetic.py", "seed": 0}}


def test_load_model_exposes_what_the_checkpoint_was_trained_on(net, tmp_path):
    from helpers import provenance
    val = {**SYNTH_HEADER, "split": "val", "num_tasks": 700, "num_images": 160}
    record = provenance.run_record("demo", 5, 8, 0.558, SYNTH_HEADER, val)
    path = save_model_checkpoint(net, tmp_path / "best.pth", trained_on=record)
    assert torch.load(path, weights_only=True)["trained_on"] == record  # plain strings and numbers
    loaded = inference.load_model(path, "cpu")
    assert loaded.trained_on == record and provenance.knows_only_synthetic(loaded.trained_on)
    assert engines.FastSegVLM(loaded, cuda_graphs=False).trained_on == record
    assert provenance.describe(record) == ("trained on synthetic shapes and colours (sources/synthetic.py) (train split: "
                                           "4,520 phrases on 1,280 images), preset demo, 5 epochs of 8, best val mean "
                                           "IoU 55.8 %")
    # a real dataset: its name from the LMDB header, no note
    refcoco = {"dataset": "refcoco", "refer": {"dataset": "refcoco+", "split_by": "unc"}, "split": "train",
               "num_tasks": 120624, "num_images": 16994}
    real = provenance.run_record("cris-refcoco", 50, 50, 0.62, refcoco, {**refcoco, "split": "val"})
    assert real["dataset"] == "refcoco+" and not provenance.knows_only_synthetic(real)
    assert "RefCOCO+ (train split, unc: 120,624 phrases on 16,994 images)" in provenance.describe(real)
    phrasecut = provenance.run_record("paper", 1, 50, 0.3, {**SYNTH_HEADER, "synthetic": None}, val)
    assert phrasecut["dataset"] == "phrasecut" and phrasecut["name"] == "PhraseCut"


def test_older_and_cris_checkpoints_say_what_they_can(net, tmp_path):
    from cris_files import small_model, write_cris_checkpoint

    from helpers import provenance
    bare = inference.load_model(save_model_checkpoint(net, tmp_path / "bare.pth"), "cpu")  # no record, no run
    assert bare.trained_on["dataset"] == "unknown" and "unknown" in provenance.describe(bare.trained_on)
    # a best.pth from before the record: a run without --data trained on the synthetic set
    old = save_model_checkpoint(net, tmp_path / "old.pth", args={"preset": "demo", "data": "", "epochs": 8},
                                data_dir="/cache/synthetic_n1600_seed0_px192_gen3_lmdb3", epoch=7, best_metric=0.705)
    record = inference.load_model(old, "cpu").trained_on
    assert record["dataset"] == "synthetic" and record["epochs"] == 8 and record["best_val_mIoU"] == 0.705
    other = save_model_checkpoint(net, tmp_path / "other.pth", args={"preset": "paper", "data": "lmdb/", "epochs": 50},
                                  data_dir="lmdb", epoch=9, best_metric=0.4)
    assert inference.load_model(other, "cpu").trained_on["dataset"] == "unknown"
    cris = inference.load_model(write_cris_checkpoint(small_model("RN50"), tmp_path / "best_model.pth"), "cpu")
    assert cris.trained_on["format"] == "CRIS" and cris.trained_on["dataset"] == "unknown"
    assert cris.trained_on["epochs"] == 50 and cris.trained_on["best_val_IoU"] == pytest.approx(0.6211)
    line = provenance.describe(cris.trained_on)
    assert line.startswith("a CRIS checkpoint; trained on unknown") and "62.11 %" in line
    assert not provenance.knows_only_synthetic(cris.trained_on)


def legend_box(image, phrases):
    """(width, height) of the corner overlay's legend takes, and the share of the picture it hides."""
    masks = [np.zeros((image.height, image.width), bool)] * len(phrases)
    drawn = (np.asarray(inference.overlay(image, masks, phrases)) != np.asarray(inference.overlay(image, masks))).any(-1)
    ys, xs = np.nonzero(drawn)
    return xs.max() + 1, ys.max() + 1, drawn.mean()


def test_the_legend_is_scaled_to_the_picture():
    phrases = PHRASES + ["the big yellow star"]
    w, h, hidden = legend_box(Image.new("RGB", (192, 192), (128, 128, 128)), phrases)
    assert hidden < 1 / 6 and h < 192 / 2.5  # five phrases on a demo image (before: 23 % of it, 90 px down)
    big_w, big_h, _ = legend_box(Image.new("RGB", (768, 768), (128, 128, 128)), phrases)
    assert big_h == pytest.approx(4 * h, rel=0.25) and big_w == pytest.approx(4 * w, rel=0.25)  # the same share
    assert inference.legend_font_size(192, 192) == 8 and inference.legend_font_size(50, 4000) == 8
    assert inference.legend_font_size(4000, 3000) == 40


def test_the_notebooks_find_the_newest_demo_run(tmp_path, monkeypatch):
    import os
    monkeypatch.delenv("SEGVLM_CKPT", raising=False)
    assert inference.trained_checkpoint(tmp_path) is None
    names = ["demo-20260101-000000", "demo", "paper-20260103-000000", "demo-gres", "demo-old", "demo-gres-20260101-000000"]
    for k, name in enumerate(names):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "best.pth").write_bytes(b"")
        os.utime(tmp_path / "runs" / name / "best.pth", (1000 + k, 1000 + k))
    # the newest demo run; never another preset's, though demo-gres's name starts with "demo" and its run is newer
    assert inference.trained_checkpoint(tmp_path) == tmp_path / "runs" / "demo" / "best.pth"
    assert inference.trained_checkpoint(tmp_path, "demo-gres") == tmp_path / "runs/demo-gres-20260101-000000/best.pth"
    assert inference.trained_checkpoint(tmp_path, "paper") == tmp_path / "runs/paper-20260103-000000/best.pth"
    monkeypatch.setenv("SEGVLM_CKPT", "elsewhere/best.pth")
    assert inference.trained_checkpoint(tmp_path) == Path("elsewhere/best.pth")
    monkeypatch.setenv("SEGVLM_CKPT", "none")  # random weights, whatever runs/ holds
    assert inference.trained_checkpoint(tmp_path) is None
    model, which = inference.notebook_model(tmp_path, "smoke")
    assert which.startswith("random weights (the smoke preset)") and not hasattr(model, "trained_on")


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
