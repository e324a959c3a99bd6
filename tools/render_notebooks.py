"""Render the notebooks with their outputs, on the trained checkpoints of README's quick start: one command, no
hand editing, so that a student reads every figure on the repository's web page before installing anything.

    python -m tools.render_notebooks                                  # every notebook of notebooks/
    python -m tools.render_notebooks --only 5_training_and_results.ipynb 6_no_target.ipynb
    python -m tools.render_notebooks --ckpt runs/demo/best.pth --gres-ckpt runs/demo-gres/best.pth   # the defaults

Each notebook is executed in a fresh kernel from notebooks/, as nbmake runs it (nbclient), with $SEGVLM_CKPT
naming its checkpoint (--gres-ckpt for the notebooks on phrases that name nothing, GRES_NOTEBOOKS; --ckpt for
the others) and one thread (OMP_NUM_THREADS=1: the same sums in the same order, so that rendering the same code
on the same checkpoint again gives the same outputs). It is then written in place (files.atomic_path) with its
outputs and, in its metadata, what they were rendered from:

    "segvlm": {"rendered": {"commit": the repository's HEAD ("... (uncommitted changes)" when code outside
                                      notebooks/ differs from it),
                            "ckpt": {"path": as given, relative to the repository where it lies under it,
                                     "trained_on": what the checkpoint says (provenance.describe),
                                     "test": its test score (provenance.test_scores)},
                                    or null for a notebook that loads no model,
                            "code_sha256": code_sha256 of the notebook}}

tests/test_notebooks_rendered.py (fast) fails when a notebook's code cells no longer match code_sha256, when a
code cell has not run in order, or a notebook has no figure or outgrows MAX_BYTES; its message gives this command.

Refused before any work, in one line (exit 2): a checkpoint that is not a file, a name --only gives that is not
a notebook of notebooks/. A cell that fails ends the tool with one line naming the notebook, the cell and the
error (exit 1), and so does an output that shows this machine's repository folder or temporary folder (a committed
notebook must not name the renderer's folders): that notebook is left as it was, those rendered before stay so.
"""
import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers.cli import run_tool, shown
from helpers.files import atomic_path
from helpers.provenance import describe, test_scores

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GRES_NOTEBOOKS = ("6_no_target.ipynb",)  # shown on the demo-gres checkpoint
READS_A_CHECKPOINT = ("notebook_model(", "trained_checkpoint(")  # how a notebook finds the trained model it shows
MAX_BYTES = 1_500_000  # a notebook with its figures: GitHub's page shows it whole, a clone stays small
COMMAND = "python -m tools.render_notebooks"
CELL_TIMEOUT = 1800  # seconds: notebook 5 and 6 evaluate a whole test split on one thread


def source_text(cell) -> str:
    """A cell's source as one string (nbformat keeps it as a string or as a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def code_sha256(nb) -> str:
    """SHA-256 (hex) of the notebook's code cells' sources, each one string, joined with "\\n\\n", in UTF-8: what
    the rendered outputs were computed from (markdown may change without a new render)."""
    sources = [source_text(cell) for cell in nb["cells"] if cell.get("cell_type") == "code"]
    return hashlib.sha256("\n\n".join(sources).encode("utf-8")).hexdigest()


def reads_a_checkpoint(nb) -> bool:
    return any(name in source_text(cell) for cell in nb["cells"] if cell.get("cell_type") == "code"
               for name in READS_A_CHECKPOINT)


def git_commit() -> str:
    """HEAD, with " (uncommitted changes)" when a tracked file outside notebooks/ differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)notebooks")
        return git("rev-parse", "HEAD") + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def under_root(path):
    """`path` relative to the repository, or None where it lies outside. abspath, not realpath: runs/ may be a link
    to another disk, and the repository may be reached through a link (the current folder, when it is the root)."""
    bases = [ROOT]
    with contextlib.suppress(OSError):
        if os.path.samefile(".", ROOT):
            bases.append(Path(os.path.abspath(".")))
    for base in bases:
        with contextlib.suppress(ValueError):
            return str(Path(os.path.abspath(path)).relative_to(base))
    return None


def checkpoint_record(path) -> dict:
    """What a rendered notebook records of its checkpoint: the path, what it was trained on, its test score."""
    from helpers.inference import load_model  # the model file's own checks; torch is imported only here

    model = load_model(path, "cpu", engine="eager", precision="fp32")
    return {"path": under_root(path) or str(path), "trained_on": describe(model.trained_on), "test": test_scores(path)}


def leaked_folder(nb):
    """(cell number, folder) of the first output that shows this repository's folder, the temporary folder, this
    Python's environment or the home folder, or None."""
    folders = {str(ROOT), os.path.realpath(ROOT), tempfile.gettempdir(), sys.prefix, os.path.realpath(sys.prefix),
               str(Path.home())} - {"", "/"}
    for number, cell in enumerate(nb["cells"], 1):
        for output in cell.get("outputs", []):
            texts = [output.get("text", ""), output.get("evalue", "")]
            texts += [v for k, v in output.get("data", {}).items() if k.startswith("text/")]
            text = "".join("".join(t) if isinstance(t, list) else str(t) for t in texts)
            for folder in folders:
                if folder in text:
                    return number, folder
    return None


def failed_cell(nb) -> str:
    """"cell N (In [k]) failed: Error: its message's first line" for the cell whose output is an error."""
    for number, cell in enumerate(nb["cells"], 1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                message = (str(output.get("evalue", "")).splitlines() or [""])[0]
                return (f"cell {number} (In [{cell.get('execution_count')}]) failed: "
                        f"{shown(output.get('ename', 'error'))}: {shown(message)}")
    return "a cell failed"


def render(path: Path, ckpt, threads: int) -> float:
    """Execute the notebook at `path` in a fresh kernel with $SEGVLM_CKPT = ckpt (None: none needed) and write it
    back with its outputs and metadata -> seconds taken. A ValueError (one line) when a cell fails or an output
    names this machine's folders; the file is then untouched."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    record = checkpoint_record(ckpt) if ckpt is not None and reads_a_checkpoint(nb) else None
    inside = under_root(ckpt) if ckpt is not None else None
    # relative to the notebook's folder where it can be, so that the notebook names runs/demo/best.pth, not a folder
    # of this machine (inference.weights_line)
    kernel_ckpt = os.path.relpath(ROOT / inside, path.parent) if inside else os.path.abspath(ckpt) if ckpt else "none"
    env = {"SEGVLM_CKPT": kernel_ckpt, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        # no timings, and a cell's printed lines in one output however the kernel happened to flush them: the same
        # code renders the same file
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False, coalesce_streams=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError:
        raise ValueError(f"{path.name}: {failed_cell(nb)}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.perf_counter() - start
    leak = leaked_folder(nb)
    if leak:
        raise ValueError(f"{path.name}: cell {leak[0]}'s output shows this machine's folder {shown(leak[1])}; "
                         f"print paths relative to the repository (a committed notebook is read elsewhere)")
    nb.metadata["segvlm"] = {"rendered": {"commit": git_commit(), "ckpt": record, "code_sha256": code_sha256(nb)}}
    with atomic_path(path) as tmp:
        nbformat.write(nb, str(tmp))
    return seconds


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/demo/best.pth", help="the demo's checkpoint (default: runs/demo/best.pth)")
    p.add_argument("--gres-ckpt", default="runs/demo-gres/best.pth",
                   help=f"the checkpoint of {', '.join(GRES_NOTEBOOKS)} (default: runs/demo-gres/best.pth)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="render only these notebooks of notebooks/ (file names)")
    p.add_argument("--threads", type=int, default=1, choices=range(1, 65), metavar="N",
                   help="threads of each kernel (default 1: the same outputs from one render to the next)")
    args = p.parse_args(argv)
    available = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
    for name in args.only or ():
        if name not in available:
            p.error(f"--only {shown(name)} is not a notebook of notebooks/ (those are: {', '.join(available)})")
    args.names = args.only or available
    for flag, path in (("--ckpt", args.ckpt), ("--gres-ckpt", args.gres_ckpt)):
        used = [n for n in args.names if (n in GRES_NOTEBOOKS) == (flag == "--gres-ckpt")]
        if used and not Path(path).is_file():
            preset = "demo-gres" if flag == "--gres-ckpt" else "demo"
            p.error(f"{flag} {shown(path)} is not a file ({', '.join(used)} show{'s' if len(used) == 1 else ''} "
                    f"it); train it with `python train.py --preset {preset}` (README's quick start) or name another "
                    f"with {flag}")
    return args


def main(argv=None):
    args = parse_args(argv)
    total = time.perf_counter()
    for name in args.names:
        path = NOTEBOOKS / name
        ckpt = args.gres_ckpt if name in GRES_NOTEBOOKS else args.ckpt
        try:
            seconds = render(path, ckpt, args.threads)
        except (ValueError, OSError) as e:
            sys.exit(f"render_notebooks: error: {e}")
        print(f"{path.relative_to(ROOT)}: rendered in {seconds:.0f} s, {path.stat().st_size / 1e6:.2f} MB"
              f"{'' if path.stat().st_size <= MAX_BYTES else f' (over {MAX_BYTES / 1e6:.1f} MB: make its figures smaller)'}",
              flush=True)
    print(f"{len(args.names)} notebook{'s' if len(args.names) != 1 else ''} in {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    run_tool("render_notebooks.py", main)
