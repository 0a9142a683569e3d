"""tools/leaderboard.py and tools/stats.py: records from synthetic run logs, every refusal, safe concurrent writes."""

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import leaderboard as lb  # conftest puts tools/ on sys.path: tools are scripts that import siblings by name
import numpy as np
import pytest
import scipy.stats
import stats

TOOLS = Path(__file__).resolve().parent.parent / "tools"

SOURCE = "# stand-in for airbench_ssl.py\nprint('train')\n"
CHECKS = [8, 10, 12, 14, 16, 18, 20]  # check_first_epoch 8, every 2, epochs 20


def make_log(seed: int = 0, gpu: str = "NVIDIA H200", epoch_seconds: float = 10.0,
             accs: tuple[float, ...] = (88.5, 89.6, 90.1), source: str = SOURCE) -> dict:
    """A valid log: the run checks at epochs 8, 10, 12 and stops at 12, the first check to reach 90 %."""
    config = {"arch": "resnet18", "width": 64, "batch_size": 512, "epochs": 20, "base_lr": 0.06, "grayscale_p": 0.1,
              "train_subset": 0, "target_pct": 90.0, "knn_k": 10, "check_first_epoch": 8, "check_every_epochs": 2,
              "seed": seed, "device": "auto", "data_dir": f"/data/{seed}", "log_dir": "logs"}
    rows, cumulative = [], 0.0
    check_accs = dict(zip(CHECKS, accs))
    last_epoch = CHECKS[len(accs) - 1]
    for epoch in range(1, last_epoch + 1):
        seconds = epoch_seconds + 0.01 * seed
        cumulative += seconds
        knn = check_accs.get(epoch)
        rows.append({"epoch": epoch, "loss": 5.0 - 0.1 * epoch, "lr": 0.06, "epoch_seconds": seconds,
                     "timed_seconds": cumulative, "knn_pct": knn, "knn_seconds": 1.5 if knn is not None else None})
    reached = accs[-1] >= 90.0
    tag = hashlib.sha256(f"{seed} {gpu} {epoch_seconds} {accs}".encode()).hexdigest()[:6]  # one run, one id
    files = {name: {"md5": f"md5-{name}", "expected_md5": f"md5-{name}", "ok": True}
             for name in ("data_batch_1", "test_batch")}
    return {
        "format": "airbench-ssl-log/1", "kind": "train", "run_id": f"20250101T000000Z_resnet18_seed{seed}_{tag}",
        "created_utc": "2025-01-01T00:00:00Z", "argv": ["airbench_ssl.py", "--seed", str(seed)], "config": config,
        "code": {"path": "airbench_ssl.py", "sha256": hashlib.sha256(source.encode("utf-8")).hexdigest(),
                 "source": source},
        "environment": {"python": "3.11.7", "torch": "2.11.0", "torchvision": "0.26.0", "cuda": "12.8", "cudnn": 90800,
                        "driver": "570.0", "device": "cuda", "gpu_name": gpu, "gpu_count": 1, "cpu": "x86_64",
                        "cpu_threads": 16, "hostname": "h", "platform": "Linux", "nvidia_smi": "..."},
        "data": {"data_dir": f"/data/{seed}", "source": "folder", "official": True, "files": files,
                 "train_images": 50000, "test_images": 10000},
        "eligible": True, "ineligible_reasons": [],
        "timing": {"timed": "training epochs", "not_timed": "data load, warmup, kNN checks"},
        "check_epochs": CHECKS, "epochs": rows,
        "untimed_seconds": {"data_load": 1.0, "warmup": 2.0, "knn_checks": 4.5, "final_eval": 0.0},
        "result": {"status": "reached_target" if reached else "max_epochs", "reached_target": reached,
                   "target_pct": 90.0, "epochs_run": last_epoch, "timed_seconds": cumulative,
                   "time_to_target_seconds": cumulative if reached else None, "knn_at_stop_pct": accs[-1],
                   "message": ""},
        "final_eval": None, "total_wall_seconds": cumulative + 10.0,
    }


def write_logs(folder: Path, logs: list[dict]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for log in logs:
        path = folder / f"{log['run_id']}.json"
        path.write_text(json.dumps(log, indent=1))
        paths.append(path)
    return paths


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def board(tmp_path: Path):
    """Paths of an empty repository layout, and a function running the CLI in-process on them."""
    records, leaderboard = tmp_path / "records", tmp_path / "leaderboard.md"
    records.mkdir()

    def cli(*args: str) -> int:
        return lb.main([*args, "--records-dir", str(records), "--leaderboard", str(leaderboard)])

    assert cli("render") == 0
    return records, leaderboard, cli


def add(cli, tmp_path: Path, logs: list[dict], name: str = "Baseline", folder: str = "logs", *extra: str) -> int:
    paths = write_logs(tmp_path / folder, logs)
    return cli("add", *map(str, paths), "--name", name, "--date", "2025-01-02", "--description", "first try", *extra)


########################################
#  Valid logs become a record

def test_valid_logs_become_a_record_and_render(board, tmp_path, capsys):
    records, leaderboard, cli = board
    accs = [90.1, 90.25, 90.05]
    logs = [make_log(seed, accs=(88.5, 89.6, acc)) for seed, acc in zip(range(3), accs)]
    assert add(cli, tmp_path, logs) == 0
    folder = records / "2025-01-02_Baseline"
    for log in logs:
        name = f"{log['run_id']}.json"
        assert (folder / name).read_bytes() == (tmp_path / "logs" / name).read_bytes()
    assert (folder / "README.md").is_file()

    times = [sum(10.0 + 0.01 * seed for _ in range(12)) for seed in range(3)]
    meta = json.loads((folder / "record.json").read_text())
    assert meta["n_runs"] == 3 and meta["gpu_name"] == "NVIDIA H200" and meta["previous_record"] is None
    assert meta["time_mean_seconds"] == pytest.approx(np.mean(times))
    assert meta["time_std_seconds"] == pytest.approx(np.std(times, ddof=1))
    assert meta["knn_mean_pct"] == pytest.approx(np.mean(accs))
    assert meta["knn_std_pct"] == pytest.approx(np.std(accs, ddof=1))
    p_value = scipy.stats.ttest_1samp(accs, 90.0, alternative="greater").pvalue
    assert meta["p_value_knn_gt_target"] == pytest.approx(p_value)
    assert meta["code_sha256"] == hashlib.sha256(SOURCE.encode()).hexdigest()

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
    assert add(cli, tmp_path, [make_log(s) for s in range(3)]) == 0
    faster = [make_log(s, epoch_seconds=8.0) for s in range(10, 14)]
    assert add(cli, tmp_path, faster, "Faster", "logs2") == 0
    statistics = (records / "2025-01-02_Faster" / "statistics.md").read_text()
    assert "Previous record: [2025-01-02_Baseline](../2025-01-02_Baseline/)" in statistics
    assert "Delta in mean time to target: -22.740 s (-18.9 %)" in statistics
    text = leaderboard.read_text()
    assert text.index("2025-01-02_Faster") < text.index("2025-01-02_Baseline")
    assert "| 1 | 1 min 37.4 s" in text and "| 2 | 2 min 00.1 s" in text
    assert cli("check") == 0


########################################
#  Every kind of invalid log is refused with its reason, and nothing is written

def _set(log: dict, path: str, value) -> None:
    *parents, key = path.split(".")
    for p in parents:
        log = log[p]
    log[key] = value


def _edit_source(log: dict) -> None:
    log["code"]["source"] += "# faster\n"


def _other_code(log: dict) -> None:
    log["code"]["source"] = SOURCE + "# other\n"
    log["code"]["sha256"] = hashlib.sha256(log["code"]["source"].encode()).hexdigest()


def _shrink_time(log: dict) -> None:
    log["result"]["timed_seconds"] -= 5.0
    log["result"]["time_to_target_seconds"] -= 5.0
    log["epochs"][-1]["timed_seconds"] -= 5.0


def _shrink_result_only(log: dict) -> None:
    log["result"]["timed_seconds"] -= 5.0
    log["result"]["time_to_target_seconds"] -= 5.0


def _shrink_one_epoch(log: dict) -> None:
    log["epochs"][3]["epoch_seconds"] = 1.0


def _drop_a_check(log: dict) -> None:
    log["epochs"][9]["knn_pct"] = None  # epoch 10 is on the schedule


def _extra_check(log: dict) -> None:
    log["epochs"][8]["knn_pct"] = 89.0  # epoch 9 is not


def _late_stop(log: dict) -> None:
    log["epochs"][9]["knn_pct"] = 90.05  # epoch 10 already reached the target, yet the run went on to 12


def _gap_in_epochs(log: dict) -> None:
    del log["epochs"][4]


def _tampered_schedule(log: dict) -> None:
    log["config"]["check_every_epochs"] = 4  # schedule now 8, 12, 16, 20, but the log checked at 10


def _unofficial(log: dict) -> None:
    log["data"]["official"] = False
    log["data"]["files"]["test_batch"].update(md5="deadbeef", ok=False)


def _unofficial_file_only(log: dict) -> None:
    log["data"]["files"]["test_batch"].update(md5="deadbeef", ok=False)  # flag says official: recheck files


def _knn_mismatch(log: dict) -> None:
    log["result"]["knn_at_stop_pct"] = 91.0


INVALID_SINGLE = {
    "edited source": (_edit_source, "code.sha256 does not match"),
    "unofficial data": (_unofficial, "not the official CIFAR-10 (md5 mismatch: test_batch)"),
    "unofficial file, official flag": (_unofficial_file_only, "not the official CIFAR-10"),
    "cpu run": (lambda log: _set(log, "environment.device", "cpu"), "ran on device 'cpu'"),
    "subset": (lambda log: _set(log, "config.train_subset", 5000), "train_subset is 5000"),
    "easier target": (lambda log: _set(log, "config.target_pct", 85.0), "target_pct is 85.0"),
    "other k": (lambda log: _set(log, "config.knn_k", 200), "knn_k is 200"),
    "flagged ineligible": (lambda log: _set(log, "eligible", False), "marks itself ineligible"),
    "eval log": (lambda log: _set(log, "kind", "eval"), "only training logs"),
    "wrong format": (lambda log: _set(log, "format", "other/2"), "format is 'other/2'"),
    "tampered time": (_shrink_time, "does not match the sum of epoch_seconds"),
    "tampered result time": (_shrink_result_only, "stated time does not match the rows"),
    "tampered epoch": (_shrink_one_epoch, "epoch 4: timed_seconds 40.04 does not match"),
    "missing check": (_drop_a_check, "epoch 10: kNN check missing"),
    "unscheduled check": (_extra_check, "epoch 9: kNN check outside the schedule"),
    "schedule changed": (_tampered_schedule, "differs from the one the config implies"),
    "late stop": (_late_stop, "did not stop at the first check that reached the target (epoch 10"),
    "epoch gap": (_gap_in_epochs, "epoch 6, expected 5"),
    "knn at stop lies": (_knn_mismatch, "knn_at_stop_pct 91.0 differs from the last check 90.1"),
    "missing field": (lambda log: log.pop("environment"), "missing field environment.device"),
}


@pytest.mark.parametrize("case", INVALID_SINGLE)
def test_invalid_log_is_refused_with_reason(board, tmp_path, capsys, case):
    _records, leaderboard, cli = board
    mutate, reason = INVALID_SINGLE[case]
    logs = [make_log(seed) for seed in range(3)]
    mutate(logs[1])
    before = snapshot(tmp_path / "records"), leaderboard.read_bytes()
    capsys.readouterr()
    assert add(cli, tmp_path, logs) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"leaderboard: refused: {tmp_path / 'logs' / logs[1]['run_id']}.json: ")
    assert reason in err[0]
    assert (snapshot(tmp_path / "records"), leaderboard.read_bytes()) == before


def test_run_that_missed_the_target_is_refused(board, tmp_path, capsys):
    records, _leaderboard, cli = board
    logs = [make_log(0), make_log(1, accs=(88.0, 89.0, 89.5, 89.7, 89.8, 89.9, 89.95)), make_log(2)]
    assert add(cli, tmp_path, logs) == 1
    err = capsys.readouterr().err
    assert "run did not reach the target: status 'max_epochs', kNN at stop 89.95 %" in err
    assert lb.record_dirs(records) == []


CROSS_RUN = {
    "too few runs": (lambda logs: logs[:2], "a record needs at least 3 runs, got 2"),
    "mismatched code hash": (lambda logs: [logs[0], logs[1], _with(logs[2], _other_code)], "code sha256"),
    "mixed GPUs": (lambda logs: [logs[0], logs[1], make_log(2, gpu="NVIDIA A100-SXM4-80GB")],
                   "GPU 'NVIDIA A100-SXM4-80GB' differs"),
    "different config": (lambda logs: [logs[0], logs[1], _with(logs[2], _bigger_batch)],
                         "'s: batch_size=1024 vs 512"),
    "duplicate seed": (lambda logs: [logs[0], logs[1], _with(logs[1], _rename)], "duplicate seed 1"),
}


def _with(log: dict, mutate) -> dict:
    log = copy.deepcopy(log)
    mutate(log)
    return log


def _bigger_batch(log: dict) -> None:
    log["config"]["batch_size"] = 1024


def _rename(log: dict) -> None:
    log["run_id"] += "_copy"


@pytest.mark.parametrize("case", CROSS_RUN)
def test_inconsistent_runs_are_refused(board, tmp_path, capsys, case):
    records, leaderboard, cli = board
    select, reason = CROSS_RUN[case]
    logs = select([make_log(seed) for seed in range(3)])
    before = leaderboard.read_bytes()
    capsys.readouterr()
    assert add(cli, tmp_path, logs) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("leaderboard: refused: ") and reason in err[0], err
    assert lb.record_dirs(records) == [] and leaderboard.read_bytes() == before


def test_per_run_paths_may_differ(board, tmp_path):
    _records, _leaderboard, cli = board
    logs = [make_log(seed) for seed in range(3)]
    logs[2]["config"]["save_checkpoint"] = "ckpt.pt"  # a path-like field, not part of the recipe
    assert add(cli, tmp_path, logs) == 0


def test_slower_record_and_reused_runs_are_refused(board, tmp_path, capsys):
    records, leaderboard, cli = board
    logs = [make_log(seed) for seed in range(5)]
    assert add(cli, tmp_path, logs) == 0
    before = snapshot(records), leaderboard.read_bytes()
    capsys.readouterr()
    assert add(cli, tmp_path, [make_log(s, epoch_seconds=10.5) for s in range(10, 13)], "Slower", "slow") == 1
    assert "not faster than 2025-01-02_Baseline (120.240 s) on NVIDIA H200" in capsys.readouterr().err
    assert add(cli, tmp_path, logs[:3], "Picked", "picked") == 1  # the 3 fastest of 5 are faster on average
    assert "already belongs to record 2025-01-02_Baseline" in capsys.readouterr().err
    assert (snapshot(records), leaderboard.read_bytes()) == before


@pytest.mark.parametrize(("name", "date", "reason"), [("bad name", "2025-01-02", "--name 'bad name'"),
                                                      ("Ok", "2025-13-01", "--date '2025-13-01'"),
                                                      ("Ok", "20250102", "--date '20250102'")])
def test_bad_name_or_date_is_refused(board, tmp_path, capsys, name, date, reason):
    records, _leaderboard, cli = board
    paths = write_logs(tmp_path / "logs", [make_log(seed) for seed in range(3)])
    assert cli("add", *map(str, paths), "--name", name, "--date", date) == 1
    assert reason in capsys.readouterr().err and lb.record_dirs(records) == []


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
    _shrink_time(logs[0])
    (records / "2025-01-02_Baseline" / f"{logs[0]['run_id']}.json").write_text(json.dumps(logs[0]))
    capsys.readouterr()
    assert cli("check") == 1
    err = capsys.readouterr().err
    assert "record does not validate" in err and f"{logs[0]['run_id']}.json" in err
    assert cli("render") == 1  # render refuses to publish an invalid record


@pytest.mark.parametrize("file_name", ["record.json", "statistics.md"])
def test_check_fails_on_edited_generated_file(board, tmp_path, capsys, file_name):
    records, _leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    path = records / "2025-01-02_Baseline" / file_name
    text = path.read_text()
    assert "120.12" in text
    path.write_text(text.replace("120.12", "100.12"))
    capsys.readouterr()
    assert cli("check") == 1
    assert f"{path} does not match its logs" in capsys.readouterr().err


########################################
#  Safe writes

def test_concurrent_adds_lose_nothing(board, tmp_path):
    records, leaderboard, cli = board
    commands = []
    for i, gpu in enumerate(["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]):
        paths = write_logs(tmp_path / f"logs{i}", [make_log(seed, gpu=gpu) for seed in range(3)])
        commands.append([sys.executable, str(TOOLS / "leaderboard.py"), "add", *map(str, paths), "--name", f"Run{i}",
                         "--date", "2025-01-02", "--records-dir", str(records), "--leaderboard", str(leaderboard)])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert [p.name for p in lb.record_dirs(records)] == ["2025-01-02_Run0", "2025-01-02_Run1"]
    text = leaderboard.read_text()
    assert "### NVIDIA H200" in text and "### NVIDIA A100-SXM4-80GB" in text
    assert not list(records.glob(".*")) and not list(tmp_path.glob(".leaderboard.md.*"))
    assert cli("check") == 0


def test_concurrent_adds_on_one_gpu_serialize(board, tmp_path):
    """Equal times on one GPU: whichever add takes the lock second is cleanly refused as not faster."""
    records, leaderboard, cli = board
    first = [make_log(seed) for seed in range(3)]
    second = [_with(log, _reseed) for log in first]  # same times, different runs
    commands = []
    for i, logs in enumerate([first, second]):
        paths = write_logs(tmp_path / f"logs{i}", logs)
        commands.append([sys.executable, str(TOOLS / "leaderboard.py"), "add", *map(str, paths), "--name", f"Run{i}",
                         "--date", "2025-01-02", "--records-dir", str(records), "--leaderboard", str(leaderboard)])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    refused = next(err for rc, _, err in results if rc == 1)
    assert refused.startswith("leaderboard: refused: not faster than 2025-01-02_Run"), refused
    assert len(lb.record_dirs(records)) == 1 and not list(records.glob(".*"))
    assert cli("check") == 0


def _reseed(log: dict) -> None:
    log["config"]["seed"] += 100
    log["run_id"] += "_b"


def test_crash_mid_add_leaves_previous_state(board, tmp_path, monkeypatch):
    _records, leaderboard, cli = board
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 0
    before = snapshot(tmp_path / "records"), leaderboard.read_bytes()
    real_write = lb.write_synced

    def crash_on_statistics(path: Path, data: bytes) -> None:
        if path.name == "statistics.md":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(lb, "write_synced", crash_on_statistics)
    assert add(cli, tmp_path, [make_log(s, epoch_seconds=8.0) for s in range(10, 13)], "Faster", "logs2") == 1
    assert (snapshot(tmp_path / "records"), leaderboard.read_bytes()) == before
    assert not list(tmp_path.glob(".leaderboard.md.*"))
    monkeypatch.undo()
    assert cli("check") == 0


def test_crash_before_rename_leaves_previous_state(board, tmp_path, monkeypatch):
    records, leaderboard, cli = board
    before = snapshot(tmp_path / "records"), leaderboard.read_bytes()

    def crash(*args) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(lb.os, "rename", crash)
    assert add(cli, tmp_path, [make_log(seed) for seed in range(3)]) == 1
    assert (snapshot(tmp_path / "records"), leaderboard.read_bytes()) == before
    assert not list(tmp_path.glob(".leaderboard.md.*")) and not list(records.glob(".*"))


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
