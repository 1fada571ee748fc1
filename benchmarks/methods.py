"""Every pretraining method at the demo budget, scored by the same evaluation: one table of method, kNN, linear, time.

Each method trains the demo's network (half-width ResNet-18, 16 px) on the built-in digits with the demo preset's
budget (15 epochs, batch 128, LARS) and only `--method` changed, so data, encoder, augmentation code, optimiser and
schedule are the same for all; each method's own settings are its defaults. SwAV's multi-crop sees more (smaller)
views per image, so its steps cost more: the time column says how much. Then `simclr knn` and `simclr linear-eval`
score the encoder on the digits val split (359 images), and the demo network untrained (`--random-init`) is the
baseline row every method must beat.

    python benchmarks/methods.py --out methods.jsonl                  # all methods, seed 0
    python benchmarks/methods.py --methods simclr moco-v2 --seeds 0 1 2 --out methods.jsonl

Finished runs are read back from --out, so an interrupted benchmark resumes where it stopped. A pretraining that
fails (a loss that became non-finite) is a result too: counted in the last column, not averaged. Prints a Markdown
table of the mean (and min-max over seeds when there are several).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simclr_cli.engine.methods import METHODS

RANDOM_INIT = "untrained (--random-init)"


def simclr(*args: str) -> None:
    """`simclr ARGS` in a child process (the installed command's module), its output passed through."""
    subprocess.run([sys.executable, "-m", "simclr_cli", *args], check=True)


def top1(results_dir: Path) -> float:
    return json.loads((results_dir / "results.json").read_text())["top1"]


def run_one(method: str, seed: int, work: Path, *, epochs: list[str]) -> dict:
    """Pretrain `method` at the demo budget (or nothing, for the untrained row) and score it; one result row."""
    run = work / f"{method}-{seed}".replace(" ", "")
    eval_flags = ["--seed", str(seed)]
    if method == RANDOM_INIT:
        simclr("pretrain", "--epochs", "1", "--out", str(run), "--overwrite", "--seed", str(seed))  # its file names the net
        eval_flags.append("--random-init")
        seconds = 0.0
    else:
        start = time.perf_counter()
        try:
            simclr("pretrain", "--method", method, *epochs, "--out", str(run), "--overwrite", "--seed", str(seed))
        except subprocess.CalledProcessError:  # e.g. a loss that became non-finite: a result, recorded as such
            return {"method": method, "seed": seed, "failed": True}
        seconds = time.perf_counter() - start
    encoder = str(run / "encoder.safetensors")
    simclr("knn", encoder, *eval_flags, "--out", str(run / "knn"))
    simclr("linear-eval", encoder, *eval_flags, "--out", str(run / "linear"))
    return {"method": method, "seed": seed, "knn": top1(run / "knn"), "linear": top1(run / "linear"),
            "pretrain_s": round(seconds, 1)}


def cell(values: list[float], *, percent: bool = True) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    mean = f"{scale * statistics.mean(values):.1f}{unit}"
    if len(values) > 1:
        mean += f" ({scale * min(values):.1f}-{scale * max(values):.1f}{unit})"
    return mean


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| method | kNN top-1 | linear top-1 | pretraining time (s) | seeds (failed) |",
             "| --- | --- | --- | --- | --- |"]
    for method in methods:
        mine = [row for row in rows if row["method"] == method and not row.get("failed")]
        failed = sum(1 for row in rows if row["method"] == method and row.get("failed"))
        if not mine:
            if failed:
                lines.append(f"| {method} | - | - | - | 0 ({failed}) |")
            continue
        seconds = "-" if method == RANDOM_INIT else cell([row["pretrain_s"] for row in mine], percent=False)
        lines.append(f"| {method} | {cell([r['knn'] for r in mine])} | {cell([r['linear'] for r in mine])} | "
                     f"{seconds} | {len(mine)}{f' ({failed})' if failed else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="default: every method")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=Path("methods.jsonl"), help="results, one JSON line per run")
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo preset's 15")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    methods = [*args.methods, RANDOM_INIT]
    rows = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    rows = [row for row in rows if row.get("epochs") == args.epochs]  # another budget's rows are another table
    done = {(row["method"], row["seed"]) for row in rows}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        for seed in args.seeds:
            for method in methods:
                if (method, seed) in done:
                    continue
                row = run_one(method, seed, work, epochs=[] if args.epochs is None else ["--epochs", str(args.epochs)])
                row["epochs"] = args.epochs  # None: the demo preset's
                rows.append(row)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    print(table(rows, methods))


if __name__ == "__main__":
    main()
