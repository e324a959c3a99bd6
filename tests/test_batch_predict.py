"""predict.py's folder mode (helpers/batch_predict.py): every image x every phrase, one 0/255 mask at the image's
size and a row of index.csv each; broken files named and counted, the rest done; a rerun skips and rewrites
nothing; masks equal the single-image predict's; OUT locked, user files in it kept; Ctrl-C resumable."""
import csv
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tooling import one_line_error, run_tool, save_model_checkpoint, start_tool

import predict
from helpers import batch_predict
from helpers.files import hold_dir, load_mask

PHRASES = ["red circle", "the blue square on the left", "green"]
SIZES = {"a.jpg": (37, 53), "b.png": (80, 40), "sub/c.jpg": (64, 64), "sub/deeper/d.png": (23, 90)}
BROKEN = {"broken.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "empty.png": b"", "notes.txt": b"a text file\n"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import model
    root = tmp_path_factory.mktemp("folder")
    torch.manual_seed(0)
    save_model_checkpoint(model.build_model("smoke"), root / "best.pth")
    rng = np.random.default_rng(0)
    photos = root / "photos"
    for name, (h, w) in SIZES.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        # smooth colour blobs: probabilities away from the threshold are what a photo gives too
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / name)
    for name, data in BROKEN.items():
        (photos / name).write_bytes(data)
    (photos / ".hidden.jpg").write_bytes(b"never read")
    (root / "phrases.txt").write_text("\n".join(PHRASES + ["", PHRASES[0]]) + "\n")
    return root


@pytest.fixture(scope="module")
def net(files):
    return predict.load_model(files / "best.pth", device="cpu", precision="fp32")


def read_index(out):
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*.png")) if p.is_file()}


def test_cli_does_the_good_images_names_the_broken_ones_and_fails_with_a_count(files, tmp_path):
    out = tmp_path / "out"
    proc = run_tool("predict.py", "--ckpt", files / "best.pth", "--images", files / "photos",
                    "--phrases", files / "phrases.txt", "--out", out)
    one_line = one_line_error(proc, code=1)
    for name in BROKEN:
        assert f"{files / 'photos' / name}" in one_line  # each named, with its reason
    assert "is empty (0 bytes)" in one_line and "not an image" in one_line and "cannot decode" in one_line
    assert f"3 of {len(SIZES) + 3} image(s) could not be read" in one_line
    rows = read_index(out)
    assert list(rows[0]) == list(batch_predict.COLUMNS)
    assert {(r["image"], r["phrase"]) for r in rows} == {(str(files / "photos" / n), p) for n in SIZES for p in PHRASES}
    assert len(rows) == len(SIZES) * len(PHRASES)  # the repeated phrase and the blank line count once
    for r in rows:
        mask_file = out / r["mask"]
        assert mask_file.parent == out / "photos" / os.path.relpath(r["image"], files / "photos")  # its own folder
        with Image.open(mask_file) as im:
            h, w = SIZES[os.path.relpath(r["image"], files / "photos")]
            assert im.size == (w, h) == (int(r["width"]), int(r["height"])) and im.mode == "L"
            assert set(np.unique(np.asarray(im))) <= {0, 255}
        assert float(r["fraction"]) == pytest.approx(load_mask(mask_file).mean(), abs=1e-6)
    assert not any(".hidden" in r["image"] for r in rows)


def test_masks_equal_single_image_predict(files, net, tmp_path):
    images = [files / "photos" / n for n in SIZES]
    summary, failures = batch_predict.run(net, images, PHRASES, tmp_path, 0.35, batch_size=3, workers=0,
                                          progress=False)
    assert not failures and summary["written"] == len(SIZES) * len(PHRASES)
    probs_seen = []
    for r in read_index(tmp_path):
        single = predict.predict(net, r["image"], r["phrase"])  # what --image X --phrase Y --mask M saves
        assert np.array_equal(load_mask(tmp_path / r["mask"]), single), r
        probs_seen.append(single.mean())
    assert 0 < np.mean(probs_seen) < 1  # not all empty nor all full: the comparison says something
    # and the CLI's own single-image mask, for one pair
    pair = read_index(tmp_path)[4]
    predict.main(["--ckpt", str(files / "best.pth"), "--image", pair["image"], "--phrase", pair["phrase"],
                  "--out", str(tmp_path / "o.png"), "--mask", str(tmp_path / "m.png"), "--precision", "fp32"])
    assert np.array_equal(load_mask(tmp_path / "m.png"), load_mask(tmp_path / pair["mask"]))


def test_resume_skips_done_pairs_and_rewrites_nothing(files, net, tmp_path):
    images = [files / "photos" / n for n in SIZES]
    batch_predict.run(net, images[:2], PHRASES[:2], tmp_path, 0.35, workers=0, progress=False)
    before, index_before = mtimes(tmp_path), (tmp_path / "index.csv").read_bytes()
    time.sleep(0.01)
    summary, _ = batch_predict.run(net, images[:2], PHRASES[:2], tmp_path, 0.35, workers=0, progress=False)
    assert summary["written"] == 0 and summary["skipped"] == 4
    assert mtimes(tmp_path) == before and (tmp_path / "index.csv").read_bytes() == index_before
    # more images and phrases: only the new pairs are written, the old files untouched
    summary, _ = batch_predict.run(net, images, PHRASES, tmp_path, 0.35, workers=0, progress=False)
    assert summary["written"] == len(SIZES) * len(PHRASES) - 4 and summary["skipped"] == 4
    assert {p: t for p, t in mtimes(tmp_path).items() if p in before} == before
    rows = read_index(tmp_path)
    assert len(rows) == len({r["mask"] for r in rows}) == len(SIZES) * len(PHRASES)
    # a row a killed run left half-written is dropped and its pair done again; a listed mask that is gone is redone
    gone = tmp_path / rows[-1]["mask"]
    gone.unlink()
    with open(tmp_path / "index.csv", "a") as f:
        f.write(f"{images[0]},half a ro")
    summary, _ = batch_predict.run(net, images, PHRASES, tmp_path, 0.35, workers=0, progress=False)
    assert summary["written"] == 1 and gone.is_file()
    rows = read_index(tmp_path)
    assert len(rows) == len(SIZES) * len(PHRASES) + 1 and rows[-1]["mask"] == rows[-2]["mask"]  # listed again
    assert "half a ro" not in (tmp_path / "index.csv").read_text()


def test_user_files_in_out_and_a_held_out_are_refused(files, net, tmp_path):
    images = [files / "photos" / "a.jpg"]
    name = batch_predict.mask_name("a.jpg", "green")
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_bytes(b"the user's own file")
    with pytest.raises(ValueError, match="did not write"):
        batch_predict.run(net, images, ["green"], tmp_path, 0.35, workers=0, progress=False)
    assert (tmp_path / name).read_bytes() == b"the user's own file"
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.csv").write_text("id,score\n1,2\n")  # somebody's index.csv
    with pytest.raises(ValueError, match="index.csv was not written by predict.py"):
        batch_predict.run(net, images, ["green"], other, 0.35, workers=0, progress=False)
    with hold_dir(tmp_path / "held", "--out"), pytest.raises(SystemExit) as stop:
        predict.main(["--ckpt", str(files / "best.pth"), "--images", str(images[0]), "--phrase", "x",
                      "--out", str(tmp_path / "held")])
    assert "in use by another run" in str(stop.value.code)


def test_flags_of_the_two_modes_are_checked(files, tmp_path, capsys):
    cases = [(["--images", files / "photos", "--phrase", "x"], "needs --out"),
             (["--images", files / "photos", "--out", tmp_path], "--phrases FILE or --phrase"),
             (["--image", files / "photos" / "a.jpg"], "--image needs --phrase"),
             (["--image", files / "photos" / "a.jpg", "--phrase", "x", "--phrases", files / "phrases.txt"],
              "--phrases belong(s) to the folder mode"),
             (["--images", tmp_path / "nowhere", "--phrase", "x", "--out", tmp_path / "o"], "no such file or folder"),
             (["--images", files / "photos", "--phrase", "x", "--out", tmp_path, "--mask", tmp_path / "m.png"],
              "--mask is for one --image")]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            predict.main(["--ckpt", str(files / "best.pth"), *map(str, args)])
        assert stop.value.code == 2 and message in capsys.readouterr().err, args


@pytest.mark.slow
def test_ctrl_c_leaves_an_index_a_rerun_continues(files, tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    out = tmp_path / "out"
    args = ("--ckpt", files / "best.pth", "--images", photos, "--phrase", "a", "--phrase", "b", "--out", out,
            "--batch-size", "1", "--workers", "1")
    proc = start_tool("predict.py", *args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "index.csv").is_file() and len((out / "index.csv").read_text().splitlines()) > 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    rows = read_index(out)
    assert 2 < len(rows) < 600 and all((out / r["mask"]).is_file() for r in rows)
    before = {out / r["mask"]: (out / r["mask"]).stat().st_mtime_ns for r in rows}
    done = run_tool("predict.py", *args, check=True)
    assert f"{len(rows)} already in" in done.stdout
    rows = read_index(out)
    assert len(rows) == 600 and len({r["mask"] for r in rows}) == 600
    assert all(path.stat().st_mtime_ns == t for path, t in before.items())
