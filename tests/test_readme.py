"""Every command in README's bash blocks (and then docs/'s) runs, at smoke size, as a newcomer would type it.

Each block is run as a bash script in a scratch directory, with the sizes
turned down: presets become "smoke", 4 processes become 2 (gloo on the CPU),
the multi-node address becomes this machine, and the PhraseCut paths point at
a small synthetic set made by README's own `data.py synth` command. The
install block is CI's own job (`.ci/run`), so it is checked for wording only.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from coco_files import coco_folder, refer_root, voc_root
from cris_files import write_cris_checkpoint

from model import build_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every command of README and docs/, in order: minutes

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)
# docs/ quotes figures with the commands that measured them: those run too, after README's
DOC_BLOCKS = [b for doc in sorted((REPO / "docs").glob("*.md")) for b in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)]
SCRIPTS = ("train.py", "evaluate.py", "predict.py", "data.py", "ablation.py", "model.py", "cris.py", "benchmark.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_size(block: str) -> str:
    """README's command lines, turned down to smoke size for this machine."""
    py = sys.executable
    subs = [
        (r"--preset (paper|demo)\b", "--preset smoke"),
        (r"--preset cris-refcocog?\b", "--preset smoke --batch-size 2"),  # the fixture's 3 training sentences
        (r"--word-len \d+", "--word-len 10"),  # the smoke model's CLIP context is 12
        (r"--nproc_per_node=4", "--nproc_per_node=2"),
        (r"--nnodes=\d+", "--nnodes=1"),
        (r"--master_addr=\S+", "--master_addr=127.0.0.1"),
        (r"--master_port=\d+", f"--master_port={free_port()}"),
        (r"--images \d+", "--images 12"),
        (r"data/VGPhraseCut_v0", "data/synth"),
        (r"(?<![\w/])(runs/demo/)?best\.pth", "$CKPT"),
        (r"python ablation\.py", "python ablation.py --preset smoke"),
        (r"--seeds( \d+)+", "--seeds 0"),
        (r"--nproc \d+", "--nproc 1"),  # ablation.py's processes per run
        (r"--synth-images \d+", "--synth-images 12"),
        (r"(python benchmark\.py.*)", r"\1 --preset smoke --batch 2 --repeats 1 --warmup 1 --workers 0 "
                                      r"--loader-batches 2"),
        (r"^torchrun ", f"{py} -m torch.distributed.run "),
        (r"^python ", f"{py} "),
        (r"(\s)python ", rf"\1{py} "),
    ]
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].strip()
        for pattern, repl in subs:
            line = re.sub(pattern, repl, line)
        for script in SCRIPTS:
            line = re.sub(rf"(?<![\w/.]){re.escape(script)}", str(REPO / script), line)
        out.append(line)
    return "\n".join(out)


def test_readme_quick_start_is_ci():
    install = [b for b in BLOCKS if "pip install" in b]
    assert install and "-r requirements.txt" in install[0]
    assert "torchrun --standalone --nproc_per_node=2 train.py --preset demo" in install[0]
    assert any(b.strip() == "bash .ci/run" for b in BLOCKS)
    ci = (REPO / ".ci" / "run").read_text()
    test_command = re.search(r"test command, `([^`]+)`", README).group(1)
    assert ci.rstrip().splitlines()[-1] == test_command


def test_every_readme_command_runs_at_smoke_size(tmp_path):
    runnable = [b for b in BLOCKS + DOC_BLOCKS if "pip install" not in b and ".ci/run" not in b]
    assert len(runnable) >= 4 and DOC_BLOCKS
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CKPT": ""}
    for block in runnable:
        script = smoke_size(block)
        if "$CKPT" in script:  # a checkpoint from the training block that ran before
            ckpt = next(iter(sorted(tmp_path.glob("runs/*/best.pth"))), None)
            assert ckpt is not None, "README evaluates a checkpoint before training one"
            env["CKPT"] = str(ckpt)
        if "best_model.pth" in script:  # CRIS's released file: here one in its format, from a smoke-sized model
            write_cris_checkpoint(build_model("smoke", deform=False, se=False), tmp_path / "best_model.pth")
        for folder, make in (("data/refer", refer_root), ("data/coco", coco_folder), ("data/VOCdevkit", voc_root)):
            if folder in script and not (tmp_path / folder).exists():  # tiny sets in each official layout
                make(tmp_path / "data")
        if "photo.jpg" in script:
            (tmp_path / "photo.jpg").write_bytes((tmp_path / "data/synth/images/1.jpg").read_bytes())
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README block failed:\n{block}\n---\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "overlay.png").is_file() and (tmp_path / "test.json").is_file()
