"""End to end: a log the harness really wrote goes through the leaderboard's validator.

A CPU run on a tiny dataset can never be a record, so the test overrides exactly what such a run cannot have: the
GPU (device, CUDA version, name, nvidia-smi, driver), the official data (md5s and image counts) and the eligibility
the harness derived from those two. Everything else is the harness's own output: its source, argv, config, rows,
seconds and result. The log must pass, and fail after any single cross-checked field is tampered with.
"""

import copy
import hashlib
import json
import os
import subprocess
import sys

import leaderboard as lb
import pytest
from conftest import ROOT

import airbench_ssl as ab

SMI = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:18:00.0 Off |                    0 |
+-----------------------------------------+------------------------+----------------------+
"""


@pytest.fixture(scope="module")
def harness_log(easy_cifar_root, tmp_path_factory):
    """A real run, as a user starts it, that reaches the target: -> (the log with the CPU-only overrides, its path)."""
    root, log_dir = easy_cifar_root, tmp_path_factory.mktemp("logs")
    argv = ["--preset", "recipe", "--width", "8", "--batch-size", "40", "--projector-hidden-dim", "64", "--epochs",
            "3", "--check-first-epoch", "1", "--check-every-epochs", "1", "--seed", "0", "--download", "false",
            "--data-dir", root, "--log-dir", str(log_dir)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "airbench_ssl.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    (path,) = log_dir.glob("*.json")
    log = json.loads(path.read_text())
    assert log["result"]["status"] == "reached_target" and log["eligible"] is False
    log["environment"].update(device="cuda", cuda="12.8", gpu_name="NVIDIA H200", gpu_names=["NVIDIA H200"],
                              gpu_count=1, driver="570.86.15", nvidia_smi=SMI)
    log["data"].update(official=True, train_images=50_000, test_images=10_000)
    log["data"]["files"] = {name: dict(md5=md5, expected_md5=md5, ok=True) for name, md5 in ab.OFFICIAL_MD5.items()}
    log.update(eligible=True, ineligible_reasons=[])
    return log, path


def test_a_harness_written_log_passes_the_validator(harness_log, tmp_path):
    log, path = harness_log
    run = lb.validate_log(copy.deepcopy(log))
    assert run.run_id == log["run_id"] and run.gpu_model == "NVIDIA H200" and run.world_size == 1
    assert run.time_to_target_seconds == pytest.approx(log["result"]["time_to_target_seconds"])
    written = tmp_path / path.name  # and as a file, under the name the harness gave it
    written.write_text(json.dumps(log))
    assert lb.validate_log(written).run_id == log["run_id"]


def set_path(log, dotted, change):
    *parents, last = dotted.split(".")
    node = log
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    node[key] = change(node[key])


# One field at a time, each cross-checked by some rule: (field, change, the rule that must refuse it).
TAMPERING = [
    ("epochs.0.epoch_seconds", lambda v: v / 2, "timed seconds"),
    ("epochs.0.timed_seconds", lambda v: v / 2, "timed seconds"),
    ("result.time_to_target_seconds", lambda v: v / 2, "timed seconds"),
    ("result.timed_seconds", lambda v: v / 2, "timed seconds"),
    ("epochs.0.knn_pct", lambda v: 89.9, "stop rule"),
    ("result.knn_at_stop_pct", lambda v: v - 1, "stop rule"),
    ("result.status", lambda v: "max_epochs", "stop rule"),
    ("epochs.0.knn_seconds", lambda v: v + 5, "untimed seconds"),
    ("untimed_seconds.knn_checks", lambda v: v + 5, "untimed seconds"),
    ("total_wall_seconds", lambda v: v / 100, "untimed seconds"),
    ("config.seed", lambda v: v + 1, "argv"),
    ("config.epochs", lambda v: v + 1, "argv"),
    ("config.batch_size", lambda v: v * 2, "argv"),
    ("config.train_subset", lambda v: 512, "race settings"),
    ("config.target_pct", lambda v: 80.0, "race settings"),
    ("argv.1", lambda v: "cpu_demo", "argv"),
    ("code.source", lambda v: v.replace("knn_k", "knn_k ", 1), "source hash"),
    ("code.sha256", lambda v: "0" * 64, "source hash"),
    ("data.files.test_batch.md5", lambda v: "0" * 32, "official data"),
    ("data.train_images", lambda v: 5_000, "official data"),
    ("environment.device", lambda v: "cpu", "gpu run"),
    ("environment.gpu_name", lambda v: "NVIDIA H100 80GB HBM3", "hardware"),
    ("environment.driver", lambda v: "999.0", "hardware"),
    ("ineligible_reasons", lambda v: ["not run on a GPU"], "self-declared eligibility"),
    ("format", lambda v: "airbench-ssl-log/1", "schema"),
    ("model.file", lambda v: "other_" + v, "model artefact"),
    ("model.format", lambda v: "export", "model artefact"),
    ("model", lambda v: None, "model artefact"),
    ("config.save_model", lambda v: "false", "model artefact"),
]


@pytest.mark.parametrize("field, change, rule", TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_with_any_cross_checked_field_is_refused(harness_log, field, change, rule):
    log = copy.deepcopy(harness_log[0])
    set_path(log, field, change)
    with pytest.raises(lb.Refused, match=rule):
        lb.validate_log(log)


def test_the_logged_model_is_the_file_the_harness_saved(harness_log):
    """What a record keeps of the model, its sha256 and size, is that of the file beside the log."""
    log, path = harness_log
    run = lb.validate_log(copy.deepcopy(log))
    artefact = path.with_name(run.model["file"])
    assert run.model["format"] == "weights" and run.model["bytes"] == artefact.stat().st_size
    assert run.model["sha256"] == hashlib.sha256(artefact.read_bytes()).hexdigest()


def test_a_renamed_log_file_is_refused(harness_log, tmp_path):
    log, path = harness_log
    renamed = tmp_path / ("x" + path.name)
    renamed.write_text(json.dumps(log))
    with pytest.raises(lb.Refused, match="run_id"):
        lb.validate_log(renamed)
