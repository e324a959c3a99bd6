"""Category prompts on MS COCO and PASCAL VOC (the paper's Fig. 7): tasks, masks, the void rule, scores."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from coco_files import coco_folder, voc_labels, voc_root
from PIL import Image
from pycocotools.coco import COCO

import data
import data as datasets
import evaluate
import evaluate as metrics
from helpers import files
from sources import coco, voc


def test_coco_one_task_per_image_and_category_with_pycocotools_masks(tmp_path):
    annotations, images = coco_folder(tmp_path)
    stats = coco.build_coco(annotations, images, tmp_path / "coco.lmdb", template="a photo of a {}", progress=False)
    ds = datasets.PhraseCutLMDB(tmp_path / "coco.lmdb", input_size=32, train=False)
    api = COCO(str(annotations))
    expected = {}
    for ann in api.anns.values():
        key = f"{ann['image_id']}_{ann['category_id']}"
        expected[key] = expected.get(key, 0) | api.annToMask(ann)  # union of the category's instances
    assert [ds[i]["task_id"] for i in range(len(ds))] == sorted(expected) and stats["num_tasks"] == 5
    for i in range(len(ds)):
        item = ds[i]
        name = api.cats[int(item["task_id"].split("_")[1])]["name"]
        assert item["phrase"] == f"a photo of a {name}" and item["subsets"] == ["i_single", name]
        assert np.array_equal(item["gt_mask"].numpy(), expected[item["task_id"]]), item["task_id"]
    assert ds.header["template"] == "a photo of a {}" and ds.category_names == ["person", "dining table"]
    assert ds.subset_names == ["i_single", "i_multi", "i_many"]
    for bad in ("the {} and {}", "no braces", "{name}"):
        with pytest.raises(ValueError, match="exactly one"):
            coco.build_coco(annotations, images, tmp_path / "x.lmdb", template=bad, progress=False)


def test_coco_instances_of_one_category_are_united(tmp_path):
    annotations, images = coco_folder(tmp_path)
    content = json.loads(annotations.read_text())
    for ann in content["annotations"]:
        ann["category_id"] = 1  # image 1's and image 3's two annotations now share a category
    annotations.write_text(json.dumps(content))
    coco.build_coco(annotations, images, tmp_path / "c.lmdb", progress=False)
    ds = datasets.PhraseCutLMDB(tmp_path / "c.lmdb", input_size=32, train=False)
    api = COCO(str(annotations))
    assert len(ds) == 3 and ds[0]["phrase"] == "person" and ds[0]["subsets"] == ["i_multi", "person"]
    assert np.array_equal(ds[0]["gt_mask"].numpy(), api.annToMask(api.anns[11]) | api.annToMask(api.anns[12]))


def test_coco_bad_records_are_named(tmp_path):
    annotations, images = coco_folder(tmp_path)
    good = annotations.read_text()
    for edit, message in ((lambda c: c["annotations"][2].update(image_id=77), "annotation 13: image_id 77 is not"),
                          (lambda c: c["annotations"][3]["segmentation"].update(counts="zz"), "annotation 14: segm"),
                          (lambda c: c["annotations"][2]["segmentation"]["counts"].append(5), "cover 869 pixels"),
                          (lambda c: c["annotations"][0]["segmentation"][0].__setitem__(0, 1e9), "far outside"),
                          (lambda c: c["images"][0].update(file_name="../x.jpg"), "not a plain file name")):
        content = json.loads(good)
        edit(content)
        annotations.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            coco.build_coco(annotations, images, tmp_path / "x.lmdb", progress=False)
    annotations.write_text(good)
    with pytest.raises(ValueError, match="is one of --annotations/--images's inputs"):
        coco.build_coco(annotations, images, annotations, progress=False)
    assert annotations.read_text() == good


def test_voc_one_task_per_class_with_its_void(tmp_path, capsys):
    root = voc_root(tmp_path)
    data.main(["build", "--source", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "v.lmdb")])
    assert "v.lmdb: 2 tasks, 1 images" in capsys.readouterr().out
    ds = datasets.PhraseCutLMDB(tmp_path / "v.lmdb", input_size=32, train=False)
    labels = voc_labels()
    items = [ds[0], ds[1]]
    assert [(it["task_id"], it["phrase"]) for it in items] == [("2007_000032_11", "dining table"),
                                                               ("2007_000032_15", "person")]
    for item, c in zip(items, (11, 15)):
        assert np.array_equal(item["gt_mask"].numpy(), labels == c)
        assert np.array_equal(item["ignore_mask"].numpy(), labels == 255)
    assert items[1]["subsets"] == ["person"] and ds.subset_names == [] and ds.category_names[14] == "person"
    assert voc.NAMES[15] == "potted plant" and voc.NAMES[19] == "tv monitor"


def test_void_pixels_count_in_neither_intersection_nor_union():
    """Hand-worked: 1x6 row, G = [1 1 1 0 0 0], P = [1 0 1 1 1 0], void V = [0 0 1 1 0 0].
    Without V: I = 2 (pixels 0, 2), U = 5 (0-4). With V: pixels 2 and 3 leave, I = 1, U = 3 (0, 1, 4)."""
    g = np.array([[1, 1, 1, 0, 0, 0]], bool)
    p = np.array([[1, 0, 1, 1, 1, 0]], bool)
    v = np.array([[0, 0, 1, 1, 0, 0]], bool)
    assert metrics.task_iou(p, g) == (2, 5)
    assert metrics.task_iou(p, g, v) == (1, 3)
    assert metrics.task_iou(torch.from_numpy(p), torch.from_numpy(g), torch.from_numpy(v)) == (1, 3)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.task_iou(p, g, v[:, :3])


def test_voc_scores_per_category_with_the_void_rule(tmp_path):
    root = voc_root(tmp_path)
    voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    labels = voc_labels()
    preds = tmp_path / "preds"
    preds.mkdir()
    person = (labels == 15) | (labels == 255)  # the person and its whole void border: the border is not counted
    files.save_mask(person, preds / "2007_000032_15.png")
    table = np.zeros_like(person)
    table[22:28, 20:29] = True  # half the table (6 x 9 of 6 x 18)
    files.save_mask(table, preds / "2007_000032_11.png")
    evaluate.main(["--data", str(tmp_path / "v.lmdb"), "--pred-masks", str(preds), "--json", str(tmp_path / "m.json"),
                   "--no-progress"])
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["categories"]["person"]["mIoU"] == 1.0 and result["categories"]["person"]["n"] == 1
    assert result["categories"]["dining table"]["mIoU"] == 0.5 and result["categories"]["cat"]["n"] == 0
    assert result["mIoU"] == 0.75 and result["subsets"] == {}


def test_voc_refuses_a_png_that_is_not_a_palette_image(tmp_path):
    root = voc_root(tmp_path, mode="L")
    with pytest.raises(ValueError, match="2007_000032.png: a mode L image, expected a palette"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    labels = voc_labels()
    labels[0, 0] = 42
    root = voc_root(tmp_path / "b", labels=labels)
    with pytest.raises(ValueError, match=r"class indices \[42\] are none of VOC's"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    with pytest.raises(ValueError, match="VOC's segmentation splits are train, val"):
        voc.build_voc(root, "trainval2", tmp_path / "v.lmdb", progress=False)
    root = voc_root(tmp_path / "c")
    Image.new("RGB", (20, 20)).save(root / "JPEGImages" / "2007_000032.jpg")  # not the PNG's 40x30
    with pytest.raises(ValueError, match="is 20x20 but its class PNG .* lists 40x30"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    with pytest.raises(ValueError, match="one of --root's inputs"):
        voc.build_voc(root, "val", root / "SegmentationClass" / "x.lmdb", progress=False)
    assert not (tmp_path / "v.lmdb").exists()


def test_pred_masks_of_the_wrong_size_or_unreadable_are_named(tmp_path, capsys):
    root = voc_root(tmp_path)
    voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    preds = tmp_path / "preds"
    preds.mkdir()
    files.save_mask(np.ones((30, 40), bool), preds / "2007_000032_11.png")
    files.save_mask(np.ones((300, 400), bool), preds / "2007_000032_15.png")
    argv = ["--data", str(tmp_path / "v.lmdb"), "--pred-masks", str(preds), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert "2007_000032_15.png is 400x300, but its image is 40x30" in str(exit_info.value.code)
    (preds / "2007_000032_15.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert "2007_000032_15.png: not a readable mask image" in str(exit_info.value.code)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--vis", str(tmp_path / "vis")])
    assert "--vis needs a model (--ckpt)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--pred-masks", str(preds)])
    assert "--pred-masks needs --data" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile and careless input (issue 33)

def test_coco_duplicate_ids_are_refused_naming_both_records(tmp_path):
    annotations, images = coco_folder(tmp_path)
    good = annotations.read_text()
    for key, index, first, message in (
            ("annotations", 4, 0, r"annotations\[0\] and annotations\[4\] have the same id 11"),
            ("categories", 1, 0, r"categories\[0\] and categories\[1\] have the same id 1 .*'person'.*'dining table'"),
            ("images", 2, 1, r"images\[1\] and images\[2\] have the same id 2")):
        content = json.loads(good)
        content[key][index]["id"] = content[key][first]["id"]
        if key == "categories":  # the annotations of the second category now point at no category: keep them valid
            for ann in content["annotations"]:
                ann["category_id"] = 1
        if key == "images":
            content["images"][2].update(width=36, height=24)
            content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 3]
        annotations.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            coco.build_coco(annotations, images, tmp_path / "x.lmdb", progress=False)
    assert not (tmp_path / "x.lmdb").exists()


def test_coco_a_polygon_of_two_points_and_a_folder_are_named(tmp_path, capsys):
    annotations, images = coco_folder(tmp_path)
    content = json.loads(annotations.read_text())
    content["annotations"][1]["segmentation"] = [[2, 2, 12, 2]]  # pycocotools would take it for a box
    annotations.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"{annotations}: annotation 12: segmentation: polygon 0 has 4 coordinates"):
        coco.build_coco(annotations, images, tmp_path / "x.lmdb", progress=False)
    with pytest.raises(ValueError, match=f"{annotations.parent} is a folder; name the COCO instances file"):
        coco.build_coco(annotations.parent, images, tmp_path / "x.lmdb", progress=False)


def test_deep_json_is_a_clean_error_naming_the_file(tmp_path):
    annotations, images = coco_folder(tmp_path)
    annotations.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{annotations}: JSON nested deeper than Python's recursion limit"):
        coco.build_coco(annotations, images, tmp_path / "x.lmdb", progress=False)
    annotations.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nested deeper"):
        files.read_json(annotations, dict)


def test_build_refuses_an_unwritable_out_naming_it_before_reading_input(tmp_path, capsys, monkeypatch):
    annotations, images = coco_folder(tmp_path)
    monkeypatch.setattr(coco, "read_instances", lambda path: pytest.fail("the input was read first"))
    with pytest.raises(SystemExit):
        data.main(["build", "--source", "coco", "--annotations", str(annotations), "--images", str(images),
                   "--out", "/proc/coco.lmdb"])
    err = capsys.readouterr().err
    assert "data.py: error: --out: cannot write in /proc" in err and ".tmp-" not in err


def big_header_png(path, width, height):
    """A palette PNG whose header claims width x height, with one tiny IDAT: PIL sees the size on opening."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
                     + chunk(b"PLTE", bytes(768)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_voc_class_png_of_absurd_size_is_refused_and_can_be_skipped(tmp_path, capsys):
    root = voc_root(tmp_path)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000033\n")
    Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "2007_000033.jpg")
    bomb = root / "SegmentationClass" / "2007_000033.png"
    big_header_png(bomb, 100_000, 100_000)
    with pytest.raises(ValueError, match=f"{bomb}: the class PNG is too large to decode safely.*--skip-missing"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    build = ["build", "--source", "voc", "--root", str(root), "--split", "val", "--out", str(tmp_path / "v.lmdb")]
    data.main(build + ["--skip-missing"])
    out = capsys.readouterr().out
    assert "v.lmdb: 2 tasks, 1 images" in out and "1 class PNGs cannot be read" in out and "2007_000033" in out
    assert datasets.PhraseCutLMDB(tmp_path / "v.lmdb", input_size=32, train=False).header["unreadable_masks"] == 1


def test_voc_size_mismatch_names_the_class_png_and_a_repeated_name_both_lines(tmp_path):
    root = voc_root(tmp_path)
    Image.new("RGB", (20, 20)).save(root / "JPEGImages" / "2007_000032.jpg")  # not the PNG's 40x30
    png = root / "SegmentationClass" / "2007_000032.png"
    with pytest.raises(ValueError, match=f"is 20x20 but its class PNG {png} .* lists 40x30"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\nx\n2007_000032\n")
    with pytest.raises(ValueError, match="val.txt: entries 1 and 3 both name 2007_000032"):
        voc.build_voc(root, "val", tmp_path / "v.lmdb", progress=False)


def test_data_build_exits_2_with_one_line_for_hostile_input(tmp_path):
    from tooling import one_line_error, run_tool
    annotations, images = coco_folder(tmp_path)
    annotations.write_text("[" * 100_000 + "]" * 100_000)
    proc = run_tool("data.py", "build", "--source", "coco", "--annotations", annotations, "--images", images,
                    "--out", tmp_path / "c.lmdb")
    assert "nested deeper than Python's recursion limit" in one_line_error(proc)
