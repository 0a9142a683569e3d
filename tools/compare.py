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

Before the first run starts, every run's command line (config file, seed, flags after --extra, --at-epoch) is checked
by the harness's own parser and config rules, so a typo in B is reported in seconds, not after A has trained. Ctrl-C
(or SIGTERM) stops the running runs, which log themselves as interrupted, and ends in one line saying how many runs
finished and where their logs are.

Metrics: time to target (timed seconds; only when every run reached the target, else it says so and the verdict
falls back to kNN at stop), kNN accuracy at stop (the run's last check: the one that reached the target, or the
one after its last epoch), and with --at-epoch E the kNN accuracy after epoch E (a fixed epoch budget; E must be a
check epoch of every run). Every kNN accuracy is the harness's check: the test set's kNN k=knn_k against the run's
training images. Differences are B - A. "Significant" means Welch's two-sided p < 0.05; with few seeds only large
effects can pass, which is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from typing import IO, Any

import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "airbench_ssl.py")
LOG_FORMATS = ("airbench-ssl-log/1", "airbench-ssl-log/2")  # /2 dropped check_epochs; both read the same here
PER_RUN_KEYS = frozenset({"seed", "data_dir", "log_dir", "save_checkpoint", "save_model", "download"})  # may differ
ALPHA = 0.05
POLL_SECONDS = 0.2  # how often `run` looks for finished runs; runs last minutes
KNN_SETS = "(test set vs the run's training images)"  # what the harness's kNN checks measure
STOP_SECONDS = 30.0  # after Ctrl-C, how long a run may take to log itself as interrupted before it is killed


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class CompareError(Exception):
    """Bad input; main() prints it as one line and exits 1."""


class RefusedRun(CompareError):
    """A run the harness would refuse (found before any run starts); main() prints it as one line and exits 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during `run`, once the running runs are stopped; main() prints it as one line, exits 130."""


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
    number = (int, float)
    if not (isinstance(result.get("status"), str) and isinstance(result.get("timed_seconds"), number)
            and isinstance(result.get("knn_at_stop_pct"), (*number, type(None)))
            and (result.get("reached_target") is not True or isinstance(result.get("time_to_target_seconds"), number))):
        raise CompareError(f"{path}: malformed result (needs status, timed_seconds, knn_at_stop_pct, and "
                           "time_to_target_seconds when reached_target)")
    if result["status"] == "running":
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
    paths = [{os.path.realpath(log["_path"]) for log in side} for side in (a, b)]
    if paths[0] == paths[1]:
        lines.append("NOTE: --a and --b are the same logs: an A/A comparison, which can only find no difference")
    elif paths[0] & paths[1]:
        lines.append(f"WARNING: {len(paths[0] & paths[1])} logs are on both sides (e.g. {min(paths[0] & paths[1])}): "
                     "the sides are not independent samples")
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


def knn_name(logs: Sequence[dict]) -> str:
    """"kNN k=10 accuracy", with every k the logs used ("k=10/20" when they differ: the config line says so)."""
    ks = sorted({log["config"].get("knn_k") for log in logs}, key=str)
    return f"kNN k={'/'.join(map(str, ks))} accuracy"


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
    knn = knn_name(a + b)
    accs = [[knn_at_stop(log) for log in side] for side in (a, b)]
    lines += compare_metric(f"{knn} at stop {KNN_SETS}", "%", *accs, True, "more accurate", "less accurate")[0]
    if at_epoch is not None:
        accs = [[knn_at_epoch(log, at_epoch) for log in side] for side in (a, b)]
        lines += compare_metric(f"{knn} after epoch {at_epoch} {KNN_SETS}", "%", *accs, True, "more accurate",
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


def resolve(ab: types.ModuleType, argv: list[str], cuda_available: bool) -> Any:
    """The harness's resolved Config for its command line argv; RefusedRun with the harness's one-line reason if its
    parser or config rules refuse argv."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return ab.config_from_args(ab.build_parser().parse_args(argv), cuda_available)[0]
    except ab.HarnessError as error:
        raise RefusedRun(str(error)) from None
    except SystemExit as error:  # the parser's one-line error, or --help
        if not error.code:
            raise RefusedRun("--extra asks for the harness's --help; run python airbench_ssl.py --help") from None
        message = (out.getvalue().strip().splitlines() or [f"exit {error.code}"])[-1].partition(": error: ")
        hint = "(see python airbench_ssl.py --help)"
        raise RefusedRun((message[2] or message[0]).replace("(see --help)", hint)) from None


def check_runs(runs: Sequence[tuple[str, str, int]], extra: Sequence[str], log_dir: str,
               at_epoch: int | None) -> list[str]:
    """Every run's command line checked by the harness's own parser and config rules, and --at-epoch against every
    run's check schedule, before any run starts -> notes to print. Raises RefusedRun naming each reason and the arms
    it refuses."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    import airbench_ssl as ab  # only here: torch takes seconds to import, and `compare.py logs` needs none of it

    cuda_available = torch.cuda.is_available()  # what each run will see, and so the preset it resolves
    refused: dict[str, list[str]] = {}  # reason -> the arms it refuses
    configs: dict[str, dict] = {}
    for side, config, seed in runs:
        arm, folder = f"{side} ({config})", os.path.join(log_dir, side)
        try:
            cfg = resolve(ab, harness_command(config, seed, folder, extra)[2:], cuda_available)
            if cfg.seed != seed or os.path.normpath(cfg.log_dir) != os.path.normpath(folder):
                raise RefusedRun("--extra sets the seed or the log folder, which compare sets for each run: use "
                                 "--seeds and --log-dir")
            if at_epoch is not None and not ab.is_check_epoch(cfg, at_epoch):
                raise RefusedRun(f"--at-epoch {at_epoch} is not a kNN check epoch (check_first_epoch "
                                 f"{cfg.check_first_epoch}, check_every_epochs {cfg.check_every_epochs}, epochs "
                                 f"{cfg.epochs})")
            configs.setdefault(side, dataclasses.asdict(cfg))
        except RefusedRun as error:
            arms = refused.setdefault(str(error), [])
            arms += [arm] * (arm not in arms)
    if refused:
        raise RefusedRun("; ".join(f"{' and '.join(arms)}: {reason}" for reason, arms in refused.items()))
    if differing_keys(configs["A"], configs["B"]):
        return []
    same = "are the same file" if os.path.realpath(runs[0][1]) == os.path.realpath(runs[1][1]) else \
        "resolve to the same config"
    return [f"NOTE: --a and --b {same}: an A/A comparison, which measures run-to-run noise, not a change"]


def last_line(text: str) -> str:
    return (text.strip() or "no output").splitlines()[-1]


def result_line(log_path: str) -> str:
    log = load_log(log_path)
    result, knn = log["result"], log["result"]["knn_at_stop_pct"]
    return (f"{result['status']}: {result['timed_seconds']:.2f} timed s, kNN k={log['config'].get('knn_k')} at stop "
            + ("not checked" if knn is None else f"{knn:.2f} %"))


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


def stop(procs: Sequence[subprocess.Popen]) -> None:
    """End the runs: SIGTERM, which the harness logs as an interrupted run, then SIGKILL for any still running after
    STOP_SECONDS or a second Ctrl-C."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    try:
        for proc in procs:
            proc.wait(max(0.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        for proc in procs:
            proc.kill()
            proc.wait()


def run_interleaved(config_a: str, config_b: str, seeds: Sequence[int], extra: Sequence[str], log_dir: str,
                    gpus: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """Train A and B for every seed, started in the order A B A B ...; -> the new log paths of each side.

    Without gpus the runs go one after the other; with gpus, each starts on the first free GPU (one run per GPU).
    After a failure no new run starts, the running ones finish (their logs stay usable), then the error names every
    failed run. Ctrl-C or SIGTERM stops the running runs and raises Interrupted. Runs get their own session, so a
    Ctrl-C in the terminal reaches compare alone and each run receives exactly one SIGTERM from it."""
    runs = interleaved_runs(config_a, config_b, seeds)
    folders = {side: os.path.join(log_dir, side) for side in ("A", "B")}
    before = {side: set(os.listdir(f)) if os.path.isdir(f) else set() for side, f in folders.items()}
    slots: Sequence[int | None] = gpus or [None]
    logs: dict[tuple[str, int], str] = {}
    failures: list[str] = []
    running: dict[int | None, tuple[int, str, int, float, subprocess.Popen, IO[str]]] = {}  # by slot
    pending = list(enumerate(runs, 1))
    try:
        while pending or running:
            while pending and not failures and len(running) < len(slots):
                slot = next(s for s in slots if s not in running)
                k, (side, config, seed) = pending.pop(0)
                command = harness_command(config, seed, folders[side], extra)
                where = "" if slot is None else f" on GPU {slot}"
                print(f"run {k}/{len(runs)}: {side} seed {seed}{where}: {' '.join(command)}", flush=True)
                output = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
                env = dict(os.environ) if slot is None else dict(os.environ, CUDA_VISIBLE_DEVICES=str(slot))
                proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                running[slot] = (k, side, seed, time.monotonic(), proc, output)
            if not running:
                break
            time.sleep(POLL_SECONDS)
            for slot, (k, side, seed, start, proc, output) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                with output:
                    output.seek(0)
                    text = output.read()
                created = new_logs_of_seed(folders[side], before[side], seed)
                name = f"{side} seed {seed}{'' if slot is None else f' on GPU {slot}'}"
                if proc.returncode != 0 or len(created) != 1:
                    why = f"exit {proc.returncode}" if proc.returncode else f"{len(created)} new logs of the seed"
                    failures.append(f"{name} failed ({why}): {last_line(text)}")
                    print(f"  run {k} failed: {failures[-1]}", flush=True)
                    continue
                try:
                    print(f"  run {k} done in {time.monotonic() - start:.0f} s wall: {name}: "
                          f"{result_line(created[0])}", flush=True)
                except CompareError as error:
                    failures.append(f"{name}: {error}")
                    continue
                logs[side, seed] = created[0]
    except KeyboardInterrupt:
        done = [side for side, _ in logs]
        raise Interrupted(f"interrupted after {len(logs)} of {len(runs)} runs (A: {done.count('A')} finished, "
                          f"B: {done.count('B')} finished); logs in {log_dir}") from None
    finally:  # an interrupted or failed sweep must not leave runs holding the GPUs
        stop([proc for _, _, _, _, proc, _ in running.values()])
        for *_, output in running.values():
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
            for note in check_runs(interleaved_runs(args.a, args.b, args.seeds), args.extra, log_dir, args.at_epoch):
                print(note, flush=True)
            paths_a, paths_b = run_interleaved(args.a, args.b, args.seeds, args.extra, log_dir, gpus)
        else:
            paths_a, paths_b = args.a, args.b
        print(compare([load_log(p) for p in paths_a], [load_log(p) for p in paths_b], args.at_epoch))
    except (CompareError, ValueError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, RefusedRun) else 1
    except Interrupted as interrupted:
        print(f"compare: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before any run started, or while comparing
        print("compare: interrupted (no run was running)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a scheduler's stop or a closed terminal: stop the runs, as Ctrl-C
        if signal.getsignal(sig) == signal.SIG_DFL:  # not under nohup, which ignores SIGHUP
            signal.signal(sig, signal.default_int_handler)
    sys.exit(main())
