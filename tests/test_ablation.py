"""tools/ablation.py: Table 2 over seeds with Figs. 4-6, resuming, failures and refused flags.

The bookkeeping (means, std, gains, resume, failures, other settings) is tested fast against a stand-in
trainer (StandIn) that writes each run's files through the project's own writers, with chosen test
numbers and untrained smoke models. One real smoke-sized ablation with two seeds (eight train.py runs,
in this process so they are counted) is kept, in the slow tier, for the tests that need trained runs.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest
from tooling import command, save_model_checkpoint, tool_env

import evaluate
import train
from data import PhraseCutLMDB
from helpers.model_files import load_checkpoint
from helpers.runs import make_run_dir
from model import build_model
from sources.synthetic import ensure_synthetic
from tools import ablation

REPO = Path(__file__).resolve().parents[1]

FILES = ("table2.md", "table2.json", "fig4_precision.png", "fig5_gains.png", "fig6_qualitative.png")


class Trainer:
    """ablation.run_train in this process: train.py's main on the same flags; records each run."""

    def __init__(self, fail=()):
        self.runs, self.fail = [], set(fail)

    def __call__(self, cmd, run_dir):
        self.runs.append(str(run_dir))
        if any(str(run_dir).endswith(name) for name in self.fail):
            return 1
        try:
            train.main(cmd[cmd.index(ablation.TRAIN) + 1:])
        except SystemExit as e:
            return e.code or 0
        return 0


class StandIn:
    """ablation.run_train without training: config.json as train.py writes it (helpers.runs.make_run_dir),
    an untrained smoke model of the run's variant as best.pth, and test_metrics.json with chosen numbers:
    mIoU = 0.5 + 0.01 * variant index + 0.003 * seed (the other columns offset from it)."""

    def __init__(self, data_dir, fail=()):
        self.data_dir, self.runs, self.fail = Path(data_dir), [], set(fail)

    @staticmethod
    def numbers(dirname, seed):
        k = [v[1] for v in ablation.VARIANTS].index(dirname)
        miou = 0.5 + 0.01 * k + 0.003 * seed
        return {"mIoU": miou, "oIoU": miou + 0.02, "n": 10,
                **{f"prec@{t}": miou - t / 4 for t in evaluate.PREC_THRESHOLDS}}

    def __call__(self, cmd, run_dir):
        self.runs.append(str(run_dir))
        if any(str(run_dir).endswith(name) for name in self.fail):
            return 1
        cfg = ablation.expected_config(cmd[cmd.index(ablation.TRAIN) + 1:])
        model = build_model("smoke", deform=cfg.deform, se=cfg.se)
        make_run_dir(cfg, model.config, self.data_dir, out=run_dir)
        save_model_checkpoint(model, run_dir / "best.pth", data_dir=str(self.data_dir))
        test = self.numbers(run_dir.parent.name, cfg.seed)
        (run_dir / "test_metrics.json").write_text(json.dumps(test))
        return 0


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(out, StandIn, cache): a two-seed ablation made by the stand-in on a 12-image synthetic set."""
    root = tmp_path_factory.mktemp("stand_in")
    return run_ablation(root, StandIn(ensure_synthetic(root / "data", num_images=12, size=64)))


def run_ablation(root, trainer):
    """ablation.main with `trainer` as its run_train, a two-seed smoke ablation into root/out -> (out, trainer, cache)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(ablation, "run_train", trainer)
    try:
        ablation.main(args(root / "out", root / "cache"))
    finally:
        mp.undo()
    return root / "out", trainer, root / "cache"


def args(out, cache):
    return ["--preset", "smoke", "--seeds", "0", "1", "--out", str(out), "--", "--cache-dir", str(cache)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(out, trainer, cache): a real two-seed smoke ablation (slow)."""
    return run_ablation(tmp_path_factory.mktemp("ablation"), Trainer())


@pytest.mark.slow
def test_a_two_seed_ablation_writes_all_five_files(finished):
    out, trainer, _ = finished
    assert len(trainer.runs) == 8
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for name in FILES[2:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "table2.md").read_text()
    assert text.splitlines()[0] == "| variant | IoU | P@50 | P@60 | P@70 | P@80 | P@90 | seeds |"
    assert [line.split(" | ")[0][2:] for line in text.splitlines()[2:]] == [v[0] for v in ablation.VARIANTS]


@pytest.mark.slow
def test_each_run_is_its_variant_and_seed(finished):
    out, _, _ = finished
    for _, dirname, flags in ablation.VARIANTS:
        for seed in (0, 1):
            cfg = json.loads((out / dirname / f"seed{seed}" / "config.json").read_text())
            assert cfg["train"]["loss"] == flags[1] and cfg["train"]["seed"] == seed
            assert cfg["model"]["deform"] == ("--deform" in flags) and cfg["model"]["se"] == ("--se" in flags)


def test_the_stand_in_ablation_writes_all_five_files_from_its_eight_runs(stand_in):
    out, trainer, _ = stand_in
    assert len(trainer.runs) == 8
    for name in FILES:
        assert (out / name).stat().st_size > 0, name


def test_the_tables_means_stds_and_gains_are_the_chosen_numbers(stand_in):
    out, _, _ = stand_in
    table = json.loads((out / "table2.json").read_text())
    for k, v in enumerate(table["variants"]):  # seeds 0 and 1: mIoU 0.5 + 0.01 k and 0.503 + 0.01 k
        assert v["mean"]["mIoU"] == pytest.approx(0.5015 + 0.01 * k, abs=1e-12)
        assert v["std"]["mIoU"] == pytest.approx(0.003 / 2 ** 0.5, abs=1e-12)
    for g in table["gains"]:  # every stage gains exactly 0.01 on each seed: no spread
        assert g["mean"]["mIoU"] == pytest.approx(0.01, abs=1e-12) and g["std"]["mIoU"] == pytest.approx(0, abs=1e-12)
    assert (out / "table2.md").read_text().splitlines()[2].startswith("| Baseline (CRIS) | 50.15 ± 0.21 |")


def test_the_tables_means_are_the_per_seed_values(stand_in):
    out, _, _ = stand_in
    table = json.loads((out / "table2.json").read_text())
    assert table["seeds"] == [0, 1]
    rows = (out / "table2.md").read_text().splitlines()[2:]
    for v, row in zip(table["variants"], rows):
        for seed, values in v["seeds"].items():  # each seed's values are its run's test_metrics.json
            test = json.loads((out / v["run"] / f"seed{seed}" / "test_metrics.json").read_text())
            assert values == {k: test[k] for k in ablation.KEPT}
        for k in ablation.KEPT:
            per_seed = [m[k] for m in v["seeds"].values()]
            assert v["mean"][k] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
            assert v["std"][k] == pytest.approx(statistics.stdev(per_seed), abs=1e-12)
        cells = row.split(" | ")[1:-1]
        assert cells == [f"{100 * v['mean'][k]:.2f} ± {100 * v['std'][k]:.2f}" for k in ablation.COLUMNS]
    for g, v, before in zip(table["gains"], table["variants"][1:], table["variants"]):
        diffs = [v["seeds"][s]["mIoU"] - before["seeds"][s]["mIoU"] for s in v["seeds"]]
        assert g["over"] == before["variant"] and g["mean"]["mIoU"] == pytest.approx(statistics.fmean(diffs))


@pytest.mark.slow
def test_fig6_rows_follow_the_stated_rule(finished):
    out, _, _ = finished
    table = json.loads((out / "table2.json").read_text())
    assert table["fig6"]["seed"] == 0 and "differ most" in table["fig6"]["rule"]
    per_task = {}
    for label, dirname, _ in ablation.VARIANTS:  # every test task scored again, by each variant of seed 0
        net, _ = load_checkpoint(str(out / dirname / "seed0" / "best.pth"))
        data_dir = Path(json.loads((out / dirname / "seed0" / "config.json").read_text())["data_dir"])
        test = PhraseCutLMDB(str(data_dir / "test.lmdb"), input_size=net.config.input_size,
                             word_len=net.config.word_len, train=False)
        scored = evaluate.evaluate(net, test, progress=False, per_task=True)["per_task"]
        per_task[label] = [t["iou"] for t in sorted(scored, key=lambda t: t["index"])]
    rows = table["fig6"]["rows"]
    assert [r["index"] for r in rows] == [i for _, i in ablation.qualitative_rows(per_task)]
    for r in rows:  # the IoU each panel shows is the evaluation's
        assert r["iou"] == pytest.approx({k: v[r["index"]] for k, v in per_task.items()}, abs=1e-9)


def test_qualitative_rows_take_the_widest_gaps_then_the_typical_tasks():
    per_task = {"a": [0.1, 0.5, 0.9, 0.4, 0.6, 0.2, 0.3], "b": [0.1, 0.5, 0.1, 0.4, 0.0, 0.2, 0.3]}
    rows = ablation.qualitative_rows(per_task, differ=2, typical=2)
    assert [i for _, i in rows] == [2, 4, 6, 5]  # gaps 0.8, 0.6; then means 0.3 (the median), 0.2 (0.4 ties: lower)
    assert rows[0][0] == "differ most: IoU range 80.0 points"  # percent, as every printed score
    assert rows[2][0] == "typical: mean IoU 30.0 %, median 30.0 %"
    with pytest.raises(ValueError, match="same, non-empty tasks"):
        ablation.qualitative_rows({"a": [0.1], "b": []})


def test_a_resumed_ablation_reuses_finished_runs(stand_in, tmp_path, monkeypatch):
    out, stand, cache = stand_in
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "raf-deform" / "seed1")  # as if interrupted before its run
    (copy / "table2.json").unlink()
    trainer = StandIn(stand.data_dir)
    monkeypatch.setattr(ablation, "run_train", trainer)
    ablation.main(args(copy, cache))
    assert trainer.runs == [str(copy / "raf-deform" / "seed1")]
    assert len(json.loads((copy / "table2.json").read_text())["variants"][2]["seeds"]) == 2
    trainer.runs.clear()
    ablation.main(args(copy, cache))
    assert trainer.runs == []


def test_a_failed_run_is_named_and_the_others_kept(stand_in, tmp_path, monkeypatch, capsys):
    out, stand, cache = stand_in
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "raf" / "seed1")
    monkeypatch.setattr(ablation, "run_train", StandIn(stand.data_dir, fail=["raf/seed1"]))
    with pytest.raises(ablation.AblationError, match=r"1 run\(s\) failed \(\+ RAF loss, seed 1\)"):
        ablation.main(args(copy, cache))
    assert "ablation.py: error: + RAF loss, seed 1 failed" in capsys.readouterr().err
    table = json.loads((copy / "table2.json").read_text())
    assert [len(v["seeds"]) for v in table["variants"]] == [2, 1, 2, 2]
    assert table["gains"][0]["seeds"] == [0]


def test_a_run_of_other_settings_is_refused_before_any_training(stand_in, tmp_path, monkeypatch):
    out, stand, cache = stand_in
    trainer = StandIn(stand.data_dir)
    monkeypatch.setattr(ablation, "run_train", trainer)
    with pytest.raises(ablation.AblationError, match=r"baseline/seed0 holds a run with other settings: epochs=1 \(now 2\)"):
        ablation.main(args(out, cache) + ["--epochs", "2"])
    assert trainer.runs == []


@pytest.mark.parametrize("flags, named", [
    (["--loss", "bce"], "--loss"), (["--no-se"], "--no-se"), (["--se"], "--se"), (["--no-deform"], "--no-deform"),
    (["--w-dice", "2"], "--w-dice"), (["--dice-w", "none"], "--dice-w"), (["--lo=bce"], "--lo"),
    (["--out", "x"], "--out"), (["--resume", "x/checkpoint.pth"], "--resume"), (["--seed", "3"], "--seed"),
    (["--preset", "paper"], "--preset"), (["--no-eval-test"], "--no-eval-test")])
def test_flags_that_define_a_variant_are_refused_after_the_separator(flags, named):
    with pytest.raises(ablation.AblationError, match=rf"^{named} after --: "):
        ablation.parse_args(["--seeds", "0", "1", "--", "--epochs", "1", *flags])


@pytest.mark.slow
def test_bad_input_is_one_line_without_a_traceback(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cases = [(["--", "--loss", "bce"], "ablation.py: error: --loss after --: it defines the variants"),
             (["--", "--bogus", "1"], "ablation.py: error: --bogus after --: not a train.py flag"),
             (["--seeds", "0", "0"], "ablation.py: error: --seeds 0 0: a seed is given twice"),
             (["--nproc", "x"], "ablation.py: error: argument --nproc: invalid int value: 'x'"),
             (["--", "--epochs", "0"], "ablation.py: error: after --: --epochs must be"),
             (["--out", "file"], "ablation.py: error: --out file is an existing file"),
             (["--preset", "nope"], "ablation.py: error: argument --preset: invalid choice: 'nope'"),
             (["--seeds", "0", "-1"], "ablation.py: error: --seeds: -1 is not a seed")]
    for argv, message in cases:
        proc = subprocess.run(command("ablation.py", "--preset", "smoke", *argv), cwd=tmp_path, env=tool_env(),
                              capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if "Warning" not in line and "pkg_resources" not in line]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith(message), (argv, proc.stderr)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_no_temporary_file(tmp_path):
    proc = subprocess.Popen(command("ablation.py", *args("out", tmp_path / "cache")), env=tool_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the first run has started, then interrupt as Ctrl-C does
        if "trained by" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "Warning" not in line and "pkg_resources" not in line]
    assert proc.returncode != 0 and "Traceback" not in err
    assert lines[-1] == "ablation.py: interrupted; the finished runs are kept: the same command resumes"
    assert not list((tmp_path / "out").rglob(".*.tmp-*"))


# ----------------------------------------------------------------------------- careless input (issue 33)

def test_a_damaged_finished_run_is_refused_naming_the_file_and_field(stand_in, tmp_path, monkeypatch):
    out, stand, cache = stand_in  # finished runs in the layout train.py writes, without the real trainings
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    trainer = StandIn(stand.data_dir)
    monkeypatch.setattr(ablation, "run_train", trainer)
    metrics = copy / "raf" / "seed1" / "test_metrics.json"
    good = json.loads(metrics.read_text())
    for value, shown in ((float("nan"), "nan"), ("0.5", "'0.5'"), (None, "None"), (7, "7")):
        metrics.write_text(json.dumps({**good, "prec@0.7": value}))  # json writes NaN as NaN, as Python reads it
        with pytest.raises(ablation.AblationError, match=rf"raf/seed1/test_metrics.json: field 'prec@0.7' is {shown}, "
                                                         "expected a number from 0 to 1"):
            ablation.main(args(copy, cache))
    metrics.write_text("{")
    with pytest.raises(ablation.AblationError, match="test_metrics.json is not valid JSON"):
        ablation.main(args(copy, cache))
    assert trainer.runs == []


def test_a_run_folder_without_config_is_refused_once_not_retried(tmp_path, monkeypatch):
    trainer = Trainer()
    monkeypatch.setattr(ablation, "run_train", trainer)
    stray = tmp_path / "out" / "raf" / "seed0"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ablation.AblationError, match=r"raf/seed0 holds files \(notes.txt\) but no config.json"):
        ablation.main(args(tmp_path / "out", tmp_path / "cache"))
    assert trainer.runs == [] and (stray / "notes.txt").read_text() == "mine"
    with pytest.raises(ablation.AblationError, match="--seeds: -1 is not a seed"):
        ablation.main(["--preset", "smoke", "--seeds", "-1", "--out", str(tmp_path / "new")])
    assert trainer.runs == [] and not (tmp_path / "new").exists()


def test_a_second_ablation_on_one_out_is_refused_naming_the_holder(tmp_path, monkeypatch):
    from helpers.files import hold_dir
    trainer = Trainer()
    monkeypatch.setattr(ablation, "run_train", trainer)
    out = tmp_path / "out"
    with hold_dir(out, "--out"):  # as the first ablation holds it while it trains
        with pytest.raises(ValueError, match=rf"--out {out} is in use by another run \(process {os.getpid()} on"):
            ablation.main(args(out, tmp_path / "cache"))
    assert trainer.runs == []
