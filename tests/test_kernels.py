"""What a training step launches: tools/count_kernels.py's counts, and the compiled augmentation they exist to keep
in a few kernels (the same values as the eager one for the same drawn parameters, compiled once per batch shape)."""

import dataclasses
import functools
import json
import subprocess
import sys

import bench_augment
import count_kernels
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TINY = ab.Config(width=8, projector_hidden_dim=32, projector_out_dim=16, batch_size=16, device="cpu", compile="off",
                 bf16="off", channels_last="off")
# inductor's generated code computes the augmentation's formulas in another order (vectorised sums for the contrast
# mean, fused multiply-adds, its own exp and sqrt): values in [0, 1] differ in their last bits (measured: at most
# 2.8e-6 on 512 images); a different crop box, flip, op order or grayscale choice would differ by far more
COMPILED_ATOL = 1e-5
# Eager, a view is ~290 operator calls that each start kernels; compiled, inductor's C++ backend makes 27 loop nests
# of it under torch 2.14 and 35 under 2.11 (which keeps each blend's `other` image apart), besides the view's own
# operator calls: six draws from the generator, the op order's sort and, channels_last, the layout copy. The GPU's
# bound (30 Triton kernels) is counted on a GPU: tools/count_kernels.py's device kernels.
MAX_LOOP_NESTS_PER_VIEW = 40
MAX_OPERATOR_CALLS_PER_VIEW = 10


def images(n, seed):
    """uint8 images with the cases where the colour ops branch: black, white, grey, saturated primaries."""
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    x[0], x[1], x[2] = 0, 255, 128
    x[3] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    x[4] = torch.tensor([0, 255, 255], dtype=torch.uint8).view(3, 1, 1)
    return x


def cheap_compile(backend):
    """torch.compile as the harness calls it (its own options), with a backend that compiles in seconds on a CPU."""
    return functools.partial(torch.compile, backend=backend)


# --------------------------------------------------------------------------- how the tool counts


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")  # torch 2.11, about reading events later
def test_summarize_counts_each_operator_call_once_and_views_start_no_kernel():
    x = torch.rand(4, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = (x + 1).mul(2)  # two calls, each starts a kernel
        y.view(-1).unsqueeze(0)  # two calls, no kernel
        y.to(torch.float64)  # to -> _to_copy -> copy_: one call, one kernel
        y.t().contiguous()  # a view, then a copy (contiguous -> clone -> copy_)
        y.to(torch.float32)  # already float32: a call, no kernel
    counts = count_kernels.summarize(list(prof.events()))
    assert counts["ops"] == 8 and counts["launching"] == 4
    assert counts["launching_by_name"] == {"aten::add": 1, "aten::mul": 1, "aten::to": 1, "aten::contiguous": 1}
    assert counts["device_kernels"] is None and counts["device_ms"] is None  # no CUDA activity on a CPU


def tiny_trainer(cfg=TINY):
    torch.manual_seed(0)
    return ab.Trainer(cfg, torch.device("cpu"), cfg.batch_size)


def test_the_counted_step_is_the_trainers_own_step():
    counted, plain = tiny_trainer(), tiny_trainer()
    batch = images(TINY.batch_size, seed=1)
    parts = count_kernels.run_step(counted, batch, torch.Generator().manual_seed(2), profiled=True)
    plain.step(batch, torch.Generator().manual_seed(2))
    assert list(parts) == list(count_kernels.PARTS) and all(parts[p]["ops"] > 0 for p in count_kernels.PARTS)
    for (name, a), b in zip(counted.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name  # the marks changed nothing the step computes
    # and they are gone: the Trainer's own model call and the optimizer's own methods are back
    assert counted.forward is counted.model and "step" not in vars(counted.optimizer)
    assert "zero_grad" not in vars(counted.optimizer)


def test_a_step_whose_parts_cannot_be_told_apart_is_refused(monkeypatch):
    def update_without_zero_grad(self, views):
        loss = ab.info_nce(self.forward(views), self.cfg.temperature)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    monkeypatch.setattr(ab.Trainer, "update", update_without_zero_grad)
    trainer = tiny_trainer()
    with pytest.raises(RuntimeError, match=r"not \['augmentation', 'forward', 'loss', 'backward', 'optimizer'\]"):
        count_kernels.run_step(trainer, images(TINY.batch_size, 3), torch.Generator(), profiled=True)
    assert "step" not in vars(trainer.optimizer)  # restored after the failure too


def test_eager_counts_add_up_and_a_view_is_half_the_augmentation():
    report = count_kernels.count_step(TINY, torch.device("cpu"))
    parts = report["parts"]
    for key in ("ops", "launching", "generated", "graphs"):
        assert report["step"][key] == sum(parts[p][key] for p in count_kernels.PARTS)
    assert report["per_view"]["ops"] == parts["augmentation"]["ops"] / 2 and report["config"]["n_views"] == 2
    assert all(0 < parts[p]["launching"] <= parts[p]["ops"] for p in count_kernels.PARTS)
    assert report["step"]["generated"] == 0 and report["step"]["graphs"] == 0 and not report["compiled"]
    assert report["step"]["device_kernels"] is None  # CUDA only


@pytest.mark.slow  # inductor compiles the augmentation's C++ (~40-60 s on 2 busy cores without its cache)
def test_the_compiled_augmentation_stays_within_a_few_kernels_per_view():
    """Fails if someone brings back per-operation launches (a graph break, an eager op in the view's path)."""
    cfg = dataclasses.replace(TINY, compile="on")
    report = count_kernels.count_step(cfg, torch.device("cpu"), compile_backend="eager")  # the model: dynamo only
    eager = count_kernels.count_step(TINY, torch.device("cpu"))
    view, augmentation = report["per_view"], report["parts"]["augmentation"]
    assert report["augment_compiled"] and augmentation["graphs"] == 1  # one graph for every view: no break
    assert 0 < view["generated"] <= MAX_LOOP_NESTS_PER_VIEW
    assert view["launching"] <= MAX_OPERATOR_CALLS_PER_VIEW < eager["per_view"]["launching"] / 10
    assert report["step"]["recompiles"] == 0


# --------------------------------------------------------------------------- the compiled augmentation


@pytest.mark.slow  # inductor compiles the augmentation's C++ (~40-60 s on 2 busy cores without its cache)
def test_compiled_and_eager_augmentation_agree_for_the_same_drawn_parameters():
    batch, cfg = images(48, seed=4), ab.Config()
    params = ab.draw_augment_params(len(batch), torch.Generator().manual_seed(5), batch.device)
    eager = ab.apply_augment(batch, params, cfg)
    torch._dynamo.reset()
    compiled = torch.compile(ab.apply_augment, dynamic=False)(batch, params, cfg)
    torch.testing.assert_close(compiled, eager, atol=COMPILED_ATOL, rtol=0)
    gray = (eager[:, :1] == eager).flatten(1).all(1)
    assert 0 < gray.sum() < len(batch)  # the batch holds both kinds, so the comparison covers both branches
    # the eager path is augment itself: same draws, same values, bit for bit
    assert torch.equal(eager, ab.augment(batch, cfg, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("low_res", [False, True], ids=["32px", "progressive 16px then 32px"])
def test_no_recompiles_across_epochs_with_the_tail_batch(monkeypatch, low_res):
    """The warm-up compiles every batch shape an epoch has (the tail batch too, and each view size): two epochs then
    compile nothing (dynamo's own counters)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", cheap_compile("eager"))  # recompiles are dynamo's guards, whatever backend
    cfg = dataclasses.replace(TINY, compile="on", epochs=2, compile_warmup_steps=1,
                              **(dict(low_res_px=16, low_res_epochs=1) if low_res else {}))
    train = images(2 * cfg.batch_size + 5, seed=6)  # two full batches and a tail of 5
    torch._dynamo.reset()
    trainer = ab.Trainer(cfg, torch.device("cpu"), len(train))
    assert trainer.batch_sizes == [16, 16, 5] and trainer.compiled
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    trainer.warm_up()
    warm = counters["stats"]["unique_graphs"] - graphs_before
    assert warm == 2 * 2 * (2 if low_res else 1)  # model and augmentation, per batch shape, per view size
    generator = torch.Generator().manual_seed(7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for epoch in range(cfg.epochs):
            trainer.train_epoch(epoch, train, generator, generator)
    assert counters["stats"]["unique_graphs"] - graphs_before == warm
    assert sum(counters["graph_break"].values()) == breaks_before


# --------------------------------------------------------------------------- the command line


def test_without_a_gpu_the_profiler_prints_nothing_once_quieted():
    """Issue 21: no `ERROR ... gpuGetDeviceCount failed` from the profiler's tracing library (nor its start and stop
    lines, nor torch 2.11's warning about reading events) in a CPU run."""
    code = ("import torch, count_kernels; cpu = torch.device('cpu'); count_kernels.quiet_profiler(cpu)\n"
            "session = count_kernels.start_profiler(cpu); torch.ones(2) + 1; session.__exit__(None, None, None)\n"
            "assert any(e.name == 'aten::add' for e in session.events())\n")
    tools = str(count_kernels.__file__).rsplit("/", 1)[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tools)
    assert result.returncode == 0 and result.stderr == ""


def test_command_line_prints_the_table_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "counts.json"
    assert count_kernels.main(["--tiny", "--device", "cpu", "--batch-size", "8", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for part in count_kernels.PARTS + ("step", "per view"):
        assert f"\n{part} " in text
    report = json.loads(out.read_text())
    assert report["format"] == "airbench-ssl-kernel-count/1" and report["config"]["batch_size"] == 8
    assert report["harness"].endswith("airbench_ssl.py") and report["device"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--width", "0"], "bad config: width=0 must be in [1, 1024]"),
    (["--config", "/no/such/file.json"], "cannot read config file /no/such/file.json"),
    (["--compile-backend", "no_such_backend"], "--compile-backend 'no_such_backend' is not a torch.compile backend"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    assert count_kernels.main(["--device", "cpu", *argv, "--json", str(tmp_path / "counts.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"count_kernels: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "counts.json").exists()


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # slow: inductor's C++
def test_bench_augment_prints_one_row_per_thread_count(capsys, compiled):
    argv = ["--images", "48", "--batch-size", "32", "--repeats", "1", "--threads", "1", "--compile", str(compiled)]
    saved = torch.get_num_threads()
    assert bench_augment.main(argv) == 0
    assert torch.get_num_threads() == saved  # the thread count it set is undone
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[1].split(), lines[2].split()
    ways = ["pil", "tensor", "eager"] + ["compiled"] * compiled
    assert header[:1 + len(ways)] == ["threads", *ways] and row[0] == "1" and len(row) == len(header)
    images_per_second = dict(zip(ways, map(float, row[1:])))
    assert all(value > 0 for value in images_per_second.values())
    eager_over_pil = float(row[1 + len(ways)].rstrip("x"))  # from unrounded times: the printed rates are rounded
    assert eager_over_pil == pytest.approx(images_per_second["eager"] / images_per_second["pil"], rel=0.05)
