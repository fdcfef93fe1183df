"""Full-resolution reference run on one GPU: the rows that decide the paper's claims, one budget, one seed.

`paper_tables.py --budget gpu` (11 rows x 3 seeds x 3000 steps x 16 at 512 px) needs GPU hours.
This runs the rows behind the paper's main claims (default: unet_sl_nlb, the plain unet, unetpp)
side by side on one GPU within a wall-clock budget, with the gpu budget's recipe otherwise
(512 px, batch 16, lr 1e-3, AMP, the shipped loss and sampling defaults):

1. probe: milliseconds per training step of each row (forward, backward, AdamW, AMP) on random input;
2. steps = min(--max-steps, budget / sum of the rows' step times), the same for every row (the rows
   run concurrently and share the GPU, so their step times add up);
3. `lungnlb train` for every row at once on the given split; a row still running at the deadline
   is stopped and its best validated checkpoint so far is used (the step it was saved at is reported);
4. `lungnlb evaluate` of every row's best checkpoint on the split's test subset.

Writes `results.json` (probe, steps, per row: validation and test metrics, wall time, log tail) and
each row's `<row>_best.pt` / `<row>_best.json` into --out.

    python -m experiments.gpu_reference --data STUDIES --split SPLIT.json --out OUT --budget-s 270
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from lungnlb.training.loss import MultiTaskLoss  # noqa: E402
from lungnlb.stamp import run_stamp  # noqa: E402
from lungnlb.training.trainer import TrainConfig, build_network, train_step  # noqa: E402

ROWS = ["unet_sl_nlb", "unet", "unetpp"]


def probe_step_ms(model: str, batch_size: int, size: int, device: torch.device, steps: int = 10) -> float:
    """Mean ms per training step (`train_step`, as in training) of `model` on random input, after 3 warm-up steps."""
    config = TrainConfig(data="", out="", model=model, input_size=size)
    network = build_network(config).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = MultiTaskLoss(1.0, 1.0).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    batch = {
        "image": torch.rand(batch_size, 1, size, size, device=device, generator=generator),
        "mask": (torch.rand(batch_size, 1, size, size, device=device, generator=generator) > 0.9).float(),
        "has_mask": torch.ones(batch_size, dtype=torch.bool, device=device),
        "label": torch.ones(batch_size, 1, device=device),
        "has_label": torch.ones(batch_size, dtype=torch.bool, device=device),
    }
    torch.backends.cudnn.benchmark = device.type == "cuda"

    def step() -> None:
        train_step(network, batch, criterion, optimizer, scaler, config.grad_clip, use_amp)

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_command(args: argparse.Namespace, row: str, steps: int, run: Path) -> list[str]:
    return [sys.executable, "-m", "lungnlb.cli", "train", "--data", str(args.data), "--split", str(args.split),
            "--out", str(run), "--model", row, "--input-size", str(args.input_size), "--steps", str(steps),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
            "--val-every", str(max(25, steps // 6)), "--num-workers", str(args.workers), "--device", args.device]


def run_all(commands: dict[str, list[str]], logs: dict[str, Path], deadline: float) -> dict[str, dict]:
    """Start every command at once; stop those still running at `deadline` (monotonic seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started, processes = time.monotonic(), {}
    for row, command in commands.items():
        processes[row] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[row].open("w"),
                                          stderr=subprocess.STDOUT)
    status = {}
    while processes:
        for row, process in list(processes.items()):
            if process.poll() is not None:
                status[row] = {"returncode": process.returncode, "stopped_at_deadline": False,
                               "wall_s": round(time.monotonic() - started, 1)}
                del processes[row]
        if processes and time.monotonic() > deadline:
            for row, process in processes.items():
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                status[row] = {"returncode": process.returncode, "stopped_at_deadline": True,
                               "wall_s": round(time.monotonic() - started, 1)}
            processes = {}
        time.sleep(1)
    return status


def log_tail(path: Path, lines: int = 4) -> str:
    """The last lines of a log (progress bars' carriage returns read as line ends)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join([line for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:])


def planned_steps(budget_s: float, ms_per_step: dict[str, float], max_steps: int) -> int:
    """Steps every row gets: the rows share the GPU, so their step times add up (rounded down to 100s)."""
    steps = int(budget_s * 1000 / sum(ms_per_step.values()))
    return max(1, min(max_steps, steps // 100 * 100 or steps))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="prepared studies folder")
    parser.add_argument("--split", required=True, type=Path, help="split.json (cases per subset)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", nargs="+", default=ROWS)
    parser.add_argument("--budget-s", type=float, default=270.0, help="wall-clock seconds for all training")
    parser.add_argument("--grace-s", type=float, default=60.0,
                        help="rows still running at 1.3 x budget + grace (data loading, validation) are stopped")
    parser.add_argument("--eval-s", type=float, default=90.0, help="evaluations still running after this are stopped")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes per row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/lungnlb-gpu-reference"), help="run folders")
    args = parser.parse_args(argv)
    args.data, args.split = args.data.resolve(), args.split.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    begin = time.monotonic()
    device = torch.device(args.device)
    results = {**run_stamp(), "torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "recipe": {k: getattr(args, k) for k in ("input_size", "batch_size", "lr", "seed", "max_steps", "budget_s")}}
    results["probe_ms_per_step"] = {row: round(probe_step_ms(row, args.batch_size, args.input_size, device), 2)
                                    for row in args.rows}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' models are gone: give their memory back to the training processes
    results["steps"] = steps = planned_steps(args.budget_s, results["probe_ms_per_step"], args.max_steps)
    print(json.dumps(results, indent=1), flush=True)

    shutil.rmtree(args.runs, ignore_errors=True)
    args.runs.mkdir(parents=True)
    runs = {row: args.runs / row for row in args.rows}
    logs = {row: args.runs / f"{row}.log" for row in args.rows}
    train_status = run_all({row: train_command(args, row, steps, runs[row]) for row in args.rows}, logs,
                           deadline=time.monotonic() + args.budget_s * 1.3 + args.grace_s)
    args.out.mkdir(parents=True, exist_ok=True)
    results["rows"] = {row: row_result(row, runs[row], train_status[row], logs[row], args.out) for row in args.rows}
    write_results(results, args.out, begin)  # kept even if evaluation fails
    for row, entry in evaluate_rows(args, runs).items():
        results["rows"][row].update(entry)
    write_results(results, args.out, begin)
    print(summary_table(results), flush=True)


def evaluate_rows(args: argparse.Namespace, runs: dict[str, Path]) -> dict[str, dict]:
    """`lungnlb evaluate` of every trained row's best checkpoint on the test subset, all at once."""
    commands = {row: [sys.executable, "-m", "lungnlb.cli", "evaluate", "--data", str(args.data), "--checkpoint",
                      str(run / "best.pt"), "--split", str(run / "split.json"), "--subset", "test",
                      "--device", args.device, "--out", str(run / "test.json")]
                for row, run in runs.items() if (run / "best.pt").is_file()}
    logs = {row: args.runs / f"{row}.eval.log" for row in commands}
    status = run_all(commands, logs, deadline=time.monotonic() + args.eval_s)
    return {row: test_result(runs[row], status[row], logs[row]) for row in commands}


def row_result(row: str, run: Path, trained: dict, log: Path, out: Path) -> dict:
    """How one row's training ended; copies its best checkpoint into `out`."""
    entry = {"train": trained, "train_log_tail": log_tail(log)}
    if (run / "best.json").is_file():
        best = json.loads((run / "best.json").read_text())
        entry["best_step"], entry["validation"] = best.get("step"), best.get("metrics")
        shutil.copyfile(run / "best.pt", out / f"{row}_best.pt")
        shutil.copyfile(run / "best.json", out / f"{row}_best.json")
    return entry


def test_result(run: Path, evaluated: dict, log: Path) -> dict:
    """The test-subset metrics of one row's evaluation (or the end of its log if it failed)."""
    if not (run / "test.json").is_file():
        return {"eval": evaluated, "eval_log_tail": log_tail(log)}
    report = json.loads((run / "test.json").read_text())
    keys = ("dice", "iou", "false_positive_rate", "n_tumour_slices", "precision", "recall", "f1", "average_precision",
            "ci")
    return {"eval": evaluated, "test": {key: report.get(key) for key in keys}}


def write_results(results: dict, out: Path, begin: float) -> None:
    results["total_s"] = round(time.monotonic() - begin, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")


def summary_table(results: dict) -> str:
    lines = [f"steps {results['steps']} x {results['recipe']['batch_size']} at {results['recipe']['input_size']} px "
             f"on {results['device']}, total {results['total_s']} s",
             "row | ms/step | best step | test precision | recall | F1 | Dice | IoU"]
    for row, entry in results["rows"].items():
        test = entry.get("test") or {}
        cells = [_fmt(test.get(k)) for k in ("precision", "recall", "f1", "dice", "iou")]
        lines.append(" | ".join([row, str(results["probe_ms_per_step"][row]), str(entry.get("best_step")), *cells]))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
