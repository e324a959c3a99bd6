"""The one LMDB format, as every source writes it: what the builder refuses, counts and reports; old files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from phrasecut_files import good_task, official_mask, rectangle, tiny_root
from PIL import Image
from pycocotools import mask as coco_rle

import data
import data as datasets
from helpers import transforms
from sources import lmdb_store, phrasecut

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("ids, message", [
    (["7__1", "7__1"], r"task #1 '7__1' has the same id \(task #0\)"),
    (["Box_1", "box_1"], r"task #1 'box_1' has the same file name as 'Box_1' on a case-insensitive disk"),
    ([5, "5"], r"task #1 '5' has the same id"),
    (["ok", "../evil"], r"task #1: unsafe task id for a file name: '../evil'"),
    (["ok", ".hidden"], r"task #1: unsafe task id")])
def test_task_ids_that_collide_as_file_names_are_refused(tmp_path, ids, message):
    root = tiny_root(tmp_path, [good_task(task_id=i) for i in ids])
    with pytest.raises(ValueError, match=r"refer_train.json: " + message):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert not (tmp_path / "t.lmdb").exists()


def test_empty_ground_truth_is_counted_and_reported(tmp_path, capsys):
    tasks = [good_task(), good_task(task_id="1__1", Polygons=[]), good_task(task_id="1__2", Polygons=[[[[3, 3]]]])]
    root = tiny_root(tmp_path, tasks)
    data.main(["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")])
    out = capsys.readouterr().out
    assert "warning: 2 tasks have an empty ground truth" in out and "1__1; 1__2" in out
    header = datasets.PhraseCutLMDB(tmp_path / "t.lmdb").header
    assert (header["empty_tasks"], header["empty_task_ids"]) == (2, ["1__1", "1__2"])


def test_a_multi_frame_image_says_which_frame_it_used(tmp_path, capsys):
    root = tiny_root(tmp_path)
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    frames[0].save(root / "images" / "1.jpg", format="GIF", save_all=True, append_images=frames[1:])
    data.main(["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")])
    assert "warning: 1 images have several frames (GIF, TIFF); the first was used, e.g. 1: frame 0 of 3" in \
        capsys.readouterr().out
    ds = datasets.PhraseCutLMDB(tmp_path / "t.lmdb", input_size=32)
    assert ds.header["multi_frame_examples"] == ["1: frame 0 of 3"]
    pixel = transforms.unnormalize(ds[0]["image"])[:, 16, 16]  # the first frame's red
    assert pixel[0] > 0.7 and pixel[1] < 0.1


def test_a_header_that_disagrees_with_its_records_is_refused(tmp_path):
    root = tiny_root(tmp_path, [good_task(), good_task(task_id="1__1")])
    out = tmp_path / "t.lmdb"
    phrasecut.build_lmdb(root, "train", out, progress=False)
    header = json.loads(lmdb.open(str(out), subdir=False, readonly=True, lock=False).begin().get(b"__header__"))
    for name, edit, message in (
            ("fewer.lmdb", {"num_tasks": 1}, "counts 1 tasks and 1 images, but the file holds 3 records, not 2"),
            ("images.lmdb", {"num_images": 2}, "counts 2 tasks and 2 images, but the file holds 3 records, not 4")):
        path = tmp_path / name
        shutil.copy(out, path)
        env = lmdb.open(str(path), subdir=False, lock=False)
        with env.begin(write=True) as txn:
            txn.put(b"__header__", json.dumps({**header, **edit}).encode())
        env.close()
        with pytest.raises(ValueError, match=f"{path}: the header {message}"):
            datasets.PhraseCutLMDB(path)


def _dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except OSError:
            pass
        pid -= 1


def test_a_rerun_removes_the_temporaries_of_a_killed_build(tmp_path, capsys):
    root = tiny_root(tmp_path)
    out = tmp_path / "lmdb" / "train.lmdb"
    out.parent.mkdir()
    stale = out.parent / f".train.lmdb.tmp-{_dead_pid()}"
    stale.write_bytes(b"\0" * 4096)  # what a build killed with SIGKILL leaves
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = out.parent / f".train.lmdb.tmp-{sleeper.pid}"  # a build still running
        busy.write_bytes(b"\0" * 10)
        other = out.parent / ".val.lmdb.tmp-1"  # another output's: not ours to judge
        other.write_bytes(b"")
        data.main(["build", "--root", str(root), "--split", "train", "--out", str(out)])
        printed = capsys.readouterr().out
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not stale.exists() and f"note: removed {stale} (4,096 bytes), left by a build" in printed
    assert busy.exists() and f"{busy} (10 bytes) belongs to process {sleeper.pid}, still running" in printed
    assert other.exists() and out.is_file()


def test_version_2_files_written_by_the_earlier_code_are_still_read():
    """tests/fixtures/phrasecut_v2.lmdb was written by the version-2 code: two tasks on a 16x12 and a
    12x8 image, the rectangles of tiny_root's good_task (0, 0, 10, 10) and (2, 3, 5, 4)."""
    ds = datasets.PhraseCutLMDB(FIXTURES / "phrasecut_v2.lmdb", input_size=32, train=False)
    assert (ds.header["version"], ds.dataset, len(ds)) == (2, "phrasecut", 2)
    first, second = ds[0], ds[1]
    assert first["phrase"] == "grey box" and second["phrase"] == "small box"
    assert np.array_equal(first["gt_mask"].numpy(), official_mask([rectangle(0, 0, 10, 10)], 16, 12))
    assert np.array_equal(second["gt_mask"].numpy(), official_mask([rectangle(2, 3, 5, 4)], 12, 8))
    assert first["ignore_mask"] is None and "i_single" in first["subsets"]


def test_rle_strings_are_read_as_pycocotools_writes_them():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (30, 40), (64, 3)):
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random((h, w)) < density
            rle = transforms.mask_to_rle(mask)
            counts = transforms.rle_counts(rle["counts"])
            assert sum(counts) == h * w  # every pixel once, as decoding needs
            again = coco_rle.decode(coco_rle.frPyObjects({"size": [h, w], "counts": counts}, h, w))
            assert np.array_equal(again, mask) and np.array_equal(transforms.coco_mask([rle], h, w), mask)


@pytest.mark.parametrize("seg, message", [
    ({"size": [4, 4], "counts": [0, 100]}, "cover 100 pixels"),        # would write past the mask
    ({"size": [4, 4], "counts": [20, -4]}, "some negative"),
    ({"size": [9, 9], "counts": [81]}, "RLE size is \\[9, 9\\]"),
    ({"size": [4, 4], "counts": "0~"}, "not a COCO RLE"),
    ([[0, 0, 1e12, 0, 3, 3]], "far outside"),                           # pycocotools would allocate by its extent
    ([[0, 0, 1, 1, 2]], "even number"),
    ("a string", "expected polygons")])
def test_a_hostile_segmentation_is_refused_before_pycocotools_decodes_it(seg, message):
    with pytest.raises(ValueError, match=message):
        transforms.coco_mask([seg], 4, 4)


def test_an_image_file_beyond_any_real_image_is_refused_before_it_is_read(tmp_path, monkeypatch):
    root = tiny_root(tmp_path, [good_task(), good_task(task_id="2__0", image_id=2)], sizes=[(40, 30), (40, 30)])
    size = (root / "images" / "1.jpg").stat().st_size
    monkeypatch.setattr(lmdb_store, "MAX_IMAGE_BYTES", size - 1)  # as a 2 GB file against the real limit
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or b"")
    with pytest.raises(ValueError, match=f"images/1.jpg \\(image id 1\\) is {size:,} bytes, over the {size - 1:,}"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert "1.jpg" not in read
