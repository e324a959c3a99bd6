"""The ablation of the paper's Table 2 with its Figs. 4-6: four variants, each trained once per seed.

    python -m tools.ablation --preset demo --seeds 0 1 2                       # synthetic data, CPU
    python -m tools.ablation --preset demo --seeds 0 1 2 -- --epochs 2 --synth-images 600   # shorter
    python -m tools.ablation --preset paper --nproc 4 --seeds 0 1 2 -- --data lmdb/   # after --: train.py flags

Each variant adds one thing to the one before, as Table 2 does:

    Baseline (CRIS)           BCE, no enhancement block    --loss bce --no-deform --no-se
    + RAF loss                eq. 4-8                      --loss raf --no-deform --no-se
    + Deformable + Residual   eq. 1 and eq. 3              --loss raf --deform --no-se
    + SE block (SegVLM)       eq. 2                        --loss raf --deform --se

Every run is train.py's, in OUT/<variant>/seed<k>/, scored on the held-out test split with its
best.pth (by val mean IoU). A seed fixes the initialisation, the order of the batches and, for the
synthetic set, the dataset itself, so within a seed every variant sees the same data and the same
number of steps. OUT then receives (helpers/figures.py draws the figures):

    table2.md, table2.json   IoU and P@50-P@90 as Table 2 lays them out, mean +- standard deviation
                             over the seeds; the JSON adds oIoU and every seed's value
    fig4_precision.png       Prec@k against k, one curve per variant, the seeds' spread as a band
    fig5_gains.png           each stage's gain over the one before, per metric (paired by seed)
    fig6_qualitative.png     test tasks as image, ground truth and each variant's prediction, drawn
                             from the best.pth of one seed (--fig6-seed, default the first); rows by
                             a rule stated in its caption, never by hand: the tasks where the
                             variants' IoU differ most, then typical ones (qualitative_rows)

Interrupted, the same command resumes: a finished run (test_metrics.json written, same settings) is
reused, a started one continues from its checkpoint.pth (train.py --resume). A run that fails is
named in one line and the others go on; the files are written from the runs that finished, and the
command exits non-zero. The flags that define a variant (--loss, --w-*, --dice-weight, --deform,
--se) or a run's place (--out, --resume, --seed, --preset) are ablation.py's business and refused
after --. On a shared or busy CPU, OMP_NUM_THREADS=1 keeps each run from fighting for cores.

Refused before any run starts: an unknown --preset, a seed outside 0 to 2**32 - 1, a run folder that holds
files but no config.json, a finished run whose test_metrics.json lacks a metric or holds one that is not a
number from 0 to 1 (NaN included), naming the file and the field, and a second ablation on an --out that
one holds (files.hold_dir, as train.py holds its run folder), naming the holder.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import evaluate
from data import PhraseCutLMDB
from helpers import figures
from helpers.cli import make_dir
from helpers.files import atomic_path, hold_dir, read_json
from helpers.model_files import load_checkpoint
from helpers.train_config import TrainConfig
from helpers.train_config import parse_args as parse_train_args
from model import PRESETS

VARIANTS = [
    # (Table 2's row, run dir, train.py flags)
    ("Baseline (CRIS)", "baseline", ["--loss", "bce", "--no-deform", "--no-se"]),
    ("+ RAF loss", "raf", ["--loss", "raf", "--no-deform", "--no-se"]),
    ("+ Deformable + Residual", "raf-deform", ["--loss", "raf", "--deform", "--no-se"]),
    ("+ SE block (SegVLM)", "segvlm", ["--loss", "raf", "--deform", "--se"]),
]

# train.py flags ablation.py sets itself, and what to do instead
OWN_FLAGS = {
    "loss": "it defines the variants (Table 2's rows)",
    "w_bce": "it defines the variants (Table 2's rows)",
    "w_focal": "it defines the variants (Table 2's rows)",
    "w_dice": "it defines the variants (Table 2's rows)",
    "dice_weight": "it defines the variants (Table 2's rows)",
    "deform": "it defines the variants (Table 2's rows)",
    "se": "it defines the variants (Table 2's rows)",
    "preset": "give ablation.py's --preset, before --",
    "seed": "give ablation.py's --seeds, before --",
    "out": "give ablation.py's --out, before --; each run goes to OUT/<variant>/seed<k>",
    "resume": "rerun the same ablation.py command: it resumes by itself",
    "eval_test": "the table is scored on the test split",
}

# config.json fields that may differ between a finished run and this ablation's (where the data lies,
# how fast it ran); any other difference means the run is not this ablation's
NOT_COMPARED = {"out", "resume", "cache_dir", "data", "num_workers", "log_every", "compile", "channels_last",
                "eval_test"}

# what train.py writes into a run dir before its first checkpoint.pth
STARTED_FILES = {"config.json", "command.txt", "git.txt", "metrics.jsonl"}

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")


class AblationError(Exception):
    """A user's mistake or a run that cannot be reused: main prints it as one line."""


def train_command(nproc: int, args: list[str]) -> list[str]:
    """train.py by its full path, so relative --out and --cache-dir mean the caller's directory."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", TRAIN, *args]
    return [sys.executable, TRAIN, *args]


def train_flag(token: str) -> str | None:
    """The TrainConfig field a typed train.py flag sets, as train.py's argparse reads it (a unique prefix
    is enough, `--no-x` sets x, `--x=v` too) -> None for a token that is no flag (a value)."""
    if not token.startswith("--") or token == "--":
        return None
    typed = token.split("=", 1)[0]
    options = {}
    for f in dataclasses.fields(TrainConfig):
        options["--" + f.name.replace("_", "-")] = f.name
        if f.type == "bool":
            options["--no-" + f.name.replace("_", "-")] = f.name
    if typed in options:
        return options[typed]
    matches = {name for option, name in options.items() if option.startswith(typed)}
    if len(matches) != 1:
        raise AblationError(f"{typed} after --: {'ambiguous' if matches else 'not a'} train.py flag "
                            f"(python train.py --help lists them)")
    return matches.pop()


def check_train_args(train_args: list[str], epochs_given: bool) -> None:
    """Refuse, naming the flag, a train.py flag after -- that ablation.py sets itself."""
    for token in train_args:
        name = train_flag(token)
        if name in OWN_FLAGS:
            raise AblationError(f"{token.split('=', 1)[0]} after --: {OWN_FLAGS[name]}")
        if name == "epochs" and epochs_given:
            raise AblationError("--epochs is given twice, before and after --; keep one")


def expected_config(cmd: list[str]) -> TrainConfig:
    """train.py's own reading of a run's flags; its error (a bad value) as an AblationError, one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_train_args(cmd)
    except SystemExit as e:  # argparse's error is on stderr; train.py's own checks exit with their message
        said = e.code if isinstance(e.code, str) else err.getvalue()
        lines = [line for line in said.splitlines() if "error:" in line] or ["train.py: error: its flags were refused"]
        raise AblationError(f"after --: {lines[0].split('error:', 1)[1].strip()}") from None


def run_state(run_dir: Path, cfg: TrainConfig) -> str:
    """"done" (test_metrics.json and best.pth of a run with these settings), "started" (a checkpoint.pth
    to resume) or "new"; an AblationError for a run dir that holds another ablation's run."""
    config = run_dir / "config.json"
    if not config.is_file():
        left = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".")) if run_dir.is_dir() else []
        if left:  # train.py would refuse it on every retry: say so now, once (hidden files: a killed run's lock)
            raise AblationError(f"{run_dir} holds files ({', '.join(left[:3])}{' ...' * (len(left) > 3)}) but no "
                                "config.json, so no run of train.py's; move it away or pick another --out")
        return "new"
    try:
        saved = read_json(config, dict)["train"]
    except (ValueError, OSError, KeyError) as e:
        raise AblationError(f"{run_dir} holds no readable run ({e}); move it away or pick another --out") from None
    wanted = dataclasses.asdict(cfg)
    differ = [k for k in sorted(wanted) if k not in NOT_COMPARED and saved.get(k) != wanted[k]]
    if differ:
        changes = ", ".join(f"{k}={saved.get(k)!r} (now {wanted[k]!r})" for k in differ)
        raise AblationError(f"{run_dir} holds a run with other settings: {changes}; pick another --out")
    if (run_dir / "test_metrics.json").is_file() and (run_dir / "best.pth").is_file():
        read_test_metrics(run_dir / "test_metrics.json")  # refused now, before any training, if unusable
        return "done"
    if (run_dir / "checkpoint.pth").is_file():
        return "started"
    left = {p.name for p in run_dir.iterdir()}
    if left <= STARTED_FILES:  # stopped before its first epoch ended: nothing to continue, start again
        for name in left:
            (run_dir / name).unlink()
        return "new"
    raise AblationError(f"{run_dir} holds files but no checkpoint.pth; move it away or pick another --out")


def read_test_metrics(path: Path) -> dict:
    """A finished run's test_metrics.json, with every metric of the table (KEPT) a number from 0 to 1; an
    AblationError naming the file and the field otherwise (a NaN would reach Table 2 as "nan")."""
    try:
        metrics = read_json(path, dict)
    except (ValueError, OSError) as e:
        raise AblationError(f"{e}; delete that run's folder to train it again") from None
    for key in KEPT:
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise AblationError(f"{path}: field {key!r} is {value!r}, expected a number from 0 to 1; the file is "
                                "damaged: delete that run's folder to train it again")
    return metrics


def run_train(cmd: list[str], run_dir: Path) -> int:
    """One train.py run in its own session (a Ctrl-C reaches ablation.py alone, which ends the run
    with SIGTERM, waits for it and removes the temporary files it leaves) -> its exit status."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        for tmp in run_dir.glob(".*.tmp-*"):  # files.atomic_path's, cut short
            tmp.unlink(missing_ok=True)
        raise


def parse_args(argv: list[str]) -> argparse.Namespace:
    """ablation.py's flags before --, train.py's after it (checked); errors as one line."""
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise AblationError(message)

    parser = Parser(prog="ablation.py", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="train.py preset for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                        help="train every variant once per seed; each cell is their mean +- std")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the preset's)")
    parser.add_argument("--out", default="runs/ablation", help="where the runs, the table and the figures go")
    parser.add_argument("--fig6-seed", type=int, default=None,
                        help="whose models Fig. 6 draws (default: the first of --seeds)")
    args = parser.parse_args(own)
    if args.nproc < 1:
        raise AblationError(f"--nproc must be >= 1, got {args.nproc}")
    if args.epochs is not None and args.epochs < 1:
        raise AblationError(f"--epochs must be >= 1, got {args.epochs}")
    bad = [seed for seed in args.seeds if not 0 <= seed < 2 ** 32]
    if bad:
        raise AblationError(f"--seeds: {bad[0]} is not a seed; seeds are integers from 0 to 2**32 - 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise AblationError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    args.fig6_seed = args.seeds[0] if args.fig6_seed is None else args.fig6_seed
    if args.fig6_seed not in args.seeds:
        raise AblationError(f"--fig6-seed {args.fig6_seed} is not one of --seeds")
    check_train_args(train_args, args.epochs is not None)
    args.train_args = train_args
    return args


def plan(args) -> list[dict]:
    """Every (seed, variant) run: its command, run dir and state; settings checked before any training."""
    runs = []
    for seed in args.seeds:  # seed by seed: an interrupted ablation has whole seeds
        for label, dirname, flags in VARIANTS:
            run_dir = Path(args.out) / dirname / f"seed{seed}"
            cmd = ["--preset", args.preset, "--seed", str(seed), "--out", str(run_dir), "--eval-test", *flags,
                   *([] if args.epochs is None else ["--epochs", str(args.epochs)]), *args.train_args]
            cfg = expected_config(cmd[:4] + cmd[6:])  # without --out: train.py refuses one that holds a run
            runs.append({"label": label, "variant": dirname, "seed": seed, "dir": run_dir, "cmd": cmd,
                         "state": run_state(run_dir, cfg)})
    return runs


# Table 2's columns (the paper's IoU is the mean IoU), and what table2.json keeps besides
COLUMNS = ["mIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9"]
KEPT = COLUMNS + ["oIoU"]

FIG6_DIFFER, FIG6_TYPICAL = 4, 2  # Fig. 6's rows: where the variants differ most, then typical tasks


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation) of one cell's per-seed values; no deviation from one seed."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(done: list[dict]) -> dict:
    """table2.json from the finished runs: per variant each seed's test metrics and their mean and
    std; per stage (each variant after the first) the gain over the variant before it, computed seed
    by seed (the same data and initialisation) over the seeds both finished."""
    by = {(r["variant"], r["seed"]): r["test"] for r in done}
    seeds = sorted({r["seed"] for r in done})
    variants, gains = [], []
    for (label, dirname, flags), before in zip(VARIANTS, [None] + VARIANTS[:-1]):
        mine = {s: {k: by[dirname, s][k] for k in KEPT} for s in seeds if (dirname, s) in by}
        if not mine:
            continue
        cells = {k: spread([m[k] for m in mine.values()]) for k in KEPT}
        variants.append({"variant": label, "run": dirname, "flags": flags, "seeds": mine,
                         "mean": {k: c[0] for k, c in cells.items()}, "std": {k: c[1] for k, c in cells.items()}})
        paired = [s for s in mine if before is not None and (before[1], s) in by]
        if paired:
            diffs = {k: spread([mine[s][k] - by[before[1], s][k] for s in paired]) for k in KEPT}
            gains.append({"stage": label, "over": before[0], "seeds": paired,
                          "mean": {k: d[0] for k, d in diffs.items()}, "std": {k: d[1] for k, d in diffs.items()}})
    return {"columns": COLUMNS, "seeds": seeds, "variants": variants, "gains": gains}


def format_table(table: dict) -> str:
    """Table 2's layout in percent: one row per variant, each cell mean +- std over the seeds."""
    def cell(v, k):
        std = v["std"][k]
        return f"{100 * v['mean'][k]:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")

    head = "| variant | " + " | ".join(figures.percent_label(k) for k in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for v in table["variants"]:
        lines.append(f"| {v['variant']} | " + " | ".join(cell(v, k) for k in COLUMNS)
                     + f" | {', '.join(map(str, v['seeds']))} |")
    return "\n".join(lines)


def qualitative_rows(per_task: dict[str, list[float]], differ=FIG6_DIFFER, typical=FIG6_TYPICAL) -> list:
    """Fig. 6's rows, by rule: per_task maps each variant to its IoU on every test task (by dataset
    index) -> [(label, index)]. First the `differ` tasks where the variants differ most (the largest
    max - min IoU across them), then the `typical` tasks among the rest whose mean IoU across the
    variants is nearest the median of that mean over all tasks. Ties go to the lower index."""
    columns = list(per_task.values())
    n = len(columns[0])
    if not n or any(len(c) != n for c in columns):
        raise ValueError("qualitative_rows: every variant needs the IoU of the same, non-empty tasks")
    gap = [max(c[i] for c in columns) - min(c[i] for c in columns) for i in range(n)]
    mean = [statistics.fmean(c[i] for c in columns) for i in range(n)]
    most = sorted(range(n), key=lambda i: (-gap[i], i))[:differ]
    median = statistics.median(mean)
    rest = sorted((i for i in range(n) if i not in most), key=lambda i: (abs(mean[i] - median), i))[:typical]
    return ([(f"differ most: IoU range {100 * gap[i]:.1f} points", i) for i in most]
            + [(f"typical: mean IoU {100 * mean[i]:.1f} %, median {100 * median:.1f} %", i) for i in rest])


FIG6_RULE = (f"Rows by rule (ablation.qualitative_rows): the {FIG6_DIFFER} test tasks where the variants' IoU "
             f"differ most (max - min), then the {FIG6_TYPICAL} whose mean IoU over the variants is nearest "
             "its median; no row is picked by hand.")


def draw_fig6(done: list[dict], seed: int, path: Path) -> list[dict]:
    """Fig. 6 from the best.pth of every variant of one seed: each scored on its test split task by
    task (evaluate.evaluate, per_task), rows by qualitative_rows, drawn by figures.variant_grid."""
    runs = [r for r in done if r["seed"] == seed]
    if not runs:
        return []
    config = read_json(runs[0]["dir"] / "config.json", dict)
    models, per_task = [], {}
    for r in runs:
        net, _ = load_checkpoint(str(r["dir"] / "best.pth"), map_location="cpu")
        models.append((r["label"], net))
    cfg = models[0][1].config
    test_set = PhraseCutLMDB(str(Path(config["data_dir"]) / "test.lmdb"), input_size=cfg.input_size,
                             word_len=cfg.word_len, train=False)
    threshold = config["train"]["threshold"]
    for label, net in models:
        scored = evaluate.evaluate(net, test_set, threshold=threshold, progress=False, per_task=True)["per_task"]
        per_task[label] = [t["iou"] for t in sorted(scored, key=lambda t: t["index"])]
    rows = qualitative_rows(per_task)
    caption = f"Fig. 6: the same test tasks segmented by each variant (best.pth of seed {seed}). {FIG6_RULE}"
    return figures.variant_grid(models, test_set, rows, path, threshold=threshold, caption=caption)


def write_all(done: list[dict], out: Path, fig6_seed: int) -> dict:
    """table2.md, table2.json and the three figures in out, each written whole (atomic_path)."""
    table = summarize(done)
    seeds = f"{len(table['seeds'])} seed(s): {', '.join(map(str, table['seeds']))}"
    figures.plot_precision_curves(table["variants"], out / "fig4_precision.png",
                                    caption=f"Mean over {seeds}; the band is +- one standard deviation.")
    figures.plot_stage_gains(table["gains"], COLUMNS, out / "fig5_gains.png",
                               caption=f"Each stage minus the stage before, seed by seed, then the mean over {seeds};"
                                       " the error bar is +- one standard deviation of those differences.")
    table["fig6"] = {"seed": fig6_seed, "rule": FIG6_RULE,
                     "rows": draw_fig6(done, fig6_seed, out / "fig6_qualitative.png")}
    text = format_table(table)
    print(f"\nTest split, best.pth of each run, percent, mean ± std over {seeds}:\n{text}")
    for name, content in (("table2.md", text + "\n"), ("table2.json", json.dumps(table, indent=2) + "\n")):
        with atomic_path(out / name) as tmp:
            tmp.write_text(content)
    return table


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = make_dir(args.out, "--out")
    if not os.access(out, os.W_OK | os.X_OK):
        raise AblationError(f"--out {out}: not writable")
    with hold_dir(out, "--out"):  # a second ablation on this --out is refused, naming this one
        return ablate(args, out)


def ablate(args, out: Path) -> dict:
    """main's work, while it holds --out: plan, train what is not done, write the table and figures."""
    runs = plan(args)
    failed = []
    for r in runs:
        name = f"{r['label']}, seed {r['seed']}"
        if r["state"] == "done":
            print(f"== {name}: reused ({r['dir']})", flush=True)
            continue
        cmd = r["cmd"] + (["--resume", str(r["dir"] / "checkpoint.pth")] if r["state"] == "started" else [])
        print(f"== {name}: {'resumed' if r['state'] == 'started' else 'trained'} by "
              f"{' '.join(train_command(args.nproc, cmd))}", flush=True)
        code = run_train(train_command(args.nproc, cmd), r["dir"])
        if code == 0 and not (r["dir"] / "test_metrics.json").is_file():
            code = "no test_metrics.json: does the data have test.lmdb?"
        if code != 0:  # train.py has said why
            print(f"ablation.py: error: {name} failed ({r['dir']}: "
                  f"{code if isinstance(code, str) else f'train.py exited {code}'}); the other runs go on",
                  file=sys.stderr, flush=True)
            failed.append(name)
    done = [r for r in runs if (r["dir"] / "test_metrics.json").is_file() and r["label"] + ", seed "
            + str(r["seed"]) not in failed]
    if not done:
        raise AblationError("no run finished, so there is no table")
    for r in done:
        r["test"] = read_test_metrics(r["dir"] / "test_metrics.json")
    table = write_all(done, out, fig6_seed=args.fig6_seed)
    if failed:
        raise AblationError(f"{len(failed)} run(s) failed ({'; '.join(failed)}); {out} holds the others' "
                            "table and figures; rerun the same command to retry them")
    return table


if __name__ == "__main__":
    try:
        main()
    except AblationError as e:
        sys.exit(f"ablation.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("ablation.py: interrupted; the finished runs are kept: the same command resumes")
    except (ValueError, OSError) as e:  # an output that cannot be written, a file that cannot be read
        sys.exit(f"ablation.py: error: {e}")
