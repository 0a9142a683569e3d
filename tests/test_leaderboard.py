"""tools/leaderboard.py and tools/stats.py: records from synthetic run logs, every rule alone, hostile inputs,
cross-record rules, and writes that die half-way."""

import ast
import copy
import dataclasses
import hashlib
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
                  train_subset=0, target_pct=90.0, knn_k=10, seed=seed, device="auto", data_dir=f"/data/{seed}")
    check_accs = dict(zip(CHECKS, accs))
    rows = []
    for epoch in range(1, CHECKS[len(accs) - 1] + 1):
        knn = check_accs.get(epoch)
        rows.append({"epoch": epoch, "loss": 5.0 - 0.1 * epoch + 1e-3 * rng.random(), "lr": 0.06,
                     "epoch_seconds": epoch_seconds + 0.01 * seed + 1e-4 * rng.random(), "timed_seconds": 0.0,
                     "knn_pct": knn, "knn_seconds": 1.5 if knn is not None else None})
    argv = ["--seed", str(seed)]
    log = {
        "format": "airbench-ssl-log/2", "kind": "train",
        "run_id": f"20250101T000000Z_resnet18_seed{seed}_{hashlib.sha256(key.encode()).hexdigest()[:6]}",
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


def refused(board, tmp_path: Path, capsys, args: list[str]) -> str:
    """Run `add` with args; assert it exits 1 with one stderr line and writes nothing; return that line."""
    _records, _leaderboard, cli = board
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli("add", *args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("leaderboard: refused: "), err
    assert snapshot(tmp_path) == before
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
    assert meta["knn_mean_pct"] == pytest.approx(np.mean(accs))
    assert meta["knn_std_pct"] == pytest.approx(np.std(accs, ddof=1))
    p_value = scipy.stats.ttest_1samp(accs, 90.0, alternative="greater").pvalue
    assert meta["p_value_knn_gt_target"] == pytest.approx(p_value)
    assert meta["code_sha256"] == hashlib.sha256(HARNESS_SOURCE.encode()).hexdigest()

    statistics = (folder / "statistics.md").read_text()
    assert "First record on NVIDIA H200." in statistics and "H0: mean kNN accuracy at stop <= 90.0 %" in statistics
    text = leaderboard.read_text()
    assert "### NVIDIA H200" in text and "[2025-01-02_Baseline](records/2025-01-02_Baseline/)" in text
    assert f"| 1 | 2 min 00.1 s ± 0.1 s | 3 | 90.13 ± 0.10 % | {p_value:.2g} | first try | 2025-01-02 |" in text
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
    logs[2]["config"]["save_checkpoint"] = "ckpt.pt"  # a path-like field, not part of the recipe
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


def test_confusable_gpu_name_is_refused(board, tmp_path, capsys):
    logs = [make_log(s, gpu=CONFUSABLE_H200) for s in range(3)]
    assert "hardware: GPU name" in refused_logs(board, tmp_path, capsys, logs)


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
    copied["config"]["seed"] = second[2]["config"]["seed"]
    _argv()(copied)
    (records / "2025-01-03_Faster" / f"{copied['run_id']}.json").write_text(json.dumps(copied))
    capsys.readouterr()
    assert cli("check") == 1
    assert "one run, one record: 2025-01-03_Faster/" in capsys.readouterr().err


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
    line = refused_logs(board, tmp_path, capsys, [with_source(make_log(s), edited) for s in range(3)])
    assert "pinned evaluation: differs from the canonical harness in knn_predict" in line
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
    line = refused(board, tmp_path, capsys, [str(path)] * 3 + ["--name", "X", "--description", "x"])
    assert f"log file: is {lb.MAX_LOG_BYTES + 1} bytes, over the {lb.MAX_LOG_BYTES}-byte limit" in line


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
    assert reason in refused(board, tmp_path, capsys, [*map(str, paths), "--name", name, "--date", date])


def test_log_file_name_must_be_its_run_id(board, tmp_path, capsys):
    logs = [make_log(s) for s in range(3)]
    paths = write_logs(tmp_path / "bad", logs)
    odd = paths[0].with_name("odd\nname.json")
    paths[0].rename(odd)
    line = refused(board, tmp_path, capsys, [str(odd), *map(str, paths[1:]), "--name", "X", "--description", "x"])
    assert "\\n" in line and "log file: the file is named 'odd\\nname.json'" in line


def test_legacy_description_with_control_characters_renders_and_checks(board, tmp_path, capsys):
    """A record written before descriptions were checked (or edited by hand) must not break leaderboard.md nor make
    `check` fail forever: render makes the text one safe cell."""
    records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    meta_path = records / "2025-01-02_Baseline" / "record.json"
    meta = json.loads(meta_path.read_text())
    meta["description"] = "two\r\nlines | and a pipe"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    assert cli("render") == 0
    text = leaderboard.read_bytes().decode()
    assert "\r" not in text and "| two lines \\| and a pipe |" in text
    capsys.readouterr()
    assert cli("check") == 0, capsys.readouterr().err


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
