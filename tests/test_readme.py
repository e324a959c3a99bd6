"""README's and docs/'s commands, one test per block, named after its heading, in README's order.

The blocks run as bash scripts in one scratch folder that stands in for the repository's root (the
repository's files are linked into it), in the order a reader meets them: README, then each file of
docs/ in the order README links them. Paths are never rewritten: README's quick start writes
`runs/demo`, and the later blocks use `runs/demo/best.pth` as written. Only sizes are turned down for
this machine: the demo trains one epoch on 12 synthetic images, the `paper` and `cris-*` presets become
`smoke`, 4 processes become 2 (gloo on the CPU), the several-node address becomes this machine, the
ablation runs one seed at smoke size. One checkpoint is trained for the whole module (the `workspace`
fixture: README's quick start, at that size); a block run alone first runs the blocks before it.

What the data downloads would bring (`sh` blocks: they need the network, so they are checked for
their commands only) is stood in for by tiny sets in each dataset's own layout, made at the path the
docs name (PhraseCut's clone, data/refer, data/coco, data/VOCdevkit), as is the user's `photo.jpg` and
a CRIS-format `best_model.pth`. The install block is CI's own job (`.ci/run`), the test-tier block
runs its one-file command and collects the two tiers, and `python app.py` is served and fetched once.
"""
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from coco_files import UMD, coco_folder, ref, refer_root, voc_root
from cris_files import write_cris_checkpoint
from grefcoco_files import grefcoco_root

from model import build_model
from sources import synthetic

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# docs/ in the order README's "Documentation" links them
DOCS = list(dict.fromkeys(re.findall(r"\]\(docs/(\w+\.md)\)", README.split("## Documentation")[1])))
# what the repository holds that the commands read; linked into the scratch root
LINKED = ("helpers", "sources", "tools", "tests", "notebooks", "docs", ".ci", "pyproject.toml", "requirements.txt",
          "README.md", "LICENSE")
# the downloads of docs/data.md: the only commands an `sh` block may hold
NETWORK = ("git clone ", "cd ", "mkdir ", "pip install ", "python download_dataset.py", "wget ", "unzip ", "tar ")
# blocks that show commands without running them here, and why
NOT_RUN = {"measurements.md: The web page": "needs Chromium; tests/test_app.py's browser test drives the same page",
           "measurements.md: Engines on the CPU #2": "the first block's command in float32; tests/test_engines.py "
                                                      "runs OpenVINO in float32",
           "measurements.md: One heavy request on the web page": "a test of tests/test_app.py, which the slow tier runs",
           "measurements.md: Using a model: folders, ONNX, bf16 #2": "times this CPU's matmul; emulated bf16 takes minutes",
           "measurements.md: Using a model: folders, ONNX, bf16 #3": "times the folder mode on photos it names; "
                                                                     "tests/test_batch_predict.py runs that mode"}
DEMO_AT_TEST_SIZE = "--synth-images 12 --epochs 1 --batch-size 4 --milestones 100 --num-workers 0"
TIMEOUT = 900


def fenced_blocks(name: str, text: str) -> list[dict]:
    """Every fenced block of a Markdown file: {id, lang, code}, the id '<file>: <heading>' (#2, #3 ... when a
    heading has several)."""
    found, heading, seen = [], "top", {}
    for m in re.finditer(r"^(#{1,4}) ([^\n]+)$|^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(2).strip()
            continue
        key = f"{name}: {heading}"
        seen[key] = seen.get(key, 0) + 1
        found.append({"id": key if seen[key] == 1 else f"{key} #{seen[key]}", "lang": m.group(3), "code": m.group(4)})
    return found


ALL_BLOCKS = fenced_blocks("README", README) + [b for doc in DOCS for b in fenced_blocks(doc, (REPO / "docs" / doc).read_text())]
BASH = [b for b in ALL_BLOCKS if b["lang"] == "bash"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def at_test_size(line: str) -> str:
    """One command line with its sizes turned down; its paths stay as written."""
    if "tools.ablation" in line:
        line = re.sub(r"--preset \S+", "--preset smoke", line)
        line = re.sub(r"--seeds( \d+)+", "--seeds 0", line)
        line = re.sub(r"--nproc \d+", "--nproc 1", line)
    elif "tools.benchmark" in line:
        line += " --preset smoke --batch 2 --repeats 1 --warmup 1 --workers 0 --loader-batches 2"
    elif re.search(r"\btrain\.py\b", line):
        line = re.sub(r"--preset (demo|demo-gres)(?![\w-])", rf"--preset \1 {DEMO_AT_TEST_SIZE}", line)
        # RefCOCOg's stand-in has 3 training sentences: a batch of 2 (BatchNorm needs 2 a process), 4 for two processes
        batch = 4 if re.match(r"(\w+=\S* )*torchrun ", line) else 2
        line = re.sub(r"--preset cris-refcocog?\b", f"--preset smoke --batch-size {batch}", line)
        line = re.sub(r"--preset paper\b", "--preset smoke", line)
        if "--resume" in line:
            line = re.sub(r"--epochs \d+", "--epochs 2", line)
    for pattern, repl in [
        (r"--word-len \d+", "--word-len 10"),  # the smoke model's CLIP context is 12
        (r"--nproc_per_node=4", "--nproc_per_node=2"),
        (r"--nnodes=\d+", "--nnodes=1"),
        (r"--master_addr=\S+", "--master_addr=127.0.0.1"),
        (r"--master_port=\d+", f"--master_port={free_port()}"),
        (r"--images \d+", "--images 12"),
        (r"--synth-images \d+", "--synth-images 12"),
        (r"^((?:\w+=\S* )*)torchrun ", rf"\1{sys.executable} -m torch.distributed.run "),  # after VAR=value too
        (r"^((?:\w+=\S* )*)python ", rf"\1{sys.executable} "),
    ]:
        line = re.sub(pattern, repl, line)
    return line


def script_at_test_size(code: str) -> str:
    lines = [line.split("  #")[0].rstrip() for line in code.replace("\\\n", " ").splitlines()]
    return "\n".join(at_test_size(line.strip()) if line.strip() else "" for line in lines)


def stand_ins(root: Path, code: str) -> None:
    """What a user would have at the paths a block names: the downloads, a photo, a CRIS-format file."""
    phrasecut = root / "PhraseCutDataset" / "data" / "VGPhraseCut_v0"
    if "PhraseCutDataset/data/VGPhraseCut_v0" in code and not phrasecut.exists():
        synthetic.synthesize(phrasecut, num_images=12, seed=0, size=96)
    for folder, make in (("data/refer", refer_root), ("data/coco", coco_folder), ("data/VOCdevkit", voc_root)):
        if folder in code and not (root / folder).exists():
            make(root / "data")
    if "data/gres" in code and not (root / "data" / "gres").exists():  # gRefCOCO's layout under ReLA's root
        grefcoco_root(root / "data").rename(root / "data" / "gres")
    umd = root / "data" / "refer" / "refcocog" / "refs(umd).p"
    if umd.exists() and len(pickle.loads(umd.read_bytes())[0]["sentences"]) == 1:  # two sentences: a batch of 2
        umd.write_bytes(pickle.dumps([ref(9, 11, 1, "train", [(300, "a man"), (305, "man on the left")]), *UMD[1:]]))
    if "photo.jpg" in code and not (root / "photo.jpg").exists():
        synthetic.synthesize(root / "photo-source", num_images=8, seed=1, size=96)
        image = next(iter(sorted((root / "photo-source" / "images").glob("*.jpg"))))
        (root / "photo.jpg").write_bytes(image.read_bytes())
    if "best_model.pth" in code and not (root / "best_model.pth").exists():
        write_cris_checkpoint(build_model("smoke", deform=False, se=False), root / "best_model.pth")


def run_script(root: Path, code: str, what: str) -> subprocess.CompletedProcess:
    stand_ins(root, code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script_at_test_size(code)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{what} failed:\n{code}\n---\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def quick_start_training(code: str) -> str:
    """The command the install block ends with, as the activated environment runs it."""
    return code.strip().split("&& .venv/bin/")[-1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch root with the repository's files linked in, after README's quick start (at test size):
    {"root": Path, "done": set of block ids that ran, "failed": set}."""
    root = tmp_path_factory.mktemp("readme")
    for path in [*REPO.glob("*.py"), *(REPO / name for name in LINKED)]:
        (root / path.name).symlink_to(path)
    install = next(b for b in BASH if "pip install" in b["code"])
    run_script(root, quick_start_training(install["code"]), "README's quick start")
    return {"root": root, "done": {install["id"]}, "failed": set()}


def run_block(workspace, block) -> None:
    """Run `block` (and, first, every earlier bash block that has not run) in the workspace."""
    for earlier in BASH[:BASH.index(block) + 1]:
        if earlier["id"] in workspace["done"]:
            continue
        if earlier["id"] in workspace["failed"] and earlier is not block:
            continue  # reported by its own test; a block that needs its files fails on its own
        workspace["failed"].add(earlier["id"])
        kind = block_kind(earlier)
        if kind == "run":
            run_script(workspace["root"], earlier["code"], earlier["id"])
        elif kind == "tiers":
            check_test_tiers(workspace["root"], earlier["code"])
        elif kind == "server":
            serve_once(workspace["root"], earlier["code"])
        workspace["failed"].discard(earlier["id"])
        workspace["done"].add(earlier["id"])


def block_kind(block) -> str:
    code = block["code"]
    if "pip install" in code:
        return "install"
    if code.strip() == "bash .ci/run":
        return "ci"
    if "-m pytest" in code:
        return "tiers"
    if code.strip() == "python app.py":
        return "server"
    if block["id"] in NOT_RUN:
        return "not run"
    return "run"


def check_test_tiers(root: Path, code: str) -> None:
    """The one-file command runs as written; the two tiers are collected (running them here would run this
    test inside itself): the fast one leaves the slow tests out, the slow one holds this module's."""
    commands = [line.split("  #")[0].strip() for line in code.strip().splitlines()]
    assert commands == ["python -m pytest", "python -m pytest tests/test_loss.py", "python -m pytest -m slow"], commands
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(at_test_size(commands[1]).split(), cwd=root, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert one.returncode == 0 and " passed" in one.stdout, one.stdout[-2000:] + one.stderr[-2000:]
    collected = {}
    for command in (commands[0], commands[2]):
        proc = subprocess.run([*at_test_size(command).split(), "--collect-only", "-q", "tests"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        collected[command] = proc.stdout
    assert "test_readme.py::" not in collected[commands[0]] and "test_loss.py::" in collected[commands[0]]
    assert "test_readme.py::" in collected[commands[2]] and "test_loss.py::" not in collected[commands[2]]


def serve_once(root: Path, code: str) -> None:
    """`python app.py` serves the newest demo run's page on 127.0.0.1; fetch it once, then Ctrl-C."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(script_at_test_size(code).split(), cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen, deadline = "", time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()
            seen += line
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            if found or proc.poll() is not None:
                break
        assert found, f"app.py printed no address:\n{seen[-3000:]}"
        assert "runs/demo/best.pth" in seen, seen[-3000:]
        with urllib.request.urlopen(found.group(0), timeout=60) as page:
            assert page.status == 200 and b"SegVLM" in page.read()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("block", BASH, ids=[b["id"] for b in BASH])
def test_block(block, workspace):
    kind = block_kind(block)
    root = workspace["root"]
    if kind == "install":  # its training command ran, at test size, as the workspace was made
        assert block["code"].startswith("python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && ")
        assert quick_start_training(block["code"]) == "torchrun --standalone --nproc_per_node=2 train.py --preset demo"
        assert (root / "runs/demo/best.pth").is_file() and (root / "runs/demo/predictions.png").is_file()
        assert (root / "runs/demo/test_metrics.json").is_file()
    elif kind == "ci":  # CI runs the linter and exactly the test commands README names
        named = re.search(r"then the test commands, `([^`]+)`", README).group(1)
        ci = (REPO / ".ci" / "run").read_text().rstrip().splitlines()
        assert ci[-1] == named and ".venv/bin/ruff check ." in ci
        assert named == ".venv/bin/python -m pytest && .venv/bin/python -m pytest -m slow"
    elif kind == "not run":
        pytest.skip(NOT_RUN[block["id"]])
    else:
        run_block(workspace, block)


def test_the_commands_leave_what_the_docs_say(workspace):
    """After every block (run here if they have not run yet), the files README and docs/ name are there."""
    run_block(workspace, [b for b in BASH if block_kind(b) == "run"][-1])
    for made in ("runs/demo-1proc/best.pth", "overlay.png", "test.json", "synth_test.json", "phrasecut_test.json",
                 "runs/phrasecut/test_metrics.json", "refcoco_testB.json", "refcoco+_testA.json", "refcocog_test.json",
                 "cris_refcocog_test.json", "voc_val.json", "runs/ablation/table2.md"):
        assert (workspace["root"] / made).is_file(), made


def test_every_block_is_run_or_shown_for_a_reason():
    """Every fenced block is run (bash), a download checked for its commands (sh), README's one Python
    block (tests/test_api.py runs it), or text that holds no command."""
    assert DOCS == ["data.md", "training.md", "evaluation.md", "predict.md", "cris.md", "tools.md", "measurements.md",
                    "choices.md"]
    assert sorted(DOCS) == sorted(p.name for p in (REPO / "docs").glob("*.md")), "a doc README does not link"
    for block in ALL_BLOCKS:
        lines = [line.strip() for line in block["code"].replace("\\\n", " ").splitlines() if line.strip()]
        if block["lang"] == "sh":
            for line in lines:
                for command in line.split(" && "):
                    assert command.startswith(NETWORK), (block["id"], command)
        elif block["lang"] == "python":
            assert block["id"] == "README: Try it #2", block["id"]  # after `python app.py`
        elif block["lang"] != "bash" and block["id"] not in NOT_RUN:
            assert not any(re.match(r"(python|torchrun|bash) ", line) for line in lines), block["id"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_readme_and_docs_lands_on_a_file_and_heading():
    pages = {REPO / "README.md": README, **{REPO / "docs" / doc: (REPO / "docs" / doc).read_text() for doc in DOCS}}
    for page, text in pages.items():
        for target, anchor in re.findall(r"\]\(((?:\.\./|docs/)?[\w./]*\.md|)(?:#([\w-]+))?\)", text):
            path = (page.parent / target).resolve() if target else page
            assert path.is_file(), (page.name, target)
            if anchor:
                headings = re.findall(r"^#{1,4} ([^\n]+)$", path.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, (page.name, target, anchor)
