"""The ablation of the paper's Table 2: four variants, same seed, same budget.

    python ablation.py                                  # demo preset, synthetic data, CPU
    python ablation.py --nproc 2 --epochs 4 --out runs/ablation
    python ablation.py --preset paper --nproc 4 -- --data lmdb/   # after --: passed to train.py

Each variant adds one thing to the one before, as Table 2 does:

    baseline          CRIS: BCE, no enhancement block       --loss bce --no-deform --no-se
    + RAF loss        eq. 4-8                                --loss raf --no-deform --no-se
    + deform + res    eq. 1 and eq. 3                        --loss raf --deform --no-se
    + SE (SegVLM)     eq. 2                                  --loss raf --deform --se

Every variant is trained by train.py and scored on the held-out test split with
best.pth (by val mean IoU). The table is printed and written to
OUT/table.md and OUT/results.json. train.py refuses a run dir that already holds
a run, so a second ablation needs a new --out (or the old one deleted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cli import run_tool
from files import atomic_path

VARIANTS = [
    # (table row, run dir, train.py flags)
    ("baseline", "baseline", ["--loss", "bce", "--no-deform", "--no-se"]),
    ("+ RAF loss", "raf", ["--loss", "raf", "--no-deform", "--no-se"]),
    ("+ deform + residual", "raf-deform", ["--loss", "raf", "--deform", "--no-se"]),
    ("+ SE (SegVLM)", "segvlm", ["--loss", "raf", "--deform", "--se"]),
]
COLUMNS = ["mIoU", "oIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9"]


TRAIN = str(Path(__file__).resolve().with_name("train.py"))


def train_command(nproc: int, args: list[str]) -> list[str]:
    """train.py by its full path, so relative --out and --cache-dir mean the caller's directory."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", TRAIN, *args]
    return [sys.executable, TRAIN, *args]


def format_table(rows: list[dict]) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | minutes |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"{100 * r['test'][c]:.2f}" for c in COLUMNS]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="train.py preset for every variant")
    parser.add_argument("--nproc", type=int, default=1, help="processes per variant (torchrun)")
    parser.add_argument("--epochs", type=int, default=None, help="budget per variant (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("train_args", nargs="*", help="after --: more train.py flags for every variant")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, dirname, flags in VARIANTS:
        run_dir = out / dirname
        cmd = ["--preset", args.preset, "--seed", str(args.seed), "--out", str(run_dir),
               "--eval-test", *flags, *args.train_args]
        if args.epochs is not None:
            cmd += ["--epochs", str(args.epochs)]
        print(f"== {name}: {' '.join(train_command(args.nproc, cmd))}", flush=True)
        t0 = time.time()
        if subprocess.run(train_command(args.nproc, cmd)).returncode != 0:  # train.py has said why
            sys.exit(f"ablation.py: error: train.py failed for {name} ({run_dir})")
        seconds = time.time() - t0
        test_file = run_dir / "test_metrics.json"
        if not test_file.exists():
            sys.exit(f"ablation.py: error: {test_file} was not written; does the data have test.lmdb?")
        rows.append({"variant": name, "flags": flags, "seconds": seconds,
                     "test": json.loads(test_file.read_text())})

    table = format_table(rows)
    print("\nTest split, best.pth of each variant (percent):\n" + table)
    for name, text in (("table.md", table + "\n"), ("results.json", json.dumps(rows, indent=2))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    return rows


if __name__ == "__main__":
    run_tool("ablation.py", main)
