"""Every tool's outputs and its end: no output may be an input or another output, or a path that is
not a regular file; a folder's files that a tool did not write are never overwritten; a run directory
is held by one run at a time; a full disk is named as such; Ctrl-C and SIGTERM end a tool with one
line and no temporary file; a user's mistake never ends in a traceback."""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cris_files import small_model, write_cris_checkpoint
from tooling import one_line_error, run_tool, save_model_checkpoint, start_tool

from helpers import files
from model import build_model
from sources import synthetic
from tools import cris

REPO = Path(__file__).resolve().parents[1]
FAST_BENCH = ["--preset", "smoke", "--batch", "2", "--repeats", "1", "--warmup", "1", "--workers", "-1"]


tool = run_tool




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    net = build_model("smoke")
    save_model_checkpoint(net, out / "best.pth")
    return out / "best.pth"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic.ensure_synthetic(tmp_path_factory.mktemp("synth"), num_images=12)


@pytest.fixture(scope="module")
def cris_file(tmp_path_factory):
    return write_cris_checkpoint(small_model("RN50"), tmp_path_factory.mktemp("cris") / "best_model.pth")


# --- every output is checked before any work ---------------------------------------------------------


def usage_error(main, argv, capsys):
    """main(argv) in this process: it must exit 2 with a one-line error (an exception would be a traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_benchmark_json_may_not_be_its_checkpoint_nor_unwritable(ckpt, tmp_path, capsys, monkeypatch):
    from tools import benchmark
    monkeypatch.setattr(benchmark, "run", lambda args: pytest.fail("the benchmark ran"))
    before = ckpt.read_bytes()
    err = usage_error(benchmark.main, [*FAST_BENCH, "--ckpt", str(ckpt), "--json", str(ckpt)], capsys)
    assert f"--json {ckpt} is the --ckpt file" in err and ckpt.read_bytes() == before
    err = usage_error(benchmark.main, [*FAST_BENCH, "--json", str(tmp_path)], capsys)
    assert f"--json {tmp_path} is a directory" in err
    err = usage_error(benchmark.main, [*FAST_BENCH, "--json", "/proc/segvlm/figures.json"], capsys)
    assert "--json's folder: cannot create the directory /proc/segvlm" in err
    err = usage_error(benchmark.main, [*FAST_BENCH, "--json", "/proc/figures.json"], capsys)
    assert "--json: cannot write in /proc" in err


@pytest.mark.slow
def test_cris_convert_refuses_a_file_it_did_not_write(cris_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    err = one_line_error(tool("cris.py", "convert", cris_file, notes))
    assert f"{notes} exists and is not a checkpoint cris.py convert wrote" in err
    assert notes.read_text() == "my notes\n"
    out = tmp_path / "converted.pth"
    assert tool("cris.py", "convert", cris_file, out).returncode == 0
    assert tool("cris.py", "convert", cris_file, out).returncode == 0  # its own output: rewritten
    err = one_line_error(tool("cris.py", "convert", cris_file, "/proc/segvlm.pth"))
    assert "error: dst: cannot write in /proc" in err


def test_save_masks_never_overwrites_a_users_file(ckpt, data_dir, tmp_path):
    import evaluate
    from data import PhraseCutLMDB
    task_id = PhraseCutLMDB(data_dir / "test.lmdb", input_size=64, word_len=10, train=False)[0]["task_id"]
    masks = tmp_path / "masks"
    masks.mkdir()
    mine = masks / f"{task_id}.png"
    mine.write_bytes(b"the user's picture")
    argv = ["--ckpt", str(ckpt), "--data", str(data_dir / "test.lmdb"), "--save-masks", str(masks), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    assert f"{mine}" in str(exc.value.code) and "did not write" in str(exc.value.code)
    assert mine.read_bytes() == b"the user's picture"
    mine.unlink()
    evaluate.main(argv)
    evaluate.main(argv)  # its own files: a second run rewrites them
    assert mine.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_outputs_that_are_not_regular_files_are_refused_not_waited_on(ckpt, data_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    image = tmp_path / "photo.png"
    from PIL import Image
    Image.new("RGB", (32, 24)).save(image)
    err = one_line_error(tool("evaluate.py", "--ckpt", ckpt, "--data", data_dir / "test.lmdb", "--json", fifo,
                              timeout=120))
    assert f"--json {fifo}" in err and "not a regular file" in err
    err = one_line_error(tool("predict.py", "--ckpt", ckpt, "--image", image, "--phrase", "a", "--mask", fifo,
                              "--out", tmp_path / "o.png", timeout=120))
    assert f"--mask {fifo}" in err and "not a regular file" in err
    err = one_line_error(tool("predict.py", "--ckpt", ckpt, "--image", image, "--phrase", "a", "--out",
                              "/dev/null", timeout=120))
    assert "--out /dev/null" in err and "not a regular file" in err


@pytest.mark.slow
def test_inputs_that_are_not_regular_files_or_cannot_be_resolved_are_refused(ckpt, data_dir, tmp_path):
    fifo, loop = tmp_path / "pipe", tmp_path / "loop"
    os.mkfifo(fifo)
    os.symlink(loop, loop)
    for args, flag in ((["evaluate.py", "--ckpt", fifo, "--data", data_dir / "test.lmdb"], "--ckpt"),
                       (["evaluate.py", "--ckpt", ckpt, "--data", fifo], "--data"),
                       (["evaluate.py", "--ckpt", loop, "--json", tmp_path / "m.json"], "--ckpt"),
                       (["predict.py", "--ckpt", ckpt, "--image", fifo, "--phrase", "a",
                         "--out", tmp_path / "o.png"], "--image"),
                       (["benchmark.py", *FAST_BENCH, "--ckpt", fifo], "--ckpt"),
                       (["cris.py", "convert", fifo, tmp_path / "c.pth"], "src")):
        err = one_line_error(tool(*args, timeout=120))
        assert flag in err and ("not a regular file" in err or "cannot be resolved" in err), err


# --- the life of a train.py run -------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["train.py", "--preset", "smoke", "--out", out, "--cache-dir", cache, "--epochs", "100000",
            "--synth-images", "8", "--no-eval-test"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()  # "run dir ...": the run holds its directory from now on
        assert line.startswith("run dir"), (line, first.stderr.read() if first.poll() is not None else "")
        err = one_line_error(tool(*args, timeout=120))
        assert f"--out {out} is in use by another run (process {first.pid}" in err
        first.send_signal(signal.SIGTERM)
        rc = first.wait(timeout=60)
        stderr = first.stderr.read()
        assert rc == 128 + signal.SIGTERM and "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == "train.py: stopped by SIGTERM; temporary files removed"
        assert not list(out.glob(".*.tmp-*"))
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_a_lock_left_by_a_dead_process_does_not_hold_the_directory(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / files.LOCK_NAME).write_text(f"process {dead.pid} on {os.uname().nodename}\n")
    with files.hold_dir(tmp_path, "--out") as lock:
        assert f"process {os.getpid()}" in (tmp_path / files.LOCK_NAME).read_text()
        with pytest.raises(ValueError, match=f"--out {tmp_path} is in use by another run \\(process {os.getpid()}"):
            with files.hold_dir(tmp_path, "--out"):
                pass
    assert lock is not None and not (tmp_path / files.LOCK_NAME).exists()


def test_a_folder_of_outputs_is_never_written_through_a_link_nor_a_users_file(tmp_path):
    """cli.claim_files, which every tool that writes into a folder uses (evaluate's --save-masks and --vis, the
    folder mode of predict.py): a link, in the name or on the way, is refused before anything is written, and
    a file or folder where the other is needed is named in words, not as [Errno 17] or [Errno 21]."""
    from helpers import cli
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "mine.png").write_bytes(b"the user's file")
    cli.claim_files(out, ["a.png", "sub/b.png"], "--save-masks")  # a fresh folder: claimed and recorded
    (out / "a.png").symlink_to(outside / "mine.png")
    (out / "sub").symlink_to(outside)
    (out / "file").write_bytes(b"a user's file")
    (out / "dir.png").mkdir()
    cases = {"a.png": "a.png is a symbolic link", "sub/b.png": "sub is a symbolic link; this tool writes only into "
             "real folders", "file/c.png": "file is a file where this tool needs a folder (for file/c.png)",
             "dir.png": "dir.png is a folder where this tool writes a file"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            cli.claim_files(out, [name], "--save-masks")  # a.png and sub/b.png are listed as ours: still refused
    with pytest.raises(ValueError, match="is a symbolic link"):
        cli.make_folders(out, "sub/b.png", "--save-masks")
    assert sorted(p.name for p in outside.iterdir()) == ["mine.png"]
    assert (outside / "mine.png").read_bytes() == b"the user's file"


def test_the_record_of_a_folder_keeps_names_with_line_breaks_and_reads_the_first_format(tmp_path):
    from helpers import cli
    names = ["a\nb.png", "c\rd.png", "e\u2028f.png", "g\x85h.png", "i\udcffj.png", "plain.png"]
    cli.claim_files(tmp_path, names, "--out")
    assert cli.written_names(tmp_path) == set(names)
    for name in names:
        (tmp_path / name).write_bytes(b"written by the tool")
    cli.claim_files(tmp_path, names, "--out")  # its own files: no refusal
    old = tmp_path / "old"
    old.mkdir()
    (old / cli.WRITTEN).write_text("x.png\ny\u2028z.png\n")  # the first format, one name a line
    assert cli.written_names(old) == {"x.png", "y\u2028z.png"}
    (old / cli.WRITTEN).write_text(cli.RECORD_HEADER + "\n" + '"x.png"\nnot json\n')
    with pytest.raises(ValueError, match="line 3: not a JSON string"):
        cli.written_names(old)


def test_a_lock_or_temporary_file_that_is_a_link_is_never_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("the user's text")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / files.LOCK_NAME).symlink_to(target)
    with pytest.raises(ValueError, match="is not a regular file"):
        with files.hold_dir(run_dir, "--out"):
            pass
    (run_dir / f".m.json.tmp-{os.getpid()}").symlink_to(target)  # a planted link under this process's temporary name
    with files.atomic_path(run_dir / "m.json") as tmp:
        tmp.write_text("{}")
    assert target.read_text() == "the user's text" and (run_dir / "m.json").read_text() == "{}"


# --- a full disk, stale temporary files, signals ---------------------------------------------------


def test_a_full_disk_is_named_and_the_previous_file_stays(cris_file, tmp_path, monkeypatch):
    out = tmp_path / "converted.pth"
    cris.convert(cris_file, out)
    before = out.read_bytes()

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: files.shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(SystemExit) as exc:
        cris.main(["convert", str(cris_file), str(out)])
    assert f"the disk is full: could not write {out}" in str(exc.value.code)
    assert out.read_bytes() == before and not list(tmp_path.glob(".*.tmp-*"))

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError, match=f"the disk is full: could not write {tmp_path / 'm.json'}"):
        with files.atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{}")


def test_temporary_files_of_a_killed_process_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, alive = tmp_path / f".m.json.tmp-{dead.pid}", tmp_path / f".m.json.tmp-{os.getppid()}"
    stale.write_text("half")
    alive.write_text("another live process's")
    with files.atomic_path(tmp_path / "m.json") as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and alive.exists() and (tmp_path / "m.json").read_text() == "{}"


SCRIPT = """
import time
from helpers import cli, files

def work():
    with files.atomic_path({out!r}) as tmp:
        tmp.write_text("half")
        print("writing", flush=True)
        time.sleep(120)
cli.run_tool("demo.py", work)
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_ends_a_tool_with_one_line_and_no_temporary_file(tmp_path, sig, name):
    out = tmp_path / "result.json"
    proc = start_tool("-c", SCRIPT.format(out=str(out)))
    try:
        assert proc.stdout.readline() == "writing\n"
        assert list(tmp_path.glob(".result.json.tmp-*"))
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 128 + sig
    assert proc.stderr.read() == f"demo.py: stopped by {name}; temporary files removed\n"
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ctrl_c_in_benchmark_is_one_line(tmp_path):
    proc = start_tool("benchmark.py", *FAST_BENCH[:-4], "--repeats", "100000000")
    try:
        assert "median of" in proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "benchmark.py: stopped by Ctrl-C; temporary files removed"


# --- no traceback from a user's mistake ---------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["benchmark.py", "--device", "gpu0"], "--device"),
    (["benchmark.py", "--size", "-32"], "--size"),
    (["benchmark.py", "--workers", "-5"], "--workers"),
    (["benchmark.py", "--ckpt", "/"], "--ckpt"),
    (["cris.py", "convert", "/no/such.pth", "out.pth"], "/no/such.pth"),
    (["cris.py", "convert", "x.pth", "y.pth", "--decoder-heads", "0"], "--decoder-heads"),
    (["cris.py", "convert", "x.pth", "y.pth", "--word-len", "2"], "--word-len"),
    (["cris.py", "convert", "x.pth", "y.pth", "--input-size", "-64"], "--input-size"),
])
def test_no_traceback_from_a_users_mistake(args, message, capsys, monkeypatch):
    from tools import benchmark
    monkeypatch.setattr(benchmark, "run", lambda args: pytest.fail("the benchmark ran"))
    last = usage_error({"benchmark.py": benchmark.main, "cris.py": cris.main}[args[0]], args[1:], capsys)
    assert last.startswith(args[0]) and ": error: " in last and message in last, last


def test_train_refuses_inputs_that_are_not_regular_files(tmp_path, capsys):
    from helpers import train_config
    os.mkfifo(tmp_path / "train.lmdb")
    (tmp_path / "val.lmdb").write_bytes(b"")
    os.mkfifo(tmp_path / "best.pth")
    for argv, message in ((["--data", str(tmp_path)], f"{tmp_path / 'train.lmdb'} is not a regular file but a FIFO"),
                          (["--init-from", str(tmp_path / "best.pth")], "--init-from"),
                          (["--resume", str(tmp_path / "best.pth")], "--resume")):
        with pytest.raises(SystemExit) as exc:
            train_config.parse_args(["--preset", "smoke", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "not a regular file" in err, err


@pytest.mark.parametrize("raw, expected", [
    ("photo é 中.jpg", "photo é 中.jpg"),                   # accents and scripts as they are
    ("a\x1b[2Jb.png", "a\\x1b[2Jb.png"),                   # a terminal escape cannot clear the screen
    ("x\npredict.py: note: forged", "x\\npredict.py: note: forged"),  # nor forge a line of its own
    ("u\u2028v\x85w\r", "u\\u2028v\\x85w\\r"),             # Unicode's line breaks too
    ("\u202egpj.exe", "\\u202egpj.exe"),                   # a bidirectional override
])
def test_shown_escapes_what_could_drive_a_terminal(raw, expected):
    from helpers.cli import shown
    assert shown(raw) == expected
    assert shown(raw).isprintable()
