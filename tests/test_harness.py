"""The harness end to end on CPU: config, schedule, the run loop, its log, and every way a run can go wrong."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

import airbench_ssl as ab

TINY = ["--preset", "recipe", "--device", "cpu", "--width", "8", "--batch-size", "40", "--warmup-steps", "0",
        "--final-evals", "", "--download", "false", "--projector-hidden-dim", "64"]


def run_main(root, tmp_path, *extra):
    log_dir = str(tmp_path / "logs")
    code = ab.main(["--data-dir", root, "--log-dir", log_dir, *TINY, *extra])
    logs = sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []
    return code, [json.load(open(os.path.join(log_dir, name))) for name in logs]


def test_check_schedule_is_fixed_by_config():
    cfg = ab.Config(epochs=50, check_first_epoch=10, check_every_epochs=15)
    assert ab.check_epochs(cfg) == [10, 25, 40, 50]
    assert ab.check_epochs(dataclasses.replace(cfg, check_first_epoch=0, check_every_epochs=50)) == [0, 50]
    assert ab.check_epochs(dataclasses.replace(cfg, check_first_epoch=80)) == [50]  # the last epoch is always checked


def test_cosine_schedule_matches_torch_scheduler():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)
    for epoch in range(7):
        assert ab.cosine_lr(0.06, epoch, 7) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_run_stops_at_first_check_reaching_target_and_writes_a_full_log(fake_cifar_root, tmp_path):
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "6", "--check-first-epoch", "1",
                          "--check-every-epochs", "1", "--target-pct", "20")
    assert code == 0 and len(logs) == 1
    log = logs[0]
    result = log["result"]
    assert result["status"] == "reached_target" and result["reached_target"]
    rows = log["epochs"]
    # the synthetic classes are separable by colour: some check reaches 20% early, and the run stops right there
    assert rows[-1]["knn_pct"] >= 20 and all(r["knn_pct"] < 20 for r in rows[:-1])
    assert result["epochs_run"] == rows[-1]["epoch"] < 6
    assert result["timed_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in rows))
    assert result["time_to_target_seconds"] == result["timed_seconds"] == rows[-1]["timed_seconds"]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in rows)
    # self-contained: the exact source, its hash, the resolved config, versions and hardware
    assert log["code"]["source"] == open(os.path.join(ROOT, "airbench_ssl.py"), encoding="utf-8").read()
    assert log["code"]["sha256"] == hashlib.sha256(log["code"]["source"].encode()).hexdigest()
    assert log["config"]["width"] == 8 and log["config"]["target_pct"] == 20
    assert log["environment"]["torch"] == torch.__version__ and log["environment"]["device"] == "cpu"
    assert log["eligible"] is False and "not run on a GPU" in log["ineligible_reasons"]
    assert log["data"]["official"] is False
    assert set(log["untimed_seconds"]) == {"data_load", "warmup", "knn_checks", "final_eval"}
    assert "timed" in log["timing"] and "not_timed" in log["timing"]


def test_run_that_misses_the_target_says_so(fake_cifar_root, tmp_path, capsys):
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "2", "--check-first-epoch", "0",
                          "--check-every-epochs", "2", "--target-pct", "100")
    assert code == 0
    result = logs[0]["result"]
    assert result["status"] == "max_epochs" and not result["reached_target"]
    assert result["time_to_target_seconds"] is None and result["epochs_run"] == 2
    assert [r["epoch"] for r in logs[0]["epochs"]] == [0, 1, 2]
    assert [r["knn_pct"] is not None for r in logs[0]["epochs"]] == [True, False, True]
    assert "TARGET NOT REACHED" in capsys.readouterr().out


def test_seeded_runs_repeat_exactly(fake_cifar_root, tmp_path):
    losses = []
    for attempt in range(2):
        _, logs = run_main(fake_cifar_root, tmp_path / str(attempt), "--epochs", "2", "--check-first-epoch", "2",
                           "--target-pct", "100", "--seed", "3")
        losses.append([r["loss"] for r in logs[0]["epochs"]] + [logs[0]["epochs"][-1]["knn_pct"]])
    assert losses[0] == losses[1]


def test_warm_up_trains_nothing(fake_cifar_root):
    cfg = ab.Config(device="cpu", width=8, batch_size=30, warmup_steps=2)
    torch.manual_seed(0)
    trainer = ab.Trainer(cfg, torch.device("cpu"), 100)  # 100 = 3 x 30 + 10: warm-up sees both batch shapes
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.warm_up()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.optimizer.state_dict()["state"] == {}


def test_nan_loss_fails_loudly_and_keeps_the_log(fake_cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ab, "info_nce", lambda z, temperature: z.sum() * float("nan"))
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "3", "--check-first-epoch", "3", "--target-pct", "100")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("airbench_ssl: error: loss became nan in epoch 1")
    assert logs[0]["result"]["status"] == "failed" and len(logs[0]["epochs"]) == 1


def test_interrupted_run_keeps_finished_epochs(fake_cifar_root, tmp_path, monkeypatch, capsys):
    real_epoch = ab.Trainer.train_epoch

    def interrupt_second(self, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *args)

    monkeypatch.setattr(ab.Trainer, "train_epoch", interrupt_second)
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "4", "--check-first-epoch", "4",
                          "--target-pct", "100")
    assert code == 1
    assert "interrupted" in capsys.readouterr().err
    assert logs[0]["result"]["status"] == "interrupted" and [r["epoch"] for r in logs[0]["epochs"]] == [1]


def test_logs_are_never_overwritten(tmp_path):
    cfg = ab.Config(log_dir=str(tmp_path))
    first = ab.reserve_log_path(cfg)
    ab.write_json_atomic(first, {"keep": 1})
    second = ab.reserve_log_path(cfg)
    assert first != second and json.load(open(first)) == {"keep": 1}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp_")]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "log.json")
    ab.write_json_atomic(path, {"v": 1})
    with pytest.raises(TypeError):
        ab.write_json_atomic(path, {"v": object()})  # not serialisable: fails half-way
    assert json.load(open(path)) == {"v": 1} and os.listdir(tmp_path) == ["log.json"]


def test_config_file_and_flags_override_in_order(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"_note": "ignored", "batch_size": 1024, "grayscale_p": 0.2, "epochs": 7}))
    args = ab.build_parser().parse_args(["--config", str(config_file), "--epochs", "9"])
    cfg = ab.config_from_args(args, cuda_available=True)
    assert (cfg.batch_size, cfg.grayscale_p, cfg.epochs, cfg.width) == (1024, 0.2, 9, 64)


def test_without_gpu_the_default_is_the_cpu_demo():
    args = ab.build_parser().parse_args([])
    assert ab.config_from_args(args, cuda_available=False).width == ab.CPU_DEMO["width"]
    assert ab.config_from_args(args, cuda_available=True) == ab.Config()
    recipe = ab.build_parser().parse_args(["--preset", "recipe"])
    assert ab.config_from_args(recipe, cuda_available=False) == ab.Config()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size=0 must be > 0"),
    (["--grayscale-p", "1.5"], "grayscale_p=1.5 must be a probability"),
    (["--arch", "vgg"], "arch='vgg'"),
    (["--final-evals", "knn3"], "final_evals has ['knn3']"),
    (["--check-first-epoch", "-1"], "check_first_epoch=-1 must be >= 0"),
    (["--data-dir", "/nonexistent/cifar", "--download", "false"], "CIFAR-10 not found in /nonexistent/cifar"),
])
def test_bad_input_is_one_line_and_nonzero_exit(flags, message, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "airbench_ssl.py"), "--device", "cpu",
                           "--log-dir", str(tmp_path), *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("airbench_ssl: error: ") and message in lines[0]
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_bad_config_file_values_are_refused(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"epochs": "many"}))
    with pytest.raises(ab.HarnessError, match="epochs='many' should be of type int"):
        ab.config_from_args(ab.build_parser().parse_args(["--config", str(config_file)]), True)
    config_file.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ab.HarnessError, match="unknown fields"):
        ab.config_from_args(ab.build_parser().parse_args(["--config", str(config_file)]), True)


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ab.main(["--no-such-field", "1"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_real_data_runs_end_to_end(real_cifar_root, tmp_path):
    code, logs = run_main(real_cifar_root, tmp_path, "--train-subset", "200", "--epochs", "1",
                          "--check-first-epoch", "1", "--target-pct", "100", "--eval-batch-size", "2000")
    assert code == 0
    assert logs[0]["data"]["train_images"] == 50000 and logs[0]["data"]["official"] is False
    assert 10 < logs[0]["epochs"][-1]["knn_pct"] < 100


def test_sigterm_is_logged_as_an_interruption(fake_cifar_root, tmp_path):
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "airbench_ssl.py"), "--data-dir", fake_cifar_root,
                             "--log-dir", str(log_dir), *TINY, "--epochs", "500", "--target-pct", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the run has logged a finished epoch, then stop it
            logs = list(log_dir.glob("*.json")) if log_dir.exists() else []
            if logs and os.path.getsize(logs[0]) and json.load(open(logs[0]))["epochs"]:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    log = json.load(open(logs[0]))
    assert proc.returncode == 1 and "interrupted (Ctrl-C or SIGTERM)" in err
    assert log["result"]["status"] == "interrupted" and len(log["epochs"]) >= 1


def test_final_evaluation_reuses_the_last_checks_features(fake_cifar_root, tmp_path, monkeypatch):
    extractions = []
    real_features = ab.backbone_features
    monkeypatch.setattr(ab, "backbone_features", lambda *a: extractions.append(1) or real_features(*a))
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "2", "--check-first-epoch", "2", "--target-pct",
                          "100", "--final-evals", "knn5,knn10")
    assert code == 0 and len(extractions) == 1  # one check, and the final table did not extract again
    final = logs[0]["final_eval"]
    assert final["knn10_pct"] == logs[0]["epochs"][-1]["knn_pct"] and final["knn5_pct"] is not None
