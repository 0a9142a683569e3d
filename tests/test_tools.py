"""tools/bench_throughput.py, tools/compare.py and tools/plot.py on CPU: tiny settings, synthetic logs, a stand-in
harness for the multi-GPU scheduling of `compare.py run --gpus`, and tiny training runs on synthetic data."""

import contextlib
import dataclasses
import io
import json
import os
import stat
import time
import types

import bench_throughput
import compare
import matplotlib.colors
import matplotlib.image
import plot
import pytest
import torch
from scipy.stats import ttest_ind

import airbench_ssl as ab

TINY_BENCH = ["--device", "cpu", "--width", "8", "--batch-size", "16", "--steps", "2", "--repeats", "1",
              "--workers", "0", "--peak-size", "256"]


pytestmark = pytest.mark.usefixtures("one_compute_thread")
RESNET34_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "baselines",
                               "resnet34.json")  # a JSON file that is not a run log


def conv_linear_macs(model, x):
    """Multiply-accumulates of every Conv2d and Linear, from their output shapes (hooks): the obvious count."""
    total = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total.append(output.numel() * module.in_channels // module.groups * kh * kw)
        else:
            total.append(output.numel() * module.in_features)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model.eval()([x])
    for h in handles:
        h.remove()
    return sum(total)


def test_forward_flops_count_matches_hooks_and_the_published_resnet18_figure():
    flops = bench_throughput.forward_flops("resnet18", 64)
    assert flops == 2 * conv_linear_macs(ab.make_model("resnet18", 64), torch.zeros(1, 3, 32, 32))
    assert flops / 2 == pytest.approx(0.556e9, rel=0.01)  # CIFAR ResNet18: ~0.56 GMACs per image
    assert bench_throughput.forward_flops("resnet18", 8) == 2 * conv_linear_macs(ab.make_model("resnet18", 8),
                                                                                 torch.zeros(1, 3, 32, 32))


def test_peak_matmul_is_timed_only_after_a_warm_up_of_at_least_ten_matmuls_and_the_asked_seconds(monkeypatch):
    clock = iter(i * 0.25 for i in range(10**6))  # each reading a quarter second later
    monkeypatch.setattr(bench_throughput.time, "perf_counter", lambda: next(clock))
    flops, what, warmups = bench_throughput.measured_peak_flops(torch.device("cpu"), 16, repeats=2)
    assert warmups == 10 and flops > 0 and what == "float32 matmul 16x16x16"  # CPU default: no seconds, 10 matmuls
    _, _, warmups = bench_throughput.measured_peak_flops(torch.device("cpu"), 16, repeats=2, warmup_seconds=2.0)
    assert warmups == 80  # one clock reading per 10 matmuls: 2 s of 0.25 s readings


def test_bench_throughput_tiny_on_cpu_prints_both_sides_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_throughput.main([*TINY_BENCH, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "harness" in text and "ratio harness/reference" in text
    r = json.loads(out.read_text())
    assert r["images_per_round"] == 32 and r["steps_per_round"] == 2
    for side in ("reference", "harness"):
        s = r[side]
        assert s["median_round_seconds"] == r["round_seconds"][side][0] > 0
        assert s["images_per_second"] == pytest.approx(32 / s["median_round_seconds"])
        assert s["seconds_per_epoch"] == pytest.approx(50_000 / s["images_per_second"])
        assert s["tflops"] * 1e12 == pytest.approx(6 * r["forward_flops_per_image"] * s["images_per_second"])
        assert s["fraction_of_peak"] == pytest.approx(s["tflops"] * 1e12 / r["peak_flops"])
    ratio = r["harness"]["images_per_second"] / r["reference"]["images_per_second"]
    assert r["speedup_harness_over_reference"] == pytest.approx(ratio)
    assert f"{ratio:.2f}x" in text


def test_bench_throughput_bad_input_is_one_line(capsys):
    assert bench_throughput.main([*TINY_BENCH, "--repeats", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "bench_throughput: error: --repeats out of range (see --help)\n"


########################################
#  compare.py on synthetic logs

V1, V2 = "airbench-ssl-log/1", "airbench-ssl-log/2"
AT_STOP = "kNN k=10 accuracy at stop (test set vs the run's training images)"
AT_EPOCH_5 = "kNN k=10 accuracy after epoch 5 (test set vs the run's training images)"


def make_log(name, seed, seconds, knn, reached=True, log_format=V2, **config):
    """A run log in the harness's format: checks after epochs 5 and 10, stopping at 10. Format /1 also listed
    the check epochs; /2 has only the rows (kNN checks are the rows with a knn_pct)."""
    cfg = dict(dataclasses.asdict(ab.Config()), seed=seed, **config)
    rows = [dict(epoch=e, loss=5.0, lr=0.06, epoch_seconds=seconds / 10, timed_seconds=seconds * e / 10,
                 knn_pct=(knn - 1 if e == 5 else knn) if e in (5, 10) else None, knn_seconds=None)
            for e in range(1, 11)]
    log = dict(format=log_format, kind="train", run_id=name, config=cfg,
               code=dict(sha256="ab" * 32), environment=dict(device="cuda", gpu_name="NVIDIA H200"), epochs=rows,
               result=dict(status="reached_target" if reached else "max_epochs", reached_target=reached,
                           target_pct=90.0, epochs_run=10, timed_seconds=seconds,
                           time_to_target_seconds=seconds if reached else None, knn_at_stop_pct=knn))
    if log_format == V1:
        log["check_epochs"] = [5, 10]
    return log


def write_log(folder, name, seed, seconds, knn, reached=True, log_format=V2, **config):
    path = os.path.join(folder, name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(make_log(name, seed, seconds, knn, reached, log_format, **config), f)
    return path


def side(tmp_path, label, times, accs, log_format=V2, **config):
    return [write_log(str(tmp_path), f"{label}{i}", i, t, a, log_format=log_format, **config)
            for i, (t, a) in enumerate(zip(times, accs))]


def run_compare(capsys, *argv):
    code = compare.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def blocks(out):
    """The report split into its metric blocks: {metric title: block text}."""
    found, title = {}, None
    for line in out.splitlines():
        if not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


def verdict(block):
    """The one verdict line of a metric block."""
    lines = [line.strip() for line in block.splitlines() if "significant at 5%" in line]
    assert len(lines) == 1, block
    return lines[0]


def test_identical_samples_are_not_significant(tmp_path, capsys):
    a = side(tmp_path, "a", [300.0, 310.0, 305.0], [90.1, 90.3, 90.2], grayscale_p=0.1)
    b = side(tmp_path, "b", [300.0, 310.0, 305.0], [90.1, 90.3, 90.2], grayscale_p=0.2)
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b)
    assert code == 0
    found = blocks(out)
    assert list(found) == ["time to target (timed seconds)", AT_STOP]
    for block in found.values():
        assert verdict(block) == "NOT significant at 5%: no evidence of a difference (n=3 vs 3)"
        assert "B - A: +0.000" in block and "Welch p = 1 " in block
    assert "config A vs B: grayscale_p: 0.1 vs 0.2" in out


@pytest.mark.parametrize("formats", [(V2, V2), (V1, V1), (V1, V2)])
def test_well_separated_samples_are_significant_with_the_right_direction(tmp_path, capsys, formats):
    times_a, times_b = [300.0, 310.0, 305.0, 302.0], [200.0, 207.0, 204.0, 199.0]
    accs_a, accs_b = [90.1, 90.3, 90.2, 90.2], [90.2, 90.1, 90.3, 90.1]
    a = side(tmp_path, "a", times_a, accs_a, log_format=formats[0])
    b = side(tmp_path, "b", times_b, accs_b, log_format=formats[1])
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b)
    assert code == 0
    found = blocks(out)
    time_block, acc_block = found["time to target (timed seconds)"], found[AT_STOP]
    diff = sum(times_b) / 4 - sum(times_a) / 4
    assert verdict(time_block) == (f"significant at 5%: B is faster than A ({abs(diff):.3f} s, "
                                   f"{100 * abs(diff) / (sum(times_a) / 4):.1f}%)")
    assert f"B - A: {diff:+.3f} s" in time_block
    assert f"Welch p = {ttest_ind(times_b, times_a, equal_var=False).pvalue:.4g}" in time_block
    assert verdict(acc_block) == "NOT significant at 5%: no evidence of a difference (n=4 vs 4)"  # per metric
    # the other direction: B slower
    code, out, _ = run_compare(capsys, "logs", "--a", *b, "--b", *a)
    assert code == 0
    assert verdict(blocks(out)["time to target (timed seconds)"]).startswith("significant at 5%: B is slower than A")


def test_time_to_target_falls_back_when_a_run_missed_and_at_epoch_budget(tmp_path, capsys):
    a = side(tmp_path, "a", [300.0, 310.0], [90.1, 90.3])
    b = side(tmp_path, "b", [300.0, 310.0], [95.1, 95.3])
    b.append(write_log(str(tmp_path), "b_missed", 7, 400.0, 95.2, reached=False))
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b, "--at-epoch", "5")
    assert code == 0
    assert f"time to target: not compared: 1 of 5 runs did not reach the target (e.g. {b[-1]})" in out
    found = blocks(out)
    assert list(found) == [AT_STOP, AT_EPOCH_5]
    assert verdict(found[AT_STOP]).startswith("significant at 5%: B is more accurate than A (5.000 %")
    assert "B - A: +5.000 %" in found[AT_EPOCH_5]  # epoch 5 rows are 1 point below at stop
    assert "A: 89.200 ± 0.141 % (n=2)" in found[AT_EPOCH_5]


@pytest.mark.parametrize("case", ["one_run", "not_a_log", "no_such_epoch_v1", "no_such_epoch_v2", "missing_file",
                                  "repeated_seed", "gpus_empty", "gpus_word", "gpus_negative", "gpus_gap",
                                  "gpus_fraction", "gpus_twice", "no_command", "unknown_flag"])
def test_compare_bad_input_is_one_line_and_nonzero(tmp_path, capsys, case):
    a = side(tmp_path, "a", [300.0, 310.0], [90.1, 90.3], log_format=V1 if case.endswith("v1") else V2)
    b = side(tmp_path, "b", [300.0, 310.0], [90.1, 90.3])
    resnet34 = RESNET34_CONFIG
    run = ["run", "--a", a[0], "--b", a[1], "--seeds", "0", "1", "--log-dir", str(tmp_path / "logs")]
    gpus_error = "compare: error: --gpus must be a comma-separated list of GPU ids such as 0,1,2,3, got "
    argv, expected = {
        "one_run": (["logs", "--a", a[0], "--b", *b], "compare: error: need at least 2 runs per side"),
        "not_a_log": (["logs", "--a", *a, "--b", b[0], resnet34],
                      f"compare: error: {resnet34}: not an airbench-ssl run log"),
        "no_such_epoch_v1": (["logs", "--a", *a, "--b", *b, "--at-epoch", "7"],
                             f"compare: error: {a[0]}: no kNN check after epoch 7 (its checks: [5, 10])"),
        "no_such_epoch_v2": (["logs", "--a", *a, "--b", *b, "--at-epoch", "7"],
                             f"compare: error: {a[0]}: no kNN check after epoch 7 (its checks: [5, 10])"),
        "missing_file": (["run", "--a", str(tmp_path / "nope.json"), "--b", a[0], "--seeds", "0", "1"],
                         f"compare: error: A ({tmp_path / 'nope.json'}): cannot read config file "
                         f"{tmp_path / 'nope.json'}: [Errno 2] No such file or directory"),
        "repeated_seed": ([*run[:-4], "1", "1"], "compare: error: --seeds repeats a seed: [1, 1]"),
        "gpus_empty": ([*run, "--gpus", ""], gpus_error + "''"),
        "gpus_word": ([*run, "--gpus", "0,one"], gpus_error + "'0,one'"),
        "gpus_negative": ([*run, "--gpus", "-1"], gpus_error + "'-1'"),
        "gpus_gap": ([*run, "--gpus", "0,,1"], gpus_error + "'0,,1'"),
        "gpus_fraction": ([*run, "--gpus", "1.5"], gpus_error + "'1.5'"),
        "gpus_twice": ([*run, "--gpus", "2,3,2"], "compare: error: --gpus lists a GPU twice ('2,3,2')"),
        "no_command": ([], "compare: error: the following arguments are required: command"),
        "unknown_flag": (["logs", "--a", *a, "--b", *b, "--frobnicate"], "compare: error: unrecognized arguments"),
    }[case]
    if case in ("no_command", "unknown_flag"):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(argv)
        code, out, err = exit_info.value.code, "", capsys.readouterr().err
    else:
        code, out, err = run_compare(capsys, *argv)
    assert code in (1, 2) and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists()  # nothing was started


########################################
#  compare.py run: scheduling, with a stand-in for the harness (no GPU, no training)

FAKE_HARNESS = r"""
import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
for flag in ("--config", "--seed", "--log-dir"):
    parser.add_argument(flag)
args, _ = parser.parse_known_args()
with open(args.config) as f:
    cfg = json.load(f)
seed, gpu = int(args.seed), os.environ.get("CUDA_VISIBLE_DEVICES")
pid_file = os.path.join(cfg["events"], f"{cfg['side']}{seed}.pid")
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)  # whoever sees the file can read the pid
lock = os.path.join(cfg["events"], f"busy_gpu{gpu}")
try:  # exclusive create: fails while another run holds the same GPU
    os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    shared = False
except FileExistsError:
    shared = True
time.sleep(600 if seed in cfg["hang_seeds"] else cfg["seconds"])  # SIGTERM ends it, as the harness
if not shared:
    os.unlink(lock)
with open(os.path.join(cfg["events"], f"{cfg['side']}{seed}.json"), "w") as f:
    json.dump({"gpu": gpu, "shared": shared}, f)
if seed in cfg["fail_seeds"]:
    sys.exit("fake harness: CUDA out of memory")
os.makedirs(args.log_dir, exist_ok=True)
knn = 90.0 + seed + 0.089999496936798  # as float32 sums print: compare rounds it
log = {"format": "airbench-ssl-log/2", "kind": "train",
       "config": {"seed": seed, "grayscale_p": cfg["grayscale_p"], "knn_k": 10},
       "environment": {"device": "cuda", "gpu_name": "NVIDIA H200"}, "code": {"sha256": "ab" * 32},
       "epochs": [{"epoch": 1, "timed_seconds": cfg["timed"] + seed, "knn_pct": knn}],
       "result": {"status": "reached_target", "reached_target": True, "timed_seconds": cfg["timed"] + seed,
                  "time_to_target_seconds": cfg["timed"] + seed, "knn_at_stop_pct": knn}}
with open(os.path.join(args.log_dir, f"run_seed{seed}_{os.getpid()}.json"), "w") as f:
    json.dump(log, f)
"""


@pytest.fixture
def fake_harness(tmp_path, monkeypatch):
    """compare.py's harness replaced by a script that sleeps (600 s for hang_seeds), records the GPU it was given
    and whether another run held that GPU at the same time, then writes a log (A takes 300+seed timed s, B
    200+seed): -> a function that writes the two configs and returns (their paths, the events folder). Its configs
    are no harness configs, so the harness's checks of them are skipped here (tested with real configs below)."""
    script = tmp_path / "fake_harness.py"
    script.write_text(FAKE_HARNESS)
    monkeypatch.setattr(compare, "HARNESS", str(script))
    monkeypatch.setattr(compare, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(compare, "check_runs", lambda *args: [])
    events = tmp_path / "events"
    events.mkdir()

    def configs(seconds_a=0.3, seconds_b=0.3, fail_a=(), fail_b=(), hang_seeds=()):
        paths = []
        for name, seconds, timed, fail in (("A", seconds_a, 300.0, fail_a), ("B", seconds_b, 200.0, fail_b)):
            paths.append(str(tmp_path / f"{name}.json"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                json.dump({"events": str(events), "side": name, "seconds": seconds, "timed": timed,
                           "fail_seeds": list(fail), "hang_seeds": list(hang_seeds),
                           "grayscale_p": 0.1 if name == "A" else 0.2}, f)
        return paths, events

    return configs


def launches(out):
    """[(side and seed, GPU or None)] from the "run k/n: ..." lines, in the order the runs were started."""
    found = []
    for line in out.splitlines():
        if line.startswith("run "):
            what = line.split(":")[1].strip()
            name, _, gpu = what.partition(" on GPU ")
            found.append((name, gpu or None))
    return found


def records(events):
    return {p.stem: json.loads(p.read_text()) for p in events.glob("*.json")}


def test_compare_run_on_gpus_one_run_per_gpu_interleaved(fake_harness, tmp_path, capsys):
    (config_a, config_b), events = fake_harness()
    code, out, err = run_compare(capsys, "run", "--a", config_a, "--b", config_b, "--seeds", "0", "1", "2",
                                 "--log-dir", str(tmp_path / "logs"), "--gpus", "3,5")
    assert code == 0, err
    started = launches(out)
    assert [name for name, _ in started] == ["A seed 0", "B seed 0", "A seed 1", "B seed 1", "A seed 2", "B seed 2"]
    assert [gpu for _, gpu in started[:2]] == ["3", "5"]  # both GPUs busy at once from the start
    ran = records(events)
    assert sorted(ran) == ["A0", "A1", "A2", "B0", "B1", "B2"]
    assert not any(r["shared"] for r in ran.values())  # no run ever found its GPU held by another
    for name, gpu in started:  # each run saw exactly the GPU it was started on
        side_, _, seed = name.split()
        assert ran[side_ + seed]["gpu"] == gpu
    assert {r["gpu"] for r in ran.values()} == {"3", "5"}
    assert not list(events.glob("busy_*"))
    for name in ("A", "B"):
        logs = [json.loads(p.read_text()) for p in (tmp_path / "logs" / name).glob("*.json")]
        assert sorted(log["config"]["seed"] for log in logs) == [0, 1, 2]
    found = blocks(out)
    assert verdict(found["time to target (timed seconds)"]).startswith("significant at 5%: B is faster than A "
                                                                       "(100.000 s")
    assert verdict(found[AT_STOP]) == "NOT significant at 5%: no evidence of a difference (n=3 vs 3)"


def test_compare_run_without_gpus_is_sequential_and_leaves_the_devices_alone(fake_harness, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (config_a, config_b), events = fake_harness(seconds_a=0.05, seconds_b=0.05)
    code, out, err = run_compare(capsys, "run", "--a", config_a, "--b", config_b, "--seeds", "4", "2",
                                 "--log-dir", str(tmp_path / "logs"))
    assert code == 0, err
    assert launches(out) == [("A seed 4", None), ("B seed 4", None), ("A seed 2", None), ("B seed 2", None)]
    assert records(events) == {name: {"gpu": None, "shared": False} for name in ("A4", "B4", "A2", "B2")}
    assert verdict(blocks(out)["time to target (timed seconds)"]).startswith("significant at 5%: B is faster")


def test_compare_run_on_gpus_stops_starting_runs_after_a_failure(fake_harness, tmp_path, capsys):
    (config_a, config_b), events = fake_harness(seconds_a=0.05, seconds_b=0.05, fail_a=[1])
    code, out, err = run_compare(capsys, "run", "--a", config_a, "--b", config_b, "--seeds", "0", "1", "2",
                                 "--log-dir", str(tmp_path / "logs"), "--gpus", "7")
    assert code == 1
    assert err == ("compare: error: 1 of 6 runs failed: A seed 1 on GPU 7 failed (exit 1): "
                   "fake harness: CUDA out of memory\n")
    assert [name for name, _ in launches(out)] == ["A seed 0", "B seed 0", "A seed 1"]  # nothing after the failure
    assert sorted(records(events)) == ["A0", "A1", "B0"]


def test_compare_run_on_gpus_waits_for_running_runs_before_reporting_a_failure(fake_harness, tmp_path, capsys):
    (config_a, config_b), events = fake_harness(seconds_a=0.6, seconds_b=0.0, fail_b=[0])
    code, out, err = run_compare(capsys, "run", "--a", config_a, "--b", config_b, "--seeds", "0", "1",
                                 "--log-dir", str(tmp_path / "logs"), "--gpus", "0,1")
    assert code == 1
    assert err.startswith("compare: error: 1 of 4 runs failed: B seed 0 on GPU 1 failed (exit 1): fake harness")
    assert err.count("\n") == 1
    started = launches(out)
    assert started[:2] == [("A seed 0", "0"), ("B seed 0", "1")]
    assert sorted(records(events)) == sorted(n.replace(" seed ", "") for n, _ in started)  # every started run ended
    assert len(list((tmp_path / "logs" / "A").glob("*.json"))) == len([n for n, _ in started if n.startswith("A")])


def interrupt_when(monkeypatch, ready):
    """Ctrl-C in compare's wait for its runs, as soon as ready() is true."""
    deadline = time.monotonic() + 120

    def sleep(seconds):
        if ready():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise AssertionError("the moment to interrupt never came")
        time.sleep(seconds)

    monkeypatch.setattr(compare, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))


@pytest.mark.parametrize("gpus", [None, "0,1"])
def test_interrupted_compare_run_stops_its_runs_and_says_what_finished_in_one_line(fake_harness, tmp_path, capsys,
                                                                                  monkeypatch, gpus):
    (config_a, config_b), events = fake_harness(seconds_a=0.05, seconds_b=0.05, hang_seeds=[1])
    # seed 0 of both sides finishes; then A seed 1 (and on 2 GPUs B seed 1) hangs until stopped
    started = {"A0", "B0", "A1"} | ({"B1"} if gpus else set())
    interrupt_when(monkeypatch, lambda: {p.stem for p in events.glob("*.pid")} == started)
    log_dir = tmp_path / "logs"
    code, out, err = run_compare(capsys, "run", "--a", config_a, "--b", config_b, "--seeds", "0", "1",
                                 "--log-dir", str(log_dir), *(["--gpus", gpus] if gpus else []))
    assert code == 130
    assert err == f"compare: interrupted after 2 of 4 runs (A: 1 finished, B: 1 finished); logs in {log_dir}\n"
    finished = sorted(line.partition(" s wall: ")[2] for line in out.splitlines() if " done in " in line)
    on = [f" on GPU {gpu}" for gpu in gpus.split(",")] if gpus else ["", ""]
    assert finished == [f"A seed 0{on[0]}: reached_target: 300.00 timed s, kNN k=10 at stop 90.09 %",  # rounded
                        f"B seed 0{on[1]}: reached_target: 200.00 timed s, kNN k=10 at stop 90.09 %"]
    for pid_file in events.glob("*.pid"):
        with pytest.raises(ProcessLookupError):  # ended and reaped, not left running on its GPU
            os.kill(int(pid_file.read_text()), 0)
    assert sorted(records(events)) == ["A0", "B0"]  # the stopped runs never got as far as writing a result
    assert [len(list((log_dir / side).glob("*.json"))) for side in "AB"] == [1, 1]


########################################
#  compare.py run: every run checked by the harness's own rules before the first starts

def write_json(path, value):
    path.write_text(json.dumps(value))
    return str(path)


@pytest.mark.parametrize("gpus", [None, "0,1"])
@pytest.mark.parametrize("case", ["typo_in_b", "b_out_of_range", "b_missing", "flag_typo", "flag_value",
                                  "flag_sets_seed", "at_epoch_not_checked_by_a", "at_epoch_past_the_end"])
def test_compare_run_refuses_a_bad_arm_in_one_line_before_any_run_starts(tmp_path, capsys, monkeypatch, case, gpus):
    started = tmp_path / "started"  # the harness, replaced: it marks that a run started
    (tmp_path / "harness.py").write_text(f"open({str(started)!r}, 'w').close()\n")
    monkeypatch.setattr(compare, "HARNESS", str(tmp_path / "harness.py"))
    a = write_json(tmp_path / "a.json", {"grayscale_p": 0.1, "check_first_epoch": 5, "check_every_epochs": 10})
    b_values, extra, at_epoch, expected = {
        "typo_in_b": ({"grayscle_p": 0.2}, [], None, "B ({b}): config file {b} has unknown fields ['grayscle_p']"),
        "b_out_of_range": ({"grayscale_p": 2}, [], None, "B ({b}): bad config: grayscale_p=2 must be in [0, 1]"),
        "b_missing": (None, [], None, "B ({b}): cannot read config file {b}: [Errno 2] No such file or directory"),
        "flag_typo": ({}, ["--widht", "8"], None,
                      "A ({a}) and B ({b}): unrecognized arguments: --widht 8 (see python airbench_ssl.py --help)"),
        "flag_value": ({}, ["--width", "x"], None, "A ({a}) and B ({b}): argument --width: invalid int value: 'x'"),
        "flag_sets_seed": ({}, ["--seed", "3"], None, "A ({a}) and B ({b}): --extra sets the seed or the log folder"),
        "at_epoch_not_checked_by_a": ({"check_first_epoch": 1, "check_every_epochs": 1}, ["--epochs", "20"], 10,
                                      "A ({a}): --at-epoch 10 is not a kNN check epoch (check_first_epoch 5, "
                                      "check_every_epochs 10, epochs 20)"),
        "at_epoch_past_the_end": ({"check_first_epoch": 1, "check_every_epochs": 1}, ["--epochs", "20"], 21,
                                  "A ({a}): --at-epoch 21 is not a kNN check epoch (check_first_epoch 5, "
                                  "check_every_epochs 10, epochs 20); B ({b}): --at-epoch 21 is not a kNN check epoch "
                                  "(check_first_epoch 1, check_every_epochs 1, epochs 20)"),
    }[case]
    b = write_json(tmp_path / "b.json", b_values) if b_values is not None else str(tmp_path / "nope.json")
    code, out, err = run_compare(capsys, "run", "--a", a, "--b", b, "--seeds", "0", "1", "--log-dir",
                                 str(tmp_path / "logs"), *(["--gpus", gpus] if gpus else []),
                                 *(["--at-epoch", str(at_epoch)] if at_epoch is not None else []), "--extra", *extra)
    assert code == 2
    assert err.startswith("compare: error: " + expected.format(a=a, b=b)) and err.count("\n") == 1, err
    assert out == ""
    assert not started.exists() and not (tmp_path / "logs").exists()  # nothing ran, nothing was created


def test_compare_run_says_when_both_arms_are_one_recipe(tmp_path):
    a = write_json(tmp_path / "a.json", {"_description": "the reference", "grayscale_p": 0.1})
    same = write_json(tmp_path / "same.json", {"_description": "a copy", "grayscale_p": 0.1, "data_dir": "elsewhere"})
    other = write_json(tmp_path / "other.json", {"grayscale_p": 0.2})
    notes = {name: compare.check_runs(compare.interleaved_runs(a, b, [0, 1]), ["--epochs", "20"], str(tmp_path), None)
             for name, b in (("file", a), ("copy", same), ("other", other))}
    tail = ": an A/A comparison, which measures run-to-run noise, not a change"
    assert notes == {"file": ["NOTE: --a and --b are the same file" + tail],
                     "copy": ["NOTE: --a and --b resolve to the same config" + tail], "other": []}


def test_compare_logs_says_when_the_sides_share_logs(tmp_path, capsys):
    a = side(tmp_path, "a", [300.0, 310.0], [90.1, 90.3])
    b = side(tmp_path, "b", [300.0, 310.0], [90.2, 90.4])
    _, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b)
    assert "NOTE" not in out and "WARNING" not in out
    _, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", a[1], str(tmp_path / ".." / tmp_path.name / "a0.json"))
    assert "NOTE: --a and --b are the same logs: an A/A comparison, which can only find no difference" in out
    _, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", a[0], b[0])
    assert f"WARNING: 1 logs are on both sides (e.g. {os.path.realpath(a[0])}): the sides are not independent" in out


########################################
#  compare.py run and plot.py on real CPU runs

TINY_RUN = ["--preset", "cpu_demo", "--device", "cpu", "--width", "8", "--train-subset", "0", "--batch-size", "32",
            "--download", "false"]


@pytest.fixture(scope="module")
def cpu_runs(fake_cifar_root, tmp_path_factory):
    """Two tiny configurations x 2 seeds trained by `compare.py run` on the synthetic dataset (about 20 s)."""
    folder = tmp_path_factory.mktemp("compare_run")
    configs = []
    for name, p in (("a", 0.1), ("b", 0.2)):
        configs.append(str(folder / f"{name}.json"))
        with open(configs[-1], "w", encoding="utf-8") as f:
            json.dump({"_description": f"grayscale {p}", "grayscale_p": p}, f)
    cpu = [*TINY_RUN, "--epochs", "1", "--data-dir", fake_cifar_root]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        # one compute thread per run: OpenMP threads spinning against other busy processes on a 2-core CI machine
        # made these runs ~20x slower
        mp.setenv("OMP_NUM_THREADS", "1")
        code = compare.main(["run", "--a", configs[0], "--b", configs[1], "--seeds", "0", "1",
                             "--log-dir", str(folder / "logs"), "--extra", *cpu])
    return code, folder / "logs", out.getvalue()


def expected_verdict(xs_a, xs_b):
    """compare.py's verdict on kNN accuracy, from scipy's Welch test (stats.py's documented rule when both sides
    have zero variance, where scipy has no answer)."""
    mean_a, mean_b = sum(xs_a) / len(xs_a), sum(xs_b) / len(xs_b)
    if len(set(xs_a)) == len(set(xs_b)) == 1:
        p_value = 0.0 if mean_a != mean_b else 1.0
    else:
        p_value = ttest_ind(xs_b, xs_a, equal_var=False).pvalue
    if p_value < 0.05:
        return f"significant at 5%: B is {'more' if mean_b > mean_a else 'less'} accurate than A"
    return f"NOT significant at 5%: no evidence of a difference (n={len(xs_a)} vs {len(xs_b)})"


def test_compare_run_trains_interleaved_and_compares(cpu_runs, capsys):
    code, log_dir, out = cpu_runs
    assert code == 0
    assert launches(out) == [("A seed 0", None), ("B seed 0", None), ("A seed 1", None), ("B seed 1", None)]
    knn = {}
    for name in ("A", "B"):
        logs = [json.loads(p.read_text()) for p in sorted((log_dir / name).glob("*.json"))]
        assert sorted(log["config"]["seed"] for log in logs) == [0, 1]
        assert {log["config"]["grayscale_p"] for log in logs} == {0.1 if name == "A" else 0.2}
        knn[name] = [log["result"]["knn_at_stop_pct"] for log in logs]
    assert "config A vs B: grayscale_p: 0.1 vs 0.2" in out
    assert "time to target: not compared: 4 of 4 runs did not reach the target" in out  # the CPU preset aims at 100%
    found = blocks(out)
    assert list(found) == [AT_STOP]
    assert verdict(found[AT_STOP]).startswith(expected_verdict(knn["A"], knn["B"]))
    # The same logs on both sides: the other verdict, whatever the runs measured.
    paths = [str(p) for p in sorted((log_dir / "A").glob("*.json"))]
    code, out, _ = run_compare(capsys, "logs", "--a", *paths, "--b", *paths)
    assert code == 0
    assert "NOTE: --a and --b are the same logs: an A/A comparison" in out
    assert verdict(blocks(out)[AT_STOP]) == "NOT significant at 5%: no evidence of a difference (n=2 vs 2)"


def test_interrupted_compare_run_leaves_the_harness_logging_its_run_as_interrupted(fake_cifar_root, tmp_path, capsys,
                                                                                    monkeypatch):
    """Ctrl-C reaches compare alone (the runs have their own session) and each run gets one SIGTERM from it, which
    the harness logs: the log keeps the finished epochs and says interrupted (about 10 s on 2 cores)."""
    config, log_dir = write_json(tmp_path / "a.json", {"grayscale_p": 0.1}), tmp_path / "logs"

    def training():  # A's first run has logged a trained epoch
        for path in (log_dir / "A").glob("*.json"):
            with contextlib.suppress(ValueError):
                return any(row["epoch"] >= 1 for row in json.loads(path.read_text())["epochs"])
        return False

    interrupt_when(monkeypatch, training)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in cpu_runs
    code, out, err = run_compare(capsys, "run", "--a", config, "--b", config, "--seeds", "0", "1", "--log-dir",
                                 str(log_dir), "--extra", *TINY_RUN, "--epochs", "10000", "--data-dir", fake_cifar_root)
    assert code == 130
    assert err == f"compare: interrupted after 0 of 4 runs (A: 0 finished, B: 0 finished); logs in {log_dir}\n"
    assert out.startswith("NOTE: --a and --b are the same file")
    (path,) = (log_dir / "A").glob("*.json")
    log = json.loads(path.read_text())
    assert log["result"]["status"] == "interrupted" and log["result"]["message"] == "interrupted (Ctrl-C or SIGTERM)"
    assert log["epochs"] and log["result"]["epochs_run"] == log["epochs"][-1]["epoch"] >= 1
    assert not (log_dir / "B").exists()


########################################
#  plot.py

def line_data(ax):
    """{label: (xs, ys)} of the lines drawn on one panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_plot_draws_every_kNN_check_of_every_log_and_the_target(tmp_path):
    paths = [write_log(str(tmp_path), "a0", 0, 300.0, 91.0, log_format=V1, grayscale_p=0.1),
             write_log(str(tmp_path), "b1", 1, 200.0, 93.0, grayscale_p=0.3)]
    logs = [compare.load_log(p) for p in paths]
    fig = plot.draw(logs, "both", target=92.5)
    try:
        seconds_ax, epochs_ax = fig.axes[:2]
        assert len(fig.axes) == 2
        assert seconds_ax.get_xlabel() == "timed seconds" and epochs_ax.get_xlabel() == "epoch"
        target = ([0, 1], [92.5, 92.5])  # axhline: x in axes fraction, y in data
        assert line_data(seconds_ax) == {"grayscale_p=0.1, seed 0": ([150.0, 300.0], [90.0, 91.0]),
                                         "grayscale_p=0.3, seed 1": ([100.0, 200.0], [92.0, 93.0]),
                                         "target 92.5%": target}
        assert line_data(epochs_ax) == {"grayscale_p=0.1, seed 0": ([5, 10], [90.0, 91.0]),
                                        "grayscale_p=0.3, seed 1": ([5, 10], [92.0, 93.0]),
                                        "target 92.5%": target}
        assert [t.get_text() for t in seconds_ax.get_legend().get_texts()] == list(line_data(seconds_ax))
    finally:
        plot.plt.close(fig)
    fig = plot.draw(logs, "epochs")
    try:
        assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == "epoch"
    finally:
        plot.plt.close(fig)


@pytest.mark.parametrize("x", ["both", "seconds", "epochs"])
def test_plot_png_is_the_drawn_figure_of_the_cpu_runs(cpu_runs, tmp_path, x):
    _, log_dir, _ = cpu_runs
    paths = sorted(str(p) for p in log_dir.glob("*/*.json"))
    logs = [compare.load_log(p) for p in paths]
    out = tmp_path / "curves.png"
    assert plot.main([*paths, "-o", str(out), "--x", x]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]  # no temp file left
    image = matplotlib.image.imread(str(out))[..., :3]
    fig = plot.draw(logs, x)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        for ax in fig.axes:  # the figure holds every log's checks ...
            drawn = line_data(ax)
            for log, label in zip(logs, plot.labels_for(logs)):
                checks = [row for row in log["epochs"] if row["knn_pct"] is not None]
                assert drawn[label][1] == [row["knn_pct"] for row in checks] and checks
        colors = [matplotlib.colors.to_rgb(line.get_color()) for line in fig.axes[0].get_lines()[:len(logs)]]
    finally:
        plot.plt.close(fig)
    buffer.seek(0)
    assert (image == matplotlib.image.imread(buffer)[..., :3]).all()  # ... and the PNG is that figure
    for color in colors:  # each run's colour is really painted (a blank or data-free image fails here)
        assert (abs(image - color).max(axis=-1) < 0.02).sum() >= 20, color
    assert (image.shape[1] > 1.8 * image.shape[0]) == (x == "both")  # two panels side by side
    assert plot.labels_for(logs) == [
        "grayscale_p=0.1, seed 0", "grayscale_p=0.1, seed 1", "grayscale_p=0.2, seed 0", "grayscale_p=0.2, seed 1"]


@pytest.mark.parametrize("case", ["not_a_run_log", "no_knn_checks", "unknown_image_format"])
def test_plot_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    good = write_log(str(tmp_path), "a0", 0, 300.0, 91.0)
    no_checks = make_log("n0", 0, 300.0, 91.0)
    for row in no_checks["epochs"]:
        row["knn_pct"] = None
    (tmp_path / "n0.json").write_text(json.dumps(no_checks))
    out = tmp_path / "plots" / ("x.nosuchformat" if case == "unknown_image_format" else "x.png")
    out.parent.mkdir()
    logs, expected = {
        "not_a_run_log": ([RESNET34_CONFIG], "not an airbench-ssl run log"),
        "no_knn_checks": ([str(tmp_path / "n0.json")], "none of the logs has a kNN check to plot"),
        "unknown_image_format": ([good], "nosuchformat"),
    }[case]
    assert plot.main([*logs, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plot: error: ") and expected in err and err.count("\n") == 1, err
    assert not any(out.parent.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_plot_creates_a_missing_folder_and_its_files_follow_the_umask(tmp_path, umask):
    paths = [write_log(str(tmp_path), "a0", 0, 300.0, 91.0)]
    reference = tmp_path / "reference"  # what any file the user creates gets under this umask
    saved = os.umask(umask)
    try:
        reference.write_bytes(b"")
        out = tmp_path / "new" / "deeper" / "curves.png"
        assert plot.main([*paths, "-o", str(out)]) == 0
    finally:
        os.umask(saved)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(out.parent) == ["curves.png"]
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("case", ["folder_is_a_file", "folder_under_a_file", "out_is_a_folder"])
def test_plot_that_cannot_write_says_so_in_one_line_naming_the_image(tmp_path, capsys, case):
    paths = [write_log(str(tmp_path), "a0", 0, 300.0, 91.0)]
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    out, reason = {"folder_is_a_file": (tmp_path / "file" / "x.png", f"{tmp_path / 'file'} is a file, not a folder"),
                   "folder_under_a_file": (tmp_path / "file" / "sub" / "x.png", "Not a directory"),
                   "out_is_a_folder": (tmp_path / "folder", "Is a directory")}[case]
    before = sorted(os.listdir(tmp_path))
    assert plot.main([*paths, "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"plot: error: cannot write {out}: {reason}\n"  # not the temp file's name
    assert sorted(os.listdir(tmp_path)) == before and not any((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("tool", [bench_throughput, compare, plot])
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
