"""tools/gpu_check.py on CPU: the --tiny dry run takes every code path a GPU run takes, and the results file keeps
what was measured when a rung fails, the run is cut off, or the reference bench hangs."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import bench_throughput
import gpu_check
import pytest
import torch

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

SECTIONS = ["environment", "data", "peak", "forward", "ladder", "sync_debug", "augmentation", "knn", "profile",
            "kernels", "reference"]
RUNGS = ["eager fp32", "+ channels_last", "+ bf16 autocast", "+ torch.compile (model)", "+ compiled augment = default",
         "default, batch 64", "+ CUDA graphs"]
DEFAULT = 4  # the default rung's place in the ladder


def read(out):
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.txt").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One full dry run, --batch-1024 and --reference included, with the batch shapes each warm-up saw."""
    out, warmed = tmp_path_factory.mktemp("gpu_check"), []
    warm_up = ab.Trainer.warm_up

    def spy(trainer):
        warmed.append(sorted(set(trainer.batch_sizes)))
        return warm_up(trainer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ab.Trainer, "warm_up", spy)
        assert gpu_check.main(["--tiny", "--device", "cpu", "--batch-1024", "--reference", "--out", str(out)]) == 0
    report, text = read(out)
    return out, report, text, warmed


@pytest.mark.slow
def test_dry_run_writes_every_section_and_a_consistent_ladder(dry_run):
    out, report, text, warmed = dry_run
    assert report["status"] == "complete" and report["failed"] == []
    assert [key for key in report if key in SECTIONS] == SECTIONS
    assert not any("error" in report[name] for name in SECTIONS if name != "ladder")
    # every section announced itself in the transcript, in order, before its result
    positions = [text.index(f"== {name} (") for name in SECTIONS]
    assert positions == sorted(positions)
    assert text.rstrip().splitlines()[-1].startswith("complete; nothing failed;")

    ladder = report["ladder"]
    assert [rung["name"] for rung in ladder] == RUNGS
    *timed_rungs, cuda_graphs = ladder
    features = [(r["compiled"], r["augment_compiled"], r["bf16"], r["views_channels_last"], r["compile_backend"])
                for r in timed_rungs]
    assert features == [(False, False, False, False, None), (False, False, False, True, None),
                        (False, False, True, True, None), (True, False, True, True, "aot_eager"),
                        (True, True, True, True, "aot_eager"), (True, True, True, True, "aot_eager")]
    assert cuda_graphs == {"name": "+ CUDA graphs", "batch_size": 32, "skipped": "CUDA graphs need a CUDA GPU"}
    assert [r["batch_size"] for r in ladder] == [32, 32, 32, 32, 32, 64, 32]
    assert warmed == [[32]] * 5 + [[64]]  # 300 images: a tail batch of 12 (or 44) is never compiled
    train_flops = report["forward"]["train_gflop_per_image"] * 1e9
    assert train_flops == pytest.approx(6 * report["forward"]["forward_gflop_per_image"] * 1e9)
    assert 0.012 < report["forward"]["forward_gflop_per_image"] < 0.03  # width 8: ~1/64 of ResNet18's 1.11 GFLOP
    for rung in timed_rungs:
        assert rung["steps"] == 2 and rung["step_ms"] > 0 and rung["warmup_seconds"] >= 0
        assert rung["images_per_second"] == pytest.approx(1000 * rung["batch_size"] / rung["step_ms"])
        assert rung["epoch_seconds"] == pytest.approx(50_000 / rung["images_per_second"])
        assert rung["tflops"] == pytest.approx(train_flops * rung["images_per_second"] / 1e12)
        assert rung["fraction_of_peak"] == pytest.approx(rung["tflops"] / report["peak"]["peak_tflops"])

    assert report["sync_debug"] == {"skipped": "CUDA only: torch.cuda.set_sync_debug_mode checks CUDA "
                                                "synchronisations"}
    augmentation = report["augmentation"]
    assert (augmentation["n_views"], augmentation["batch_size"], augmentation["steps"]) == (2, 32, 2)
    assert augmentation["augmentation_ms"] == pytest.approx(augmentation["step_ms"]
                                                            - augmentation["step_fed_views_ms"])
    assert augmentation["fraction_of_step"] == pytest.approx(augmentation["augmentation_ms"] / augmentation["step_ms"])
    assert augmentation["kernel_ms"] is None and augmentation["views_alone_ms"] > 0  # device time: CUDA only
    assert "% (step fed made views: " in text
    kernels = report["kernels"]
    assert list(kernels["parts"]) == ["augmentation", "forward", "loss", "backward", "optimizer"]
    assert (kernels["compiled"], kernels["augment_compiled"], kernels["compile_backend"]) == (True, True, "aot_eager")
    assert kernels["config"] == dict(arch="resnet18", width=8, batch_size=32, n_views=2)
    assert kernels["step"]["recompiles"] == 0 and "\nper view " in text
    knn = report["knn"]
    assert (knn["n_train"], knn["n_test"], knn["dim"], knn["k"]) == (2000, 500, 64, 10) and knn["seconds"] > 0
    assert 0 <= knn["chance_accuracy_pct"] <= 100
    assert "convolution" in report["profile"]["table"] and "convolution" in text
    assert report["data"]["images"] == 300 and report["peak"]["copy_gb_per_s"] > 0
    assert report["peak"]["warmup_matmuls"] >= 10

    reference = report["reference"]
    bench = json.loads((out / "bench_throughput.json").read_text())
    assert reference["returncode"] == 0 and reference["command"][1].endswith("bench_throughput.py")
    assert reference["speedup_harness_over_reference"] == bench["speedup_harness_over_reference"]
    assert "ratio harness/reference" in reference["output_tail"] and "ratio harness/reference" in text


def test_a_failing_rung_is_recorded_saved_at_once_and_the_rest_still_run(tmp_path, monkeypatch):
    seen_when_compile_rung_began = []

    class Trainer(ab.Trainer):
        def __init__(self, cfg, device, n_train):
            if cfg.bf16 == "on" and cfg.compile == "off":
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            if cfg.compile == "on" and not seen_when_compile_rung_began:
                seen_when_compile_rung_began.append(read(tmp_path))
            super().__init__(cfg, device, n_train)

    monkeypatch.setattr(ab, "Trainer", Trainer)
    assert gpu_check.main(["--tiny", "--device", "cpu", "--compile-backend", "eager", "--out", str(tmp_path)]) == 0
    report, text = read(tmp_path)
    assert report["status"] == "complete" and report["failed"] == ["ladder: + bf16 autocast"]
    ladder = report["ladder"]
    assert [rung["name"] for rung in ladder] == [name for name in RUNGS if name != "default, batch 64"]
    assert ladder[2]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "raise RuntimeError" in ladder[2]["traceback"] and "step_ms" not in ladder[2]
    assert all(rung["step_ms"] > 0 for i, rung in enumerate(ladder[:-1]) if i != 2)
    assert ladder[DEFAULT]["compiled"] and ladder[DEFAULT]["compile_backend"] == "eager"
    assert f"{'+ bf16 autocast':<28} failed: RuntimeError: CUDA out of memory" in text
    # the sections after the ladder ran, with the default rung's trainer
    augmentation = report["augmentation"]
    assert augmentation["fraction_of_step"] == pytest.approx(augmentation["augmentation_ms"] / augmentation["step_ms"])
    assert "convolution" in report["profile"]["table"]
    # and each rung was on disk before the next began
    on_disk, transcript = seen_when_compile_rung_began[0]
    assert on_disk["status"] == "running ladder: + torch.compile (model)"
    assert [rung["name"] for rung in on_disk["ladder"]] == RUNGS[:3] and "error" in on_disk["ladder"][2]
    assert "+ channels_last " in transcript and "augmentation" not in on_disk


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_sections_are_on_disk_before_the_next_begins(tmp_path, monkeypatch, capsys, stop):
    snapshots = []
    monkeypatch.delenv("KINETO_LOG_LEVEL", raising=False)

    def cut_off(arch, width):
        snapshots.append(read(tmp_path))
        raise stop()

    monkeypatch.setattr(bench_throughput, "forward_flops", cut_off)
    argv = ["--tiny", "--device", "cpu", "--out", str(tmp_path)]
    if stop is KeyboardInterrupt:  # Ctrl-C, or SIGTERM from a timeout: recorded, one line, exit 130
        assert gpu_check.main(argv) == 130
        assert capsys.readouterr().err == (f"gpu_check: interrupted; what finished is in {tmp_path}/gpu_check.json\n")
    else:  # anything else that ends the process: the file still holds what finished
        with pytest.raises(SystemExit):
            gpu_check.main(argv)
    on_disk, transcript = snapshots[0]
    assert on_disk["status"] == "running forward"
    assert [key for key in on_disk if key in SECTIONS] == ["environment", "data", "peak"]
    assert on_disk["peak"]["peak_tflops"] > 0 and on_disk["data"]["images"] == 300
    assert "measured peak:" in transcript and transcript.rstrip().splitlines()[-1].startswith("== forward (")
    final, _ = read(tmp_path)
    assert final["status"] == ("interrupted during forward" if stop is KeyboardInterrupt else "running forward")
    assert "forward" not in final and final["peak"] == on_disk["peak"]
    # without a GPU the profiler's own log (a failed GPU query: issue 21) is off before any section profiles
    assert os.environ["KINETO_LOG_LEVEL"] == "6"


def process_gone(pid, deadline_seconds=20):
    """True once pid no longer runs (gone, or a zombie waiting for init to reap it)."""
    end = time.monotonic() + deadline_seconds
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_reference_timeout_is_recorded_and_ends_the_whole_process_group(tmp_path, monkeypatch):
    # a bench that hangs, with a child of its own (as DataLoader workers are) holding the output pipe open
    hang = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '120']); "
            "print('started', child.pid, flush=True); time.sleep(120)")
    monkeypatch.setattr(gpu_check, "reference_command", lambda args, device: [sys.executable, "-c", hang])
    args = argparse.Namespace(out=str(tmp_path), tiny=True, data_dir="", reference_timeout=2.0)
    said = []
    result = gpu_check.run_reference(args, torch.device("cpu"), said.append)
    assert result["error"] == "TimeoutExpired: no result within --reference-timeout 2 s"
    assert result["returncode"] == -9 and result["seconds"] >= 2
    assert result["output_tail"].startswith("started ")
    assert said[1].startswith("  started ")  # relayed as it came, not at the end
    grandchild = int(result["output_tail"].split()[1])
    gone = process_gone(grandchild)
    if not gone:
        os.kill(grandchild, signal.SIGKILL)
    assert gone


def test_reference_failure_is_recorded_in_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "reference_command",
                        lambda args, device: [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"])
    args = argparse.Namespace(out=str(tmp_path), tiny=True, data_dir="", reference_timeout=60.0)
    result = gpu_check.run_reference(args, torch.device("cpu"), lambda line: None)
    assert result["error"] == "bench_throughput.py exited with 2" and result["output_tail"] == "bad flag"


def test_reference_command_is_one_bench_throughput_accepts(tmp_path):
    for tiny in (True, False):
        args = argparse.Namespace(out=str(tmp_path), tiny=tiny, data_dir="/data", reference_timeout=1.0)
        command = gpu_check.reference_command(args, torch.device("cpu"))
        parsed = bench_throughput.build_parser().parse_args(command[2:])
        assert (parsed.json, parsed.data_dir, parsed.device) == (str(tmp_path / "bench_throughput.json"), "/data",
                                                                 "cpu")
        assert (parsed.width, parsed.workers) == ((8, 0) if tiny else (64, os.cpu_count() or 1))


def test_sync_debug_reports_the_offending_harness_line_and_resets_the_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def synchronising_grayscale(x):
        raise RuntimeError("called a synchronizing CUDA operation\nfull stack ...")

    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    assert gpu_check.under_sync_debug(lambda: ab.augment(images, ab.Config())) == {"passed": True}
    monkeypatch.setattr(ab, "grayscale", synchronising_grayscale)
    result = gpu_check.under_sync_debug(lambda: ab.augment(images, ab.Config()))
    assert result["passed"] is False and result["message"] == "called a synchronizing CUDA operation"
    assert result["where"].startswith("airbench_ssl.py:") and " in blend_step: " in result["where"]
    assert "grayscale(x)" in result["where"]

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # not a sync: the section's failure, not a verdict
        gpu_check.under_sync_debug(out_of_memory)
    assert modes == ["error", 0] * 3


def test_without_the_default_rung_the_sections_that_need_it_say_so():
    assert "CUDA only" in gpu_check.sync_debug(None, torch.device("cpu"))["skipped"]
    needs = "'[+] compiled augment = default' rung, which failed"
    with pytest.raises(RuntimeError, match=needs):
        gpu_check.sync_debug(None, torch.device("cuda"))
    with pytest.raises(RuntimeError, match=needs):
        gpu_check.profile_steps(None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match=needs):
        gpu_check.time_augmentation(None, torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_cut_off_mid_ladder_shows_what_finished_and_where_it_was(tmp_path, stop):
    """What `timeout 420 python tools/gpu_check.py ...` does to a run that overruns (SIGTERM), and a machine taken
    away (SIGKILL: nothing runs after it, so only what was already written and flushed survives)."""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # as by default
    proc = subprocess.Popen([sys.executable, gpu_check.__file__, "--tiny", "--device", "cpu", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=buffered)
    try:
        deadline, status = time.monotonic() + 300, ""
        while not status.startswith("running ladder:") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                status = read(tmp_path)[0]["status"]
            except (FileNotFoundError, ValueError):
                pass
        assert status.startswith("running ladder:"), status
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report, text = read(tmp_path)
    assert report["peak"]["peak_tflops"] > 0 and "forward_gflop_per_image" in report["forward"]
    assert "sync_debug" not in report and "== ladder (" in text
    assert "== ladder (" in out  # printed as it went (flushed), not held in a buffer that dies with the process
    if stop == signal.SIGTERM:
        assert proc.returncode == 130
        assert err.splitlines()[-1] == f"gpu_check: interrupted; what finished is in {tmp_path}/gpu_check.json"
        assert report["status"].startswith("interrupted during ladder: ")
        assert text.rstrip().splitlines()[-1].startswith("interrupted during ladder: ")
    else:
        assert proc.returncode == -signal.SIGKILL and report["status"].startswith("running ladder: ")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--reference-timeout", "0"], "--reference-timeout 0.0 must be positive"),
    (["--compile-backend", "no_such_backend"], "--compile-backend 'no_such_backend' is not a torch.compile backend"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gpu_check: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: error: --out ") and "not a writable folder" in err and err.count("\n") == 1
    assert (tmp_path / "file").read_text() == "not a folder"
