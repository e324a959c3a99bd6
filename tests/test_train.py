"""train.py: flags, the optimizer's rates, smoke runs in one and two processes, exact resume; refusals that
keep runs from being lost, resume after a kill at any write, the collective timeout."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tooling import run_tool

import data
import train
from helpers import (
    provenance,
    runs,
    train_config,
    transforms,
    visualize,
)
from helpers.model_files import load_checkpoint
from model import build_model

REPO = Path(__file__).resolve().parents[1]


def run(args, cwd=REPO, timeout=600, env=None):
    """args: an argv whose first item is sys.executable; the tool must succeed."""
    assert args[0] == sys.executable
    return run_tool(*args[1:], cwd=cwd, timeout=timeout, env=env, check=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic smoke dataset shared by every run in this module."""
    return tmp_path_factory.mktemp("cache")


def smoke_args(out, cache, *extra):
    return ["--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), *extra]


# --- flags -----------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be > 0"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/nonexistent/dir"], "--data /nonexistent/dir does not exist: give the directory that holds"),
    (["--resume", "/"], "--resume /: a directory, not a file"),
    (["--cache-dir", "/dev/null"], "--cache-dir /dev/null is a file"),
    (["--synth-images", "3"], "--synth-images must be >= 4"),
    (["--milestones", "10", "-1"], "--milestones are epochs > 0, got 10 -1"),
    (["--milestones", "inf"], "--milestones are epochs > 0, got inf"),
    (["--milestones", "seven"], "invalid epoch_number value: 'seven'"),
    (["--epochs", "two"], "invalid int value"),
    (["--learning-rate", "1e-3"], "unrecognized arguments"),
    (["--loss", "mse"], "--loss must be"),
    (["--input-size", "100"], "multiple of 32"),
    (["--preset", "paper"], "needs --data"),
    (["--clip-weights", "/no/such/RN101.pt"], "neither 'none', a CLIP model name"),
    (["--resume", "/no/such/checkpoint.pth"], "--resume /no/such/checkpoint.pth: no such file"),
    (["--threshold", "1"], "must be between 0 and 1"),
    (["--loss", "bce", "--w-focal", "2"], "--loss bce is BCE alone (the CRIS baseline), so --w-focal 2.0 would be"),
    (["--loss", "bce", "--dice-weight", "none"], "--dice-weight none would be ignored"),
])
def test_bad_flags_are_rejected_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code != 0
    err = capsys.readouterr().err + str(exc.value.code)
    assert message in err
    if "unrecognized" in message or "invalid" in message:
        assert "valid flags:" in err and "--batch-size" in err


@pytest.mark.slow
def test_an_out_holding_a_run_is_refused_and_path_flags_say_what_they_are(tmp_path, cache, capsys):
    """Data loss: --out of an existing run, without --resume, would overwrite its checkpoints."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # an empty directory is fine
    assert train.parse_args(smoke_args(run_dir, cache)).out == str(run_dir)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (run_dir / "checkpoint.pth").write_bytes(b"stands in for a checkpoint")
    with pytest.raises(SystemExit) as exc:
        train.parse_args(smoke_args(run_dir, cache))
    assert exc.value.code == 2
    assert (f"--out {run_dir} already holds a run (checkpoint.pth, metrics.jsonl); continue it with --resume "
            f"{run_dir / 'checkpoint.pth'}") in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == '{"epoch": 1}\n'
    # the CLI: a file where a directory belongs, a message and exit 2, no traceback
    proc = subprocess.run([sys.executable, "train.py", *smoke_args(tmp_path / "new", cache, "--data",
                                                                   str(run_dir / "metrics.jsonl"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"train.py: error: --data {run_dir / 'metrics.jsonl'} is not a directory" in proc.stderr
    assert not (tmp_path / "new").exists()


def fake_checkpoint(path, **args):
    """A checkpoint.pth as resumed_config reads it: a smoke run's settings with `args` changed, after epoch 1."""
    cfg = dataclasses.replace(train_config.preset_defaults("smoke"), **args)
    torch.save({"format": runs.CHECKPOINT_FORMAT, "args": dataclasses.asdict(cfg), "epoch": 0,
                "config": build_model("smoke", deform=cfg.deform, se=cfg.se).config.to_dict()}, path)
    return str(path)


def test_the_default_run_dir_is_runs_preset_and_a_rerun_there_is_refused(tmp_path, cache, monkeypatch, capsys):
    """README's later commands use runs/demo/best.pth: with no --out a run writes runs/<preset>, on every
    rank and every rerun; a rerun over a run there is refused before any work, as --out of a run is.
    Reading the flags alone (tools.ablation, the tests) does not depend on what runs/ holds."""
    run_dir = runs.run_dir
    monkeypatch.chdir(tmp_path)
    argv = ["--preset", "smoke", "--cache-dir", str(tmp_path / "fresh-cache")]
    cfg = train.parse_args(argv)
    assert run_dir(cfg) == Path("runs/smoke")
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "checkpoint.pth").write_bytes(b"stands in for a checkpoint")
    assert train.parse_args(argv) == cfg
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "train.py: error: --out runs/smoke already holds a run (checkpoint.pth); continue it with --resume "
        "runs/smoke/checkpoint.pth, or give a new --out (or delete runs/smoke)")
    assert not (tmp_path / "fresh-cache").exists()  # refused before any work: no data made
    assert (tmp_path / "runs" / "smoke" / "checkpoint.pth").read_bytes() == b"stands in for a checkpoint"
    assert run_dir(dataclasses.replace(cfg, resume="elsewhere/run/checkpoint.pth")) == Path("elsewhere/run")
    assert run_dir(dataclasses.replace(cfg, out="mine")) == Path("mine")


def test_resume_takes_the_checkpoints_settings_and_refuses_contradicting_flags(tmp_path, capsys):
    ckpt = fake_checkpoint(tmp_path / "checkpoint.pth", batch_size=8, lr=3e-4, se=False, epochs=1)
    cfg = train.parse_args(["--resume", ckpt, "--epochs", "3", "--lr", "3e-4"])  # --lr as the run's: fine
    assert (cfg.batch_size, cfg.lr, cfg.se, cfg.epochs) == (8, 3e-4, False, 3)  # not the preset's 4, 1e-3, True
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--resume", ckpt, "--se", "--lr", "0.01", "--input-size", "96", "--preset", "demo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for contradiction in ("--input-size 96 (the checkpoint's: --input-size 64)",
                          "--lr 0.01 (the checkpoint's: --lr 0.0003)",
                          "--preset demo (the checkpoint's: --preset smoke)", "--se (the checkpoint's: --no-se)"):
        assert contradiction in err
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", ckpt, "--epochs", "0"])
    assert "has finished epoch 1 already" in capsys.readouterr().err


def test_resume_of_a_checkpoint_older_than_a_setting_keeps_how_it_ran(tmp_path, capsys):
    """A demo run saved before --freeze-token-embedding existed trained the table: resuming it must not take
    the demo preset's frozen table (its saved Adam state would not fit), but the behaviour from before."""
    ckpt = fake_checkpoint(tmp_path / "checkpoint.pth", preset="demo")
    saved = torch.load(ckpt, weights_only=True)
    del saved["args"]["freeze_token_embedding"]
    torch.save(saved, ckpt)
    assert train_config.preset_defaults("demo").freeze_token_embedding  # what a new demo run gets
    cfg = train.parse_args(["--resume", ckpt])
    assert cfg.preset == "demo" and not cfg.freeze_token_embedding
    with pytest.raises(SystemExit) as exc:  # its Adam state holds the table: freezing it now contradicts the run
        train.parse_args(["--resume", ckpt, "--freeze-token-embedding"])
    assert exc.value.code == 2
    assert ("--freeze-token-embedding (the checkpoint's: --no-freeze-token-embedding)"
            in capsys.readouterr().err)


class Killed(Exception):
    """A kill at one chosen write, for the tests of what a resume finds."""


def kill_at(monkeypatch, name: str, after_write: bool):
    """Make torch.save raise Killed when it writes `name`'s temporary: before or after the bytes are written."""
    save = torch.save

    def killed_save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(f".{name}.tmp-"):
            if after_write:
                save(obj, f, *args, **kwargs)
            raise Killed(name)
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_save)


def test_a_kill_between_any_two_writes_resumes_to_consistent_files(tmp_path, cache, monkeypatch):
    out = tmp_path / "run"
    args = smoke_args(out, cache, "--no-eval-test")
    # 1. killed after best.pth's bytes, before its rename: checkpoint.pth says epoch 1 was the best
    kill_at(monkeypatch, "best.pth", after_write=True)
    with pytest.raises(Killed):
        train.train(train.parse_args(args + ["--epochs", "1"]))
    assert (out / "checkpoint.pth").is_file() and not (out / "best.pth").exists()
    assert not list(out.glob(".*tmp*")), "a failed write left its temporary"
    # 2. the resume first writes best.pth from the checkpoint; then killed after metrics.jsonl got epoch 2,
    # before checkpoint.pth did
    (out / ".checkpoint.pth.tmp-999999").write_bytes(b"left by a killed process")
    monkeypatch.undo()
    kill_at(monkeypatch, "checkpoint.pth", after_write=False)
    resume = args + ["--resume", str(out / "checkpoint.pth")]
    with pytest.raises(Killed):
        train.train(train.parse_args(resume + ["--epochs", "2"]))
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    best = torch.load(out / "best.pth", weights_only=True)
    assert ckpt["epoch"] == best["epoch"] == 0 and ckpt["best_metric"] == best["best_metric"]
    assert all(torch.equal(ckpt["model"][k], best["model"][k]) for k in ckpt["model"])
    assert not list(out.glob(".*tmp*"))
    # 3. resumed again: every epoch listed once, the command of every start kept
    monkeypatch.undo()
    train.train(train.parse_args(resume + ["--epochs", "2"]))
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len((out / "command.txt").read_text().splitlines()) == 3
    assert json.loads((out / "config.json").read_text())["resumed"] == {"after_epoch": 1,
                                                                        "changed": {"epochs": [1, 2]}}


def test_help_shows_every_flag_with_its_help_and_the_presets_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping: one entry's help on one line
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--preset", "paper", "--help"])
    assert exc.value.code == 0
    entries = {}  # first flag of an entry -> its text; an entry starts at a line "  --flag"
    for line in capsys.readouterr().out.split("\noptions:\n")[1].splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        else:
            entries[flag] += " " + line.strip()
    paper = train_config.preset_defaults("paper")
    assert paper.clip_weights == "RN101" and paper.num_workers == 4  # the recipe's, not TrainConfig's
    for f in dataclasses.fields(train_config.TrainConfig):
        entry = entries.pop("--" + f.name.replace("_", "-"))
        assert f.metadata["help"] in entry and entry.endswith(f"(default: {getattr(paper, f.name)})"), entry
    assert list(entries) == ["-h"]  # and nothing else


def test_help_says_whose_defaults_it_shows(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    for preset in ("demo", "paper"):
        with pytest.raises(SystemExit):
            train.parse_args(["--preset", preset, "--help"] if preset != "demo" else ["--help"])
        head = capsys.readouterr().out.split("\noptions:\n")[0]
        assert f"The defaults shown are preset {preset}'s" in head and "--preset NAME --help" in head


def test_flags_override_the_preset():
    paper = train_config.preset_defaults("paper")
    assert (paper.epochs, paper.batch_size, paper.lr, paper.milestones) == (50, 64, 1e-4, [15, 30])
    assert paper.backbone_lr_scale == 0.1 and paper.clip_grad == 0.0 and paper.clip_weights == "RN101"
    cfg = train.parse_args(["--preset", "smoke", "--lr", "3e-4", "--no-se", "--milestones", "10", "20"])
    assert cfg.lr == 3e-4 and cfg.se is False and cfg.deform is True and cfg.milestones == [10, 20]
    assert cfg.epochs == train_config.preset_defaults("smoke").epochs


def test_backbone_starts_at_its_own_rate():
    """The CRIS slip: the backbone's reduced rate must be the rate of the very first step."""
    cfg = train_config.preset_defaults("paper")
    model = build_model("smoke")
    optimizer, scheduler = train.make_optimizer(model, cfg)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({"backbone": 1e-5, "head": 1e-4})
    # the groups partition the trainable parameters
    n_groups = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_groups == sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone_ids for p in optimizer.param_groups[0]["params"])
    for epoch in range(31):
        if epoch == 15:
            assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-7)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-6)


def test_per_step_schedules_follow_their_formulas():
    """--schedule cosine and --warmup-epochs step the rates after every batch: the step schedule's
    per-batch factor equals MultiStepLR's per-epoch one; cosine falls from 1 to 0; warm-up is linear;
    the backbone's group keeps its scale throughout."""
    spe = 10  # steps per epoch
    step_cfg = train.parse_args(["--preset", "smoke", "--epochs", "5", "--milestones", "2", "4"])
    model = build_model("smoke")
    opt, multistep = train.make_optimizer(model, step_cfg)
    assert isinstance(multistep, torch.optim.lr_scheduler.MultiStepLR) and not train.steps_the_rate_per_batch(step_cfg)
    for epoch in range(5):
        for step in range(epoch * spe, (epoch + 1) * spe):
            assert train.lr_factor(step, spe, step_cfg) * step_cfg.lr == pytest.approx(opt.param_groups[1]["lr"])
        opt.step()
        multistep.step()
    cos = train.parse_args(["--preset", "smoke", "--epochs", "4", "--schedule", "cosine", "--warmup-epochs", "1",
                            "--backbone-lr-scale", "0.5", "--lr", "0.01"])
    opt, sched = train.make_optimizer(model, cos, steps_per_epoch=spe)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    seen = []
    for _ in range(4 * spe):
        seen.append(opt.param_groups[1]["lr"])
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * seen[-1])
        opt.step()
        sched.step()
    expected = [min(1, (s + 1) / spe) * 0.5 * (1 + math.cos(math.pi * s / (4 * spe))) * 0.01 for s in range(4 * spe)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(0.001 * math.cos(0)) and max(seen) < 0.01 and seen[-1] < 2e-5
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "smoke", "--schedule", "linear"])


def test_a_fractional_milestone_decays_at_its_batch():
    """--milestones 2.5: the rates drop before batch 2.5 x steps_per_epoch, stepped per batch; whole epochs stay
    MultiStepLR's ints (7, not 7.0, in config.json)."""
    whole = train.parse_args(["--preset", "smoke", "--milestones", "7", "8.0"]).milestones
    assert whole == [7, 8] and all(type(m) is int for m in whole)
    cfg = train.parse_args(["--preset", "smoke", "--epochs", "4", "--milestones", "2.5", "--lr", "0.01"])
    assert cfg.milestones == [2.5] and train.steps_the_rate_per_batch(cfg)
    spe = 10
    opt, sched = train.make_optimizer(build_model("smoke"), cfg, steps_per_epoch=spe)
    seen = []
    for _ in range(4 * spe):
        seen.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.01] * 25 + [0.001] * 15)


# --- runs ------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_one_process(tmp_path, cache):
    out = tmp_path / "run"
    proc = run([sys.executable, "train.py", *smoke_args(out, cache, "--epochs", "2")])
    for name in ("config.json", "command.txt", "git.txt", "metrics.jsonl", "checkpoint.pth",
                 "best.pth", "curves.png", "test_metrics.json", "predictions.png"):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in lines] == [1, 2]
    for key in ("loss", "bce", "focal", "dice", "lr", "val_mIoU", "val_oIoU", "val_prec@0.5", "seconds"):
        assert all(isinstance(row[key], float) for row in lines), key
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["format"] == runs.CHECKPOINT_FORMAT
    model, best = load_checkpoint(out / "best.pth")
    assert model.config.to_dict() == ckpt["config"]
    assert Path(best["data_dir"], "test.lmdb").exists()
    test = json.loads((out / "test_metrics.json").read_text())
    assert 0 <= test["mIoU"] <= 1 and test["n"] > 0
    # the run ends with the test scores beside the ceiling of its grid, the evaluator's own figure
    ceiling = test["ceiling"]
    assert ceiling["n"] == test["n"] and 0.3 < ceiling["mIoU"] < 1
    # printed in percent, as evaluate.py prints them; the files keep fractions and say so
    assert f"ceiling at 64 px (a perfect 4x4 decoder map): mIoU {100 * ceiling['mIoU']:.2f}" in proc.stdout
    assert f"test (best.pth, percent): mIoU {100 * test['mIoU']:.2f}" in proc.stdout
    assert f"val mIoU {100 * lines[-1]['val_mIoU']:.2f} " in proc.stdout
    assert test["units"] == provenance.UNITS and all(row["units"] == provenance.UNITS for row in lines)
    # best.pth says what it was trained on: the synthetic set, its splits' sizes from the LMDB headers
    record = best["trained_on"]
    train_set = data.PhraseCutLMDB(Path(best["data_dir"], "train.lmdb"))
    assert record["dataset"] == "synthetic" and record["preset"] == "smoke"
    assert record["train"] == {"split": "train", "tasks": len(train_set), "images": train_set.header["num_images"]}
    assert record["epochs"] == best["epoch"] + 1 and record["planned_epochs"] == 2
    assert record["best_val_mIoU"] == best["best_metric"] == max(row["val_mIoU"] for row in lines)
    assert train_set.header["synthetic"]["generator"] == "sources/synthetic.py"
    import evaluate
    test_set = data.PhraseCutLMDB(Path(best["data_dir"], "test.lmdb"), input_size=64, word_len=10, train=False)
    assert evaluate.decoder_grid_ceiling(test_set)["mIoU"] == pytest.approx(ceiling["mIoU"])


@pytest.mark.parametrize("flags, layout", [([], torch.channels_last), (["--no-channels-last"], torch.contiguous_format)])
def test_channels_last_on_the_cpu_changes_the_layout_not_the_logits(flags, layout):
    """--channels-last (default) on every device: the convolutions' weights are laid out
    channels-last, and the logits are those of the contiguous model. Adam is the fused one."""
    cfg = train.parse_args(["--preset", "smoke", *flags])
    torch.manual_seed(0)
    model = build_model("smoke").eval()
    image = torch.randn(2, 3, 64, 64)
    tokens = transforms.tokenize(["red circle", "all stars"], model.config.word_len)
    with torch.no_grad():
        want = model(image, tokens)
        net = train.wrap_model(model, cfg, torch.device("cpu"))  # one process: the model itself
        got = net(image.contiguous(memory_format=layout), tokens)
    assert model.neck.f4_proj[0].weight.is_contiguous(memory_format=layout)
    assert layout == torch.contiguous_format or not model.neck.f4_proj[0].weight.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5)
    optimizer, _ = train.make_optimizer(model, cfg)
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("flags", [["--freeze-token-embedding"], ["--no-freeze-token-embedding"]])
def test_freeze_token_embedding_keeps_the_table_and_trains_the_rest(flags, tmp_path, cache):
    """--freeze-token-embedding: CLIP's token table is neither in Adam's groups nor changed by a step;
    the text transformer still learns. Without it, the table trains with the rest of CLIP."""
    cfg = train.parse_args(smoke_args(tmp_path / "run", cache, *flags))
    frozen = flags == ["--freeze-token-embedding"]
    model, loader, optimizer, scaler = smoke_parts(cfg)
    table = model.backbone.token_embedding.weight
    in_adam = any(p is table for g in optimizer.param_groups for p in g["params"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(loader))
    train.train_step(model, batch["image"], batch["tokens"], batch["mask"], train.make_loss(cfg), optimizer, scaler,
                     None)
    after = model.state_dict()
    assert in_adam is not frozen
    assert torch.equal(after["backbone.token_embedding.weight"], before["backbone.token_embedding.weight"]) is frozen
    assert not torch.equal(after["backbone.transformer.resblocks.0.attn.in_proj_weight"],
                           before["backbone.transformer.resblocks.0.attn.in_proj_weight"])
    assert train_config.preset_defaults("demo").freeze_token_embedding
    assert not train_config.preset_defaults("paper").freeze_token_embedding


def smoke_parts(cfg):
    """train()'s first steps for `cfg`, on this process's device: (model, loader, optimizer, scaler)."""
    from helpers import distributed
    train.seed_everything(cfg.seed)
    device = distributed.info().device
    model = train.make_model(cfg, device)
    loader, _ = train.make_loaders(cfg, model.config, train.resolve_data(cfg, model.config.input_size), device)
    optimizer, _ = train.make_optimizer(model, cfg)
    return model, loader, optimizer, torch.amp.GradScaler("cuda", enabled=False)


WORKER = textwrap.dedent("""
    import os, sys, torch
    import train
    from helpers import distributed
    from test_train import smoke_parts
    if os.environ.get("DDP_BROADCAST_BUFFERS"):  # DDP's default: rank 0's buffers sent before every forward
        ddp = train.DistributedDataParallel
        train.DistributedDataParallel = lambda *a, **k: ddp(*a, **{**k, "broadcast_buffers": True})
    cfg = train.parse_args(sys.argv[1:])
    rank, world, device = distributed.init()
    try:
        model, loader, optimizer, scaler = smoke_parts(cfg)
        net = train.wrap_model(model, cfg, device)  # DDP
        for epoch in range(cfg.epochs):
            train.train_one_epoch(net, loader, train.make_loss(cfg), optimizer, scaler, None, epoch, cfg)
        torch.save(model.state_dict(), f"{cfg.out}/rank{rank}.pt")
    finally:
        distributed.destroy()
""")


def test_group_by_image_encodes_each_image_once_per_step(tmp_path, cache):
    """--group-by-image: the step's image encoder sees each distinct image of the batch once, every
    phrase still gets its own loss term (the loader yields every task), and the model learns."""
    cfg = train.parse_args(smoke_args(tmp_path / "run", cache, "--group-by-image", "--epochs", "1"))
    model, loader, optimizer, scaler = smoke_parts(cfg)
    encoded, tasks = [], sum(len(b["tokens"]) for b in loader)
    hook = model.backbone.visual.conv1.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = train.train_one_epoch(model, loader, train.make_loss(cfg), optimizer, scaler, None, 0, cfg)
    hook.remove()
    assert len(encoded) == len(loader) and tasks == len(loader) * loader.batch_size
    assert sum(encoded) < tasks  # several phrases per image: fewer encoder passes than tasks
    assert all(math.isfinite(v) for v in terms.values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def run_worker(tmp_path, cache, name, *extra, env=None) -> Path:
    """WORKER on two processes for two smoke epochs -> the dir holding each rank's rank<r>.pt."""
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), *smoke_args(out, cache, "--epochs", "2", *extra)],
        env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", **(env or {})})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("grouping", [[], ["--group-by-image"]])
def test_smoke_run_torchrun_two_processes_keeps_ranks_identical(tmp_path, cache, grouping):
    """Every weight and BatchNorm statistic equal on both ranks after DDP's epochs (train_one_epoch),
    with tasks shuffled one by one and with the phrases of each image batched together."""
    out = run_worker(tmp_path, cache, "ddp", *grouping)
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the ranks really trained: weights differ from a fresh model's
    fresh = build_model("smoke").state_dict()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if a[k].is_floating_point())


@pytest.mark.slow
def test_ddp_without_a_buffer_broadcast_every_step_trains_the_same_model(tmp_path, cache):
    """wrap_model turns off DDP's per-forward broadcast of BatchNorm statistics (a collective every step):
    weights and statistics after two epochs equal those of DDP's default, bit for bit."""
    models = [torch.load(run_worker(tmp_path, cache, f"ddp{broadcast}", "--group-by-image",
                                    env={"DDP_BROADCAST_BUFFERS": broadcast}) / "rank1.pt", weights_only=True)
              for broadcast in ("", "1")]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert any("running_mean" in k for k in models[0])


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, cache):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--no-eval-test", "--seed", "3"]
    run([sys.executable, "train.py", *smoke_args(full, cache, "--epochs", "2", *common)])
    run([sys.executable, "train.py", *smoke_args(part, cache, "--epochs", "1", *common)])
    run([sys.executable, "train.py", *smoke_args(part, cache, "--epochs", "2", *common,
                                                 "--resume", str(part / "checkpoint.pth"))])
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


def test_resume_from_a_truncated_or_weights_only_checkpoint_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "checkpoint.pth"
    torch.save({"format": runs.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(1000)}}, bad)
    with pytest.raises(ValueError, match="not a checkpoint.pth written by train.py.*use --init-from"):
        runs.read_resume(str(bad))  # a best.pth: weights, no optimizer
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = train.parse_args(smoke_args(tmp_path, cache, "--resume", str(bad)))
    with pytest.raises(ValueError, match="--resume: checkpoint .* cannot be read"):
        train.train(cfg)
    torch.save({"format": runs.CHECKPOINT_FORMAT, "optimizer": {}, "config": {"vision_width": 8}}, bad)
    with pytest.raises(ValueError, match="its model config is not SegVLM's"):
        runs.read_resume(str(bad))  # a fragment: refused before any model is built
    torch.save({"format": runs.CHECKPOINT_FORMAT, "optimizer": Path("/")}, bad)
    with pytest.raises(ValueError, match="is refused: loading it needs .*could run code") as exc:
        runs.read_resume(str(bad))
    assert "weights_only" not in str(exc.value)


STALL = textwrap.dedent("""
    import os, time
    import train
    if os.environ["RANK"] == "1":  # this rank stalls where its first collective is due
        train.train_one_epoch = lambda *args, **kwargs: time.sleep(600)
    train.main()
""")


def test_more_processes_than_gpus_is_refused_by_name(monkeypatch):
    """torchrun --nproc_per_node=2 on a one-GPU machine: an error that says what to change, not
    CUDA's "invalid device ordinal", and before any CUDA call or process group."""
    from helpers import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1: this machine has 1 CUDA device\(s\).*"
                                           r"--nproc_per_node=1 or fewer.*CUDA_VISIBLE_DEVICES="):
        distributed.init()
    assert not distributed.initialized()


@pytest.mark.slow
def test_a_stalled_rank_ends_the_run_at_the_collective_timeout(tmp_path, cache, monkeypatch):
    from helpers import distributed

    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "soon")
    with pytest.raises(ValueError, match="SEGVLM_DIST_TIMEOUT='soon': expected a number of seconds > 0"):
        distributed.timeout_seconds()
    train.resolve_data(train.parse_args(smoke_args(tmp_path / "unused", cache)), 64)  # the data, made before
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *smoke_args(tmp_path / "run", cache)], cwd=REPO, capture_output=True,
                          text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                               distributed.TIMEOUT_VARIABLE: "3"})
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "train.py: error: rank 0: a collective waited 3 s for the other processes" in proc.stderr, proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr


def test_non_finite_loss_names_step_and_terms(tmp_path, cache):
    class Exploding(torch.nn.Module):
        def forward(self, logits, target):
            nan = logits.sum() * float("nan")
            return {"bce": nan, "focal": logits.mean(), "dice": logits.mean(), "loss": nan}

    cfg = train.parse_args(smoke_args(tmp_path / "nan", cache))
    model, loader, optimizer, scaler = smoke_parts(cfg)
    args = (model, loader, Exploding(), optimizer, scaler, None)
    with pytest.raises(train.NonFiniteLoss, match=r"epoch 1, step 0 \(rank 0\): loss=nan, bce=nan, focal="):
        train.train_one_epoch(*args, 0, cfg)
    with pytest.raises(train.NonFiniteLoss, match=rf"epoch 3, step {2 * len(loader)} "):  # steps count on
        train.train_one_epoch(*args, 2, cfg)


def test_plot_curves_leaves_the_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    row = {"epoch": 1, "loss": 1.0, "bce": 0.5, "focal": 0.2, "dice": 0.3,
           "val_mIoU": 0.1, "val_oIoU": 0.2, "val_prec@0.5": 0.0}
    visualize.plot_curves([row, {**row, "epoch": 2}], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before
