"""Turn run logs into audited records under records/ and render leaderboard.md from them.

    python tools/leaderboard.py add logs/a.json logs/b.json logs/c.json --name ShortName --description "what changed"
    python tools/leaderboard.py render     # rewrite leaderboard.md from records/
    python tools/leaderboard.py check      # CI: leaderboard.md == render, and every record still validates

A record is a folder records/YYYY-MM-DD_ShortName/ holding byte-identical copies of its run logs, a generated
statistics.md and record.json, and a README.md written by the submitter. The logs are the evidence: every number
in statistics.md, record.json and leaderboard.md is re-derived from them, and `check` fails if any file disagrees.
The rules a record must satisfy are in records/README.md; `validate_log` and `validate_runs` implement them.

Writes are atomic (temp file or temp folder in the same directory, then rename), and `add` and `render` hold an
exclusive flock on the records folder, so concurrent adds serialize and a crash leaves the previous state.
"""

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import stats

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_FORMAT = "airbench-ssl-log/1"
TARGET_PCT = 90.0
KNN_K = 10
MIN_RUNS = 3
# Fields that name per-machine paths or the seed: they differ between honest runs of one recipe.
PER_RUN_CONFIG_KEYS = frozenset({"seed", "data_dir", "log_dir", "save_checkpoint"})
GENERATED_FILES = ("record.json", "statistics.md")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
STAGING_PREFIX = ".staging-"

# Published results of the reference implementation; they were timed with its own data pipeline, so they are a
# yardstick, never a record to beat.
REFERENCE_SOURCE = "[dkobak/simclr-cifar10](https://github.com/dkobak/simclr-cifar10)"
REFERENCE_ROWS = (
    ("SimCLR ResNet18, batch 1024, grayscale p=0.2, fp32", "700", "90.0 %", "2 h 58 min"),
    ("SimCLR ResNet18, batch 512, grayscale p=0.1, fp32", "500", "90.3 %", "1 h 39 min (11.9 s/epoch)"),
)
REFERENCE_HARDWARE = "A100, 16 CPU data-loader workers"


class Refused(Exception):
    """A log, a set of logs or a record breaks a rule; `file` names the offending file when there is one."""

    def __init__(self, reason: str, file: str | None = None) -> None:
        super().__init__(reason)
        self.file = file

    def line(self) -> str:
        return f"{self.file}: {self}" if self.file else str(self)


@dataclasses.dataclass(frozen=True)
class Run:
    file: str  # log file name inside the record folder
    run_id: str
    seed: int
    epochs_run: int
    time_to_target_seconds: float
    knn_at_stop_pct: float
    gpu_name: str
    code_sha256: str
    config: dict[str, Any]
    torch_version: str
    cuda_version: str


@dataclasses.dataclass(frozen=True)
class Record:
    folder: Path
    name: str
    date: str
    description: str
    runs: tuple[Run, ...]

    @property
    def gpu_name(self) -> str:
        return self.runs[0].gpu_name

    @property
    def times(self) -> list[float]:
        return [r.time_to_target_seconds for r in self.runs]

    @property
    def accs(self) -> list[float]:
        return [r.knn_at_stop_pct for r in self.runs]

    @property
    def mean_time(self) -> float:
        return stats.summarize(self.times)[0]


########################################
#  Validation of one log

def close(a: float, b: float) -> bool:
    """Timing equality for numbers that went through float sums and JSON: 1e-6 relative plus 1 ms absolute."""
    return abs(a - b) <= 1e-3 + 1e-6 * max(abs(a), abs(b))


def check_epochs(config: dict[str, Any]) -> list[int]:
    """The kNN check schedule the config fixes in advance (same rule as the harness)."""
    first, every, epochs = config["check_first_epoch"], config["check_every_epochs"], config["epochs"]
    return sorted(set(range(first, epochs + 1, every)) | {epochs})


def _get(obj: Any, path: str, kind: type | tuple[type, ...], file: str) -> Any:
    value = obj
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise Refused(f"missing field {path}", file)
        value = value[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python but never a valid epoch, seed or time.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise Refused(f"field {path} should be {names}, got {value!r}", file)
    return value


def validate_log(log: Any, file: str) -> Run:
    """Check one run log against the rules; return its summary or raise Refused naming the first broken rule."""
    if not isinstance(log, dict):
        raise Refused("not a JSON object", file)
    if log.get("format") != LOG_FORMAT:
        raise Refused(f"format is {log.get('format')!r}, expected {LOG_FORMAT!r}", file)
    if log.get("kind") != "train":
        raise Refused(f"kind is {log.get('kind')!r}: only training logs can be records", file)

    source = _get(log, "code.source", str, file)
    code_sha256 = _get(log, "code.sha256", str, file)
    if hashlib.sha256(source.encode("utf-8")).hexdigest() != code_sha256:
        raise Refused("code.sha256 does not match the sha256 of code.source: the logged source was edited", file)

    # Eligibility is recomputed from the facts in the log; the log's own "eligible" flag is only cross-checked.
    config = _get(log, "config", dict, file)
    for key in ("epochs", "check_first_epoch", "check_every_epochs", "seed", "train_subset", "knn_k"):
        _get(log, f"config.{key}", int, file)
    target = _get(log, "config.target_pct", (int, float), file)
    if _get(log, "environment.device", str, file) != "cuda":
        raise Refused(f"not eligible: ran on device {log['environment']['device']!r}, records need cuda", file)
    gpu_name = _get(log, "environment.gpu_name", str, file)
    if not gpu_name.strip():
        raise Refused("not eligible: environment.gpu_name is empty", file)
    files = _get(log, "data.files", dict, file)
    bad = sorted(name for name, f in files.items()
                 if not (isinstance(f, dict) and f.get("ok") is True and f.get("md5") == f.get("expected_md5")))
    if _get(log, "data.official", bool, file) is not True or not files or bad:
        raise Refused(f"not eligible: data is not the official CIFAR-10 (md5 mismatch: {', '.join(bad) or 'none'})",
                      file)
    if config["train_subset"] != 0:
        raise Refused(f"not eligible: config.train_subset is {config['train_subset']}, records train on all 50k",
                      file)
    if target != TARGET_PCT:
        raise Refused(f"not eligible: config.target_pct is {target}, the race target is {TARGET_PCT}", file)
    if config["knn_k"] != KNN_K:
        raise Refused(f"not eligible: config.knn_k is {config['knn_k']}, the race uses k={KNN_K}", file)
    if _get(log, "eligible", bool, file) is not True:
        raise Refused(f"log marks itself ineligible: {log.get('ineligible_reasons')}", file)

    status = _get(log, "result.status", str, file)
    knn_at_stop = log["result"].get("knn_at_stop_pct")
    if status != "reached_target" or _get(log, "result.reached_target", bool, file) is not True:
        raise Refused(f"run did not reach the target: status {status!r}, kNN at stop {knn_at_stop} %", file)
    if _get(log, "result.target_pct", (int, float), file) != target:
        raise Refused(f"result.target_pct {log['result']['target_pct']} differs from config.target_pct {target}",
                      file)

    # A schedule fixed in advance: the checks logged are exactly those the config implies, on every epoch run.
    if config["check_first_epoch"] < 0 or config["check_every_epochs"] < 1 or config["epochs"] < 1:
        raise Refused("config has an impossible check schedule (check_first_epoch, check_every_epochs, epochs)",
                      file)
    schedule = check_epochs(config)
    if log.get("check_epochs") != schedule:
        raise Refused(f"check schedule {log.get('check_epochs')} differs from the one the config implies {schedule}",
                      file)
    rows = _get(log, "epochs", list, file)
    if not rows:
        raise Refused("no epoch rows", file)
    first_epoch = 0 if 0 in schedule else 1
    cumulative = 0.0
    for i, row in enumerate(rows):
        where = f"epochs[{i}]"
        if not isinstance(row, dict):
            raise Refused(f"{where} is not a JSON object", file)
        epoch = _get(row, "epoch", int, file)
        if epoch != first_epoch + i:
            raise Refused(f"{where}: epoch {epoch}, expected {first_epoch + i} (epochs must be consecutive)", file)
        epoch_seconds = _get(row, "epoch_seconds", (int, float), file)
        if epoch_seconds < 0 or (epoch == 0 and epoch_seconds != 0):
            raise Refused(f"epoch {epoch}: impossible epoch_seconds {epoch_seconds}", file)
        cumulative += epoch_seconds
        if not close(_get(row, "timed_seconds", (int, float), file), cumulative):
            raise Refused(f"epoch {epoch}: timed_seconds {row['timed_seconds']} does not match the sum of "
                          f"epoch_seconds so far ({cumulative:.3f})", file)
        knn = row.get("knn_pct")
        if (knn is not None) != (epoch in schedule):
            raise Refused(f"epoch {epoch}: kNN check {'missing' if knn is None else 'outside the schedule'} "
                          f"(check schedule {schedule})", file)
        if knn is not None and not isinstance(knn, (int, float)):
            raise Refused(f"epoch {epoch}: knn_pct should be a number, got {knn!r}", file)
        if knn is not None and knn >= target and i != len(rows) - 1:
            raise Refused(f"run did not stop at the first check that reached the target (epoch {epoch}: {knn} %)",
                          file)
    last = rows[-1]
    if last["epoch"] > config["epochs"]:
        raise Refused(f"ran {last['epoch']} epochs, more than config.epochs {config['epochs']}", file)
    if last.get("knn_pct") is None:
        raise Refused(f"run stopped at epoch {last['epoch']}, which is not a check epoch", file)

    timed = _get(log, "result.timed_seconds", (int, float), file)
    time_to_target = _get(log, "result.time_to_target_seconds", (int, float), file)
    if not (close(timed, cumulative) and close(time_to_target, cumulative) and close(last["timed_seconds"], timed)):
        raise Refused(f"stated time does not match the rows: result.timed_seconds {timed}, time_to_target_seconds "
                      f"{time_to_target}, sum of epoch_seconds {cumulative:.3f}", file)
    if _get(log, "result.epochs_run", int, file) != last["epoch"]:
        raise Refused(f"result.epochs_run {log['result']['epochs_run']} but the last row is epoch {last['epoch']}",
                      file)
    if knn_at_stop != last["knn_pct"]:
        raise Refused(f"result.knn_at_stop_pct {knn_at_stop} differs from the last check {last['knn_pct']}", file)
    if knn_at_stop < target:
        raise Refused(f"kNN at stop {knn_at_stop} % is below the target {target} %", file)

    env = log["environment"]
    return Run(file=file, run_id=str(log.get("run_id")), seed=config["seed"], epochs_run=last["epoch"],
               time_to_target_seconds=float(time_to_target), knn_at_stop_pct=float(knn_at_stop), gpu_name=gpu_name,
               code_sha256=code_sha256, config=config, torch_version=str(env.get("torch")),
               cuda_version=str(env.get("cuda")))


def validate_runs(runs: Sequence[Run]) -> None:
    """Rules across the runs of one record: one recipe, one GPU model, distinct seeds, enough runs."""
    if len(runs) < MIN_RUNS:
        raise Refused(f"a record needs at least {MIN_RUNS} runs, got {len(runs)}")
    ref = runs[0]
    for run in runs[1:]:
        if run.code_sha256 != ref.code_sha256:
            raise Refused(f"code sha256 {run.code_sha256[:12]} differs from {ref.file}'s {ref.code_sha256[:12]}",
                          run.file)
        keys = sorted((set(run.config) | set(ref.config)) - PER_RUN_CONFIG_KEYS)
        differ = [k for k in keys if run.config.get(k, "<absent>") != ref.config.get(k, "<absent>")]
        if differ:
            diffs = ", ".join(f"{k}={run.config.get(k)!r} vs {ref.config.get(k)!r}" for k in differ)
            raise Refused(f"config differs from {ref.file}'s: {diffs}", run.file)
        if run.gpu_name != ref.gpu_name:
            raise Refused(f"GPU {run.gpu_name!r} differs from {ref.file}'s {ref.gpu_name!r}: "
                          "times are compared only on one GPU model", run.file)
    for attr, what in (("seed", "seed"), ("run_id", "run_id"), ("file", "log file name")):
        values = [getattr(r, attr) for r in runs]
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise Refused(f"duplicate {what} {', '.join(dupes)}: the same run counted twice")


def load_log_file(path: Path) -> tuple[bytes, Run]:
    try:
        raw = path.read_bytes()
        log = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"cannot read log: {e}", str(path)) from e
    return raw, validate_log(log, str(path))


########################################
#  Records on disk

def record_dirs(records_dir: Path) -> list[Path]:
    """Record folders; dot-folders (staging left by a crashed add) are not records."""
    if not records_dir.is_dir():
        return []
    return sorted(p for p in records_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_record(folder: Path) -> Record:
    """Read record.json for what the submitter chose (name, date, description, logs) and re-validate the logs."""
    meta_path = folder / "record.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"cannot read record.json: {e}", str(folder)) from e
    for key, kind in (("name", str), ("date", str), ("description", str), ("logs", list)):
        _get(meta, key, kind, str(meta_path))
    if folder.name != f"{meta['date']}_{meta['name']}":
        raise Refused(f"folder name does not match record.json date and name ({meta['date']}_{meta['name']})",
                      str(folder))
    runs = []
    for name in meta["logs"]:
        if not isinstance(name, str) or Path(name).name != name:
            raise Refused(f"record.json lists a log that is not a plain file name: {name!r}", str(meta_path))
        runs.append(dataclasses.replace(load_log_file(folder / name)[1], file=name))
    validate_runs(runs)
    return Record(folder=folder, name=meta["name"], date=meta["date"], description=meta["description"],
                  runs=tuple(runs))


def load_records(records_dir: Path) -> list[Record]:
    return [load_record(folder) for folder in record_dirs(records_dir)]


def by_gpu(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by GPU model, fastest first (ties broken by folder name so output is deterministic)."""
    groups: dict[str, list[Record]] = {}
    for record in sorted(records, key=lambda r: (r.mean_time, r.folder.name)):
        groups.setdefault(record.gpu_name, []).append(record)
    return dict(sorted(groups.items()))


def previous_record(record: Record, records: Sequence[Record]) -> Record | None:
    """The record this one beat: every record must be faster than all before it on its GPU, so the previous one
    is the next slower on the same GPU."""
    same_gpu = by_gpu(records).get(record.gpu_name, [])
    names = [r.folder.name for r in same_gpu]
    i = names.index(record.folder.name) if record.folder.name in names else len(same_gpu)
    slower = [r for r in same_gpu[i:] if r.folder.name != record.folder.name]
    return slower[0] if slower else None


########################################
#  Generated text

def format_duration(seconds: float) -> str:
    """One format everywhere: '42.1 s', '4 min 02.3 s', '1 h 02 min 03.4 s'."""
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:04.1f} s"
    if minutes:
        return f"{minutes} min {secs:04.1f} s"
    return f"{secs:.1f} s"


def format_p(p: float) -> str:
    return f"{p:.2g}"


def record_json(record: Record, records: Sequence[Record]) -> str:
    time_mean, time_std = stats.summarize(record.times)
    acc_mean, acc_std = stats.summarize(record.accs)
    previous = previous_record(record, records)
    summary = {
        "name": record.name,
        "date": record.date,
        "description": record.description,
        "gpu_name": record.gpu_name,
        "n_runs": len(record.runs),
        "target_pct": TARGET_PCT,
        "time_mean_seconds": time_mean,
        "time_std_seconds": time_std,
        "knn_mean_pct": acc_mean,
        "knn_std_pct": acc_std,
        "p_value_knn_gt_target": stats.one_sided_ttest_ge(record.accs, TARGET_PCT),
        "code_sha256": record.runs[0].code_sha256,
        "previous_record": previous.folder.name if previous else None,
        "logs": [r.file for r in record.runs],
    }
    return json.dumps(summary, indent=2) + "\n"


def statistics_md(record: Record, records: Sequence[Record]) -> str:
    time_mean, time_std = stats.summarize(record.times)
    acc_mean, acc_std = stats.summarize(record.accs)
    p = stats.one_sided_ttest_ge(record.accs, TARGET_PCT)
    versions = sorted({f"torch {r.torch_version}, CUDA {r.cuda_version}" for r in record.runs})
    lines = [
        f"# Statistics: {record.name} ({record.date})",
        "",
        ("Generated by `python tools/leaderboard.py add` from the run logs in this folder; "
         "`python tools/leaderboard.py check` fails if it no longer matches them. Do not edit."),
        "",
        f"- GPU: {record.gpu_name}",
        f"- Code: sha256 `{record.runs[0].code_sha256}`",
        f"- Versions: {'; '.join(versions)}",
        f"- Target: kNN k={KNN_K} test accuracy >= {TARGET_PCT} %",
        "",
        "## Runs",
        "",
        "| Log | Seed | Epochs run | Time to target (s) | kNN at stop (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.file} | {r.seed} | {r.epochs_run} | {r.time_to_target_seconds:.3f} | {r.knn_at_stop_pct:.2f} |"
              for r in record.runs]
    lines += [
        "",
        "## Summary",
        "",
        "| | Mean | Std | n |",
        "|---|---:|---:|---:|",
        f"| Time to target (s) | {time_mean:.3f} | {time_std:.3f} | {len(record.runs)} |",
        f"| kNN at stop (%) | {acc_mean:.3f} | {acc_std:.3f} | {len(record.runs)} |",
        "",
        (f"One-sided one-sample t-test of H0: mean kNN accuracy at stop <= {TARGET_PCT} % against "
         f"H1: mean > {TARGET_PCT} % (df = {len(record.runs) - 1}): p = {format_p(p)}."),
        "",
        "## Versus the previous record on this GPU",
        "",
    ]
    previous = previous_record(record, records)
    if previous is None:
        lines.append(f"First record on {record.gpu_name}.")
    else:
        w = stats.welch(record.times, previous.times)
        lines += [
            (f"Previous record: [{previous.folder.name}](../{previous.folder.name}/), mean time to target "
             f"{previous.mean_time:.3f} s over {len(previous.runs)} runs."),
            "",
            (f"Delta in mean time to target: {w['diff']:+.3f} s ({100.0 * w['diff'] / previous.mean_time:+.1f} %); "
             f"Welch's t-test: 95% CI [{w['ci95_low']:+.3f}, {w['ci95_high']:+.3f}] s, "
             f"two-sided p = {format_p(w['p_value'])}, df = {w['dof']:.1f}."),
        ]
    return "\n".join(lines) + "\n"


def readme_stub(name: str, description: str) -> str:
    return (f"# {name}\n\n{description}\n\n"
            "_Submitter: say what changed versus the previous record, why it is faster, and the exact command "
            "that produced these logs._\n")


def render_leaderboard(records: Sequence[Record], leaderboard_path: Path, records_dir: Path) -> str:
    base = leaderboard_path.resolve().parent
    rules_link = os.path.relpath(records_dir.resolve() / "README.md", base)
    lines = [
        "# airbench-ssl leaderboard",
        "",
        (f"Wall-clock time for SimCLR to reach {TARGET_PCT} % cosine kNN (k={KNN_K}) accuracy on the official "
         f"CIFAR-10 test set, training on the 50k train set only. A record is at least {MIN_RUNS} runs that were not "
         "cherry-picked, with one code hash and one config (seeds aside), all reaching the target under a check "
         "schedule fixed in advance; times are compared only on the same GPU model. "
         f"The full rules are in [records/README.md]({rules_link}). This file is generated by "
         "`python tools/leaderboard.py render` from `records/`, and CI runs `python tools/leaderboard.py check`: "
         "do not edit it by hand."),
        "",
        "## Reference (published, not records of this harness)",
        "",
        (f"Published results of the reference implementation, {REFERENCE_SOURCE}, timed by its authors with their "
         "own data pipeline: a yardstick, not entries to beat."),
        "",
        "| Recipe | Hardware | Epochs | kNN k=10 | Time | Source |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [f"| {recipe} | {REFERENCE_HARDWARE} | {epochs} | {acc} | {time} | {REFERENCE_SOURCE} |"
              for recipe, epochs, acc, time in REFERENCE_ROWS]
    lines += ["", "## Records", ""]
    groups = by_gpu(records)
    if not groups:
        lines.append("No records yet.")
    for gpu, group in groups.items():
        lines += [
            f"### {gpu}",
            "",
            (f"| # | Time to target (mean ± std) | Runs | kNN at stop (mean ± std) | p (kNN > {TARGET_PCT}) "
             "| Description | Date | Record |"),
            "|---:|---:|---:|---:|---:|---|---|---|",
        ]
        for rank, r in enumerate(group, start=1):
            time_mean, time_std = stats.summarize(r.times)
            acc_mean, acc_std = stats.summarize(r.accs)
            p = stats.one_sided_ttest_ge(r.accs, TARGET_PCT)
            link = os.path.relpath(r.folder.resolve(), base)
            description = r.description.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {rank} | {format_duration(time_mean)} ± {time_std:.1f} s | {len(r.runs)} "
                         f"| {acc_mean:.2f} ± {acc_std:.2f} % | {format_p(p)} "
                         f"| {description} | {r.date} | [{r.folder.name}]({link}/) |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


########################################
#  Safe writes

@contextlib.contextmanager
def locked(records_dir: Path) -> Iterator[None]:
    """Exclusive flock on the records folder itself: no lock file to track, and the kernel drops it on a crash."""
    records_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(records_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def stage_file(path: Path, text: str) -> Path:
    """Write text to a temp file beside path (same filesystem, so os.replace is atomic) and return its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_synced(Path(tmp), text.encode("utf-8"))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the leaderboard is a normal repository file
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, text: str) -> None:
    os.replace(stage_file(path, text), path)


def remove_stale_staging(records_dir: Path) -> None:
    """Staging folders left by a crashed add; only called under the lock, so no add is using them."""
    for p in records_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


########################################
#  Commands

def add(log_paths: Sequence[Path], name: str, description: str, date: str, records_dir: Path,
        leaderboard_path: Path) -> Record:
    if not NAME_PATTERN.fullmatch(name):
        raise Refused(f"--name {name!r}: use letters, digits, '-' and '_' only")
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
            raise ValueError(date)
        datetime.date.fromisoformat(date)
    except ValueError as e:
        raise Refused(f"--date {date!r}: expected a real date as YYYY-MM-DD") from e
    loaded = [load_log_file(p) for p in log_paths]
    for p in log_paths:
        if not p.name.endswith(".json") or p.name in GENERATED_FILES:
            raise Refused("log file names must end in .json and not be record.json", str(p))
    runs = [dataclasses.replace(run, file=p.name) for p, (_, run) in zip(log_paths, loaded)]
    validate_runs(runs)

    with locked(records_dir):
        remove_stale_staging(records_dir)
        try:
            existing = load_records(records_dir)
        except Refused as e:
            raise Refused(f"an existing record no longer validates ({e.line()}); run `check` and fix it first") from e
        folder = records_dir / f"{date}_{name}"
        if folder.exists():
            raise Refused(f"{folder} already exists")
        for record in existing:
            reused = {r.run_id for r in record.runs} & {r.run_id for r in runs}
            if reused:
                raise Refused(f"run {min(reused)} already belongs to record {record.folder.name}: "
                              "picking runs out of a record is cherry-picking")
        new = Record(folder=folder, name=name, date=date, description=description, runs=tuple(runs))
        best = by_gpu(existing).get(new.gpu_name, [None])[0]
        if best is not None and not new.mean_time < best.mean_time:
            raise Refused(f"not faster than {best.folder.name} ({best.mean_time:.3f} s) on {new.gpu_name}: "
                          f"mean time to target {new.mean_time:.3f} s")
        records = [*existing, new]

        # Everything is computed before anything is written; the new folder appears by one rename.
        files = {run.file: raw for run, (raw, _) in zip(runs, loaded)}
        files["record.json"] = record_json(new, records).encode("utf-8")
        files["statistics.md"] = statistics_md(new, records).encode("utf-8")
        files["README.md"] = readme_stub(name, description).encode("utf-8")
        board = render_leaderboard(records, leaderboard_path, records_dir)
        staging = Path(tempfile.mkdtemp(dir=records_dir, prefix=f"{STAGING_PREFIX}{name}-"))
        try:
            for file_name, data in files.items():
                write_synced(staging / file_name, data)
            os.chmod(staging, 0o755)
            staged_board = stage_file(leaderboard_path, board)
            try:
                os.rename(staging, folder)
            except BaseException:
                staged_board.unlink()
                raise
            # A crash between these two renames leaves a valid record and a stale leaderboard.md, which `check`
            # reports and `render` repairs.
            os.replace(staged_board, leaderboard_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return new


def render(records_dir: Path, leaderboard_path: Path) -> int:
    with locked(records_dir):
        records = load_records(records_dir)
        write_atomic(leaderboard_path, render_leaderboard(records, leaderboard_path, records_dir))
    return len(records)


def check(records_dir: Path, leaderboard_path: Path) -> list[str]:
    """Every disagreement between records/, its generated files and leaderboard.md, one line each."""
    problems, records = [], []
    for folder in record_dirs(records_dir):
        try:
            records.append(load_record(folder))
        except Refused as e:
            problems.append(f"record does not validate: {e.line()}")
    if problems:
        return problems
    for record in records:
        for file_name, expected in (("record.json", record_json(record, records)),
                                    ("statistics.md", statistics_md(record, records))):
            path = record.folder / file_name
            if not path.is_file() or path.read_text(encoding="utf-8") != expected:
                problems.append(f"{path} does not match its logs; regenerate it from them")
        if not (record.folder / "README.md").is_file():
            problems.append(f"{record.folder / 'README.md'} is missing: the submitter's note is part of a record")
    expected_board = render_leaderboard(records, leaderboard_path, records_dir)
    if not leaderboard_path.is_file() or leaderboard_path.read_text(encoding="utf-8") != expected_board:
        problems.append(f"{leaderboard_path} differs from what `render` produces; run "
                        "`python tools/leaderboard.py render`")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    # Path flags live on every subcommand, so they go after it: `leaderboard.py check --records-dir DIR`.
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--records-dir", type=Path, default=REPO_ROOT / "records", help="default: <repo>/records")
    paths.add_argument("--leaderboard", type=Path, default=REPO_ROOT / "leaderboard.md",
                       help="default: <repo>/leaderboard.md")
    parser = argparse.ArgumentParser(prog="leaderboard.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", parents=[paths], help="validate run logs, create records/DATE_NAME/, re-render")
    p_add.add_argument("logs", nargs="+", type=Path, help=f"run logs (JSON), at least {MIN_RUNS}")
    p_add.add_argument("--name", required=True, help="ShortName: letters, digits, '-' and '_'")
    p_add.add_argument("--description", default="", help="one line for the leaderboard")
    p_add.add_argument("--date", default=datetime.datetime.now(datetime.UTC).date().isoformat(),
                       help="YYYY-MM-DD, default today (UTC)")
    sub.add_parser("render", parents=[paths], help="rewrite leaderboard.md from records/")
    sub.add_parser("check", parents=[paths], help="fail unless leaderboard.md == render and every record validates")
    args = parser.parse_args(argv)

    try:
        if args.command == "add":
            record = add(args.logs, args.name, args.description, args.date, args.records_dir, args.leaderboard)
            print(f"leaderboard: added {record.folder} ({len(record.runs)} runs, mean "
                  f"{format_duration(record.mean_time)} on {record.gpu_name}); fill in {record.folder / 'README.md'}")
        elif args.command == "render":
            n = render(args.records_dir, args.leaderboard)
            print(f"leaderboard: rendered {args.leaderboard} ({n} records)")
        else:
            problems = check(args.records_dir, args.leaderboard)
            for problem in problems:
                print(f"leaderboard: check: {problem}", file=sys.stderr)
            if problems:
                return 1
            print(f"leaderboard: ok ({len(record_dirs(args.records_dir))} records)")
    except Refused as e:
        print(f"leaderboard: refused: {e.line()}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"leaderboard: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
