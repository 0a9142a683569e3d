"""Does a trick really help? Configuration A against configuration B over n seeds: mean ± std, the difference with
its 95% confidence interval, Welch's t-test, and a plain verdict.

    python tools/compare.py logs --a logs/A/*.json --b logs/B/*.json
    python tools/compare.py run --a baselines/resnet18_bs512.json --b my_trick.json --seeds 0 1 2 3 4
    python tools/compare.py run --a a.json --b b.json --seeds 0 1 --extra --device cpu --width 8   # harness flags
    python tools/compare.py run --a a.json --b b.json --seeds 0 1 2 3 4 5 6 7 --gpus 0,1,2,3   # 4 runs at a time

`run` starts `python airbench_ssl.py --config X --seed s --log-dir DIR/{A,B}` once per seed and side, interleaved
A B A B ..., so slow drift of the machine (heat, other load) hits both sides alike; then it compares the new logs.
Flags after --extra go to every run and override both config files. With --gpus, runs start in the same order but
up to one per listed GPU at a time (each sees only its GPU, via CUDA_VISIBLE_DEVICES); concurrent runs share the
host's CPUs and disk, so their times are comparable with each other, not with runs made alone.

Metrics: time to target (timed seconds; only when every run reached the target, else it says so and the verdict
falls back to kNN at stop), kNN accuracy at stop, and with --at-epoch E the kNN accuracy after epoch E (a fixed
epoch budget; E must be a check epoch of every run). Differences are B - A. "Significant" means Welch's two-sided
p < 0.05; with few seeds only large effects can pass, which is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO

import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "airbench_ssl.py")
LOG_FORMATS = ("airbench-ssl-log/1", "airbench-ssl-log/2")  # /2 dropped check_epochs; both read the same here
PER_RUN_KEYS = frozenset({"seed", "data_dir", "log_dir", "save_checkpoint", "download"})  # may differ within a recipe
ALPHA = 0.05
POLL_SECONDS = 0.2  # how often --gpus looks for finished runs; runs last minutes


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class CompareError(Exception):
    """Bad input; main() prints it as one line and exits 1."""


def load_log(path: str) -> dict:
    """A training log of the harness, with the fields the tools read checked; anything else is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            log = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: cannot read a JSON log: {error}") from None
    if not isinstance(log, dict) or log.get("format") not in LOG_FORMATS:
        raise CompareError(f"{path}: not an airbench-ssl run log (\"format\" is not {' or '.join(LOG_FORMATS)})")
    if log.get("kind") != "train":
        raise CompareError(f"{path}: kind is {log.get('kind')!r}; only training logs have a learning curve")
    rows, result, config = log.get("epochs"), log.get("result"), log.get("config")
    if not isinstance(rows, list) or not isinstance(result, dict) or not isinstance(config, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("epoch"), int) and isinstance(r.get("timed_seconds"), (int, float))
            for r in rows):
        raise CompareError(f"{path}: malformed log (needs config, result and epoch rows with epoch and timed_seconds)")
    if result.get("status") == "running":
        raise CompareError(f"{path}: the run is still going (status 'running'); compare finished runs only")
    log["_path"] = path
    return log


def check_epochs(log: dict) -> list[int]:
    """Epochs after which the run measured kNN accuracy: its rows with a kNN value (both log formats)."""
    return [row["epoch"] for row in log["epochs"] if row.get("knn_pct") is not None]


def knn_at_epoch(log: dict, epoch: int) -> float:
    for row in log["epochs"]:
        if row["epoch"] == epoch and row.get("knn_pct") is not None:
            return float(row["knn_pct"])
    raise CompareError(f"{log['_path']}: no kNN check after epoch {epoch} (its checks: {check_epochs(log)})")


def knn_at_stop(log: dict) -> float:
    value = log["result"].get("knn_at_stop_pct")
    if value is None:
        raise CompareError(f"{log['_path']}: no kNN check was run (result.knn_at_stop_pct is null)")
    return float(value)


def differing_keys(a: dict, b: dict) -> list[str]:
    """Config fields in which two runs differ, per-run fields (seed, folders) aside."""
    return [k for k in sorted((set(a) | set(b)) - PER_RUN_KEYS) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def config_differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}" for k in differing_keys(a, b)]


def describe_sides(a: list[dict], b: list[dict]) -> list[str]:
    """What differs between A and B, and warnings when a side is not one recipe on one machine."""
    lines = []
    for name, side in (("A", a), ("B", b)):
        inner = sorted({d for log in side[1:] for d in config_differences(side[0]["config"], log["config"])})
        if inner:
            lines.append(f"WARNING: the runs of {name} differ in config ({'; '.join(inner)})")
        seeds = [log["config"].get("seed") for log in side]
        if len(set(seeds)) < len(seeds):
            lines.append(f"WARNING: {name} repeats a seed ({seeds}): runs are not independent samples")
    diff = config_differences(a[0]["config"], b[0]["config"])
    lines.append("config A vs B: " + ("; ".join(diff) if diff else "identical"))
    shas = [sorted({str(log.get("code", {}).get("sha256"))[:12] for log in side}) for side in (a, b)]
    if shas[0] != shas[1]:
        lines.append(f"harness code sha256 A {shas[0]} vs B {shas[1]}")
    machines = [{str(log.get("environment", {}).get(k)) for log in side for k in ("device", "gpu_name")}
                for side in (a, b)]
    if machines[0] != machines[1]:
        lines.append(f"WARNING: A and B ran on different hardware ({sorted(machines[0])} vs {sorted(machines[1])}): "
                     "times are not comparable")
    return lines


def compare_metric(name: str, unit: str, xs_a: Sequence[float], xs_b: Sequence[float], higher_is_better: bool,
                   better: str, worse: str) -> tuple[list[str], bool]:
    """Lines for one metric and whether the difference is significant at 5%."""
    mean_a, std_a = stats.summarize(xs_a)
    mean_b, std_b = stats.summarize(xs_b)
    w = stats.welch(xs_b, xs_a)  # diff = mean(B) - mean(A)
    significant = w["p_value"] < ALPHA
    lines = [f"{name}:",
             f"  A: {mean_a:.3f} ± {std_a:.3f} {unit} (n={len(xs_a)})",
             f"  B: {mean_b:.3f} ± {std_b:.3f} {unit} (n={len(xs_b)})",
             f"  B - A: {w['diff']:+.3f} {unit}, 95% CI [{w['ci95_low']:+.3f}, {w['ci95_high']:+.3f}], "
             f"Welch p = {w['p_value']:.4g} (dof {w['dof']:.1f})"]
    if significant:
        b_better = (w["diff"] > 0) == higher_is_better
        lines.append(f"  significant at 5%: B is {better if b_better else worse} than A "
                     f"({abs(w['diff']):.3f} {unit}, {100 * abs(w['diff']) / abs(mean_a) if mean_a else 0:.1f}%)")
    else:
        lines.append(f"  NOT significant at 5%: no evidence of a difference (n={len(xs_a)} vs {len(xs_b)})")
    return lines, significant


def compare(a: list[dict], b: list[dict], at_epoch: int | None = None) -> str:
    if len(a) < stats.MIN_SAMPLES or len(b) < stats.MIN_SAMPLES:
        raise CompareError(f"need at least {stats.MIN_SAMPLES} runs per side for a standard deviation, got "
                           f"A {len(a)}, B {len(b)}")
    lines = describe_sides(a, b)
    missed = [log["_path"] for log in a + b if not log["result"].get("reached_target")]
    if missed:
        lines.append(f"time to target: not compared: {len(missed)} of {len(a) + len(b)} runs did not reach the "
                     f"target (e.g. {missed[0]}); comparing kNN accuracy at stop instead")
    else:
        times = [[float(log["result"]["time_to_target_seconds"]) for log in side] for side in (a, b)]
        lines += compare_metric("time to target (timed seconds)", "s", *times, False, "faster", "slower")[0]
    accs = [[knn_at_stop(log) for log in side] for side in (a, b)]
    lines += compare_metric("kNN accuracy at stop", "%", *accs, True, "more accurate", "less accurate")[0]
    if at_epoch is not None:
        accs = [[knn_at_epoch(log, at_epoch) for log in side] for side in (a, b)]
        lines += compare_metric(f"kNN accuracy after epoch {at_epoch}", "%", *accs, True, "more accurate",
                                "less accurate")[0]
    return "\n".join(lines)


def parse_gpus(text: str) -> list[int]:
    """"0,1,2,3" -> [0, 1, 2, 3]: distinct non-negative GPU ids, as CUDA_VISIBLE_DEVICES numbers them."""
    ids = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", i) for i in ids):
        raise CompareError(f"--gpus must be a comma-separated list of GPU ids such as 0,1,2,3, got {text!r}")
    gpus = [int(i) for i in ids]
    if len(set(gpus)) != len(gpus):
        raise CompareError(f"--gpus lists a GPU twice ({text!r}): one run per GPU at a time")
    return gpus


def interleaved_runs(config_a: str, config_b: str, seeds: Sequence[int]) -> list[tuple[str, str, int]]:
    """(side, config, seed) in start order: A B A B ..., one pair per seed."""
    return [run for seed in seeds for run in (("A", config_a, seed), ("B", config_b, seed))]


def harness_command(config: str, seed: int, folder: str, extra: Sequence[str]) -> list[str]:
    return [sys.executable, HARNESS, "--config", config, "--seed", str(seed), "--log-dir", folder, *extra]


def last_line(stdout: str, stderr: str) -> str:
    return (stderr.strip() or stdout.strip() or "no output").splitlines()[-1]


def result_line(log_path: str) -> str:
    result = load_log(log_path)["result"]
    return (f"{result['status']}: {result['timed_seconds']:.2f} timed s, kNN at stop "
            f"{result['knn_at_stop_pct']}%")


def run_interleaved(config_a: str, config_b: str, seeds: Sequence[int], extra: Sequence[str],
                    log_dir: str, gpus: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """Train A and B for every seed, started in the order A B A B ...; -> the new log paths of each side.

    Without gpus the runs go one after the other; with gpus, up to one run per GPU at a time."""
    for path in (config_a, config_b):
        if not os.path.isfile(path):
            raise CompareError(f"config file {path} does not exist")
    runs = interleaved_runs(config_a, config_b, seeds)
    if gpus:
        return run_on_gpus(runs, extra, log_dir, gpus)
    new_logs: dict[str, list[str]] = {"A": [], "B": []}
    for k, (side, config, seed) in enumerate(runs, 1):
        folder = os.path.join(log_dir, side)
        before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        command = harness_command(config, seed, folder, extra)
        print(f"run {k}/{len(runs)}: {side} seed {seed}: {' '.join(command)}", flush=True)
        proc = subprocess.run(command, capture_output=True, text=True)
        created = sorted(n for n in set(os.listdir(folder)) - before if n.endswith(".json")) \
            if os.path.isdir(folder) else []
        if proc.returncode != 0 or len(created) != 1:
            last = last_line(proc.stdout, proc.stderr)
            raise CompareError(f"{side} seed {seed} failed (exit {proc.returncode}): {last}")
        new_logs[side].append(os.path.join(folder, created[0]))
        print(f"  {result_line(new_logs[side][-1])}", flush=True)
    return new_logs["A"], new_logs["B"]


def new_logs_of_seed(folder: str, before: set[str], seed: int) -> list[str]:
    """Logs created in folder since `before` whose run had this seed. Runs of one side share a folder when they
    run concurrently, so a new file cannot be told apart by when it appeared; seeds are distinct per side."""
    found = []
    for name in sorted(set(os.listdir(folder)) - before if os.path.isdir(folder) else []):
        if name.startswith(".") or not name.endswith(".json"):  # the harness's temp files start with "."
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                log = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # another run's log, reserved but not written
            continue
        if isinstance(log, dict) and isinstance(log.get("config"), dict) and log["config"].get("seed") == seed:
            found.append(path)
    return found


def run_on_gpus(runs: Sequence[tuple[str, str, int]], extra: Sequence[str], log_dir: str,
                gpus: Sequence[int]) -> tuple[list[str], list[str]]:
    """Start the runs in order, each on the first free GPU (one run per GPU), until all finished or one failed.

    After a failure no new run starts, the running ones finish (their logs stay usable), then the error names
    every failed run."""
    folders = {side: os.path.join(log_dir, side) for side in ("A", "B")}
    before = {side: set(os.listdir(f)) if os.path.isdir(f) else set() for side, f in folders.items()}
    logs: dict[tuple[str, int], str] = {}
    failures: list[str] = []
    running: dict[int, tuple[int, str, int, subprocess.Popen, IO[str]]] = {}  # by GPU
    pending = list(enumerate(runs, 1))
    try:
        while pending or running:
            while pending and not failures and len(running) < len(gpus):
                gpu = next(g for g in gpus if g not in running)
                k, (side, config, seed) = pending.pop(0)
                command = harness_command(config, seed, folders[side], extra)
                print(f"run {k}/{len(runs)}: {side} seed {seed} on GPU {gpu}: {' '.join(command)}", flush=True)
                output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
                proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
                running[gpu] = (k, side, seed, proc, output)
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for gpu, (k, side, seed, proc, output) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[gpu]
                with output:
                    output.seek(0)
                    text = output.read()
                created = new_logs_of_seed(folders[side], before[side], seed)
                name = f"{side} seed {seed} on GPU {gpu}"
                if proc.returncode != 0 or len(created) != 1:
                    why = f"exit {proc.returncode}" if proc.returncode else f"{len(created)} new logs of the seed"
                    failures.append(f"{name} failed ({why}): {last_line(text, '')}")
                    print(f"  run {k} failed: {failures[-1]}", flush=True)
                    continue
                try:
                    print(f"  run {k} done: {name}: {result_line(created[0])}", flush=True)
                except CompareError as error:
                    failures.append(f"{name}: {error}")
                    continue
                logs[side, seed] = created[0]
    finally:  # an interrupted sweep must not leave runs holding the GPUs
        for _, _, _, proc, output in running.values():
            proc.terminate()
            proc.wait()
            output.close()
    if failures:
        raise CompareError(f"{len(failures)} of {len(runs)} runs failed: {'; '.join(failures)}")
    return ([logs["A", seed] for side, _, seed in runs if side == "A"],
            [logs["B", seed] for side, _, seed in runs if side == "B"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="compare", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    logs = commands.add_parser("logs", help="compare existing run logs")
    logs.add_argument("--a", nargs="+", required=True, metavar="LOG", help="run logs of configuration A")
    logs.add_argument("--b", nargs="+", required=True, metavar="LOG", help="run logs of configuration B")
    run = commands.add_parser("run", help="train A and B for each seed (interleaved), then compare")
    run.add_argument("--a", required=True, metavar="CONFIG", help="harness config JSON of A")
    run.add_argument("--b", required=True, metavar="CONFIG", help="harness config JSON of B")
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--log-dir", default="", help="where the logs go (default logs/compare_<UTC time>/{A,B})")
    run.add_argument("--gpus", default=None, metavar="IDS",
                     help="comma-separated GPU ids, e.g. 0,1,2,3: run up to one seed per GPU at a time")
    run.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="harness flags for every run (last)")
    for sub in (logs, run):
        sub.add_argument("--at-epoch", type=int, default=None, help="also compare kNN after this epoch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            if len(set(args.seeds)) != len(args.seeds):
                raise CompareError(f"--seeds repeats a seed: {args.seeds}")
            gpus = parse_gpus(args.gpus) if args.gpus is not None else None
            log_dir = args.log_dir or os.path.join("logs", time.strftime("compare_%Y%m%dT%H%M%SZ", time.gmtime()))
            paths_a, paths_b = run_interleaved(args.a, args.b, args.seeds, args.extra, log_dir, gpus)
        else:
            paths_a, paths_b = args.a, args.b
        print(compare([load_log(p) for p in paths_a], [load_log(p) for p in paths_b], args.at_epoch))
    except (CompareError, ValueError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
