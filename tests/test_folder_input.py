"""predict.py's folder mode against careless and hostile input: a user's index.csv or mask is never cut, added to
or written through a link, and is refused before the model loads; an image's key and a phrase's mask file are
its own whatever else is given; files under --out are counted, not silently left out; a model whose output has
another shape is refused, and what is counted is what was written; the pairs of a forward pass are bounded;
index.csv neutralises spreadsheet formulas and reads them back; names are printed with their escapes shown."""
import csv
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import save_model_checkpoint

import predict
from helpers import batch_predict, folder_index
from helpers.files import load_mask

PHRASES = ["red circle", "the blue square on the left", "green"]
SIZES = {"a.jpg": (37, 53), "b.png": (80, 40), "sub/c.jpg": (64, 64)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import model
    root = tmp_path_factory.mktemp("folder")
    torch.manual_seed(0)
    save_model_checkpoint(model.build_model("smoke"), root / "best.pth")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        (root / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "photos" / name)
    return root


@pytest.fixture(scope="module")
def net(files):
    return predict.load_model(files / "best.pth", device="cpu", precision="fp32")


@pytest.fixture
def photos(files, tmp_path):
    """A copy of the photos that a test may add to."""
    return shutil.copytree(files / "photos", tmp_path / "photos")


def run(net, sources, phrases, out, **kwargs):
    return batch_predict.run(net, sources, phrases, out, 0.35, workers=0, progress=False, **kwargs)


def cli(files, *args, model_loads=True):
    """predict.py's folder mode in this process -> its exit code (0, or SystemExit's code). With model_loads=False
    the model must not be loaded: the refusal comes first."""
    argv = ["--ckpt", str(files / "best.pth"), "--workers", "0", "--precision", "fp32", *map(str, args)]
    if not model_loads:
        original, predict.open_model = predict.open_model, lambda args: pytest.fail("the model was loaded")
    try:
        predict.main(argv)
    except SystemExit as stop:
        return stop.code
    finally:
        if not model_loads:
            predict.open_model = original
    return 0


def index_rows(out):
    return list(batch_predict.read_index(out / "index.csv").values())


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.png")) if p.is_file()}


def test_a_users_index_is_never_cut_nor_added_to_and_is_refused_before_the_model_loads(files, tmp_path):
    image = files / "photos" / "a.jpg"
    theirs = [b"id,score\n1,2",  # no final newline: its last line was cut before the refusal
              b"image,phrase,mask,fraction,width,height\r\nmy,own,row,1,2,3\r\nand a half"]  # the tool's header
    for k, content in enumerate(theirs):
        out = tmp_path / f"out{k}"
        out.mkdir()
        (out / "index.csv").write_bytes(content)
        code = cli(files, "--images", image, "--phrase", "x", "--out", out, model_loads=False)
        assert "index.csv was not written by predict.py" in str(code) and (out / "index.csv").read_bytes() == content
        outside = tmp_path / f"theirs{k}.csv"  # the same, through a link to a file outside --out
        outside.write_bytes(content)
        (out / "index.csv").unlink()
        (out / "index.csv").symlink_to(outside)
        code = cli(files, "--images", image, "--phrase", "x", "--out", out, model_loads=False)
        assert "index.csv is a symbolic link" in str(code) and outside.read_bytes() == content
    out = tmp_path / "ours"  # the tool's own index, replaced by the user's file: checked before anything is cut
    assert cli(files, "--images", image, "--phrase", "x", "--out", out) == 0
    (out / "index.csv").write_bytes(theirs[0])
    code = cli(files, "--images", image, "--phrase", "y", "--out", out, model_loads=False)
    assert "is not an index written by predict.py" in str(code) and (out / "index.csv").read_bytes() == theirs[0]


def test_masks_are_never_written_through_a_link_nor_over_a_users_file(files, net, tmp_path):
    image, elsewhere = files / "photos" / "a.jpg", tmp_path / "elsewhere"
    elsewhere.mkdir()
    for link in ("a.jpg", "a.jpg/deeper"):  # the image's folder, or a folder on the way to its masks
        out = tmp_path / link.replace("/", "_")
        (out / link).parent.mkdir(parents=True, exist_ok=True)
        (out / link).symlink_to(elsewhere)
        key = "a.jpg/deeper" if "/" in link else "a.jpg"
        with pytest.raises(ValueError, match="is a symbolic link; this tool writes only into real folders"):
            batch_predict.plan([(image, key)], ["green"], out)
        assert not list(elsewhere.iterdir())
    out = tmp_path / "taken"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"the user's file where the image's folder goes")  # was [Errno 17]
    code = cli(files, "--images", image, "--phrase", "green", "--out", out, model_loads=False)
    assert "a.jpg is a file where this tool needs a folder" in str(code)
    (out / "a.jpg").unlink()
    (out / "index.csv").mkdir()  # was [Errno 21]
    code = cli(files, "--images", image, "--phrase", "green", "--out", out, model_loads=False)
    assert "index.csv is a folder where this tool writes a file" in str(code)
    (out / "index.csv").rmdir()
    name = out / batch_predict.mask_name("a.jpg", "green")
    name.parent.mkdir(parents=True)
    name.write_bytes(b"the user's mask")
    code = cli(files, "--images", image, "--phrase", "green", "--out", out, model_loads=False)
    assert "that this tool would overwrite and did not write" in str(code) and name.read_bytes() == b"the user's mask"


def test_an_images_key_depends_on_its_source_alone(files, net, photos, tmp_path):
    out = tmp_path / "out"
    summary, _ = run(net, [photos], PHRASES, out)
    assert {r["mask"] for r in index_rows(out)} == {batch_predict.mask_name(f"photos/{n}", p) for n in SIZES for p in PHRASES}
    before = mtimes(out)
    other, single = tmp_path / "other", tmp_path / "single.png"
    other.mkdir()
    shutil.copy(photos / "b.png", other / "x.png")
    shutil.copy(photos / "a.jpg", single)
    (photos / "passwd.jpg").symlink_to("/etc/passwd")  # once made the common root "/"
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")  # and a link in a loop: left out, as a broken one
    summary, failures = run(net, [photos, other, single], PHRASES, out)  # one more folder and a file
    assert summary["skipped"] == len(SIZES) * len(PHRASES) and summary["written"] == 2 * len(PHRASES)
    assert [(p.name, "not an image" in reason) for p, reason in failures] == [("passwd.jpg", True)]
    assert {p: t for p, t in mtimes(out).items() if p in before} == before  # nothing renamed, nothing redone
    rows = index_rows(out)
    assert len(rows) == len({(r["image"], r["phrase"]) for r in rows}) == (len(SIZES) + 2) * len(PHRASES)
    assert {r["mask"].rsplit("/", 1)[0] for r in rows} == {f"photos/{n}" for n in SIZES} | {"other/x.png", "single.png"}
    # two sources of one name: the first keeps it, the second gets 8 hex of its path, the same on every run
    twin = tmp_path / "twin" / "photos"
    shutil.copytree(other, twin)
    found = batch_predict.find_images([photos, twin], out).images
    again = batch_predict.find_images([photos, twin], out).images
    assert found == again and found[-1][1].startswith("photos~") and found[-1][1].endswith("/x.png")
    for nested in ([photos, photos / "sub"], [photos / "sub", photos], [photos, photos / "a.jpg"], [photos / "a.jpg", photos]):
        with pytest.raises(ValueError, match="one holds the other"):
            batch_predict.find_images(nested, out)


def test_two_phrases_never_share_a_mask_file(files, net, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_index, "phrase_digest", lambda phrase: "0" * 16)  # every phrase's hash collides
    image = files / "photos" / "a.jpg"
    summary, _ = run(net, [image], ["red!", "red?"], tmp_path / "one")
    rows = index_rows(tmp_path / "one")
    assert summary["written"] == 2 and sorted(r["mask"] for r in rows) == [
        "a.jpg/red-0000000000000000-2.png", "a.jpg/red-0000000000000000.png"]
    for r in rows:
        assert np.array_equal(load_mask(tmp_path / "one" / r["mask"]), predict.predict(net, image, r["phrase"]))
    assert run(net, [image], ["red!", "red?"], tmp_path / "one")[0]["skipped"] == 2
    out = tmp_path / "two"  # a name the index lists for another phrase is neither "done" nor overwritten
    run(net, [image], ["red!"], out)
    first = (out / "a.jpg/red-0000000000000000.png").read_bytes()
    summary, _ = run(net, [image], ["red?"], out)
    assert summary["written"] == 1 and summary["skipped"] == 0
    assert (out / "a.jpg/red-0000000000000000.png").read_bytes() == first
    assert {r["phrase"]: r["mask"] for r in index_rows(out)}["red?"] == "a.jpg/red-0000000000000000-2.png"


def test_files_under_out_are_counted_and_out_may_not_hold_the_images(files, photos, capsys):
    assert cli(files, "--images", photos, "--phrase", "green", "--out", photos / "sub") == 0
    err, printed = capsys.readouterr()[::-1]
    assert f"note: 1 file(s) under --out {photos / 'sub'} are not read as images" in err and "c.jpg" in err
    assert "2 image(s) x 1 phrase(s)" in printed
    assert cli(files, "--images", photos, "--phrase", "green", "--out", photos / "sub") == 0
    assert "note: 1 file(s) under --out" in capsys.readouterr().err  # its own masks are not counted
    code = cli(files, "--images", photos, "--phrase", "green", "--out", photos)
    assert code == 2 and f"--images {photos} is the --out folder {photos}, where the masks go" in capsys.readouterr().err
    code = cli(files, "--images", photos / "sub", "--phrase", "green", "--out", photos)
    assert code == 2 and f"--images {photos / 'sub'} is inside --out {photos}" in capsys.readouterr().err


class Reshaped(torch.nn.Module):
    """The model with its logits changed as a broken ONNX graph would change them."""

    def __init__(self, net, change):
        super().__init__()
        self.net, self.config, self.change = net, net.config, change

    def forward(self, image, tokens, image_index=None):
        return self.change(self.net(image, tokens, image_index=image_index))


@pytest.mark.parametrize("change, shape", [(lambda x: x[:1], "(1, 1, 16, 16)"),  # the batch fixed at 1
                                           (lambda x: x[:, :, :3, :3], "(2, 1, 3, 3)"),
                                           (lambda x: torch.cat([x, x], 1), "(2, 2, 16, 16)")])
def test_logits_of_another_shape_are_refused_naming_the_model_and_only_masks_written_count(
        files, net, tmp_path, change, shape):
    images = [files / "photos" / "a.jpg", files / "photos" / "b.png"]
    with pytest.raises(ValueError, match=re.escape(f"fixed.onnx returned logits of shape {shape} for 2 phrase(s)")):
        run(Reshaped(net, change), images, ["red", "green"], tmp_path / "out", model_file="fixed.onnx")
    assert not index_rows(tmp_path / "out") and not mtimes(tmp_path / "out")
    if shape.startswith("(1,"):  # one phrase an image: the graph fixed at batch 1 does what it can, all of it
        summary, _ = run(Reshaped(net, change), images, ["red"], tmp_path / "one", model_file="fixed.onnx")
        assert summary["written"] == len(mtimes(tmp_path / "one")) == len(index_rows(tmp_path / "one")) == 2


def test_each_image_is_its_own_forward_pass_of_at_most_pairs_per_pass_phrases(files, net, tmp_path, monkeypatch):
    passes, forward = [], net.forward
    monkeypatch.setattr(net, "forward", lambda image, tokens, image_index=None: passes.append(
        (len(image), len(tokens))) or forward(image, tokens, image_index=image_index))
    monkeypatch.setattr(batch_predict, "PAIRS_PER_PASS", 4)  # 64: tests/test_api.py runs iter_proba past it
    phrases = [f"shape {i}" for i in range(9)]
    summary, _ = run(net, [files / "photos" / "a.jpg", files / "photos" / "b.png"], phrases, tmp_path, batch_size=4)
    assert passes == [(1, 4), (1, 4), (1, 1)] * 2 and summary["written"] == 18 == len(mtimes(tmp_path))
    listed = predict.predict(net, files / "photos" / "b.png", phrases)  # float32: the same masks, however grouped
    assert all(np.array_equal(load_mask(tmp_path / batch_predict.mask_name("b.png", p)), m) for p, m in zip(phrases, listed))


def test_under_bf16_a_mask_depends_on_neither_the_other_images_nor_a_resume(files, tmp_path, monkeypatch):
    """bf16 rounds a batch differently from another batch: each image is its own pass, and a pass holds the run's
    phrases as predict() groups them, done or not, so a mask is predict()'s bit for bit in any run."""
    fast = predict.load_model(files / "best.pth", device="cpu", precision="bf16")  # bf16 autocast, native or not
    images = [files / "photos" / n for n in SIZES]
    encoded, encode = [], fast.model.backbone.encode_image
    monkeypatch.setattr(fast.model.backbone, "encode_image", lambda image: encoded.append(len(image)) or encode(image))
    run(fast, images[:1], PHRASES, tmp_path / "alone", batch_size=4)
    run(fast, images, PHRASES, tmp_path / "together", batch_size=4)
    assert set(encoded) == {1}  # one image a pass, whatever the loader's batch
    listed = predict.predict(fast, images[0], PHRASES)  # the Python API's masks of the run's phrases
    for k, phrase in enumerate(PHRASES):
        name = batch_predict.mask_name("a.jpg", phrase)
        assert np.array_equal(load_mask(tmp_path / "alone" / name), load_mask(tmp_path / "together" / name))
        assert np.array_equal(load_mask(tmp_path / "alone" / name), listed[k])
    gone = tmp_path / "together" / batch_predict.mask_name("b.png", PHRASES[1])  # as if a kill came before it
    clean = gone.read_bytes()
    gone.unlink()
    passes, forward = [], fast.forward
    monkeypatch.setattr(fast, "forward", lambda image, tokens, image_index=None: passes.append(len(tokens)) or
                        forward(image, tokens, image_index=image_index))
    assert run(fast, images, PHRASES, tmp_path / "together")[0]["written"] == 1
    assert passes == [len(PHRASES)] and gone.read_bytes() == clean  # the whole group again: a clean run's bytes


def test_cells_a_spreadsheet_would_run_are_quoted_and_read_back(files, net, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["=cmd|' -C calc'!A0.png", "-x.jpg", "@y.jpg"]
    for name in names:
        shutil.copy(files / "photos" / "a.jpg", tmp_path / name)
    phrases = ['=HYPERLINK("http://example.com","click")', "+1+1", "@SUM(1)", "-2", "\tcell", "\rcell", "'quoted",
               "plain"]
    summary, _ = run(net, names, phrases, "out")
    with open(tmp_path / "out" / "index.csv", newline="") as f:
        raw = list(csv.reader(f))
    assert len(raw) == 1 + len(names) * len(phrases)
    assert not [c for row in raw for c in row if c.startswith(folder_index.FORMULA_START)]  # no cell runs
    assert {row[0] for row in raw[1:]} == {"'" + name for name in names}
    assert {row[1] for row in raw[1:]} == {"'" + p if p[0] in "=+-@\t\r'" else p for p in phrases}
    assert {(r["image"], r["phrase"]) for r in index_rows(tmp_path / "out")} == {(n, p) for n in names for p in phrases}
    assert run(net, names, phrases, "out")[0]["skipped"] == len(names) * len(phrases)  # read back exactly


def test_names_with_line_breaks_resume(files, net, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    names = ("a\nb.png", "c\rd.png", "e\u2028f.png", "g\x85h.png", "i\udcffj.png")  # the last: byte 0xff, not UTF-8
    for name in names:
        shutil.copy(files / "photos" / "b.png", odd / name)
    assert run(net, [odd], PHRASES, tmp_path / "out")[0]["written"] == len(names) * len(PHRASES)
    summary, _ = run(net, [odd], PHRASES, tmp_path / "out")  # was refused: "not written by this tool"
    assert summary["skipped"] == len(names) * len(PHRASES) and summary["written"] == 0
    assert {r["image"] for r in index_rows(tmp_path / "out")} == {str(odd / name) for name in names}


def test_names_and_phrases_are_printed_with_their_escapes_shown(files, photos, tmp_path, capsys):
    (photos / "bad\x1b[2J.png").write_bytes(b"not an image")
    long = "\x1b[31m" + " and".join(["the red circle"] * 12)  # longer than the smoke model's 10 tokens
    code = cli(files, "--images", photos, "--phrase", long, "--phrase", long + "!", "--phrase", "green",
               "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert "1 of 4 image(s) could not be read" in str(code)
    assert "\x1b" not in err and "bad\\x1b[2J.png" in err and "\\x1b[31m" in err
    notes = [line for line in err.splitlines() if "longer than" in line]
    assert len(notes) == 1 and "note: 2 phrase(s) longer than 10 tokens" in notes[0]  # one line, the tool's format
    assert "Warning" not in err and "warn_if_cut" not in err
