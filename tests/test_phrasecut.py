"""PhraseCut's files: conversion to LMDB, every check on hostile and careless input, the subsets."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
from phrasecut_files import copy_root, good_task, rectangle, tasks_of, tiny_root
from PIL import Image

import data
import data as datasets
from helpers import files
from sources import lmdb_store, phrasecut, synthetic


def test_corrupt_image_is_named_and_leaves_no_lmdb(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    ids = sorted({str(t["image_id"]) for t in tasks_of(root)}, key=str.encode)
    bad = root / "images" / f"{ids[len(ids) // 2]}.jpg"  # halfway through the conversion
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "out" / "train.lmdb"
    with pytest.raises(ValueError, match=f"images/{ids[len(ids) // 2]}.jpg"):
        phrasecut.build_lmdb(root, "train", out, progress=False)
    assert list(out.parent.iterdir()) == []  # neither the LMDB nor its temporary file
    stats = phrasecut.build_lmdb(root, "train", out, skip_missing=True, progress=False)
    assert stats["skipped_images"] == 1 and stats["skipped_tasks"] >= 1


def test_atomic_path_shows_the_file_only_when_it_is_whole(tmp_path):
    target = tmp_path / "checkpoint.pth"
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
        assert not target.exists() and tmp.parent == tmp_path  # same file system: the rename is atomic
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_missing_image_and_skip_missing(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    tasks = tasks_of(root)
    gone = tasks[0]["image_id"]
    (root / "images" / f"{gone}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=f"images/{gone}.jpg"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert not (tmp_path / "t.lmdb").exists()
    stats = phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", skip_missing=True, progress=False)
    lost = sum(t["image_id"] == gone for t in tasks)
    assert stats["skipped_tasks"] == lost and len(data.PhraseCutLMDB(tmp_path / "t.lmdb")) == len(tasks) - lost


def test_build_errors_name_their_cause(synth, tmp_path):
    root = copy_root(synth[0], tmp_path)
    tasks = tasks_of(root)
    tasks[3]["phrase"] = "  "
    (root / "refer_train.json").write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=tasks[3]["task_id"]):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    (root / "refer_test.json").unlink()
    with pytest.raises(FileNotFoundError, match="refer_test.json"):
        phrasecut.build_lmdb(root, "test", tmp_path / "t.lmdb", progress=False)
    old = tmp_path / "old.lmdb"
    env = lmdb.open(str(old), subdir=False, map_size=1 << 20, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"__header__", json.dumps({"format": lmdb_store.LMDB_FORMAT, "version": 999}).encode())
    env.close()
    with pytest.raises(ValueError, match=f"{old}.*version 999.*version {lmdb_store.LMDB_VERSION}"):
        data.PhraseCutLMDB(old)
    tasks[3]["phrase"] = "a phrase again"
    (root / "refer_train.json").write_text(json.dumps(tasks))
    images = json.loads((root / "image_data_split.json").read_text())
    (root / "image_data_split.json").write_text(json.dumps([d for d in images if d["image_id"] != tasks[0]["image_id"]]))
    with pytest.raises(ValueError, match=f"{tasks[0]['task_id']}.*not in image_data_split.json"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    (root / "image_data_split.json").unlink()
    with pytest.raises(FileNotFoundError, match="image_data_split.json"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)


def test_subsets_use_the_listed_image_size_and_the_count_file(tmp_path):
    """Hand-made PhraseCut: one 60x40 image file that image_data_split.json lists as 100x50 (5000 pixels),
    so the relative sizes 0.02 and 0.2 are whole pixel counts; the official rule divides by 5000."""
    root = tmp_path / "hand"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (60, 40), (90, 120, 150)).save(root / "images" / "7.jpg")
    Image.new("RGB", (30, 30), (90, 120, 150)).save(root / "images" / "8.jpg")
    (root / "image_data_split.json").write_text(json.dumps([
        {"image_id": 7, "width": 100, "height": 50, "split": "val", "url": "", "coco_id": 4321, "flickr_id": None},
        {"image_id": 8, "width": 30, "height": 30, "split": "val", "url": "", "coco_id": None, "flickr_id": None}]))
    counts = {"cat": [[f"n{i}", 1000 - i] for i in range(30)], "att": [["red", 5], ["big", 4]], "rel": [["on", 1]]}
    (root / "name_att_rel_count.json").write_text(json.dumps(counts))

    def task(i, boxes, name="n0", atts=(), rels=(), ids=(), kind="name", image_id=7):
        return {"task_id": f"{image_id}__{i}", "image_id": image_id, "ann_ids": list(range(len(boxes))),
                "instance_boxes": [[0, 0, 1, 1]] * len(boxes), "Polygons": boxes, "phrase": f"phrase {i}",
                "phrase_structure": {"name": name, "attributes": list(atts), "relation_ids": list(ids),
                                     "relation_descriptions": [list(r) for r in rels], "type": kind}}
    cases = [  # (task, expected subsets among i_*, s_*, p_*, c*, a*, d_*)
        (task(0, [rectangle(0, 0, 9, 11)]), "s_small"),        # 99 px = 0.0198 (0.04 of the 60x40 file)
        (task(1, [rectangle(0, 0, 10, 10)]), "s_mid"),         # 100 px = 0.02 exactly
        (task(2, [rectangle(0, 0, 6, 17)]), "s_mid"),          # 102 px = 0.0204
        (task(3, [rectangle(0, 0, 27, 37)]), "s_mid"),         # 999 px = 0.1998
        (task(4, [rectangle(0, 0, 40, 25)]), "s_mid"),         # 1000 px = 0.2 exactly
        (task(5, [rectangle(0, 0, 77, 13)]), "s_large"),       # 1001 px = 0.2002, beyond the file's width
        (task(6, [rectangle(0, 0, 5, 5), rectangle(50, 0, 5, 5)]), "i_multi"),
        (task(7, [rectangle(10 * k, 0, 3, 3) for k in range(4)]), "i_multi"),
        (task(8, [rectangle(10 * k, 0, 3, 3) for k in range(5)]), "i_many"),
        (task(9, [rectangle(0, 0, 5, 5)], ids=[11, 12], kind="verbose"), "p_verbose"),
        (task(10, [rectangle(0, 0, 5, 5)], atts=["big", "red"], rels=[("on", "n3"), ("by", "n4")], kind="relation"),
         "p_att p_rel p_rel+ p_attm p_relm p_att_rel"),
        (task(11, [rectangle(0, 0, 5, 5)], name="n19"), "c20"),
        (task(12, [rectangle(0, 0, 5, 5)], name="n20"), "c21-100"),
        (task(13, [rectangle(0, 0, 5, 5)], name="zebra"), "c500+"),
        (task(14, [rectangle(0, 0, 20, 20)], image_id=8), "d_notcocotv"),  # 400 / 900 px
    ]
    (root / "refer_val.json").write_text(json.dumps([t for t, _ in cases]))
    stats = phrasecut.build_lmdb(root, "val", tmp_path / "val.lmdb", progress=False)
    assert stats["size_mismatches"] == 1 and stats["name_att_rel_count"] == {"cat": counts["cat"], "att": counts["att"]}
    ds = data.PhraseCutLMDB(tmp_path / "val.lmdb", input_size=32, train=False)
    folder = datasets.PhraseCutFolder(root, "val", input_size=32, train=False)
    for i, (t, expected) in enumerate(cases):
        names = ds[i]["subsets"]
        assert names == folder[i]["subsets"]
        assert set(expected.split()) <= set(names), (t["task_id"], names)
    assert ds[0]["gt_mask"].shape == (40, 60) and ds[0]["gt_mask"].sum() == 99  # the mask itself: the file's size
    assert ds[0]["subsets"] == ["i_single", "p_name", "s_small", "c20", "c100", "c500", "a200+", "d_cocotv"]
    assert "s_large" in ds[14]["subsets"]  # 400 / 900 of the listed size
    assert [n for n in ds[10]["subsets"] if n[0] in "ac"] == ["c20", "c100", "c500", "a20", "a100", "a200"]
    assert "p_rel" not in ds[9]["subsets"] and [n for n in ds[12]["subsets"] if n[0] == "c"] == \
        ["c100", "c500", "c21-100"]


# ----------------------------------------------------------------------------- hostile and careless input

def cli_error(argv, capsys):
    """data.main(argv) must fail as a user mistake: exit 2, `data.py...: error: ...`, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        data.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert last.startswith("data.py") and ": error: " in last, err
    return last


def test_build_never_replaces_an_input_or_a_foreign_file(tmp_path):
    root = tiny_root(tmp_path)
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (tmp_path / "link.lmdb").symlink_to(root / "refer_train.json")
    for out in (root / "refer_train.json", root / "image_data_split.json", root / "images" / "1.jpg",
                root / "images" / "new.lmdb", root, root / "images", tmp_path / "link.lmdb"):
        with pytest.raises(ValueError, match="one of --root's inputs"):
            phrasecut.build_lmdb(root, "train", out, progress=False)
    notes = tmp_path / "notes.lmdb"
    notes.write_text("my notes")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=f"{notes} exists and is not an LMDB written by .*delete it first"):
        phrasecut.build_lmdb(root, "train", notes, progress=False)
    (root / "refer_train.json").write_text("[{")  # the refusal comes first, before any work
    with pytest.raises(ValueError, match="is a directory"):
        phrasecut.build_lmdb(root, "train", tmp_path / "folder", progress=False)
    (root / "refer_train.json").write_bytes(snapshot[root / "refer_train.json"])
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot
    assert notes.read_text() == "my notes" and list((tmp_path / "folder").iterdir()) == []
    ours = tmp_path / "ours.lmdb"  # an LMDB this tool wrote is replaced
    phrasecut.build_lmdb(root, "train", ours, progress=False)
    assert phrasecut.build_lmdb(root, "train", ours, progress=False)["num_tasks"] == 1
    with pytest.raises(ValueError, match="not an empty folder.*delete it first"):
        synthetic.synthesize(root, num_images=4, size=32)  # synth never writes over a dataset either
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot


def test_build_validates_every_task_record(tmp_path):
    no_polygons = good_task()
    del no_polygons["Polygons"]
    cases = [  # (refer_train.json's content, what the error must say)
        ([good_task(Polygons="circle")], r"task '1__0': Polygons is 'circle'"),
        ([good_task(Polygons=[[[[1, 2], [float("nan"), 3]]]])], r"Polygons\[0\]\[0\]\[1\] is \[nan, 3\]"),
        ([good_task(Polygons=[[[[1, 2], ["4", 3]]]])], r"Polygons\[0\]\[0\]\[1\] is \['4', 3\]"),
        ([good_task(Polygons=[[[[1, 2, 3]]]])], r"Polygons\[0\]\[0\]\[0\] is \[1, 2, 3\], expected \[x, y\]"),
        ([good_task(Polygons=[["x"]])], r"Polygons\[0\]\[0\] is 'x'"),
        ([good_task(phrase=None)], r"task '1__0': phrase is None, expected a non-empty string"),
        ([good_task(phrase=7)], r"phrase is 7"),
        ([good_task(image_id=[1])], r"image_id is \[1\]"),
        ([good_task(instance_boxes=3)], r"instance_boxes is 3"),
        ([good_task(phrase_structure={"attributes": "red"})], r"phrase_structure.attributes is 'red'"),
        ([good_task(), no_polygons], r"task '1__0' lacks fields \['Polygons'\]"),
        ([good_task(), "oops"], r"record #1 is a JSON string, expected an object"),
        ({"tasks": [good_task()]}, r"the top level is a JSON object, expected an array"),
    ]
    root = tiny_root(tmp_path)
    for content, message in cases:
        (root / "refer_train.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match="refer_train.json: .*" + message):
            phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
        with pytest.raises(ValueError, match=message):
            datasets.PhraseCutFolder(root, "train")
        assert not (tmp_path / "t.lmdb").exists()


def test_build_reports_images_whose_size_differs_from_the_annotations(tmp_path, capsys):
    root = tiny_root(tmp_path, sizes=[(30, 20)], listed=[(40, 30)])  # a 30x20 file for a 40x30 image
    data.main(["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")])
    out = capsys.readouterr().out
    assert "warning: 1 images differ in size from image_data_split.json" in out and "1: file 30x20, listed 40x30" in out
    assert data.PhraseCutLMDB(tmp_path / "t.lmdb").header["size_mismatch_examples"] == ["1: file 30x20, listed 40x30"]


def test_build_refuses_a_listed_size_absurd_beside_the_image(tmp_path):
    """A 40x30 file listed as 100000x100000: its subsets would rasterise 10 GB at the listed size."""
    root = tiny_root(tmp_path, [good_task(), good_task(task_id="2__0", image_id=2)], sizes=[(40, 30), (40, 30)],
                     listed=[(100_000, 100_000), (40, 30)])
    with pytest.raises(ValueError, match=r"images/1.jpg is 40x30 but its record \(image id 1\) lists 100000x100000"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert not (tmp_path / "t.lmdb").exists()
    stats = phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", skip_missing=True, progress=False)
    assert (stats["skipped_image_ids"], stats["num_tasks"]) == (["1"], 1)


def test_build_applies_the_decompression_bomb_limit(tmp_path, monkeypatch):
    root = tiny_root(tmp_path, [good_task(), good_task(task_id="2__0", image_id=2)], sizes=[(300, 200), (40, 30)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40_000)  # image 1 (60,000 px) is only in PIL's warning range
    with pytest.raises(ValueError, match="images/1.jpg.*decompression bomb"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    stats = phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", skip_missing=True, progress=False)
    assert (stats["skipped_images"], stats["skipped_image_ids"], stats["num_tasks"]) == (1, ["1"], 1)


def test_image_paths_stay_inside_the_images_folder(tmp_path):
    root = tiny_root(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")
    (root / "images" / "2.jpg").symlink_to(tmp_path / "secret.jpg")
    for image_id in ("../../secret", str(tmp_path / "secret"), 2):
        (root / "refer_train.json").write_text(json.dumps([good_task(), good_task(task_id="x", image_id=image_id)]))
        with pytest.raises(ValueError, match=f"task x: image_id {image_id!r} leads outside"):
            phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
        folder = datasets.PhraseCutFolder(root, "train", input_size=32)
        folder.infos[str(image_id)] = folder.infos["1"]
        with pytest.raises(ValueError, match="leads outside"):
            folder[1]
    linked = tmp_path / "linked"  # the images folder itself may be a symlink (another disk)
    linked.mkdir()
    (linked / "images").symlink_to(root / "images")
    for name in ("image_data_split.json", "refer_train.json"):
        (linked / name).symlink_to(root / name)
    (root / "refer_train.json").write_text(json.dumps([good_task()]))
    assert phrasecut.build_lmdb(linked, "train", tmp_path / "t.lmdb", progress=False)["num_images"] == 1


def test_damaged_lmdb_is_named_not_a_crash(synth, tmp_path):
    _, out, _ = synth
    half = tmp_path / "half.lmdb"
    half.write_bytes(out.read_bytes()[:out.stat().st_size // 2])
    # in a child process: without the size check, reading it is a bus error that would kill pytest
    run = subprocess.run([sys.executable, str(Path(data.__file__)), "bench", str(half), "--n", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"data.py: error: {half} is truncated" in run.stderr, run.stderr
    with pytest.raises(ValueError, match=f"{half} is truncated"):
        data.PhraseCutLMDB(half)

    def damaged(name, edit):
        path = tmp_path / name
        shutil.copy(out, path)
        env = lmdb.open(str(path), subdir=False, lock=False)
        with env.begin(write=True) as txn:
            edit(txn)
        env.close()
        return path
    bad = damaged("records.lmdb", lambda txn: (txn.put(b"task/00000003", b"\xff\x00garbage"),
                                               txn.put(b"task/00000004", b"[1, 2]")))
    ds = data.PhraseCutLMDB(bad, input_size=32)
    for i in (3, 4):
        with pytest.raises(ValueError, match=f"{bad}: record task/0000000{i} is corrupt"):
            ds[i]
    header = data.PhraseCutLMDB(out).header
    more = damaged("more.lmdb", lambda txn: txn.put(b"__header__", json.dumps({**header, "num_tasks": 10**6}).encode()))
    with pytest.raises(ValueError, match=f"{more}: the header counts 1000000 tasks but record task/00999999 is missing"):
        data.PhraseCutLMDB(more)
    garbled = damaged("header.lmdb", lambda txn: txn.put(b"__header__", b"\xff{"))
    with pytest.raises(ValueError, match=f"{garbled}: record __header__ is corrupt"):
        data.PhraseCutLMDB(garbled)


def test_cli_user_mistakes_exit_2_with_a_message(tmp_path, capsys):
    root = tiny_root(tmp_path)
    refer = root / "refer_train.json"
    build = ["build", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.lmdb")]
    good = refer.read_text()
    for content, message in ((good[:len(good) // 2], r"is not valid JSON: .*\(line 1, column \d+\); the file ends early"),
                             ("\x00\xff", "is not valid JSON"),
                             ('{"a": 1}', "top level is a JSON object, expected an array"),
                             ("[{}]", r"task '#0' lacks fields")):
        refer.write_bytes(content.encode("latin-1"))
        err = cli_error(build, capsys)
        assert re.search(f"{refer}.*{message}", err), err
    refer.write_text(good)
    (root / "images" / "1.jpg").write_bytes(b"not a jpeg")
    assert "cannot read image" in cli_error(build, capsys) and "images/1.jpg: not an image" in cli_error(build, capsys)
    (tmp_path / "dir").mkdir()
    assert "is a directory" in cli_error(build[:-1] + [str(tmp_path / "dir")], capsys)
    (root / "image_data_split.json").write_text("[1]")
    assert "image_data_split.json: record #0 is 1" in cli_error(build, capsys)
    assert "not an empty folder" in cli_error(["synth", "--out", str(root)], capsys)
    assert "expected a positive integer" in cli_error(["synth", "--out", str(tmp_path / "s"), "--images", "0"], capsys)
    assert "not a readable LMDB file" in cli_error(["bench", str(refer)], capsys)
    assert "no LMDB file" in cli_error(["bench", str(tmp_path / "nowhere.lmdb")], capsys)


def test_duplicate_ids_are_refused_naming_both_records(tmp_path):
    root = tiny_root(tmp_path, sizes=((40, 30), (20, 20)))
    infos = json.loads((root / "image_data_split.json").read_text())
    infos[1]["image_id"] = "1"  # a string of image 1's id: the same image, so its size would be replaced
    (root / "image_data_split.json").write_text(json.dumps(infos))
    with pytest.raises(ValueError, match=r"image_data_split.json: records #0 and #1 have the same image_id '1'"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    root = tiny_root(tmp_path / "b")
    (root / "refer_train.json").write_text(json.dumps([good_task(), good_task(phrase="another")]))
    with pytest.raises(ValueError, match=r"refer_train.json: task #1 '1__0' has the same id \(task #0\)"):
        phrasecut.build_lmdb(root, "train", tmp_path / "t.lmdb", progress=False)
    assert not (tmp_path / "t.lmdb").exists()
