"""What a user sees of the harness: --help, the transcript (every accuracy names what it measured), progress on a
terminal only, and files written with the user's permissions, whatever the path (torchrun's one error line:
tests/test_distributed.py)."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")
SCRIPT = os.path.join(ROOT, "airbench_ssl.py")
TINY = ["--preset", "recipe", "--device", "cpu", "--width", "8", "--batch-size", "40", "--train-subset", "80",
        "--projector-hidden-dim", "32", "--projector-out-dim", "16", "--download", "false", "--epochs", "1",
        "--check-first-epoch", "1", "--target-pct", "100"]


def field_comments():
    """Each Config field's comment, read from the source independently of the harness: text after '  # ' on the
    field's line, plus comment-only lines below it."""
    source = open(SCRIPT, encoding="utf-8").read()
    body = source[source.index("class Config:"):source.index("\nCPU_DEMO")].splitlines()[1:]
    comments, name = {}, None
    for line in body:
        code, _, comment = line.partition("  # ")
        if code.strip():
            name = code.split(":")[0].strip()
        if name and comment:
            comments[name] = (comments.get(name, "") + " " + comment.strip()).strip()
    return comments


@pytest.mark.parametrize("cuda_available", [False, True])
def test_help_shows_every_fields_description_range_and_the_default_in_force(cuda_available):
    text = " ".join(ab.build_parser(cuda_available).format_help().split())  # argparse wraps: compare unwrapped
    comments = field_comments()
    assert set(comments) == {f.name for f in ab.dataclasses.fields(ab.Config)}  # every field is documented
    assert "(default: None)" not in text and "default None" not in text
    preset = "recipe" if cuda_available else "cpu_demo"
    assert f"Defaults shown: the {preset} preset" in text
    for f in ab.dataclasses.fields(ab.Config):
        flag = "--" + f.name.replace("_", "-")
        lo, hi = f.metadata.get("bounds", (None, None))
        choices = f.metadata.get("choices") or (("true", "false") if f.type is bool else None)
        allowed = "{" + ",".join(choices) + "}" if choices else f"[{lo}..{hi}]" if lo is not None else "TEXT"
        default = ab.CPU_DEMO.get(f.name, f.default) if not cuda_available else f.default
        entry = text[text.index(f"{flag} {allowed}"):]
        assert entry.startswith(f"{flag} {allowed} {comments[f.name]} (default {json.dumps(default)}"), flag
        if default != f.default:  # the preset's value first, the recipe's beside it
            assert entry.startswith(f"{flag} {allowed} {comments[f.name]} (default {json.dumps(default)}; recipe "
                                    f"{json.dumps(f.default)})")


def test_the_transcript_names_what_every_accuracy_measured(fake_cifar_root, tmp_path, capsys):
    code = ab.main(["--data-dir", fake_cifar_root, "--log-dir", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert code == 0
    (log,) = [json.load(open(tmp_path / name)) for name in os.listdir(tmp_path) if name.endswith(".json")]
    measured = "60 test images vs 80 training images"  # the fake test set is 60 images; train_subset 80
    lines_with_pct = [line for line in out.splitlines() if re.search(r"\d%", line) or "knn_pct:" in line]
    assert lines_with_pct and all(measured in line or re.match(r" +\d+ ", line) for line in lines_with_pct)
    assert f"knn_pct: kNN k=10 accuracy of the {measured}" in out  # the table's column, named once above it
    assert (log["data"]["knn_test_images"], log["data"]["trained_on_images"]) == (60, 80)
    assert f"model: {tmp_path / log['model']['file']}" in out  # where the model went
    # the resolved config: only what differs from the recipe, readably; the log keeps every field
    (config_line,) = [line for line in out.splitlines() if line.startswith("config: ")]
    assert "width=8" in config_line and "temperature" not in config_line and len(config_line) < 400
    assert len(log["config"]) == len(ab.dataclasses.fields(ab.Config))


def test_the_cpu_demo_promises_its_time_only_as_configured(fake_cifar_root, tmp_path, monkeypatch, capsys):
    def banner(*flags):
        monkeypatch.setattr(ab, "load_cifar10", lambda *a, **k: (_ for _ in ()).throw(ab.HarnessError("stop here")))
        ab.main(["--device", "cpu", "--log-dir", str(tmp_path), *flags])
        return capsys.readouterr().out

    assert "~4 min on 2 cores" in banner("--preset", "cpu_demo", "--seed", "3", "--data-dir", "x")
    assert "~4 min on 2 cores" not in banner("--preset", "cpu_demo", "--epochs", "100")
    assert "~4 min on 2 cores" not in banner("--preset", "recipe")
    assert "No CUDA GPU" in banner("--preset", "recipe")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_shows_on_a_terminal_only_and_clears_itself(terminal, monkeypatch):
    clock = iter(range(0, 1000, 3))  # every reading 3 s later: the work counts as slow from the first item
    monkeypatch.setattr(ab.time, "perf_counter", lambda: next(clock))
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    assert list(ab.counted("step", "abcd")) == list("abcd")  # the items pass through unchanged
    if not terminal:
        assert stderr.getvalue() == ""
        return
    updates = stderr.getvalue().split("\r")[1:]
    assert updates[:3] == ["step 1/4, ~9 s left\033[K", "step 2/4, ~6 s left\033[K", "step 3/4, ~3 s left\033[K"]
    assert updates[3] == "\033[K"  # done: the line is cleared for the table row that follows


def test_an_epoch_and_a_knn_check_show_progress_on_a_terminal(monkeypatch):
    cfg = ab.Config(device="cpu", width=8, projector_hidden_dim=16, projector_out_dim=8, batch_size=4, epochs=2)
    trainer, stderr = ab.Trainer(cfg, torch.device("cpu"), 10), FakeTerminal()
    clock = iter(range(0, 10**6, 5))
    monkeypatch.setattr(ab.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(sys, "stderr", stderr)
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    trainer.train_epoch(0, images, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    ab.extract_features(trainer.model.backbone, images, batch_size=4)
    shown = stderr.getvalue()
    assert "epoch 1: step 1/3" in shown and "features: batch 1/3" in shown and shown.endswith("\r\033[K")


def test_logs_and_models_get_the_users_permissions(fake_cifar_root, tmp_path):
    old = os.umask(0o027)
    try:
        assert ab.main(["--data-dir", fake_cifar_root, "--log-dir", str(tmp_path), *TINY]) == 0
    finally:
        os.umask(old)
    modes = {name.rsplit(".", 2)[-2] if name.endswith(".model.pt") else "log": os.stat(tmp_path / name).st_mode & 0o777
             for name in os.listdir(tmp_path)}
    assert modes == {"log": 0o640, "model": 0o640}  # 0o666 & ~umask, as for any file the user creates


@pytest.mark.parametrize("case", ["nul in a path", "huge", "endless", "a folder"])
def test_config_files_that_are_not_configs_are_one_line(case, tmp_path, capsys):
    path = tmp_path / "c.json"
    if case == "nul in a path":
        path.write_text(json.dumps({"data_dir": "data\u0000/x"}))
    elif case == "huge":
        path.write_text(json.dumps({"_note": "x" * (2 << 20)}))
    elif case == "a folder":
        path.mkdir()
    config = "/dev/zero" if case == "endless" else str(path)
    code = ab.main(["--config", config, "--log-dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("airbench_ssl: error: ") and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_a_path_the_terminal_cannot_print_loses_nothing(fake_cifar_root, tmp_path):
    """A log folder whose name is not UTF-8, printed to an ASCII-only stdout: the run finishes and keeps its files."""
    log_dir = os.fsdecode(bytes(tmp_path) + b"/logs-\xff-\xc3\xa9")
    result = subprocess.run([sys.executable, SCRIPT, "--data-dir", fake_cifar_root, "--log-dir", log_dir, *TINY],
                            capture_output=True, env=dict(os.environ, PYTHONIOENCODING="ascii", OMP_NUM_THREADS="1"),
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"logs-\\udcff-\\xe9" in result.stdout or b"logs-\\udcff-\\udcc3\\udca9" in result.stdout
    names = os.listdir(log_dir)
    assert len(names) == 2 and json.load(open(os.path.join(log_dir, min(names))))["result"]["status"] == "max_epochs"
