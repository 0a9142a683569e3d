"""Does a trick really help? Configuration A against configuration B over n seeds: mean ± std, the difference with
its 95% confidence interval, Welch's t-test, and a plain verdict.

    python tools/compare.py logs --a logs/A/*.json --b logs/B/*.json
    python tools/compare.py run --a baselines/resnet18_bs512.json --b my_trick.json --seeds 0 1 2 3 4
    python tools/compare.py run --a a.json --b b.json --seeds 0 1 --extra --device cpu --width 8   # harness flags

`run` starts `python airbench_ssl.py --config X --seed s --log-dir DIR/{A,B}` once per seed and side, interleaved
A B A B ..., so slow drift of the machine (heat, other load) hits both sides alike; then it compares the new logs.
Flags after --extra go to every run and override both config files.

Metrics: time to target (timed seconds; only when every run reached the target, else it says so and the verdict
falls back to kNN at stop), kNN accuracy at stop, and with --at-epoch E the kNN accuracy after epoch E (a fixed
epoch budget; E must be a check epoch of every run). Differences are B - A. "Significant" means Welch's two-sided
p < 0.05; with few seeds only large effects can pass, which is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "airbench_ssl.py")
LOG_FORMAT = "airbench-ssl-log/1"
PER_RUN_KEYS = frozenset({"seed", "data_dir", "log_dir", "save_checkpoint"})  # may differ between runs of a recipe
ALPHA = 0.05


class CompareError(Exception):
    """Bad input; main() prints it as one line and exits 1."""


def load_log(path: str) -> dict:
    """A training log of the harness, with the fields the tools read checked; anything else is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            log = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: cannot read a JSON log: {error}") from None
    if not isinstance(log, dict) or log.get("format") != LOG_FORMAT:
        raise CompareError(f"{path}: not an airbench-ssl run log (no \"format\": \"{LOG_FORMAT}\")")
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


def knn_at_epoch(log: dict, epoch: int) -> float:
    for row in log["epochs"]:
        if row["epoch"] == epoch and row.get("knn_pct") is not None:
            return float(row["knn_pct"])
    raise CompareError(f"{log['_path']}: no kNN check after epoch {epoch} (its checks: {log.get('check_epochs')})")


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


def run_interleaved(config_a: str, config_b: str, seeds: Sequence[int], extra: Sequence[str],
                    log_dir: str) -> tuple[list[str], list[str]]:
    """Train A and B for every seed, in the order A B A B ...; -> the new log paths of each side."""
    for path in (config_a, config_b):
        if not os.path.isfile(path):
            raise CompareError(f"config file {path} does not exist")
    new_logs: dict[str, list[str]] = {"A": [], "B": []}
    total = 2 * len(seeds)
    for i, seed in enumerate(seeds):
        for j, (side, config) in enumerate((("A", config_a), ("B", config_b))):
            folder = os.path.join(log_dir, side)
            before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            command = [sys.executable, HARNESS, "--config", config, "--seed", str(seed), "--log-dir", folder, *extra]
            print(f"run {2 * i + j + 1}/{total}: {side} seed {seed}: {' '.join(command)}", flush=True)
            proc = subprocess.run(command, capture_output=True, text=True)
            created = sorted(n for n in set(os.listdir(folder)) - before if n.endswith(".json")) \
                if os.path.isdir(folder) else []
            if proc.returncode != 0 or len(created) != 1:
                last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
                raise CompareError(f"{side} seed {seed} failed (exit {proc.returncode}): {last}")
            new_logs[side].append(os.path.join(folder, created[0]))
            result = load_log(new_logs[side][-1])["result"]
            print(f"  {result['status']}: {result['timed_seconds']:.2f} timed s, kNN at stop "
                  f"{result['knn_at_stop_pct']}%", flush=True)
    return new_logs["A"], new_logs["B"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
            log_dir = args.log_dir or os.path.join("logs", time.strftime("compare_%Y%m%dT%H%M%SZ", time.gmtime()))
            paths_a, paths_b = run_interleaved(args.a, args.b, args.seeds, args.extra, log_dir)
        else:
            paths_a, paths_b = args.a, args.b
        print(compare([load_log(p) for p in paths_a], [load_log(p) for p in paths_b], args.at_epoch))
    except (CompareError, ValueError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
