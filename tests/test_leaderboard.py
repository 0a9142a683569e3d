"""tools/leaderboard.py and tools/stats.py: records from synthetic run logs, every rule alone, hostile inputs,
cross-record rules, and writes that die half-way."""

import ast
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import leaderboard as lb  # conftest puts tools/ on sys.path: tools are scripts that import siblings by name
import numpy as np
import pytest
import scipy.stats
import stats
import torch
import verify

import airbench_ssl as ab

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
HARNESS_SOURCE = Path(ab.__file__).read_text(encoding="utf-8")
CHECKS = [8, 10, 12, 14, 16, 18, 20]  # check_first_epoch 8, every 2, epochs 20
DRIVER = "570.86.15"
# The official sums, written out here rather than taken from the harness: the test must not trust what it tests.
OFFICIAL = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}


def nvidia_smi(names: list[str]) -> str:
    """The nvidia-smi table as drivers print it; names longer than the column end in '...'."""
    lines = [
        "+-----------------------------------------------------------------------------------------+",
        f"| NVIDIA-SMI {DRIVER}              Driver Version: {DRIVER}      CUDA Version: 12.8     |",
        "|-----------------------------------------+------------------------+----------------------+",
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
        "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
        "|=========================================+========================+======================|",
    ]
    for i, name in enumerate(names):
        shown = name if len(name) <= 29 else name[:26] + "..."
        lines += [f"|   {i}  {shown:<29} On  |   00000000:{i + 10:02d}:00.0 Off |                    0 |",
                  "| N/A   29C    P0             75W /  700W |       1MiB / 143771MiB |      0%      Default |"]
    return "\n".join(lines) + "\n"


def finish(log: dict) -> dict:
    """Recompute everything a log derives from its rows, as the harness writes it."""
    rows, result = log["epochs"], log["result"]
    total = 0.0
    for row in rows:
        total += row["epoch_seconds"]
        row["timed_seconds"] = total
    checks = [r["knn_pct"] for r in rows if r["knn_pct"] is not None]
    reached = rows[-1]["knn_pct"] is not None and rows[-1]["knn_pct"] >= log["config"]["target_pct"]
    result.update(status="reached_target" if reached else "max_epochs", reached_target=reached,
                  target_pct=log["config"]["target_pct"], epochs_run=rows[-1]["epoch"], timed_seconds=total,
                  time_to_target_seconds=total if reached else None, knn_at_stop_pct=checks[-1] if checks else None)
    log["untimed_seconds"]["knn_checks"] = sum(r["knn_seconds"] for r in rows if r["knn_seconds"] is not None)
    log["total_wall_seconds"] = total + sum(log["untimed_seconds"].values()) + 5.0
    log["code"]["sha256"] = hashlib.sha256(log["code"]["source"].encode("utf-8")).hexdigest()
    return log


def make_log(seed: int = 0, gpu: str = "NVIDIA H200", epoch_seconds: float = 10.0,
             accs: tuple[float, ...] = (88.5, 89.6, 90.1), world_size: int = 1, salt: str = "",
             source: str = HARNESS_SOURCE) -> dict:
    """A valid v2 log: checks at epochs 8, 10, 12, ... and a stop at the first check that reaches 90 %. Each
    (seed, gpu, epoch_seconds, accs, world_size, salt) is a different run: its own times and losses."""
    key = f"{seed} {gpu} {epoch_seconds} {accs} {world_size} {salt}"
    rng = random.Random(key)
    config = dict(dataclasses.asdict(ab.Config()), epochs=20, check_first_epoch=8, check_every_epochs=2,
                  train_subset=0, target_pct=90.0, knn_k=10, seed=seed, device="auto", data_dir=f"/data/{seed}",
                  save_model="weights")
    config.pop("save_checkpoint", None)  # the harness before saved models had it
    check_accs = dict(zip(CHECKS, accs))
    rows = []
    for epoch in range(1, CHECKS[len(accs) - 1] + 1):
        knn = check_accs.get(epoch)
        rows.append({"epoch": epoch, "loss": 5.0 - 0.1 * epoch + 1e-3 * rng.random(), "lr": 0.06,
                     "epoch_seconds": epoch_seconds + 0.01 * seed + 1e-4 * rng.random(), "timed_seconds": 0.0,
                     "knn_pct": knn, "knn_seconds": 1.5 if knn is not None else None})
    argv = ["--seed", str(seed)]
    run_id = f"20250101T000000Z_resnet18_seed{seed}_{hashlib.sha256(key.encode()).hexdigest()[:6]}"
    log = {
        "format": "airbench-ssl-log/2", "kind": "train", "run_id": run_id,
        "created_utc": "2025-01-01T00:00:00Z", "argv": argv,
        "launch": {"world_size": world_size, "command": ["airbench_ssl.py", *argv], "torchrun": world_size > 1},
        "config_sources": {"preset": "recipe", "config_file": None, "file_overrides": {}},
        "config": config,
        "code": {"path": "airbench_ssl.py", "source": source, "sha256": ""},
        "environment": {"python": "3.11.7", "torch": "2.11.0+cu128", "torchvision": "0.26.0", "cuda": "12.8",
                        "cudnn": 90800, "driver": DRIVER, "device": "cuda", "gpu_name": gpu,
                        "gpu_names": [gpu] * world_size, "gpu_count": world_size, "world_size": world_size,
                        "cpu": "x86_64", "cpu_threads": 16, "hostname": "h", "platform": "Linux",
                        "nvidia_smi": nvidia_smi([gpu] * world_size)},
        "data": {"data_dir": f"/data/{seed}/cifar-10-batches-py", "official": True,
                 "files": {name: {"md5": md5, "expected_md5": md5, "ok": True} for name, md5 in OFFICIAL.items()},
                 "train_images": 50000, "test_images": 10000},
        "eligible": True, "ineligible_reasons": [],
        "timing": {"timed": "training steps", "not_timed": "data load, warm-up, kNN checks, final evaluation"},
        "epochs": rows,
        "untimed_seconds": {"data_load": 1.0, "warmup": 2.0, "knn_checks": 0.0, "final_eval": 3.0},
        "result": {"message": ""},
        "final_eval": {"knn5_pct": 90.3, "knn10_pct": accs[-1], "seconds": {"features": 1.0, "knn5": 0.1}},
        "model": {"file": f"{run_id}.model.pt", "format": "weights", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                  "bytes": 44_700_000},
        "total_wall_seconds": 0.0,
    }
    return finish(log)


def edit_function(source: str, name: str, statement: str) -> str:
    """source with `statement` inserted as the first statement of the top-level definition `name`."""
    node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name)
    first = node.body[0]
    lines = source.splitlines(keepends=True)
    lines.insert(first.lineno - 1, " " * first.col_offset + statement + "\n")
    return "".join(lines)


def reword_docstring(source: str, name: str) -> str:
    """source with the docstring of the top-level definition `name` replaced."""
    doc = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name).body[0]
    lines = source.splitlines(keepends=True)
    lines[doc.lineno - 1:doc.end_lineno] = [" " * doc.col_offset + '"""Reworded, same code."""\n']
    return "".join(lines)


def with_source(log: dict, source: str) -> dict:
    log["code"]["source"] = source
    return finish(log)


def write_logs(folder: Path, logs: list[dict]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for log in logs:
        path = folder / f"{log['run_id']}.json"
        path.write_text(json.dumps(log, indent=1))
        paths.append(path)
    return paths


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under root (folders too, so an empty leftover folder shows)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def board(tmp_path: Path):
    """Paths of an empty repository layout, and a function running the CLI in-process on them."""
    records, leaderboard = tmp_path / "records", tmp_path / "leaderboard.md"
    records.mkdir()

    def cli(*args: str) -> int:
        return lb.main([*args, "--records-dir", str(records), "--leaderboard", str(leaderboard)])

    assert cli("render") == 0
    return records, leaderboard, cli


def add(cli, tmp_path: Path, logs: list[dict], name: str = "Baseline", folder: str = "logs",
        date: str = "2025-01-02", description: str = "first try") -> int:
    paths = write_logs(tmp_path / folder, logs)
    return cli("add", *map(str, paths), "--name", name, "--date", date, "--description", description)


def refused_lines(board, tmp_path: Path, capsys, args: list[str], command: str = "add") -> list[str]:
    """Run `add` (or another command) with args; assert it exits 1 with stderr lines that each say why, and writes
    nothing; return the lines."""
    _records, _leaderboard, cli = board
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli(command, *args) == 1
    err = capsys.readouterr().err.splitlines()
    assert err and all(line.startswith("leaderboard: refused: ") and line.isprintable() for line in err), err
    assert snapshot(tmp_path) == before
    return err


def refused(board, tmp_path: Path, capsys, args: list[str]) -> str:
    """Run `add` with args; assert it exits 1 with one stderr line and writes nothing; return that line."""
    err = refused_lines(board, tmp_path, capsys, args)
    assert len(err) == 1, err
    return err[0]


def refused_logs(board, tmp_path: Path, capsys, logs: list[dict], name: str = "Entry", folder: str = "bad",
                 date: str = "2025-01-03") -> str:
    paths = write_logs(tmp_path / folder, logs)
    return refused(board, tmp_path, capsys, [*map(str, paths), "--name", name, "--date", date, "--description",
                                              "an entry"])


def mean_time(logs: list[dict]) -> float:
    return float(np.mean([log["result"]["time_to_target_seconds"] for log in logs]))


########################################
#  Valid logs become a record

def test_factory_log_is_valid_with_the_real_harness_source():
    run = lb.validate_log(make_log(0))
    assert run.hardware == "NVIDIA H200" and run.epochs_run == 12 and run.knn_at_stop_pct == 90.1
    assert lb.pinning_problems(lb.canonical_source(), HARNESS_SOURCE) == ()


def test_every_pinned_definition_is_in_the_harness():
    tree = ast.parse(HARNESS_SOURCE)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert set(lb.PINNED) <= defined, set(lb.PINNED) - defined


def test_valid_logs_become_a_record_and_render(board, tmp_path, capsys):
    records, leaderboard, cli = board
    accs = [90.1, 90.25, 90.05]
    logs = [make_log(seed, accs=(88.5, 89.6, acc)) for seed, acc in zip(range(3), accs)]
    assert add(cli, tmp_path, logs) == 0
    folder = records / "2025-01-02_Baseline"
    for log in logs:
        name = f"{log['run_id']}.json"
        assert (folder / name).read_bytes() == (tmp_path / "logs" / name).read_bytes()
    assert (folder / "README.md").read_text().startswith("# Baseline\n\nfirst try\n")

    times = [log["result"]["time_to_target_seconds"] for log in logs]
    meta = json.loads((folder / "record.json").read_text())
    assert meta["n_runs"] == 3 and meta["hardware"] == "NVIDIA H200" and meta["world_size"] == 1
    assert meta["previous_record"] is None
    assert meta["time_mean_seconds"] == pytest.approx(np.mean(times))
    assert meta["time_std_seconds"] == pytest.approx(np.std(times, ddof=1))
    # not verified: the accuracy the runs reported is kept apart, and no recomputed number is claimed
    assert meta["verified"] is False and meta["verification"] is None
    assert meta["knn_mean_pct"] is None and meta["p_value_knn_gt_target"] is None
    assert meta["reported_knn_mean_pct"] == pytest.approx(np.mean(accs))
    assert meta["reported_knn_std_pct"] == pytest.approx(np.std(accs, ddof=1))
    assert meta["code_sha256"] == hashlib.sha256(HARNESS_SOURCE.encode()).hexdigest()
    assert meta["models"] == [dict(log=f"{log['run_id']}.json", **log["model"]) for log in logs]

    statistics = (folder / "statistics.md").read_text()
    assert "First record on NVIDIA H200." in statistics and "Verified: **no**" in statistics
    p_value = scipy.stats.ttest_1samp(accs, 90.0, alternative="greater").pvalue
    assert "H0: mean kNN accuracy at stop (reported, not verified) <= 90.0 %" in statistics
    assert f"p = {p_value:.2g}." in statistics
    text = leaderboard.read_text()
    assert "### NVIDIA H200" in text and "[2025-01-02_Baseline](records/2025-01-02_Baseline/)" in text
    assert "| 1 | 2 min 00.1 s ± 0.1 s | 3 | unverified | – | not verified | first try | 2025-01-02 |" in text
    assert "No records yet." not in text
    capsys.readouterr()
    assert cli("check") == 0
    assert capsys.readouterr().out.strip() == "leaderboard: ok (1 records)"


def test_empty_leaderboard_has_reference_rows_and_passes_check(board):
    _records, leaderboard, cli = board
    text = leaderboard.read_text()
    assert "## Reference (published, not records of this harness)" in text
    assert "| 700 | 90.0 % | 2 h 58 min |" in text and "| 500 | 90.3 % | 1 h 39 min" in text
    assert "dkobak/simclr-cifar10" in text and "No records yet." in text
    assert cli("check") == 0


def test_faster_record_ranks_first_and_reports_delta(board, tmp_path):
    records, leaderboard, cli = board
    slow = [make_log(s) for s in range(3)]
    assert add(cli, tmp_path, slow) == 0
    faster = [make_log(s, epoch_seconds=8.0) for s in range(10, 14)]
    assert add(cli, tmp_path, faster, "Faster", "logs2", date="2025-01-03") == 0
    statistics = (records / "2025-01-03_Faster" / "statistics.md").read_text()
    assert "Previous record: [2025-01-02_Baseline](../2025-01-02_Baseline/)" in statistics
    delta = mean_time(faster) - mean_time(slow)
    assert f"Delta in mean time to target: {delta:+.3f} s ({100 * delta / mean_time(slow):+.1f} %)" in statistics
    text = leaderboard.read_text()
    assert text.index("2025-01-03_Faster") < text.index("2025-01-02_Baseline")
    assert "| 1 | 1 min 37.4 s" in text and "| 2 | 2 min 00.1 s" in text
    assert cli("check") == 0


def test_per_run_paths_may_differ_and_training_code_may_change(board, tmp_path):
    _records, _leaderboard, cli = board
    source = edit_function(HARNESS_SOURCE, "info_nce", "temperature = temperature * 1.0")
    logs = [with_source(make_log(seed), source) for seed in range(3)]
    logs[2]["config"]["save_model"] = logs[2]["model"]["format"] = "export"  # how it is saved, not the recipe
    logs[1]["config"]["download"] = False
    assert add(cli, tmp_path, logs) == 0


########################################
#  Every rule refuses a log that breaks it alone: without that one rule, the same log is accepted

def _resolve(log: dict, path: str):
    """(container, key) of a dotted path; list indices are numbers."""
    *parents, key = path.split(".")
    obj = log
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj, int(key) if isinstance(obj, list) else key


def _set(path: str, value):
    def mutate(log: dict) -> None:
        obj, key = _resolve(log, path)
        obj[key] = value
    return mutate


def _drop(path: str):
    def mutate(log: dict) -> None:
        obj, key = _resolve(log, path)
        del obj[key]
    return mutate


def _shift(path: str, delta: float):
    def mutate(log: dict) -> None:
        obj, key = _resolve(log, path)
        obj[key] += delta
    return mutate


def _seq(*mutations):
    def mutate(log: dict) -> None:
        for m in mutations:
            m(log)
    return mutate


def _then_finish(*mutations):
    return _seq(*mutations, finish)


def _files(md5_of):
    def mutate(log: dict) -> None:
        for name, entry in log["data"]["files"].items():
            md5 = md5_of(name, entry["md5"])
            entry.update(md5=md5, expected_md5=md5, ok=True)
    return mutate


def _gpus(names: list[str], smi: list[str] | None = None):
    def mutate(log: dict) -> None:
        env = log["environment"]
        env.update(gpu_name=names[0], gpu_names=names, nvidia_smi=nvidia_smi(smi or names))
    return mutate


def _argv(*args: str):
    def mutate(log: dict) -> None:
        log["argv"] = ["--seed", str(log["config"]["seed"]), *args]
        log["launch"]["command"] = ["airbench_ssl.py", *log["argv"]]
    return mutate


def _lower_earlier_checks(log: dict) -> None:
    log["epochs"][7]["knn_pct"], log["epochs"][9]["knn_pct"] = 80.0, 84.0


def _claims_reached(log: dict) -> None:
    log["result"].update(status="reached_target", reached_target=True,
                         time_to_target_seconds=log["result"]["timed_seconds"])


def _untrained_run(log: dict) -> None:
    log["config"]["check_first_epoch"] = 0
    log["epochs"] = [{"epoch": 0, "loss": None, "lr": None, "epoch_seconds": 0.0, "timed_seconds": 0.0,
                      "knn_pct": 90.5, "knn_seconds": 1.0}]
    finish(log)


def _epoch_zero_row(log: dict) -> None:
    log["epochs"].insert(0, {"epoch": 0, "loss": None, "lr": None, "epoch_seconds": 0.0, "timed_seconds": 0.0,
                             "knn_pct": None, "knn_seconds": None})
    finish(log)


def _two_ranks(names: list[str], torchrun: bool = True):
    def mutate(log: dict) -> None:
        log["launch"].update(world_size=len(names), torchrun=torchrun)
        log["environment"].update(world_size=len(names), gpu_count=len(names))
        _gpus(names)(log)
    return mutate


def _bool_field(log: dict) -> str:
    return next(k for k, v in log["config"].items() if isinstance(v, bool) and k not in lb.PER_RUN_CONFIG_KEYS)


def _bool_flag_lie(log: dict) -> None:
    field = _bool_field(log)
    _argv(f"--{field.replace('_', '-')}", "no" if log["config"][field] else "yes")(log)


def _file_override(value):
    def mutate(log: dict) -> None:
        _argv("--config", "baselines/recipe.json")(log)
        log["config_sources"].update(config_file="baselines/recipe.json", file_overrides={"epochs": value})
    return mutate


CONFUSABLE_H200 = "NVIDIA \u041d200"  # Cyrillic En: looks like 'NVIDIA H200', is another table

# case -> (mutation, rule, start of the reason)
RULE_CASES = {
    "edited source": (lambda log: log["code"].update(source=log["code"]["source"] + "# faster\n"),
                      "source hash", "code.sha256 is not the sha256 of code.source"),
    "knn_predict edited": (lambda log: with_source(log, edit_function(HARNESS_SOURCE, "knn_predict", "k = k + 2")),
                           "pinned evaluation", "differs from the canonical harness in knn_predict"),
    "all-zero md5s": (_files(lambda name, md5: "0" * 32), "official data", "md5 of data_batch_1, data_batch_2"),
    "one fake file": (_files(lambda name, md5: "f" * 32 if name == "test_batch" else md5),
                      "official data", "md5 of test_batch is not the official"),
    "five files": (_drop("data.files.test_batch"), "official data", "data.files lists"),
    "extra file": (lambda log: log["data"]["files"].update({"batches.meta": {"md5": "a", "expected_md5": "a",
                                                                             "ok": True}}),
                   "official data", "data.files lists"),
    "ok flag false": (lambda log: log["data"]["files"]["data_batch_3"].update(ok=False), "official data",
                      "md5 of data_batch_3"),
    "official flag false": (_set("data.official", False), "official data", "data.official is false"),
    "fewer train images": (_set("data.train_images", 49000), "official data", "data has 49000 train"),
    "train subset": (_set("config.train_subset", 5000), "race settings", "config.train_subset is 5000"),
    "easier target": (_then_finish(_lower_earlier_checks, _set("config.target_pct", 85.0)), "race settings",
                      "config.target_pct is 85.0"),
    "other k": (_set("config.knn_k", 20), "race settings", "config.knn_k is 20"),
    "cpu device": (_set("environment.device", "cpu"), "gpu run", "environment.device is 'cpu'"),
    "cpu config": (_set("config.device", "cpu"), "gpu run", "config.device is 'cpu'"),
    "no cuda version": (_set("environment.cuda", None), "gpu run", "environment.cuda is None"),
    "confusable gpu name": (_gpus([CONFUSABLE_H200]), "hardware", f"GPU name {CONFUSABLE_H200!r} is not a plain"),
    "pipe in gpu name": (_gpus(["NVIDIA H200 | 1"]), "hardware", "GPU name 'NVIDIA H200 | 1' is not a plain"),
    "carriage return in gpu name": (_gpus(["NVIDIA H200\r"]), "hardware", "GPU name 'NVIDIA H200\\r'"),
    "gpu not in nvidia-smi": (_gpus(["NVIDIA H100 80GB HBM3"], ["NVIDIA H200"]), "hardware",
                              "GPU 'NVIDIA H100 80GB HBM3' is not among the GPUs nvidia-smi lists"),
    "more gpus than nvidia-smi lists": (_set("environment.gpu_count", 2), "hardware",
                                        "environment.gpu_count 2 but nvidia-smi lists 1"),
    "no gpu counted": (_seq(_set("environment.gpu_count", 0), _argv("--preset", "recipe")), "hardware",
                       "environment.gpu_count 0"),
    "world size disagrees": (_set("environment.world_size", 2), "hardware", "environment.world_size 2"),
    "ranks on two models": (_two_ranks(["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]), "hardware",
                            "the ranks ran on different GPU models"),
    "two ranks without torchrun": (_two_ranks(["NVIDIA H200"] * 2, torchrun=False), "hardware",
                                   "world_size 2 without torchrun"),
    "driver not nvidia-smi's": (_set("environment.driver", "555.1"), "hardware", "environment.driver '555.1'"),
    "no nvidia-smi": (_set("environment.nvidia_smi", None), "hardware", "environment.nvidia_smi is missing"),
    "marked ineligible": (_set("eligible", False), "self-declared eligibility", "the log marks itself ineligible"),
    "ineligible reasons": (_set("ineligible_reasons", ["not run on a GPU"]), "self-declared eligibility",
                           "the log marks itself ineligible"),
    "argv subset lie": (_argv("--train-subset", "512"), "argv", "argv sets --train-subset '512' but config"),
    "argv bool lie": (_bool_flag_lie, "argv", "argv sets --"),
    "argv unknown flag": (_argv("--turbo", "1"), "argv", "argv sets --turbo, which is not a field"),
    "argv positional": (_argv("extra"), "argv", "argv item 'extra' is not a --field flag"),
    "argv flag without value": (_argv("--epochs"), "argv", "argv flag --epochs has no value"),
    "argv bad number": (_argv("--epochs", "twenty"), "argv", "argv gives --epochs 'twenty', not a valid value"),
    "argv config file unlogged": (_argv("--config", "x.json"), "argv", "config_sources.config_file is None"),
    "config file says otherwise": (_file_override(30), "argv", "the config file sets epochs=30 but config.epochs"),
    "preset differs": (_set("config_sources.preset", "cpu_demo"), "argv", "config_sources.preset is 'cpu_demo'"),
    "command differs": (_set("launch.command", ["airbench_ssl.py", "--seed", "7"]), "argv", "launch.command"),
    "negative untimed": (_set("untimed_seconds.warmup", -1.0), "no negative seconds", "negative seconds"),
    "negative eval seconds": (_set("final_eval.seconds.knn5", -0.1), "no negative seconds", "negative seconds"),
    "eval kNN over 100": (_set("final_eval.knn5_pct", 100.5), "percentages", "not a percentage"),
    "check kNN below 0": (_then_finish(_set("epochs.7.knn_pct", -1.0)), "percentages", "not a percentage"),
    "zero-second epoch": (_then_finish(_set("epochs.3.epoch_seconds", 0.0)), "epoch rows",
                          "epoch 4: epoch_seconds 0.0 is not a measured time"),
    "denormal epoch": (_then_finish(_set("epochs.3.epoch_seconds", 5e-324)), "epoch rows",
                       "epoch 4: epoch_seconds 5e-324"),
    "epoch gap": (_then_finish(_drop("epochs.4")), "epoch rows", "epochs[4] is epoch 6, expected 5"),
    "epoch 0 off schedule": (_epoch_zero_row, "epoch rows", "epochs[0] is epoch 0, expected 1"),
    "trained epoch without loss": (_set("epochs.2.loss", None), "epoch rows", "epoch 3 trained but logs no loss"),
    "0 s record": (_untrained_run, "epoch rows", "the run trained no epoch"),
    "missing check": (_then_finish(_set("epochs.9.knn_pct", None), _set("epochs.9.knn_seconds", None)),
                      "check schedule", "epoch 10: kNN check missing"),
    "unscheduled check": (_then_finish(_set("epochs.8.knn_pct", 89.0), _set("epochs.8.knn_seconds", 1.5)),
                          "check schedule", "epoch 9: kNN check outside the schedule"),
    "schedule changed": (_set("config.check_every_epochs", 4), "check schedule", "epoch 10: kNN check outside"),
    "impossible schedule": (_set("config.check_every_epochs", 0), "check schedule", "impossible check schedule"),
    "knn seconds without check": (_then_finish(_set("epochs.3.knn_seconds", 1.0)), "check schedule",
                                  "epoch 4: knn_seconds 1.0 with knn_pct None"),
    "late stop": (_then_finish(_set("epochs.9.knn_pct", 90.05)), "stop rule",
                  "the run did not stop at the first check that reached the target (epoch 10"),
    "last check below target": (_seq(_set("epochs.11.knn_pct", 89.9), finish, _claims_reached), "stop rule",
                                "the last check, 89.9 % at epoch 12, is below the target"),
    "stopped off a check": (_seq(_drop("epochs.11"), finish, _claims_reached), "stop rule",
                            "the run stopped after epoch 11, which has no kNN check"),
    "status not reached": (_set("result.status", "max_epochs"), "stop rule", "result.status is 'max_epochs'"),
    "knn at stop lies": (_set("result.knn_at_stop_pct", 91.0), "stop rule", "result.knn_at_stop_pct 91.0"),
    "epochs run lies": (_set("result.epochs_run", 11), "stop rule", "result.epochs_run 11"),
    "result target lies": (_set("result.target_pct", 85.0), "stop rule", "result.target_pct 85.0"),
    "row time off": (_shift("epochs.3.timed_seconds", 5.0), "timed seconds", "epoch 4: timed_seconds"),
    "result time shrunk": (_seq(_shift("result.timed_seconds", -5.0), _shift("result.time_to_target_seconds", -5.0)),
                           "timed seconds", "result.timed_seconds"),
    "null time to target": (_set("result.time_to_target_seconds", None), "timed seconds",
                            "result.timed_seconds"),
    "wall shorter than its parts": (lambda log: log.update(total_wall_seconds=log["result"]["timed_seconds"]),
                                    "untimed seconds", "total_wall_seconds"),
    "knn seconds not summed": (_shift("untimed_seconds.knn_checks", 3.0), "untimed seconds",
                               "untimed_seconds.knn_checks"),
    "extra untimed key": (_set("untimed_seconds.compile", 0.5), "untimed seconds", "untimed_seconds has"),
    "no model saved": (_seq(_set("config.save_model", "false"), _set("model", None)), "model artefact",
                       "config.save_model is 'false': a run that saves no model"),
    "harness without artefacts": (_drop("config.save_model"), "model artefact", "config.save_model is None"),
    "model not logged": (_set("model", None), "model artefact", "the log names no saved model"),
    "model file of another run": (_set("model.file", "other.model.pt"), "model artefact",
                                  "model.file 'other.model.pt' is not 20250101T"),
    "model format not the config's": (_set("model.format", "export"), "model artefact",
                                      "model.format 'export' is not config.save_model 'weights'"),
    "model hash not a sha256": (_set("model.sha256", "Z" * 64), "model artefact", "model.sha256 'ZZZ"),
    "empty model file": (_set("model.bytes", 0), "model artefact", "model.sha256"),
}


def test_every_rule_has_a_case():
    assert {rule for _, rule, _ in RULE_CASES.values()} == {name for name, _ in lb.RULES}


@pytest.mark.parametrize("case", RULE_CASES)
def test_each_rule_refuses_a_log_that_breaks_it_alone(case, monkeypatch):
    mutate, rule, reason = RULE_CASES[case]
    log = make_log(0)
    mutate(log)
    with pytest.raises(lb.Refused, match="^" + re.escape(f"{rule}: {reason}")):
        lb.validate_log(log)
    monkeypatch.setattr(lb, "RULES", tuple(r for r in lb.RULES if r[0] != rule))
    lb.validate_log(log)  # only this rule stood between the log and a record


def test_argv_that_agrees_with_config_is_accepted():
    log = make_log(0)
    field = _bool_field(log)
    _argv("--epochs", "20", "--check-first-epoch=8", "--preset", "recipe", "--base-lr", repr(log["config"]["base_lr"]),
          "--config", "baselines/recipe.json", f"--{field.replace('_', '-')}", "On" if log["config"][field] else "off",
          "--arch", log["config"]["arch"])(log)
    log["config_sources"].update(config_file="baselines/recipe.json", file_overrides={"epochs": 30, "width": 64})
    log["config"]["width"] = 64
    lb.validate_log(log)  # the flag --epochs 20 overrides the file's 30; the file's width 64 is the config's


@pytest.mark.parametrize(("mutate", "reason"), [
    (_set("format", "airbench-ssl-log/1"), "format is 'airbench-ssl-log/1', expected 'airbench-ssl-log/2'"),
    (_set("kind", "eval"), "kind is 'eval': only training logs"),
    (_drop("environment"), "missing field environment"),
    (_set("config.epochs", True), "field config.epochs should be int, got True"),
    (_set("epochs.3.epoch_seconds", "10"), "epochs[3]: field epoch_seconds should be int or float"),
    (_set("run_id", "../escape"), "run_id '../escape' is not a plain name"),
    (_set("created_utc", "2025-02-30T00:00:00Z"), "created_utc '2025-02-30T00:00:00Z' is not a real"),
    (_set("environment.torch", "2.11\n# injected"), "environment.torch '2.11\\n# injected' is not a version"),
    (_set("argv", ["--seed", 0]), "argv should hold strings only"),
    (_set("epochs.3", [1, 2]), "epochs[3] is not a JSON object"),
    (_set("config.epochs", 10**16), "number 10000000000000000 is out of range"),
    (_set("total_wall_seconds", math.inf), "number inf is out of range"),
    (_set("final_eval.knn5_pct", math.nan), "number nan is out of range"),
    (_set("config.grayscale_p", (0.1,)), "value of type tuple is not JSON"),
])
def test_malformed_log_is_refused_by_the_schema(mutate, reason):
    log = make_log(0)
    mutate(log)
    with pytest.raises(lb.Refused, match="^" + re.escape(f"log schema: {reason}")):
        lb.validate_log(log)


########################################
#  Random edits of a valid log's numbers are either still consistent or refused

def _number_paths(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _number_paths(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _number_paths(value, (*path, i))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path


def _assign(log: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        log = log[key]
    log[path[-1]] = value


def assert_consistent(log: dict, run: lb.Run) -> None:
    """What any accepted log must satisfy, re-derived here from the log alone, without the validator."""
    cfg, rows, result, untimed = log["config"], log["epochs"], log["result"], log["untimed_seconds"]
    assert (cfg["train_subset"], cfg["target_pct"], cfg["knn_k"]) == (0, 90.0, 10)
    assert {name: f["md5"] for name, f in log["data"]["files"].items()} == OFFICIAL
    assert (log["data"]["train_images"], log["data"]["test_images"]) == (50000, 10000)
    first = 0 if cfg["check_first_epoch"] == 0 else 1
    epochs = [r["epoch"] for r in rows]
    assert epochs == list(range(first, first + len(rows))) and epochs[-1] >= 1
    scheduled = [e for e in epochs if e == cfg["epochs"] or (
        cfg["check_first_epoch"] <= e <= cfg["epochs"] and (e - cfg["check_first_epoch"]) % cfg["check_every_epochs"]
        == 0)]
    assert [r["epoch"] for r in rows if r["knn_pct"] is not None] == scheduled
    assert all(r["epoch_seconds"] >= 1e-3 for r in rows if r["epoch"] > 0)
    running = np.cumsum([r["epoch_seconds"] for r in rows])
    assert np.allclose([r["timed_seconds"] for r in rows], running, rtol=1e-6, atol=1e-3)
    for value in (result["timed_seconds"], result["time_to_target_seconds"], run.time_to_target_seconds):
        assert value == pytest.approx(running[-1], rel=1e-6, abs=1e-3)
    checks = [r["knn_pct"] for r in rows if r["knn_pct"] is not None]
    assert rows[-1]["knn_pct"] is not None and checks[-1] >= 90.0 and all(k < 90.0 for k in checks[:-1])
    assert result["knn_at_stop_pct"] == run.knn_at_stop_pct == checks[-1] and 0 <= checks[-1] <= 100
    assert result["epochs_run"] == run.epochs_run == epochs[-1] and result["status"] == "reached_target"
    assert all(v >= 0 for v in untimed.values()) and all(v >= 0 for v in log["final_eval"]["seconds"].values())
    assert log["total_wall_seconds"] >= running[-1] + sum(untimed.values()) - 2e-3
    assert 1 <= log["environment"]["gpu_count"] and log["environment"]["world_size"] == 1


def test_random_number_edits_are_consistent_or_refused():
    base = make_log(0)
    paths = list(_number_paths(base))
    rng = random.Random(20250101)
    accepted = refused_count = 0
    for _ in range(600):
        log = copy.deepcopy(base)
        for _ in range(rng.choice([1, 1, 2, 3])):
            path = rng.choice(paths)
            old = log
            for key in path:
                old = old[key]
            new = rng.choice([0, 0.0, -old, old * rng.uniform(0.5, 1.5), old + 1e-9, old - 1, old + 1, 5e-324,
                              1e300, 10**12, -1e-3, math.floor(old), old * 1e-6])
            _assign(log, path, new)
        try:
            run = lb.validate_log(log)
        except lb.Refused:
            refused_count += 1
            continue
        accepted += 1
        assert_consistent(log, run)
    assert accepted > 50 and refused_count > 200  # both outcomes were exercised


########################################
#  1. Eligibility that a log merely claims (through the CLI: one line, nothing written)

@pytest.mark.parametrize("case", ["all-zero md5s", "one fake file", "cpu device", "argv subset lie",
                                  "zero-second epoch", "last check below target", "ineligible reasons"])
def test_claimed_eligibility_is_refused_by_add(board, tmp_path, capsys, case):
    mutate, rule, reason = RULE_CASES[case]
    logs = [make_log(seed) for seed in range(3)]
    mutate(logs[1])
    line = refused_logs(board, tmp_path, capsys, logs)
    assert line.startswith(f"leaderboard: refused: {tmp_path / 'bad' / logs[1]['run_id']}.json: {rule}: {reason}")


########################################
#  2. Hardware tables one cannot slip into

@pytest.mark.parametrize("variant", ["NVIDIA H200 ", "nvidia  h200", " NVIDIA H200"])
def test_gpu_name_variants_share_one_table(board, tmp_path, capsys, variant):
    _records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    slower = [make_log(s, gpu=variant, epoch_seconds=12.0) for s in range(3)]
    line = refused_logs(board, tmp_path, capsys, slower)
    assert "faster records: not faster than 2025-01-02_Baseline" in line and "on NVIDIA H200" in line


def test_confusable_gpu_name_is_refused_in_every_log(board, tmp_path, capsys):
    logs = [make_log(s, gpu=CONFUSABLE_H200) for s in range(3)]
    paths = write_logs(tmp_path / "bad", logs)
    lines = refused_lines(board, tmp_path, capsys, [*map(str, paths), "--name", "X", "--description", "x"])
    assert len(lines) == 3  # one line per log, each naming it
    for line, log in zip(lines, logs):
        assert f"{log['run_id']}.json: hardware: GPU name {CONFUSABLE_H200!r} is not a plain" in line


def test_gpu_count_makes_its_own_table(board, tmp_path, capsys):
    records, leaderboard, cli = board
    h100 = "NVIDIA H100 80GB HBM3"
    assert add(cli, tmp_path, [make_log(s, gpu=h100, epoch_seconds=5.0) for s in range(3)], "One") == 0
    eight = [make_log(s, gpu=h100, epoch_seconds=9.0, world_size=8) for s in range(3)]  # slower, but 8 GPUs
    assert add(cli, tmp_path, eight, "Eight", "logs8") == 0
    text = leaderboard.read_text()
    assert f"### {h100}\n" in text and f"### 8× {h100}\n" in text
    meta = json.loads((records / "2025-01-02_Eight" / "record.json").read_text())
    assert meta["hardware"] == f"8× {h100}" and meta["world_size"] == 8 and meta["previous_record"] is None
    mixed = [make_log(0, gpu=h100), make_log(1, gpu=h100, world_size=8), make_log(2, gpu=h100)]
    assert "one hardware" in refused_logs(board, tmp_path, capsys, mixed)
    assert cli("check") == 0


def test_long_gpu_name_shortened_by_nvidia_smi_is_recognised():
    name = "NVIDIA GeForce RTX 4090 Laptop GPU"
    assert "Laptop..." not in nvidia_smi([name]) and "..." in nvidia_smi([name])
    assert lb.validate_log(make_log(0, gpu=name)).hardware == name


########################################
#  3. Runs are identified by their content

def _renamed(log: dict, seed: int) -> dict:
    log = copy.deepcopy(log)
    log["run_id"] = log["run_id"] + "b"
    log["model"].update(file=f"{log['run_id']}.model.pt", sha256=hashlib.sha256(log["run_id"].encode()).hexdigest())
    log["config"]["seed"] = seed
    _argv()(log)
    return log


def test_same_rows_under_another_id_are_one_run(board, tmp_path, capsys):
    logs = [make_log(0), make_log(1)]
    logs.append(_renamed(logs[1], 2))
    line = refused_logs(board, tmp_path, capsys, logs)
    assert "distinct runs:" in line and "is the same run as" in line and "epoch_seconds and losses" in line


def test_run_reused_from_a_record_is_refused(board, tmp_path, capsys):
    _records, _leaderboard, cli = board
    first = [make_log(s) for s in range(5)]
    assert add(cli, tmp_path, first) == 0
    picked = [_renamed(first[0], 10), make_log(11, epoch_seconds=8.0), make_log(12, epoch_seconds=8.0)]
    assert "one run, one record: this is the same run as 2025-01-02_Baseline/" in refused_logs(
        board, tmp_path, capsys, picked)
    assert "one run, one record" in refused_logs(board, tmp_path, capsys, first[:3], folder="again")


def test_check_refuses_a_run_copied_into_another_record(board, tmp_path, capsys):
    records, _leaderboard, cli = board
    first = [make_log(s) for s in range(3)]
    assert add(cli, tmp_path, first) == 0
    second = [make_log(s, epoch_seconds=8.0) for s in range(10, 13)]
    assert add(cli, tmp_path, second, "Faster", "logs2", date="2025-01-03") == 0
    copied = copy.deepcopy(first[0])
    copied.update(run_id=second[2]["run_id"])
    copied["model"]["file"] = f"{copied['run_id']}.model.pt"
    copied["config"]["seed"] = second[2]["config"]["seed"]
    _argv()(copied)
    (records / "2025-01-03_Faster" / f"{copied['run_id']}.json").write_text(json.dumps(copied))
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err
    assert "one run, one record: 2025-01-03_Faster/" in err and "(same model and epoch_seconds and losses)" in err


def test_check_refuses_symlinks_unlisted_files_and_strays(board, tmp_path, capsys):
    records, _leaderboard, cli = board
    logs = [make_log(s) for s in range(3)]
    assert add(cli, tmp_path, logs) == 0
    folder = records / "2025-01-02_Baseline"
    for damage, reason in [
        (lambda: (folder / "notes.txt").write_text("x"), "no unlisted files: notes.txt"),
        (lambda: (folder / "extra.json").symlink_to(folder / "record.json"), "no symlinks: extra.json"),
        (lambda: (records / "stray.json").write_text("{}"), "stray.json is not a record folder"),
        (lambda: (records / "linked").symlink_to(folder), "linked is a symbolic link"),
    ]:
        damage()
        capsys.readouterr()
        assert cli("check") == 1
        assert reason in capsys.readouterr().err
        for p in [folder / "notes.txt", folder / "extra.json", records / "stray.json", records / "linked"]:
            p.unlink(missing_ok=True)
        assert cli("check") == 0
    log_path = folder / f"{logs[0]['run_id']}.json"
    real = tmp_path / "real.json"
    shutil.move(log_path, real)
    log_path.symlink_to(real)
    capsys.readouterr()
    assert cli("check") == 1 and "symbolic link" in capsys.readouterr().err


def test_check_refuses_a_record_slower_than_an_earlier_one(board, tmp_path, capsys):
    records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert lb.main(["add", *map(str, write_logs(tmp_path / "slow", [make_log(s, epoch_seconds=12.0)
                                                                     for s in range(10, 13)])),
                    "--name", "Slow", "--date", "2025-01-03", "--description", "slower",
                    "--records-dir", str(other), "--leaderboard", str(tmp_path / "other.md")]) == 0
    shutil.move(other / "2025-01-03_Slow", records / "2025-01-03_Slow")
    capsys.readouterr()
    assert cli("check") == 1
    assert "faster records: 2025-01-03_Slow" in capsys.readouterr().err


@pytest.mark.parametrize(("date", "reason"), [
    ("2024-12-31", "--date: record date 2024-12-31 is before run"),
    ("2099-01-01", "--date 2099-01-01 is in the future"),
])
def test_record_date_must_follow_its_runs_and_not_lie_ahead(board, tmp_path, capsys, date, reason):
    assert reason in refused_logs(board, tmp_path, capsys, [make_log(s) for s in range(3)], date=date)


def test_record_cannot_be_dated_before_the_record_it_beats(board, tmp_path, capsys):
    _records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)], date="2025-01-05") == 0
    faster = [make_log(s, epoch_seconds=8.0) for s in range(10, 13)]
    assert "--date 2025-01-03 is before 2025-01-05_Baseline" in refused_logs(board, tmp_path, capsys, faster)


CROSS_RUN = {
    "too few runs": (lambda logs: logs[:2], "runs: a record needs at least 3 runs, got 2"),
    "mismatched code": (lambda logs: [logs[0], logs[1], with_source(logs[2], HARNESS_SOURCE + "# other\n")],
                        "one code: sha256"),
    "different config": (lambda logs: [logs[0], logs[1], _with(logs[2], _set("config.batch_size", 1024))],
                         "one config: differs from"),
    "duplicate seed": (lambda logs: [logs[0], logs[1], make_log(1, salt="again")], "distinct runs: seed 1"),
}


def _with(log: dict, mutate) -> dict:
    log = copy.deepcopy(log)
    mutate(log)
    return log


@pytest.mark.parametrize("case", CROSS_RUN)
def test_inconsistent_runs_are_refused(board, tmp_path, capsys, case):
    select, reason = CROSS_RUN[case]
    assert reason in refused_logs(board, tmp_path, capsys, select([make_log(seed) for seed in range(3)]))


def test_slower_record_is_refused(board, tmp_path, capsys):
    _records, _leaderboard, cli = board
    logs = [make_log(seed) for seed in range(3)]
    assert add(cli, tmp_path, logs) == 0
    line = refused_logs(board, tmp_path, capsys, [make_log(s, epoch_seconds=10.5) for s in range(10, 13)])
    assert f"faster records: not faster than 2025-01-02_Baseline ({mean_time(logs):.3f} s) on NVIDIA H200" in line


########################################
#  4. The evaluation is the harness's own

PINNING_CASES = {
    "knn_predict edited": (edit_function(HARNESS_SOURCE, "knn_predict", "k = k + 2"), "in knn_predict"),
    "helper of knn_check edited": (edit_function(HARNESS_SOURCE, "extract_features", "batch_size = 1"),
                                   "in extract_features"),
    "builtin shadowed": (HARNESS_SOURCE + "\n\ndef len(x):\n    return 0\n", "in len"),
    "pinned name rebound": (HARNESS_SOURCE + "\nknn_accuracy = lambda *args: 100.0\n", "in knn_accuracy"),
    "import rebound": (HARNESS_SOURCE + "\nimport numpy as F\n", "in F"),
    "library patched": (HARNESS_SOURCE + "\nF.normalize = lambda x, dim: x\n",
                        "patches torch.nn.functional.normalize at runtime"),
    "tensor method patched": (HARNESS_SOURCE + "\ntorch.Tensor.topk = None\n", "patches torch.Tensor.topk"),
    "pinned data mutated": (HARNESS_SOURCE + "\nOFFICIAL_MD5.update(test_batch='0')\n",
                            "modifies the pinned OFFICIAL_MD5"),
    "global rebinding": (HARNESS_SOURCE + "\ndef cheat():\n    global knn_predict\n    knn_predict = None\n",
                         "rebinds knn_predict through `global`"),
    "exec": (HARNESS_SOURCE + "\nexec('x = 1')\n", "uses exec"),
    "code object swap": (HARNESS_SOURCE + "\nknn_check.__code__ = knn_check.__code__\n", "touches __code__"),
    "star import": (HARNESS_SOURCE + "\nfrom math import *\n", "uses `from ... import *`"),
    "not python": ("def (:\n", "code.source cannot be parsed as Python"),
    "nested too deep": ("x = " + "(" * 5000 + ")" * 5000 + "\n", "code.source cannot be parsed as Python"),
    "too large": ("#" * (lb.MAX_SOURCE_CHARS + 1), "characters, over the"),
}


@pytest.mark.parametrize("case", PINNING_CASES)
def test_rewritten_evaluation_is_refused(case):
    source, reason = PINNING_CASES[case]
    log = with_source(make_log(0), source)
    with pytest.raises(lb.Refused, match="pinned evaluation: .*" + re.escape(reason)):
        lb.validate_log(log)


@pytest.mark.parametrize("source", [
    edit_function(HARNESS_SOURCE, "info_nce", "temperature = temperature * 1.0"),  # the training may change
    reword_docstring(HARNESS_SOURCE, "knn_predict"),
    HARNESS_SOURCE + "\ntorch.backends.cuda.matmul.allow_tf32 = True\nos.environ['CUBLAS_WORKSPACE_CONFIG'] = ':8'\n",
    HARNESS_SOURCE + "\ni = [i for i in range(3)]\n\ndef helper(x):\n    len = 3\n    return x + len\n",
], ids=["training edited", "docstring reworded", "speed switches", "names local to other code"])
def test_training_changes_and_speed_switches_are_accepted(source):
    assert source != HARNESS_SOURCE
    lb.validate_log(with_source(make_log(0), source))


def test_pinned_evaluation_through_the_cli(board, tmp_path, capsys):
    _records, _leaderboard, cli = board
    edited = edit_function(HARNESS_SOURCE, "knn_predict", "k = k + 2")
    paths = write_logs(tmp_path / "bad", [with_source(make_log(s), edited) for s in range(3)])
    lines = refused_lines(board, tmp_path, capsys, [*map(str, paths), "--name", "X", "--description", "x"])
    assert len(lines) == 3 and all("pinned evaluation: differs from the canonical harness in knn_predict" in line
                                   for line in lines)
    training = edit_function(HARNESS_SOURCE, "info_nce", "temperature = temperature * 1.0")
    assert add(cli, tmp_path, [with_source(make_log(s), training) for s in range(3)], "Trained") == 0


def test_changing_the_canonical_evaluation_flags_existing_records(board, tmp_path, capsys, monkeypatch):
    """A rules change: once the harness's knn_predict changes, `check` reports every record judged by the old one."""
    _records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    changed = edit_function(HARNESS_SOURCE, "knn_predict", "k = k + 2")
    monkeypatch.setattr(lb, "canonical_source", lambda: changed)
    capsys.readouterr()
    assert cli("check") == 1
    assert "pinned evaluation: differs from the canonical harness in knn_predict" in capsys.readouterr().err


########################################
#  5. Inputs that would crash or hang the validator: one line, non-zero exit, nothing written

def _raw_log(text_of) -> callable:
    def write(folder: Path) -> Path:
        log = make_log(0)
        path = folder / f"{log['run_id']}.json"
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text_of(json.dumps(log, indent=1)))
        return path
    return write


HOSTILE = {
    "NaN": (_raw_log(lambda t: t.replace('"warmup": 2.0', '"warmup": NaN').encode()),
            "log file: NaN is not a number"),
    "Infinity": (_raw_log(lambda t: t.replace('"warmup": 2.0', '"warmup": -Infinity').encode()),
                 "log file: -Infinity is not a number"),
    "huge float": (_raw_log(lambda t: t.replace('"warmup": 2.0', '"warmup": 1e999').encode()),
                   "log file: number 1e999 is out of range"),
    "5000-digit int": (_raw_log(lambda t: t.replace('"epochs": 20', '"epochs": 1' + "0" * 5000).encode()),
                       "log file: integer 10000000000000000000... (5001 digits) is out of range"),
    "deep nesting": (_raw_log(lambda t: ("[" * 100_000 + "]" * 100_000).encode()),
                     "log file: JSON nested too deeply"),
    "moderate nesting": (_raw_log(lambda t: ("[" * 200 + "]" * 200).encode()), "log schema: JSON nested too deeply"),
    "duplicate key": (_raw_log(lambda t: t.replace('"kind": "train"', '"kind": "train", "kind": "eval"').encode()),
                      "log file: key 'kind' appears twice"),
    "not UTF-8": (_raw_log(lambda t: b"\xff\xfe" + t.encode()), "log file: not UTF-8 text"),
    "not JSON": (_raw_log(lambda t: t[:-10].encode()), "log file: not valid JSON"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_log_file_is_refused(board, tmp_path, capsys, case):
    write, reason = HOSTILE[case]
    paths = [write(tmp_path / "bad"), *write_logs(tmp_path / "bad", [make_log(1), make_log(2)])]
    line = refused(board, tmp_path, capsys, [*map(str, paths), "--name", "X", "--description", "x"])
    assert f".json: {reason}" in line


def test_oversized_log_is_refused_before_reading(board, tmp_path, capsys):
    path = tmp_path / "bad" / "big.json"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.truncate(lb.MAX_LOG_BYTES + 1)  # sparse: no 64 MiB written
    lines = refused_lines(board, tmp_path, capsys, [str(path)] * 3 + ["--name", "X", "--description", "x"])
    assert f"log file: is {lb.MAX_LOG_BYTES + 1} bytes, over the {lb.MAX_LOG_BYTES}-byte limit" in lines[0]


def test_huge_epoch_count_is_validated_without_materialising_the_schedule():
    log = make_log(0)
    log["config"]["epochs"] = 10**12
    assert lb.validate_log(log).epochs_run == 12
    log["config"]["check_every_epochs"] = 10**12 - 8  # the checks now sit at 8 and 10**12 only
    with pytest.raises(lb.Refused, match="check schedule: epoch 10: kNN check outside"):
        lb.validate_log(log)


@pytest.mark.parametrize(("description", "reason"), [
    ("line\rreturn", "--description 'line\\rreturn'"),
    ("two\nlines", "--description 'two\\nlines'"),
    ("a | b", "--description 'a | b'"),
    ("naïve", "--description 'naïve'"),
    ("", "--description ''"),
    ("x" * 201, "one line of 1 to 200 printable ASCII"),
])
def test_unsafe_description_is_refused(board, tmp_path, capsys, description, reason):
    paths = write_logs(tmp_path / "logs", [make_log(s) for s in range(3)])
    line = refused(board, tmp_path, capsys, [*map(str, paths), "--name", "Ok", "--description", description])
    assert reason in line


@pytest.mark.parametrize(("name", "date", "reason"), [("bad name", "2025-01-02", "--name 'bad name'"),
                                                      ("x" * 65, "2025-01-02", "--name"),
                                                      ("Ok", "2025-13-01", "--date '2025-13-01'"),
                                                      ("Ok", "20250102", "--date '20250102'")])
def test_bad_name_or_date_is_refused(board, tmp_path, capsys, name, date, reason):
    paths = write_logs(tmp_path / "logs", [make_log(seed) for seed in range(3)])
    assert reason in refused(board, tmp_path, capsys, [*map(str, paths), "--name", name, "--date", date,
                                                       "--description", "x"])


def test_log_file_name_must_be_its_run_id(board, tmp_path, capsys):
    logs = [make_log(s) for s in range(3)]
    paths = write_logs(tmp_path / "bad", logs)
    odd = paths[0].with_name("odd\nname.json")
    paths[0].rename(odd)
    line = refused(board, tmp_path, capsys, [str(odd), *map(str, paths[1:]), "--name", "X", "--description", "x"])
    assert "\\n" in line and "log file: the file is named 'odd\\nname.json'" in line


def test_hand_edited_description_fails_check_in_one_escaped_line(board, tmp_path, capsys):
    """check applies add's rule to a description edited into record.json; render refuses to publish it."""
    records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    meta_path = records / "2025-01-02_Baseline" / "record.json"
    meta = json.loads(meta_path.read_text())
    meta["description"] = "two\r\nlines | and a pipe"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "record.json: description 'two\\r\\nlines | and a pipe': one line of" in err[0]
    assert cli("render") == 1 and snapshot(tmp_path) == before


########################################
#  6. Leftovers and writes that die half-way

def test_leaderboard_that_is_a_folder_is_refused_before_writing(board, tmp_path, capsys):
    _records, leaderboard, _cli = board
    leaderboard.unlink()
    leaderboard.mkdir()
    line = refused_logs(board, tmp_path, capsys, [make_log(s) for s in range(3)])
    assert "exists and is not a regular file" in line


def test_leftovers_are_ignored_by_git_and_removed_by_the_next_command(board, tmp_path, capsys):
    records, leaderboard, cli = board
    stale_board = tmp_path / ".leaderboard.md.abc123.tmp"
    stale_board.write_text("half")
    (records / ".staging-Run-xyz").mkdir()
    (records / ".staging-Run-xyz" / "statistics.md").write_text("half")
    assert cli("check") == 0  # invisible to check
    assert cli("render") == 0
    assert not stale_board.exists() and not list(records.glob(".*"))
    if shutil.which("git") and (ROOT / ".git").exists():
        for path in (".leaderboard.md.abc123.tmp", "records/.staging-Run-xyz/statistics.md"):
            assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path]).returncode == 0


def _dies_half_way(real_write, victim: str):
    def write(path: Path, data: bytes) -> None:
        if path.name.startswith(victim):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError("disk full")
        real_write(path, data)
    return write


@pytest.mark.parametrize("victim", ["record.json", "statistics.md", ".leaderboard.md"])
def test_add_whose_write_dies_half_way_leaves_the_previous_state(board, tmp_path, capsys, monkeypatch, victim):
    _records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    paths = write_logs(tmp_path / "logs2", [make_log(s, epoch_seconds=8.0) for s in range(10, 13)])
    before = snapshot(tmp_path)
    monkeypatch.setattr(lb, "write_synced", _dies_half_way(lb.write_synced, victim))
    assert cli("add", *map(str, paths), "--name", "Faster", "--date", "2025-01-03", "--description", "x") == 1
    assert "disk full" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    monkeypatch.undo()
    assert cli("check") == 0


def test_render_whose_write_dies_half_way_leaves_the_previous_board(board, tmp_path, monkeypatch):
    _records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    leaderboard.write_text("stale\n")
    before = snapshot(tmp_path)
    monkeypatch.setattr(lb, "write_synced", _dies_half_way(lb.write_synced, ".leaderboard.md"))
    assert cli("render") == 1
    assert snapshot(tmp_path) == before


def test_failed_leaderboard_replace_takes_the_record_back(board, tmp_path, monkeypatch):
    _records, leaderboard, cli = board
    paths = write_logs(tmp_path / "logs", [make_log(seed) for seed in range(3)])
    before = snapshot(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == leaderboard:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(lb.os, "replace", replace)
    assert cli("add", *map(str, paths), "--name", "Baseline", "--date", "2025-01-02", "--description", "x") == 1
    assert snapshot(tmp_path) == before


KILLER = """
import os, signal, sys
sys.path.insert(0, {tools!r})
import leaderboard as lb
real_replace, real_write = os.replace, lb.write_synced
def replace(src, dst):
    if {where!r} == "board" and str(dst).endswith("leaderboard.md"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
def write(path, data):
    if {where!r} == "staging" and path.name == "statistics.md":
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(path, data)
os.replace, lb.write_synced = replace, write
sys.exit(lb.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["staging", "board"])
def test_kill_9_during_add_is_invisible_or_repaired_by_render(board, tmp_path, capsys, where):
    records, leaderboard, cli = board
    paths = write_logs(tmp_path / "logs", [make_log(seed) for seed in range(3)])
    before = leaderboard.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLER.format(tools=str(TOOLS), where=where), "add",
                           *map(str, paths), "--name", "Baseline", "--date", "2025-01-02", "--description", "x",
                           "--records-dir", str(records), "--leaderboard", str(leaderboard)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert leaderboard.read_bytes() == before  # never half-written
    capsys.readouterr()
    if where == "staging":  # the partial record is a hidden staging folder: no record, check passes
        assert list(records.glob(".staging-*")) and lb.scan_records(records) == ([], [])
        assert cli("check") == 0
    else:  # the record is complete and the board is stale: check says so, render repairs it
        assert list(tmp_path.glob(".leaderboard.md.*.tmp"))
        assert cli("check") == 1 and "differs from what `render` produces" in capsys.readouterr().err
    assert cli("render") == 0 and cli("check") == 0
    assert not list(records.glob(".*")) and not list(tmp_path.glob(".leaderboard.md.*"))


########################################
#  check keeps leaderboard.md and records/ honest

def test_check_fails_on_hand_edited_leaderboard(board, tmp_path, capsys):
    _records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    text = leaderboard.read_text()
    assert "2 min 00.1 s" in text
    leaderboard.write_text(text.replace("2 min 00.1 s", "1 min 00.1 s"))
    capsys.readouterr()
    assert cli("check") == 1
    assert "differs from what `render` produces" in capsys.readouterr().err
    assert cli("render") == 0 and cli("check") == 0


def test_check_fails_on_tampered_log_in_record(board, tmp_path, capsys):
    records, _leaderboard, cli = board
    logs = [make_log(seed) for seed in range(3)]
    assert add(cli, tmp_path, logs) == 0
    logs[0]["result"]["time_to_target_seconds"] -= 5.0
    (records / "2025-01-02_Baseline" / f"{logs[0]['run_id']}.json").write_text(json.dumps(logs[0]))
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err
    assert "record does not validate" in err and f"{logs[0]['run_id']}.json: timed seconds:" in err
    assert cli("render") == 1  # render refuses to publish an invalid record


@pytest.mark.parametrize("file_name", ["record.json", "statistics.md"])
def test_check_fails_on_edited_generated_file(board, tmp_path, capsys, file_name):
    records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    path = records / "2025-01-02_Baseline" / file_name
    text = path.read_text()
    assert "120.1" in text
    path.write_text(text.replace("120.1", "100.1"))
    capsys.readouterr()
    assert cli("check") == 1
    assert f"{path} does not match its logs" in capsys.readouterr().err
    assert cli("render") == 0 and path.read_text() == text and cli("check") == 0  # render rewrites it


########################################
#  Concurrent adds

def _add_command(records: Path, leaderboard: Path, paths: list[Path], name: str) -> list[str]:
    return [sys.executable, str(TOOLS / "leaderboard.py"), "add", *map(str, paths), "--name", name, "--date",
            "2025-01-02", "--description", name, "--records-dir", str(records), "--leaderboard", str(leaderboard)]


def test_concurrent_adds_lose_nothing_and_serialize(board, tmp_path):
    """Three adds at once: the one on its own GPU model always lands; of the two with nearly equal times on one
    model, whichever takes the lock second is accepted only if it happens to be faster, else cleanly refused."""
    records, leaderboard, cli = board
    submissions = {"Run0": make_log, "Run1": lambda seed: make_log(seed, salt="1"),
                   "Other": lambda seed: make_log(seed, gpu="NVIDIA A100-SXM4-80GB")}
    commands = [_add_command(records, leaderboard, write_logs(tmp_path / name, [make(s) for s in range(3)]), name)
                for name, make in submissions.items()]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = dict(zip(submissions, [(p.wait(timeout=300), *p.communicate()) for p in procs]))
    assert results["Other"][0] == 0, results
    rcs = sorted(results[name][0] for name in ("Run0", "Run1"))
    assert rcs in ([0, 0], [0, 1]), results
    for rc, _, err in results.values():
        if rc:
            assert err.startswith("leaderboard: refused: faster records: not faster than 2025-01-02_Run"), err
    names = [p.name for p in lb.scan_records(records)[0]]
    assert "2025-01-02_Other" in names and len(names) == 1 + rcs.count(0)
    text = leaderboard.read_text()
    assert "### NVIDIA H200" in text and "### NVIDIA A100-SXM4-80GB" in text
    assert not list(records.glob(".*")) and not list(tmp_path.glob(".leaderboard.md.*"))
    assert cli("check") == 0


########################################
#  Statistics

def test_summarize_matches_numpy():
    xs = [250.1, 252.4, 249.8, 251.0]
    mean, std = stats.summarize(xs)
    assert mean == pytest.approx(np.mean(xs)) and std == pytest.approx(np.std(xs, ddof=1))


def test_one_sided_ttest_matches_scipy():
    xs = [90.05, 90.21, 90.12, 90.30, 89.98]
    expected = scipy.stats.ttest_1samp(xs, 90.0, alternative="greater").pvalue
    assert stats.one_sided_ttest_ge(xs, 90.0) == pytest.approx(expected)
    assert stats.one_sided_ttest_ge([90.5, 90.6, 90.7], 90.0) < 0.01  # clearly above
    assert stats.one_sided_ttest_ge([89.5, 89.6, 89.7], 90.0) > 0.98  # clearly below
    assert stats.one_sided_ttest_ge([90.1, 90.1, 90.1], 90.0) == 0.0  # zero variance, above
    assert stats.one_sided_ttest_ge([90.0, 90.0, 90.0], 90.0) == 1.0  # zero variance, not above


def test_welch_matches_scipy():
    a, b = [100.2, 101.5, 99.8, 100.9], [104.1, 103.2, 105.9]
    result = stats.welch(a, b)
    expected = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    ci = expected.confidence_interval(0.95)
    assert (result["ci95_low"], result["ci95_high"]) == pytest.approx((ci.low, ci.high))
    assert result["dof"] == pytest.approx(expected.df)


def test_welch_identical_and_separated_samples():
    same = stats.welch([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["diff"] == 0.0 and same["p_value"] == pytest.approx(1.0) and same["ci95_low"] < 0 < same["ci95_high"]
    apart = stats.welch([10.0, 10.1, 9.9], [20.0, 20.2, 19.8])
    assert apart["p_value"] < 1e-4 and apart["ci95_high"] < 0
    flat = stats.welch([5.0, 5.0], [6.0, 6.0])
    assert flat == {"diff": -1.0, "ci95_low": -1.0, "ci95_high": -1.0, "p_value": 0.0, "dof": 2.0}


@pytest.mark.parametrize("call", [lambda: stats.summarize([1.0]), lambda: stats.one_sided_ttest_ge([90.5], 90.0),
                                  lambda: stats.welch([1.0], [1.0, 2.0]), lambda: stats.summarize([])])
def test_fewer_than_two_samples_raise(call):
    with pytest.raises(ValueError, match="at least 2 samples"):
        call()


def test_description_cell_escapes_everything_markdown_would_misread():
    assert lb.markdown_cell("a|b\\c\r\nd\tnaïve  e") == "a\\|b\\\\c d na ve e"
    assert lb.markdown_cell("plain text") == "plain text"


########################################
#  7. Every rule a log breaks is listed, and the CLI says what it needs

def _breaks_three_rules(log: dict) -> None:
    _files(lambda name, md5: "0" * 32)(log)
    log["config"]["train_subset"] = 5000
    log["environment"]["device"] = "cpu"


def test_every_broken_rule_of_every_log_is_listed(board, tmp_path, capsys):
    log = make_log(0)
    _breaks_three_rules(log)
    with pytest.raises(lb.Refused) as refusal:
        lb.validate_log(log)
    assert [line.split(": ")[1] for line in refusal.value.lines()] == ["official data", "race settings", "gpu run"]
    logs = [log, make_log(1), make_log(2)]
    logs[2]["eligible"] = False
    paths = write_logs(tmp_path / "bad", logs)
    lines = refused_lines(board, tmp_path, capsys, [*map(str, paths), "--name", "X", "--description", "x"])
    assert [(Path(line.split(": ")[2]).name, line.split(": ")[3]) for line in lines] == [
        (paths[0].name, "official data"), (paths[0].name, "race settings"), (paths[0].name, "gpu run"),
        (paths[2].name, "self-declared eligibility")]


def test_add_help_says_the_description_is_required(capsys):
    with pytest.raises(SystemExit) as done:
        lb.main(["add", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "--name NAME --description DESCRIPTION" in help_text  # no [brackets]: required
    assert "--description DESCRIPTION required:" in help_text
    with pytest.raises(SystemExit) as done:
        lb.main(["add", "a.json", "--name", "X"])
    err = capsys.readouterr().err.splitlines()
    assert done.value.code == 2 and len(err) == 1 and "the following arguments are required: --description" in err[0]


def test_printed_text_is_one_line(board, tmp_path, capsys):
    assert lb.one_line("a\nb\r\x1b[2Jc\u2028d") == "a\\nb\\r\\x1b[2Jc\\u2028d" and lb.one_line("plain é") == "plain é"
    records, _leaderboard, cli = board
    (records / "stray\nname").write_text("x")
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "stray\\nname is not a record folder" in err[0]


########################################
#  8. Config fields an entry adds are flags as the harness makes them

def test_flags_of_fields_an_entry_added_are_accepted():
    log = make_log(0)
    log["config"].update(ema_decay=0.995, lrScale2=2.0, use_ema=True)  # fields of the entry's own Config
    _argv("--ema-decay", "0.995", "--lrScale2=2", "--use-ema", "yes", "--seed", "0")(log)
    lb.validate_log(log)
    for lie, reason in ((("--ema-decay", "0.9"), "argv sets --ema-decay '0.9' but config.ema_decay is 0.995"),
                        (("--ema_decay", "0.995"), "argv item '--ema_decay' is not a --field flag")):
        _argv(*lie)(log)
        with pytest.raises(lb.Refused, match=re.escape(reason)):
            lb.validate_log(log)


########################################
#  9. Near-duplicates: one run under a new id, seed and times

def _near_copy(log: dict, seed: int, loss_shift: float) -> dict:
    copied = _renamed(log, seed)
    for row in copied["epochs"]:
        row["epoch_seconds"] += 0.05  # other times, so only the losses can tell
        row["loss"] += loss_shift
    return finish(copied)


@pytest.mark.parametrize(("shift", "same"), [(4e-5, True), (-9e-5, True), (1e-3, False)])
def test_losses_within_rounding_are_one_run(board, tmp_path, capsys, shift, same):
    _records, _leaderboard, cli = board
    logs = [make_log(0), make_log(1)]
    logs.append(_near_copy(logs[1], 2, shift))
    if same:
        line = refused_logs(board, tmp_path, capsys, logs)
        assert "distinct runs:" in line and "is the same run as" in line and "(same losses)" in line
    else:
        assert add(cli, tmp_path, logs) == 0


def test_a_near_copy_of_a_recorded_run_is_refused(board, tmp_path, capsys):
    _records, _leaderboard, cli = board
    first = [make_log(s) for s in range(3)]
    assert add(cli, tmp_path, first) == 0
    picked = [_near_copy(first[0], 10, 3e-5), make_log(11, epoch_seconds=8.0), make_log(12, epoch_seconds=8.0)]
    assert "one run, one record: this is the same run as 2025-01-02_Baseline/" in refused_logs(
        board, tmp_path, capsys, picked)


########################################
#  10. Dates: check applies add's rules, so one edited folder cannot freeze a table

def _move_record(records: Path, old: str, date: str) -> Path:
    name = old.split("_", 1)[1]
    folder = records / f"{date}_{name}"
    (records / old).rename(folder)
    meta = json.loads((folder / "record.json").read_text())
    meta["date"] = date
    (folder / "record.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


@pytest.mark.parametrize(("date", "reason"), [
    ("2099-01-01", "date 2099-01-01 is in the future"),
    ("2024-12-31", "record date 2024-12-31 is before run"),
    ("2025-02-30", "date '2025-02-30' is not a real date"),
])
def test_check_fails_on_a_record_dated_in_the_future_or_before_its_runs(board, tmp_path, capsys, date, reason):
    records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    _move_record(records, "2025-01-02_Baseline", date)
    assert cli("render") == 1  # nothing publishes it
    capsys.readouterr()
    assert cli("check") == 1
    assert reason in capsys.readouterr().err
    faster = write_logs(tmp_path / "logs2", [make_log(s, epoch_seconds=8.0) for s in range(10, 13)])
    assert "an existing record no longer validates" in refused(
        board, tmp_path, capsys, [*map(str, faster), "--name", "Faster", "--date", "2025-01-03", "--description", "x"])


def test_a_real_date_that_is_not_a_day_fails_check():
    run = lb.validate_log(make_log(0))
    today = lb.today_utc()
    assert lb.date_problems("2025-02-30", [run], today) == ["date '2025-02-30' is not a real date as YYYY-MM-DD"]
    assert lb.date_problems("2025-01-01", [run], today) == []  # the day its runs were made


def test_a_record_dated_the_day_of_its_runs_is_added(board, tmp_path):
    _records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)], date="2025-01-01") == 0  # runs made 2025-01-01
    assert cli("check") == 0


########################################
#  11. The static check: scope-aware, never a RecursionError, linear on hostile text

HONEST_SOURCES = {
    "local variable named like a module": "\ndef helper(x):\n    F = x.features\n    F.weight = 3\n"
                                          "    time = {}\n    time['start'] = 0\n    return F\n",
    "sort on a call result": "\ndef order(n):\n    values = torch.randperm(n).sort()\n    torch.zeros(3)[0] = 1\n"
                             "    return values\n",
    "an object's own __dict__": "\nclass Box:\n    def __init__(self, **kw):\n        self.__dict__.update(kw)\n",
    "a parameter named eval": "\ndef step(model, eval=False):\n    return eval\n",
    "comprehension variable named like a module": "\nnames = [F for F in ('a', 'b')]\n",
    "deep expression in training code": "\ndef lr_sum():\n    return " + "1 + " * 2000 + "1\n",
}
PATCHING_SOURCES = {
    "module alias": ("\nG = F\nG.normalize = lambda x, dim: x\n", "patches torch.nn.functional.normalize"),
    "alias of an alias": ("\nG = F\nH = G\nH.normalize = None\n", "patches torch.nn.functional.normalize"),
    "alias in a function": ("\ndef cheat():\n    g = F\n    g.normalize = None\n",
                            "patches torch.nn.functional.normalize"),
    "import in a function": ("\ndef cheat():\n    import torch.nn.functional as G\n    G.normalize = None\n",
                             "patches torch.nn.functional.normalize"),
    "alias as a default": ("\ndef cheat(m=F):\n    m.normalize = None\n", "patches torch.nn.functional.normalize"),
    "alias made global": ("\ndef a():\n    global g\n    g = torch.Tensor\n\ndef b():\n    g.topk = None\n",
                          "patches torch.Tensor.topk"),
    "setattr on an alias": ("\nm = F\nsetattr(m, 'normalize', None)\n", "patches torch.nn.functional.normalize"),
    "a module's namespace": ("\nvars(F)['normalize'] = None\n", "patches torch.nn.functional.__dict__"),
    "sys.modules": ("\nsys.modules['torch'].topk = None\n", "uses sys.modules"),
    "pinned object in a function": ("\ndef cheat():\n    OFFICIAL_MD5.clear()\n", "modifies the pinned OFFICIAL_MD5"),
    "module namespace by locals()": ("\nlocals()['knn_predict'] = None\n", "uses locals()"),
}


@pytest.mark.parametrize("case", HONEST_SOURCES)
def test_the_static_check_accepts_honest_code(case):
    assert lb.pinning_problems(lb.canonical_source(), HARNESS_SOURCE + HONEST_SOURCES[case]) == ()


@pytest.mark.parametrize("case", PATCHING_SOURCES)
def test_the_static_check_refuses_patches_through_any_alias(case):
    extra, reason = PATCHING_SOURCES[case]
    problems = lb.pinning_problems(lb.canonical_source(), HARNESS_SOURCE + extra)
    assert any(reason in p for p in problems), problems


def test_any_source_python_parses_is_analysed_without_recursion_error():
    """ast.dump and copy.deepcopy recurse; a long sum Python still parses nests deeper than they can go."""
    for depth in (500, 2000):
        try:
            ast.parse("x = " + "1 + " * depth + "1\n")
        except RecursionError:
            continue  # this Python cannot parse it: then the rule refuses it as unparsable
        deep = "1 + " * depth + "1"
        assert lb.pinning_problems(lb.canonical_source(), HARNESS_SOURCE + f"\nx = {deep}\n") == ()
        rebound = lb.pinning_problems(lb.canonical_source(), HARNESS_SOURCE + f"\nOFFICIAL_MD5 = {deep}\n")
        assert rebound == ("differs from the canonical harness in OFFICIAL_MD5",)
    log = with_source(make_log(0), "x = " + "(" * 5000 + ")" * 5000 + "\n")
    with pytest.raises(lb.Refused, match="pinned evaluation: code.source cannot be parsed as Python"):
        lb.validate_log(log)


N = 100_000
HOSTILE_SMI = {  # text -> the GPU rows in it
    "|   0  NVIDIA H200" + " " * N + "x |": [],  # the old regex backtracked over these spaces once per position
    "|   0  NVIDIA H200" + " " * N + "On |": ["NVIDIA H200"],
    "|   0  " + "a " * (N // 2) + "Off |": ["a " * (N // 2 - 1) + "a"],
    "|" + " 0" * (N // 2): [],
    ("|   0  " + " " * 1000 + "\n") * 100: [],
    "Driver Version:" + " " * N: [],
}


@pytest.mark.parametrize("smi", HOSTILE_SMI, ids=range(len(HOSTILE_SMI)))
def test_hostile_nvidia_smi_text_is_read_in_one_pass(smi):
    assert lb.smi_gpu_names(smi) == HOSTILE_SMI[smi]
    log = make_log(0)
    log["environment"]["nvidia_smi"] = smi
    with pytest.raises(lb.Refused, match="^hardware: "):
        lb.validate_log(log)


@pytest.mark.parametrize(("path", "value", "rule"), [
    ("argv", ["--" + "a" * N + "!", "1"], "argv"),
    ("argv", ["--seed", "0", "--" + "a-" * (N // 2) + "=1"], "argv"),
    ("environment.gpu_name", " " * N + "!", "hardware"),
    ("run_id", "a" * N, "log schema"),
    ("created_utc", "2025" * N, "log schema"),
    ("environment.torch", "2." * N, "log schema"),
])
def test_hostile_fields_are_refused_in_one_line(path, value, rule):
    log = make_log(0)
    obj, key = _resolve(log, path)
    obj[key] = value
    with pytest.raises(lb.Refused) as refusal:
        lb.validate_log(log)
    assert str(refusal.value).startswith(f"{rule}: ") and all(len(line) < 1000 and line.isprintable()
                                                              for line in refusal.value.lines())


########################################
#  12. Records proven by recomputation: verify, add --models, the FLOP floor, reproduce

DEVICE = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def resnet18_flops():
    """The FLOP count verify's floor uses for a real ResNet18 (counted once: the counter takes ~1 s per call here)."""
    backbone = ab.CifarResNet("resnet18", 64)
    return backbone, verify.forward_flops(backbone, 32)


@pytest.fixture
def recompute(monkeypatch, resnet18_flops):
    """verify's recomputation without the CIFAR-10 files or the saved models: the FLOP floor is verify's own
    check_time_floor on a real ResNet18; the recomputed accuracy is the logged one plus `shift`, refused beyond
    verify's tolerance as verify refuses it. Call it to change shift or the batch deviation."""
    backbone, flops = resnet18_flops
    real_verify_run = verify.verify_run
    monkeypatch.setattr(verify, "forward_flops", lambda module, px: flops * px * px // 1024)
    monkeypatch.setattr(verify, "load_data", lambda data_dir, device: {"data_dir": data_dir})

    def use(shift: float = 0.03, deviation: float = 2e-7) -> None:
        def verify_run(log, **kwargs):
            inspect.signature(real_verify_run).bind(log, **kwargs)  # called as the real one can be
            assert kwargs["require_official"] and kwargs["data"] == {"data_dir": "cifar"} and kwargs["models_dir"]
            floor = verify.check_time_floor(log, backbone)
            logged = log["result"]["knn_at_stop_pct"]
            if abs(shift) > verify.ACCURACY_TOLERANCE_PCT:
                raise verify.VerifyError("accuracy", f"result.knn_at_stop_pct says {logged:.2f}%, the saved model "
                                                     f"gives {logged + shift:.2f}%")
            return verify.Verification(
                run_id=log["run_id"], model_file=log["model"]["file"], model_format="weights",
                model_sha256=log["model"]["sha256"], device=DEVICE, torch_version="2.11.0+cu128", official_data=True,
                knn_k=10, train_images=50_000, test_images=10_000, logged_knn_pct=logged,
                recomputed_knn_pct=logged + shift, recomputed_final_eval={"knn5_pct": 90.0, "knn10_pct": logged},
                numerics="fp32", tolerance_pct=verify.ACCURACY_TOLERANCE_PCT,
                batch_check=verify.BatchCheck(deviation, 11_000, 64),
                time_floor=floor, seconds=1.0)
        monkeypatch.setattr(verify, "verify_run", verify_run)
    use()
    return use


def add_verified(cli, tmp_path: Path, logs: list[dict], name: str = "Baseline", folder: str = "logs",
                 date: str = "2025-01-02") -> int:
    paths = write_logs(tmp_path / folder, logs)
    return cli("add", *map(str, paths), "--name", name, "--date", date, "--description", "verified",
               "--models", str(tmp_path / "models"), "--data-dir", "cifar")


def test_a_verified_record_states_the_recomputed_numbers_everywhere(board, tmp_path, capsys, recompute,
                                                                    resnet18_flops):
    records, leaderboard, cli = board
    accs = [90.1, 90.25, 90.05]
    logs = [make_log(seed, accs=(88.5, 89.6, acc)) for seed, acc in zip(range(3), accs)]
    assert add_verified(cli, tmp_path, logs) == 0
    assert "verified on NVIDIA H100 80GB HBM3" in capsys.readouterr().out
    folder = records / "2025-01-02_Baseline"
    meta = json.loads((folder / "record.json").read_text())
    recomputed = [a + 0.03 for a in accs]
    assert meta["verified"] is True and meta["knn_mean_pct"] == pytest.approx(np.mean(recomputed))
    assert meta["p_value_knn_gt_target"] == pytest.approx(
        scipy.stats.ttest_1samp(recomputed, 90.0, alternative="greater").pvalue)
    assert meta["reported_knn_mean_pct"] == pytest.approx(np.mean(accs))
    verification = meta["verification"]
    assert verification["device"] == DEVICE and verification["torch"] == "2.11.0+cu128"
    assert verification["tolerance_pct"] == verify.ACCURACY_TOLERANCE_PCT
    # the floor, from the FLOP count of a ResNet18 (FlopCounterMode: 2 per multiply-add) and the H200's peak
    flops = resnet18_flops[1]
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        resnet18_flops[0].eval()(torch.zeros(1, 3, 32, 32))
    assert flops == counter.get_total_flops() and 1.0e9 < flops < 1.2e9  # ResNet18 at 32 px: ~0.56 G multiply-adds
    floor = 50_000 * 2 * 3 * flops / 1979e12
    for log, entry, acc in zip(logs, verification["runs"], recomputed):
        assert entry["log"] == f"{log['run_id']}.json" and entry["model_sha256"] == log["model"]["sha256"]
        assert entry["recomputed_knn_pct"] == pytest.approx(acc) and entry["difference_pct"] == pytest.approx(0.03)
        assert entry["batch_max_deviation"] == 2e-7
        seconds = [row["epoch_seconds"] for row in log["epochs"]]
        assert entry["time_floor"]["epoch_floor_seconds"] == {"32": pytest.approx(floor)}
        assert entry["time_floor"]["margin"] == pytest.approx(min(seconds) / floor)
        assert entry["time_floor"]["fastest_epoch"] == 1 + seconds.index(min(seconds))
    statistics = (folder / "statistics.md").read_text()
    assert "- Verified: yes" in statistics and "kNN at stop, recomputed (%) | 90.163 | 0.104 | 3 |" in statistics
    text = leaderboard.read_text()
    p = scipy.stats.ttest_1samp(recomputed, 90.0, alternative="greater").pvalue
    assert f"| 1 | 2 min 00.1 s ± 0.1 s | 3 | 90.16 ± 0.10 % | {p:.2g} | {DEVICE} | verified | 2025-01-02 |" in text
    capsys.readouterr()
    assert cli("check") == 0


def test_the_flop_floor_refuses_an_impossible_time_and_accepts_a_plausible_one(board, tmp_path, capsys, recompute):
    """A ResNet18 epoch on an H200 needs >= 0.17 s of FLOPs at the chip's peak: 0.05 s is refused, 10 s passes."""
    _records, _leaderboard, cli = board
    impossible = [make_log(s, epoch_seconds=0.05) for s in range(3)]
    paths = write_logs(tmp_path / "fast", impossible)
    lines = refused_lines(board, tmp_path, capsys, [*map(str, paths), "--name", "Fast", "--description", "x",
                                                    "--models", "models", "--data-dir", "cifar"])
    assert len(lines) == 3 and all(": verify: time floor: epoch" in line and "physically impossible" in line
                                   for line in lines)
    assert add_verified(cli, tmp_path, [make_log(s, epoch_seconds=10.0) for s in range(3)]) == 0


def test_add_with_models_runs_verify_itself(board, tmp_path, capsys, fake_cifar_root, one_compute_thread):
    """The real path, nothing replaced: the harness saves each run's model, `add --models` has verify load it, check
    its sha256 and the FLOP floor, then the data. An epoch of 5 ms is impossible for a width-16 ResNet18 at the
    H200's peak (~10 ms of FLOPs): refused; 10 s epochs pass the floor and reach the data check, which the synthetic
    CIFAR-10 fails (the logs claim the official files). Nothing is written."""
    logs = [make_log(0, epoch_seconds=0.005), make_log(1), make_log(2)]
    models = tmp_path / "models"
    models.mkdir()
    for log in logs:
        log["config"]["width"] = 16
        log["model"] = ab.save_backbone(ab.CifarResNet("resnet18", 16), ab.Config(width=16),
                                        str(models / f"{log['run_id']}.model.pt"))
    paths = write_logs(tmp_path / "logs", logs)
    _records, _leaderboard, cli = board
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli("add", *map(str, paths), "--name", "Real", "--description", "x", "--models", str(models),
               "--data-dir", fake_cifar_root, "--device", "cpu") == 1
    assert snapshot(tmp_path) == before
    # the harness's loader warns about the synthetic data on its own line first
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leaderboard: ")]
    assert len(lines) == 3 and all(line.startswith("leaderboard: refused: ") for line in lines)
    assert f"{logs[0]['run_id']}.json: verify: time floor: epoch " in lines[0] and "impossible" in lines[0]
    assert all(": verify: data: " in line for line in lines[1:])


def test_the_floor_of_a_low_resolution_epoch_scales_with_its_pixels(board, tmp_path, capsys, recompute):
    """16 px views cost a quarter of 32 px ones: a 0.1 s epoch is possible at 16 px (floor ~0.04 s), not at 32 px
    (~0.17 s), both for add (verify's floor) and for check (the stored count)."""
    records, _leaderboard, cli = board

    def low_res(seed: int, epochs: int) -> dict:
        log = make_log(seed)
        log["config"].update(low_res_px=16, low_res_epochs=epochs)
        for row in log["epochs"][:4]:
            row["epoch_seconds"] = 0.1
        return finish(log)

    paths = write_logs(tmp_path / "full", [low_res(s, 0) for s in range(3)])
    lines = refused_lines(board, tmp_path, capsys, [*map(str, paths), "--name", "X", "--description", "x",
                                                    "--models", "m", "--data-dir", "cifar"])
    assert len(lines) == 3 and all("time floor: epoch 1 took 0.1 s" in line for line in lines)
    assert add_verified(cli, tmp_path, [low_res(s, 4) for s in range(3)]) == 0
    meta = json.loads((records / "2025-01-02_Baseline" / "record.json").read_text())
    floors = meta["verification"]["runs"][0]["time_floor"]["epoch_floor_seconds"]
    assert floors["16"] == pytest.approx(floors["32"] / 4) and 0.04 < floors["16"] < 0.1 < floors["32"]
    assert cli("check") == 0
    for name in meta["logs"]:  # epoch 4 now claimed at 32 px: below its floor
        path = records / "2025-01-02_Baseline" / name
        path.write_text(path.read_text().replace('"low_res_epochs": 4', '"low_res_epochs": 3'))
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("time floor of" in line and "epoch 4 took 0.1 s" in line for line in err)


def _edit_verification(records: Path, edit) -> None:
    path = records / "2025-01-02_Baseline" / "record.json"
    meta = json.loads(path.read_text())
    edit(meta["verification"])
    path.write_text(json.dumps(meta, indent=2) + "\n")


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda v: v["runs"][0]["time_floor"].update(forward_flops_32px=10**14),
     "time floor of 20250101T000000Z_resnet18_seed0"),  # a floor above the logged epochs: physically impossible
    (lambda v: v["runs"][1]["time_floor"].update(peak_tflops=1.0), "the GPU peak table or the run changed"),
    (lambda v: v["runs"][2].update(recomputed_knn_pct=91.0), "the saved model gives 91.0 %"),
    (lambda v: v["runs"][0].update(model_sha256="0" * 64), "is not the logged model's"),
    (lambda v: v["runs"][0].update(batch_max_deviation=0.5), "features depend on the batch"),
    (lambda v: v.update(tolerance_pct=5.0), "tolerances 5.0 points"),
    (lambda v: v["runs"].pop(), "not the record's logs"),
    (lambda v: v.pop("device"), "verification: missing field device"),
])
def test_check_applies_the_verification_rules(board, tmp_path, capsys, recompute, edit, reason):
    records, _leaderboard, cli = board
    assert add_verified(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    _edit_verification(records, edit)
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err
    assert reason in err and "physically impossible" in err if "floor" in reason else reason in err


def test_an_unverified_record_is_verified_later(board, tmp_path, capsys, recompute):
    """`add` without models stages a record marked unverified; `verify` recomputes it and rewrites its files; a
    verification that fails writes nothing."""
    records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    folder = records / "2025-01-02_Baseline"
    recompute(shift=0.5)
    lines = refused_lines(board, tmp_path, capsys, [str(folder), "--models", "m", "--data-dir", "cifar"], "verify")
    assert len(lines) == 3 and all("verify: accuracy: result.knn_at_stop_pct says" in line for line in lines)
    recompute(shift=-0.02)
    capsys.readouterr()
    assert cli("verify", str(folder), "--models", "m", "--data-dir", "cifar") == 0
    out = capsys.readouterr().out
    assert f"verified {folder} on {DEVICE}" in out and "recomputed 90.08 %, logged 90.10 %" in out
    meta = json.loads((folder / "record.json").read_text())
    assert meta["verified"] and meta["knn_mean_pct"] == pytest.approx(90.08)
    assert "| 90.08 ± 0.00 % | 0 | NVIDIA H100 80GB HBM3 |" in leaderboard.read_text()
    assert not list(records.glob(".*")) and cli("check") == 0


@pytest.mark.parametrize("victim", [".staging-Baseline-record.json", ".staging-Baseline-statistics.md",
                                    ".leaderboard.md"])
def test_verify_whose_write_dies_half_way_leaves_the_previous_state(board, tmp_path, capsys, recompute, monkeypatch,
                                                                    victim):
    records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(lb, "write_synced", _dies_half_way(lb.write_synced, victim))
    assert cli("verify", str(records / "2025-01-02_Baseline"), "--models", "m", "--data-dir", "cifar") == 1
    assert "disk full" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_a_verify_cut_between_its_renames_is_reported_and_repaired(board, tmp_path, capsys, recompute, monkeypatch):
    records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "statistics.md":
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(lb.os, "replace", replace)
    assert cli("verify", str(records / "2025-01-02_Baseline"), "--models", "m", "--data-dir", "cifar") == 1
    monkeypatch.undo()
    assert json.loads((records / "2025-01-02_Baseline" / "record.json").read_text())["verified"] is True
    assert not list(records.glob(".*")) and not list(tmp_path.glob(".leaderboard.md.*"))
    capsys.readouterr()
    assert cli("check") == 1 and "statistics.md does not match" in capsys.readouterr().err
    assert cli("render") == 0 and cli("check") == 0 and "| NVIDIA H100 80GB HBM3 |" in leaderboard.read_text()


def test_reproduce_dry_run_runs_the_records_logged_source(board, tmp_path, capsys, fake_cifar_root, monkeypatch):
    records, _leaderboard, cli = board
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the harness's run: a second thread only spins on a busy machine
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    out = tmp_path / "again"
    capsys.readouterr()
    assert cli("reproduce", str(records / "2025-01-02_Baseline"), "--dry-run", "--folder", str(out),
               "--data-dir", fake_cifar_root) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert "the logged source runs" in lines[-1] and "--seed 3" in lines[0] and "--device cpu" in lines[0]
    assert (out / "airbench_ssl.py").read_text() == HARNESS_SOURCE
    assert cli("check") == 0  # the record is untouched
