"""train.py --data with several sources: their training tasks mixed (data.MixedTasks), the sampling rule,
validation on the first folder's val.lmdb, and the checks on each entry."""
import json
from collections import Counter

import pytest
import torch
from coco_files import refer_root
from grefcoco_files import grefcoco_root

import data
import train
from helpers import train_config
from sources import grefcoco, refcoco


@pytest.fixture
def sources(tmp_path):
    """A RefCOCO folder (train.lmdb: 3 tasks, val.lmdb: 3) and a gRefCOCO train LMDB file (5 tasks)."""
    folder = tmp_path / "refcoco_unc"
    root = refer_root(tmp_path)
    refcoco.build_refcoco(root, "refcoco", "unc", "train", folder / "train.lmdb", progress=False)
    refcoco.build_refcoco(root, "refcoco", "unc", "testA", folder / "val.lmdb", progress=False)
    gref = tmp_path / "grefcoco_train.lmdb"
    grefcoco.build_grefcoco(grefcoco_root(tmp_path), "train", gref, progress=False)
    return folder, gref


def test_mixed_tasks_hold_every_source_and_keep_their_images_apart(sources):
    folder, gref = sources
    a, b = (data.PhraseCutLMDB(p, input_size=32, train=True) for p in (folder / "train.lmdb", gref))
    mixed = data.MixedTasks([a, b])
    assert len(mixed) == 3 + 5 and mixed.paths == [a.path, b.path]
    assert mixed.image_ids() == [f"0/{i}" for i in a.image_ids()] + [f"1/{i}" for i in b.image_ids()]
    assert a.image_ids()[0] == b.image_ids()[0] == "1"  # the same COCO id in both: still two keys
    assert [mixed[i]["image_id"] for i in range(len(mixed))] == mixed.image_ids()
    assert torch.equal(mixed[3]["mask"], b[0]["mask"]) and mixed[-1]["no_target"] == b[4]["no_target"]


def test_the_sampling_rule_every_task_once_an_epoch_shuffled_together(sources):
    folder, gref = sources
    mixed = data.MixedTasks([data.PhraseCutLMDB(p, input_size=32) for p in (folder / "train.lmdb", gref)])
    sampler = data.ImageGroupedSampler(mixed.image_ids(), batch_size=1, seed=0)
    orders = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(8))  # each task of each source exactly once
        orders.append(order)
    sources_first = Counter(order[0] < 3 for order in orders)
    assert len({tuple(o) for o in orders}) > 1 and len(sources_first) == 2  # shuffled across the sources
    shuffled = torch.utils.data.DistributedSampler(mixed, num_replicas=1, rank=0, shuffle=True, seed=0)
    assert sorted(shuffled) == list(range(8))


def test_train_mixes_a_folder_and_a_file_and_validates_on_the_first(sources, tmp_path, capsys):
    folder, gref = sources
    run = tmp_path / "run"
    train.main(["--preset", "smoke", "--data", str(folder), str(gref), "--out", str(run), "--epochs", "1",
                "--batch-size", "2", "--num-workers", "0", "--no-eval-test"])
    assert "8 train samples, 3 val" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["data"] == [str(folder), str(gref)] and config["data_dir"] == str(folder)


def test_each_data_entry_is_checked(sources, tmp_path):
    folder, gref = sources
    (tmp_path / "empty").mkdir()
    for data_args, message in (([str(folder), str(tmp_path / "nope.lmdb")], "nope.lmdb does not exist"),
                               ([str(folder), str(tmp_path / "empty")], "empty: missing .*train.lmdb"),
                               ([str(gref), str(folder)], "is not a directory")):
        with pytest.raises(SystemExit):
            train_config.parse_args(["--preset", "smoke", "--data", *data_args, "--out", str(tmp_path / "r")])
        cfg = train_config.TrainConfig(preset="smoke", data=data_args)
        with pytest.raises(ValueError, match=message):
            train_config.check_data(cfg)
