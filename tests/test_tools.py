"""tools/bench_throughput.py, tools/compare.py and tools/plot.py on CPU: tiny settings, synthetic and real logs."""

import contextlib
import dataclasses
import io
import json
import os

import bench_throughput
import compare
import matplotlib.image
import plot
import pytest
import torch
from scipy.stats import ttest_ind

import airbench_ssl as ab

TINY_BENCH = ["--device", "cpu", "--width", "8", "--batch-size", "16", "--steps", "2", "--repeats", "1",
              "--workers", "0", "--peak-size", "256"]


pytestmark = pytest.mark.usefixtures("one_compute_thread")


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
        model.eval()(x)
    for h in handles:
        h.remove()
    return sum(total)


def test_forward_flops_count_matches_hooks_and_the_published_resnet18_figure():
    flops = bench_throughput.forward_flops("resnet18", 64)
    assert flops == 2 * conv_linear_macs(ab.make_model("resnet18", 64), torch.zeros(1, 3, 32, 32))
    assert flops / 2 == pytest.approx(0.556e9, rel=0.01)  # CIFAR ResNet18: ~0.56 GMACs per image
    assert bench_throughput.forward_flops("resnet18", 8) == 2 * conv_linear_macs(ab.make_model("resnet18", 8),
                                                                                 torch.zeros(1, 3, 32, 32))


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
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_throughput: error:") and len(err.splitlines()) == 1


########################################
#  compare.py on synthetic logs

def write_log(folder, name, seed, seconds, knn, reached=True, **config):
    """A run log in the harness's format: checks after epochs 5 and 10, stopping at 10."""
    cfg = dict(dataclasses.asdict(ab.Config()), seed=seed, **config)
    rows = [dict(epoch=e, loss=5.0, lr=0.06, epoch_seconds=seconds / 10, timed_seconds=seconds * e / 10,
                 knn_pct=(knn - 1 if e == 5 else knn) if e in (5, 10) else None, knn_seconds=None)
            for e in range(1, 11)]
    log = dict(format="airbench-ssl-log/1", kind="train", run_id=name, config=cfg, check_epochs=[5, 10],
               code=dict(sha256="ab" * 32), environment=dict(device="cuda", gpu_name="NVIDIA H200"), epochs=rows,
               result=dict(status="reached_target" if reached else "max_epochs", reached_target=reached,
                           target_pct=90.0, epochs_run=10, timed_seconds=seconds,
                           time_to_target_seconds=seconds if reached else None, knn_at_stop_pct=knn))
    path = os.path.join(folder, name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(log, f)
    return path


def side(tmp_path, label, times, accs, **config):
    return [write_log(str(tmp_path), f"{label}{i}", i, t, a, **config) for i, (t, a) in enumerate(zip(times, accs))]


def run_compare(capsys, *argv):
    code = compare.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_identical_samples_are_not_significant(tmp_path, capsys):
    a = side(tmp_path, "a", [300.0, 310.0, 305.0], [90.1, 90.3, 90.2])
    b = side(tmp_path, "b", [300.0, 310.0, 305.0], [90.1, 90.3, 90.2], grayscale_p=0.2)
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b)
    assert code == 0
    assert out.count("NOT significant at 5%: no evidence of a difference (n=3 vs 3)") == 2
    assert "significant at 5%: B" not in out
    assert "config A vs B: grayscale_p: 0.1 vs 0.2" in out


def test_well_separated_samples_are_significant_with_the_right_direction(tmp_path, capsys):
    times_a, times_b = [300.0, 310.0, 305.0, 302.0], [200.0, 207.0, 204.0, 199.0]
    accs_a, accs_b = [90.1, 90.3, 90.2, 90.2], [90.2, 90.1, 90.3, 90.1]
    a, b = side(tmp_path, "a", times_a, accs_a), side(tmp_path, "b", times_b, accs_b)
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b)
    assert code == 0
    time_block, acc_block = out.split("kNN accuracy at stop:")
    assert "significant at 5%: B is faster than A" in time_block
    diff = sum(times_b) / 4 - sum(times_a) / 4
    assert f"B - A: {diff:+.3f} s" in time_block
    assert f"Welch p = {ttest_ind(times_b, times_a, equal_var=False).pvalue:.4g}" in time_block
    assert "NOT significant" in acc_block  # accuracies are the same: the verdict is per metric
    # the other direction: B slower
    code, out, _ = run_compare(capsys, "logs", "--a", *b, "--b", *a)
    assert "significant at 5%: B is slower than A" in out


def test_time_to_target_falls_back_when_a_run_missed_and_at_epoch_budget(tmp_path, capsys):
    a = side(tmp_path, "a", [300.0, 310.0], [90.1, 90.3])
    b = side(tmp_path, "b", [300.0, 310.0], [95.1, 95.3])
    b.append(write_log(str(tmp_path), "b_missed", 7, 400.0, 95.2, reached=False))
    code, out, _ = run_compare(capsys, "logs", "--a", *a, "--b", *b, "--at-epoch", "5")
    assert code == 0
    assert "time to target: not compared: 1 of 5 runs did not reach the target" in out
    assert "time to target (timed seconds):" not in out
    assert "kNN accuracy at stop:" in out and "B is more accurate than A" in out
    assert "kNN accuracy after epoch 5:" in out and "B - A: +5.000 %" in out.split("after epoch 5:")[1]


@pytest.mark.parametrize("case", ["one_run", "not_a_log", "no_such_epoch", "missing_file"])
def test_compare_bad_input_is_one_line_and_nonzero(tmp_path, capsys, case):
    a = side(tmp_path, "a", [300.0, 310.0], [90.1, 90.3])
    b = side(tmp_path, "b", [300.0, 310.0], [90.1, 90.3])
    argv = {"one_run": ["logs", "--a", a[0], "--b", *b],
            "not_a_log": ["logs", "--a", *a, "--b", b[0], os.path.join(ab.HERE, "baselines", "resnet34.json")],
            "no_such_epoch": ["logs", "--a", *a, "--b", *b, "--at-epoch", "7"],
            "missing_file": ["run", "--a", str(tmp_path / "nope.json"), "--b", a[0], "--seeds", "0", "1"]}[case]
    code, out, err = run_compare(capsys, *argv)
    assert code == 1 and err.startswith("compare: error:") and len(err.strip().splitlines()) == 1


########################################
#  compare.py run and plot.py on real CPU runs

@pytest.fixture(scope="module")
def real_runs(fake_cifar_root, tmp_path_factory):
    """Two tiny configurations x 2 seeds trained by `compare.py run` on the synthetic dataset (about 20 s)."""
    folder = tmp_path_factory.mktemp("compare_run")
    configs = []
    for name, p in (("a", 0.1), ("b", 0.2)):
        configs.append(str(folder / f"{name}.json"))
        with open(configs[-1], "w", encoding="utf-8") as f:
            json.dump({"_description": f"grayscale {p}", "grayscale_p": p}, f)
    cpu = ["--device", "cpu", "--width", "8", "--train-subset", "0", "--batch-size", "32", "--epochs", "1",
           "--warmup-steps", "0", "--final-evals", "", "--download", "false", "--data-dir", fake_cifar_root]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        # one compute thread per run: OpenMP threads spinning against other busy processes on a 2-core CI machine
        # made these runs ~20x slower
        mp.setenv("OMP_NUM_THREADS", "1")
        code = compare.main(["run", "--a", configs[0], "--b", configs[1], "--seeds", "0", "1",
                             "--log-dir", str(folder / "logs"), "--extra", *cpu])
    return code, folder / "logs", out.getvalue()


def test_compare_run_trains_interleaved_and_compares(real_runs):
    code, log_dir, out = real_runs
    assert code == 0
    order = [line.split(":")[1].strip() for line in out.splitlines() if line.startswith("run ")]
    assert order == ["A seed 0", "B seed 0", "A seed 1", "B seed 1"]
    for name in ("A", "B"):
        logs = [json.load(open(log_dir / name / f)) for f in sorted(os.listdir(log_dir / name))]
        assert sorted(log["config"]["seed"] for log in logs) == [0, 1]
        assert {log["config"]["grayscale_p"] for log in logs} == {0.1 if name == "A" else 0.2}
    assert "config A vs B: grayscale_p: 0.1 vs 0.2" in out
    assert "time to target: not compared" in out  # the CPU preset's target is 100%
    assert "kNN accuracy at stop:" in out and "significant at 5%" in out


@pytest.mark.parametrize("x", ["both", "seconds", "epochs"])
def test_plot_writes_a_valid_png(real_runs, tmp_path, capsys, x):
    _, log_dir, _ = real_runs
    logs = sorted(str(p) for p in log_dir.glob("*/*.json"))
    out = tmp_path / "curves.png"
    assert plot.main([*logs, "-o", str(out), "--x", x]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(out))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    wide = x == "both"
    assert (image.shape[1] > 1.8 * image.shape[0]) == wide  # two panels side by side
    assert plot.labels_for([compare.load_log(p) for p in logs]) == [
        "grayscale_p=0.1, seed 0", "grayscale_p=0.1, seed 1", "grayscale_p=0.2, seed 0", "grayscale_p=0.2, seed 1"]


def test_plot_refuses_a_json_that_is_not_a_run_log(tmp_path, capsys):
    assert plot.main([os.path.join(ab.HERE, "baselines", "resnet34.json"), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("plot: error:") and "not an airbench-ssl run log" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("tool", [bench_throughput, compare, plot])
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out
