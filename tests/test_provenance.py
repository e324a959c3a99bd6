"""helpers/provenance.py on records as files hold them: a field of the wrong type, a missing key, nesting, huge
strings. The record is checked (`checked`), its readable fields shown and the rest named as unreadable; no record
stops a tool (the page, predict.py, the API)."""
import pytest
import torch
from tooling import save_model_checkpoint, smoke_checkpoint

import model
import predict
from helpers import inference, provenance

GOOD = {"dataset": "synthetic", "name": provenance.NAMES["synthetic"], "train": {"split": "train", "tasks": 40,
        "images": 10}, "preset": "demo", "epochs": 3, "planned_epochs": 8, "best_val_mIoU": 0.5,
        "units": provenance.UNITS}


@pytest.mark.parametrize("change, unreadable", [
    ({"train": "x"}, ["train"]),
    ({"epochs": "many"}, ["epochs"]),
    ({"train": {"split": 3, "tasks": 40, "images": 10}}, ["train"]),
    ({"train": {"split": "train", "images": 10}}, ["train"]),  # a missing key
    ({"train": {"split": "train", "tasks": -1, "images": 10}}, ["train"]),
    ({"preset": {"a": {"b": {"c": [1, 2, {"d": None}]}}}}, ["preset"]),
    ({"epochs": True, "planned_epochs": 2.5}, ["epochs", "planned_epochs"]),
    ({"best_val_mIoU": float("nan")}, ["best_val_mIoU"]),
    ({"best_val_mIoU": 70.7}, ["best_val_mIoU"]),  # a percentage where a fraction belongs
    ({"epochs": torch.tensor([1, 2])}, ["epochs"]),
    ({"dataset": ["synthetic"], "name": None}, ["dataset", "name"]),
])
def test_a_wrong_field_is_named_and_the_rest_is_shown(change, unreadable):
    record = {**GOOD, **change}
    clean = provenance.checked(record)
    assert clean["unreadable"] == unreadable
    kept = {k: v for k, v in GOOD.items() if k not in change}
    assert clean == {"dataset": "unknown", **kept, "unreadable": unreadable}  # "unknown" when its own is unreadable
    line = provenance.describe(record)
    assert line.endswith(f" (unreadable in the checkpoint's record: {', '.join(unreadable)})")
    assert ("preset demo" in line) == ("preset" not in unreadable)
    assert provenance.checked(clean) == clean  # checking twice changes nothing


def test_what_is_not_a_record_and_what_is_huge():
    for record in ("trained on everything", ["x"], 3, None):
        assert provenance.checked(record) == {"dataset": "unknown", "unreadable": ["trained_on"]}
        assert provenance.describe(record) == "trained on unknown (the checkpoint's record of it is unreadable)"
    huge = provenance.checked({"dataset": "refcoco", "name": "R" * 10 ** 6, "split_by": "unc"})
    assert huge["name"] == "R" * (provenance.MAX_TEXT - 40) + "... (1,000,000 characters)"
    assert len(huge["name"]) <= provenance.MAX_TEXT and provenance.checked(huge) == huge
    assert provenance.checked({"epochs": 10 ** 30, "extra": {"any": "thing"}}) == {"dataset": "unknown",
                                                                                    "unreadable": ["epochs"]}
    assert provenance.describe({"format": "CRIS"}) == "a CRIS checkpoint; trained on unknown"
    assert provenance.checked(GOOD) == GOOD  # what train.py writes is kept as it is


def test_an_older_checkpoints_settings_of_the_wrong_type():
    old = {"args": {"preset": 3, "data": torch.zeros(3), "epochs": "x"}, "epoch": "7", "best_metric": torch.tensor(0.5),
           "data_dir": ["a"]}
    record = provenance.of_checkpoint(old)
    assert record["dataset"] == "unknown" and record["unreadable"] == ["preset", "epochs", "planned_epochs",
                                                                       "best_val_mIoU"]
    cris = provenance.of_checkpoint({"source": "CRIS", "cris": {"epoch": "fifty", "best_iou": 0.62}})
    assert cris["format"] == "CRIS" and cris["unreadable"] == ["epochs"] and cris["best_val_IoU"] == 0.62


def test_predict_and_the_api_run_on_a_checkpoint_with_a_broken_record(tmp_path, capsys):
    out = smoke_checkpoint(tmp_path, "photo.png", (30, 40))
    torch.manual_seed(0)
    broken = save_model_checkpoint(model.build_model("smoke"), tmp_path / "broken.pth",
                                   trained_on={"dataset": "synthetic", "train": "x", "epochs": "many"})
    net = inference.load_model(broken, "cpu", precision="fp32")
    assert net.trained_on == {"dataset": "synthetic", "unreadable": ["train", "epochs"]}
    assert provenance.describe(net.trained_on) == ("trained on synthetic (unreadable in the checkpoint's record: "
                                                   "train, epochs)")
    predict.main(["--ckpt", str(broken), "--image", str(out / "photo.png"), "--phrase", "red circle", "--out",
                  str(tmp_path / "o.png"), "--device", "cpu", "--precision", "fp32"])
    assert "predict.py: note: " + provenance.SYNTHETIC_NOTE in capsys.readouterr().err  # its dataset was readable
    assert (tmp_path / "o.png").is_file()


def test_a_runs_test_scores_are_read_beside_its_best_pth_and_nothing_else(tmp_path):
    import json
    run = tmp_path / "run"
    run.mkdir()
    assert provenance.test_scores(run / "best.pth") == ""  # no test_metrics.json
    (run / "test_metrics.json").write_text(json.dumps({"mIoU": 0.70691, "n": 718}))
    assert provenance.test_scores(run / "best.pth") == "test mean IoU 70.69 % (718 phrases)"
    assert provenance.test_scores(run / "checkpoint.pth") == ""  # train.py scores best.pth only
    gres = {"mIoU": 0.4865, "gIoU": 0.58519, "N_acc": 0.48370, "T_acc": 0.96518, "n": 902}
    (run / "test_metrics.json").write_text(json.dumps(gres))
    assert provenance.test_scores(run / "best.pth") == "test gIoU 58.52 %, N_acc 48.37 %, T_acc 96.52 % (902 phrases)"
    for bad in ("{", "[1, 2]", json.dumps({"mIoU": "high"}), json.dumps({"mIoU": 70.7}), json.dumps({**gres, "N_acc": None}),
                "[" * 100000):
        (run / "test_metrics.json").write_text(bad)
        assert provenance.test_scores(run / "best.pth") == "", bad[:40]


def test_the_notebooks_line_names_the_file_under_the_repository_what_it_knows_and_its_test_score(tmp_path):
    import json
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "test_metrics.json").write_text(json.dumps({"mIoU": 0.5, "n": 10}))
    line = inference.weights_line(run / "best.pth", GOOD, root=tmp_path)
    assert line == ("runs/demo/best.pth: trained on synthetic shapes and colours (sources/synthetic.py) (train split: 40 "
                    "phrases on 10 images), preset demo, 3 epochs of 8, best val mean IoU 50.0 %; test mean IoU 50.00 % "
                    "(10 phrases)")
    elsewhere = tmp_path / "other" / "model.pth"  # outside root: as given; no test score (not a best.pth)
    assert inference.weights_line(elsewhere, GOOD, root=run) == f"{elsewhere}: {provenance.describe(GOOD)}"
