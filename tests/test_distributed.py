"""Several processes, on CPU with gloo: the loss over gathered projections (2 or more views) equals the single-process
loss of the global batch, one DDP step equals one single-process step with per-shard BatchNorm, and torchrun runs of
the harness end as they should: a tiny run (over each epoch the ranks train on every image once, in the one-process
order, each rank from its own augmentation stream; the epoch clock waits for the slowest rank), a rank that fails,
bad batch sizes, --sync-bn on CPU.

The distributed pieces run once, in two processes (tests/dist_worker.py), on inputs this file makes; the references
are computed here in one process. Every subprocess has a timeout and collectives a 60 s one: nothing can hang.
"""

import dataclasses
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, easy_images, synthetic_images, write_fake_cifar

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

WORLD = 2
TESTS = os.path.join(ROOT, "tests")
TIMEOUT_SECONDS = 180  # a hang fails the test long before gloo's or the harness's own timeouts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    """SIGTERM first: torchrun then ends the workers it started in their own sessions."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()


def run_workers(folder, inputs, world=WORLD):
    """Run tests/dist_worker.py as `world` ranks on `inputs` -> each rank's outputs."""
    torch.save(inputs, os.path.join(folder, "inputs.pt"))
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(TESTS, "dist_worker.py"), os.path.join(folder, "inputs.pt"),
                               folder], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for r in range(world)]
    deadline, outputs = time.monotonic() + TIMEOUT_SECONDS, []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"rank {rank} of dist_worker.py did not finish in {TIMEOUT_SECONDS} s")
        outputs.append(out)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} of dist_worker.py failed:\n{out[-3000:]}"
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@dataclasses.dataclass
class TorchrunResult:
    returncode: int
    stderr: str  # torchrun's own
    rank_stdout: list
    rank_stderr: list


def torchrun(tmp_path, script, *args, env_extra=None):
    """`python -m torch.distributed.run` with 2 CPU processes; each rank's output read from its own files."""
    streams = tmp_path / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "--redirects", "3", "--log-dir", str(streams), script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"torchrun did not finish in {TIMEOUT_SECONDS} s: {' '.join(command)}")

    def read(rank, stream):
        paths = glob.glob(str(streams / "*" / "attempt_0" / str(rank) / f"{stream}.log"))
        assert len(paths) == 1, f"torchrun wrote no {stream} file for rank {rank}:\n{stderr[-3000:]}"
        with open(paths[0], encoding="utf-8") as f:
            return f.read()

    return TorchrunResult(proc.returncode, stderr, [read(r, "stdout") for r in range(WORLD)],
                          [read(r, "stderr") for r in range(WORLD)])


def error_lines(text):
    """Lines of a rank's stderr that are not warnings (the synthetic data's md5 warning, library warnings)."""
    return [line for line in text.splitlines() if line.strip() and "WARNING" not in line and "Warning" not in line
            and not line.startswith("  warnings.warn")]


# --------------------------------------------------------------------------- inputs and their references

GATHER_CASES = [dict(n=6, temperature=0.5), dict(n=4, temperature=0.2)]
BATCH, SEED = 8, 3
TINY = dict(width=8, projector_hidden_dim=32, projector_out_dim=16, batch_size=BATCH, base_lr=2.0, momentum=0.9,
            weight_decay=5e-4, device="cpu", compile="off", bf16="off", channels_last="off", seed=SEED)
TRAINER_CASES = [dict(), dict(temperature=0.2)]
SPLIT_CASES = [(dict(batch_size=7), 14, "[7]"), (dict(batch_size=8), 20, None),
               (dict(batch_size=8), 21, "[5, 8]"), (dict(batch_size=8, drop_last=True), 21, None)]


def shard(x, rank, world=WORLD):
    """Rank `rank`'s rows of a view-major batch: its slice of the images, in both views, still view-major."""
    per_view = x.view(2, len(x) // 2, *x.shape[1:])
    n = per_view.shape[1] // world
    return per_view[:, rank * n:(rank + 1) * n].reshape(-1, *x.shape[1:])


def global_z(case):
    return torch.randn(2 * case["n"], 5, generator=torch.Generator().manual_seed(case["n"])) * 2


def trainer_config(case):
    return ab.Config(**TINY, **case)


def global_views(cfg):
    g = torch.Generator().manual_seed(SEED)
    return [torch.rand(BATCH, 3, 32, 32, generator=g) for _ in range(2)]


def rank_views(cfg, rank):
    """What rank `rank` makes from its half of the images: both views of them."""
    return [view[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for view in global_views(cfg)]


@pytest.fixture(scope="module")
def cpu_job(tmp_path_factory):
    """One 2-process gloo job runs every case -> each rank's outputs."""
    folder = str(tmp_path_factory.mktemp("dist"))
    inputs = dict(
        device="cpu",
        gather=[dict(temperature=c["temperature"], local=[shard(global_z(c), r) for r in range(WORLD)])
                for c in GATHER_CASES],
        trainer=[dict(config=dataclasses.asdict(trainer_config(c)), n_train=BATCH,
                      views=[rank_views(trainer_config(c), r) for r in range(WORLD)]) for c in TRAINER_CASES],
        split=[dict(config=dataclasses.asdict(ab.Config(**TINY | fields)), n_train=n) for fields, n, _ in SPLIT_CASES])
    return run_workers(folder, inputs)


def one_step_reference(cfg, initial, per_shard_batchnorm=True, device="cpu"):
    """One process, the global batch: the same step, with BatchNorm statistics per shard (as DDP computes them:
    each view's half-batch on each rank) or over the whole batch -> (loss, parameters)."""
    model = ab.make_model(cfg.arch, cfg.width, cfg.projector_hidden_dim, cfg.projector_out_dim).to(device)
    model.load_state_dict(initial)
    views = [view.to(device) for view in global_views(cfg)]
    head = lambda x: model.projector(model.backbone(x))  # noqa: E731
    if per_shard_batchnorm:
        z = torch.cat([torch.cat([head(view[r * BATCH // WORLD:(r + 1) * BATCH // WORLD]) for r in range(WORLD)])
                       for view in views])
    else:
        z = torch.cat([head(view) for view in views])
    loss = ab.info_nce(z, cfg.temperature)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.base_lr * cfg.batch_size / 256, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach().cpu(), {k: v.detach().cpu() for k, v in model.named_parameters()}


# --------------------------------------------------------------------------- gather_views + info_nce


@pytest.mark.parametrize("index", range(len(GATHER_CASES)))
def test_gathered_projections_are_the_global_batch_view_major(cpu_job, index):
    z = global_z(GATHER_CASES[index])
    for rank in range(WORLD):
        assert torch.equal(cpu_job[rank]["gather"][index]["gathered"], z)


@pytest.mark.parametrize("index", range(len(GATHER_CASES)))
def test_loss_over_ranks_is_the_single_process_loss_of_the_global_batch(cpu_job, index):
    case = GATHER_CASES[index]
    expected = ab.info_nce(global_z(case), case["temperature"])
    for rank in range(WORLD):
        torch.testing.assert_close(cpu_job[rank]["gather"][index]["loss"], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("index", range(len(GATHER_CASES)))
def test_each_rank_gets_world_size_times_its_rows_of_the_global_gradient(cpu_job, index):
    # Every rank computes the same global loss; all_gather's backward sums the ranks' gradients for each shard, so a
    # rank's own rows get world_size times the global gradient. DDP's averaging of the parameter gradients over the
    # ranks divides it out again (the one-step tests below check that end to end).
    case = GATHER_CASES[index]
    z = global_z(case).requires_grad_()
    ab.info_nce(z, case["temperature"]).backward()
    assert z.grad.abs().max() > 1e-3
    for rank in range(WORLD):
        torch.testing.assert_close(cpu_job[rank]["gather"][index]["grad"],
                                   WORLD * shard(z.grad, rank), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- one Trainer step on 2 processes


@pytest.mark.parametrize("index", range(len(TRAINER_CASES)))
def test_one_step_on_two_processes_is_one_step_with_per_shard_batchnorm(cpu_job, index):
    cfg = trainer_config(TRAINER_CASES[index])
    ranks = [cpu_job[r]["trainer"][index] for r in range(WORLD)]
    assert all(torch.equal(v, ranks[1]["initial"][k]) for k, v in ranks[0]["initial"].items())
    assert all(torch.equal(v, ranks[1]["params"][k]) for k, v in ranks[0]["params"].items())  # DDP keeps them equal
    loss, expected = one_step_reference(cfg, ranks[0]["initial"])
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], loss, rtol=1e-5, atol=0)
    worst_error = max((ranks[0]["params"][k] - v).abs().max().item() for k, v in expected.items())
    step = max((v - ranks[0]["initial"][k]).abs().max().item() for k, v in expected.items())
    _, full_batch = one_step_reference(cfg, ranks[0]["initial"], per_shard_batchnorm=False)
    batchnorm_effect = max((full_batch[k] - v).abs().max().item() for k, v in expected.items())
    assert worst_error < 1e-6 and step > 1e-3, (worst_error, step)
    # the comparison tells per-shard from whole-batch statistics, which --sync-bn would give
    assert batchnorm_effect > 100 * worst_error, (batchnorm_effect, worst_error)


@pytest.mark.parametrize("index", range(len(SPLIT_CASES)))
def test_batches_that_do_not_split_over_the_ranks_are_refused(cpu_job, index):
    _, n_train, sizes = SPLIT_CASES[index]
    for rank in range(WORLD):
        message = cpu_job[rank]["split"][index]
        if sizes is None:
            assert message is None
        else:
            assert message is not None and sizes in message and f"{n_train} training images" in message
            assert "do not split over 2 processes" in message and "batch_size" in message


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 CUDA GPUs")
def test_sync_bn_step_on_two_gpus_is_one_full_batch_step(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compared at fp32 precision
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = dataclasses.replace(trainer_config({}), device="cuda", sync_bn=True)
    inputs = dict(device="cuda", trainer=[dict(config=dataclasses.asdict(cfg), n_train=BATCH,
                                               views=[rank_views(cfg, r) for r in range(WORLD)])])
    ranks = [out["trainer"][0] for out in run_workers(str(tmp_path), inputs)]
    assert all(rank["sync_bn"] for rank in ranks)
    loss, expected = one_step_reference(cfg, ranks[0]["initial"], per_shard_batchnorm=False, device="cuda")
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], loss, rtol=1e-4, atol=0)
        for name, value in expected.items():
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- torchrun runs of the harness

RUN = ["--preset", "recipe", "--device", "cpu", "--width", "8", "--projector-hidden-dim", "64", "--batch-size", "40",
       "--download", "false", "--compile-warmup-steps", "0"]


def read_logs(log_dir):
    return [json.load(open(path)) for path in sorted(glob.glob(os.path.join(log_dir, "*.json")))]


def probe_values(stdout):
    """(rank, kNN %, evaluated here) from every knn_check call, as tests/dist_probe.py prints them."""
    return [(int(rank), float(pct), evaluated == "True")
            for _, rank, pct, evaluated in (line.split() for line in stdout.splitlines() if line.startswith("KNN "))]


PER_BATCH, SUBSET, LATE_SECONDS = 40, 100, 1.0  # 100 images in batches of 40, 40 and 20: a tail split too


def numbered(images):
    """images(n, seed) with pixel (0, 0, 0) the file's seed and (0, 0, 1) the image's place in its file, so the images
    a step trained on can be named (tests/dist_probe.py prints p0 * 256 + p1)."""
    def numbered_images(n, seed):
        data, labels = images(n, seed)
        pixels = data.reshape(n, 3, 32, 32)
        pixels[:, 0, 0, 0], pixels[:, 0, 0, 1] = seed, np.arange(n)
        return pixels.reshape(n, 3072), labels
    return numbered_images


def image_index(probe_id):
    """The training image a probe id names: files data_batch_1..5 were written with seeds 0..4."""
    seed, place = divmod(probe_id, 256)
    return seed * PER_BATCH + place


@pytest.fixture(scope="module")
def numbered_cifar_roots(tmp_path_factory):
    """Two datasets of numbered images: "easy" (kNN soon near 100 %) and "hard" (far below 100 % for a long time:
    each file has its own class colours)."""
    roots = {}
    for name, images in (("easy", easy_images), ("hard", synthetic_images)):
        roots[name] = str(tmp_path_factory.mktemp(f"numbered_{name}"))
        write_fake_cifar(roots[name], per_batch=PER_BATCH, images=numbered(images))
    return roots


PROBE_FLAGS = ["--train-subset", str(SUBSET), "--check-every-epochs", "1"]


@pytest.fixture(scope="module")
def probe_run(numbered_cifar_roots, tmp_path_factory):
    """probe_run(epochs, check_first, target, data) -> (the torchrun result, its one log): tests/dist_probe.py on 2
    CPU processes, rank 1 ending each epoch LATE_SECONDS late; each configuration runs once for the whole module."""
    runs = {}

    def run(epochs, check_first, target, data):
        if (epochs, check_first, target, data) not in runs:
            folder = tmp_path_factory.mktemp("probe")
            result = torchrun(folder, os.path.join(TESTS, "dist_probe.py"), *RUN, *PROBE_FLAGS, "--data-dir",
                              numbered_cifar_roots[data], "--log-dir", str(folder / "logs"), "--epochs", str(epochs),
                              "--check-first-epoch", str(check_first), "--target-pct", str(target),
                              env_extra=dict(DIST_PROBE_LATE_SECONDS=str(LATE_SECONDS)))
            assert result.returncode == 0, result.stderr[-3000:] + "\n".join(result.rank_stderr)
            logs = read_logs(str(folder / "logs"))
            assert len(logs) == 1
            runs[epochs, check_first, target, data] = result, logs[0]
        return runs[epochs, check_first, target, data]

    return run


def steps_of(stdout):
    """The image indices of each training step of one rank, in order, as tests/dist_probe.py prints them."""
    return [[image_index(int(i)) for i in line.split()[3:]] for line in stdout.splitlines() if line.startswith("STEP ")]


def augmentation_streams(stdout):
    """The fingerprint of one rank's augmentation generator at each of its steps (tests/dist_probe.py)."""
    return [line.split()[2] for line in stdout.splitlines() if line.startswith("STEP ")]


MAX_EPOCHS_RUN = (2, 0, 100.0, "hard")  # every check, to the last epoch


@pytest.mark.parametrize("run_flags, status, checked", [
    (MAX_EPOCHS_RUN, "max_epochs", [0, 1, 2]),
    ((3, 1, 1e-9, "easy"), "reached_target", [1]),  # stops at the first check: both ranks must stop there
], ids=["max_epochs", "reached_target"])
def test_torchrun_tiny_run_writes_one_log_and_every_rank_takes_rank0s_knn(probe_run, run_flags, status, checked):
    run, log = probe_run(*run_flags)
    assert all(error_lines(err) == [] for err in run.rank_stderr), run.rank_stderr
    assert log["launch"]["world_size"] == 2 and log["launch"]["torchrun"] is True
    assert log["environment"]["world_size"] == 2 and log["environment"]["gpu_names"] == [None, None]
    assert log["result"]["status"] == status and log["result"]["epochs_run"] == checked[-1]
    logged = [(row["epoch"], row["knn_pct"]) for row in log["epochs"] if row["knn_pct"] is not None]
    assert [epoch for epoch, _ in logged] == checked
    # rank 0 evaluates and every rank receives its number: the same accuracies, so the same stop decision
    probes = [probe_values(out) for out in run.rank_stdout]
    assert [(r, pct) for r, pct, _ in probes[0]] == [(0, pct) for _, pct in logged]
    assert [(r, pct) for r, pct, _ in probes[1]] == [(1, pct) for _, pct in logged]
    assert all(evaluated for *_, evaluated in probes[0]) and not any(evaluated for *_, evaluated in probes[1])
    # rank 1 prints nothing of its own, only what the probe prints
    own_lines = [line for line in run.rank_stdout[1].splitlines() if not line.startswith("STEP ")]
    assert "TARGET" in run.rank_stdout[0] and own_lines == [f"KNN 1 {pct!r} False" for _, pct in logged]


def test_over_each_epoch_the_ranks_train_on_every_image_once(probe_run, numbered_cifar_roots, tmp_path, monkeypatch):
    """Each global batch is split between the ranks, so over an epoch the images the ranks trained on are the
    epoch's images, each exactly once, whatever the order; and the global batches are those a one-process run of the
    same seed trains on: the ranks agree on one order, the one-process order."""
    run, _ = probe_run(*MAX_EPOCHS_RUN)
    ranks = [steps_of(out) for out in run.rank_stdout]
    sizes = [40, 40, 20]
    assert [len(steps) for steps in ranks] == [2 * len(sizes)] * WORLD
    assert all(len(share) == sizes[i % len(sizes)] // WORLD for steps in ranks for i, share in enumerate(steps))
    global_batches = [sum((steps[i] for steps in ranks), []) for i in range(2 * len(sizes))]
    epochs = [sum(global_batches[:len(sizes)], []), sum(global_batches[len(sizes):], [])]
    for order in epochs:
        assert sorted(order) == list(range(SUBSET))  # every image once: none twice, none left out
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])  # shuffled, afresh each epoch
    one_process, real_views = [], ab.Trainer.views

    def views(self, images_uint8, *args, **kwargs):
        one_process.append([image_index(p0 * 256 + p1) for p0, p1 in images_uint8[:, 0, 0, :2].long().tolist()])
        return real_views(self, images_uint8, *args, **kwargs)

    monkeypatch.setattr(ab.Trainer, "views", views)
    assert ab.main([*RUN, *PROBE_FLAGS, "--data-dir", numbered_cifar_roots["hard"], "--log-dir", str(tmp_path),
                    "--epochs", "2", "--check-first-epoch", "2", "--target-pct", "100"]) == 0
    assert one_process == global_batches


def test_each_rank_draws_its_own_augmentations(probe_run):
    """The ranks augment different images from different random streams: the same stream would give the i-th image
    of every rank's share the same crop, flip and jitter, a correlation a one-process run does not have."""
    run, _ = probe_run(*MAX_EPOCHS_RUN)
    streams = [augmentation_streams(out) for out in run.rank_stdout]
    assert len(streams[0]) == len(streams[1]) == 6 and len(set(streams[0])) == 6  # the stream moves on each step
    assert all(a != b for a, b in zip(*streams))


def test_the_epoch_clock_waits_for_the_slowest_rank(probe_run):
    """Rank 1 finishes each epoch LATE_SECONDS after its last step (tests/dist_probe.py): rank 0's logged epoch time,
    the run's time, must hold it, since the epoch ends only when every process has finished it."""
    _, log = probe_run(*MAX_EPOCHS_RUN)
    trained = [row for row in log["epochs"] if row["epoch"] > 0]
    assert len(trained) == 2 and all(row["epoch_seconds"] >= LATE_SECONDS for row in trained), trained


def one_error_line(run):
    """The error lines of a failed torchrun job: one for the whole job, printed by rank 0, none by the others."""
    lines = [error_lines(err) for err in run.rank_stderr]
    assert len(lines[0]) == 1 and all(other == [] for other in lines[1:]), lines
    return lines[0]


@pytest.mark.parametrize("prompt_exit", ["0", "1"])  # 1: the failing rank's sockets close the moment it fails
def test_torchrun_failing_rank_ends_every_process_and_logs_its_reason(fake_cifar_root, tmp_path, prompt_exit):
    log_dir, marker = str(tmp_path / "logs"), str(tmp_path / "raised_at")
    run = torchrun(tmp_path, os.path.join(TESTS, "dist_fault.py"), *RUN, "--data-dir", fake_cifar_root, "--log-dir",
                   log_dir, "--epochs", "3", "--check-first-epoch", "3",
                   env_extra=dict(DIST_FAULT_MARKER=marker, DIST_FAULT_PROMPT_EXIT=prompt_exit))
    assert run.returncode != 0
    with open(marker) as f:
        raised_at = float(f.read())
    # far below any collective timeout (the harness sets 30 min): a blocked rank 0 is ended by the failure report
    assert time.time() - raised_at < 30
    logs = read_logs(log_dir)
    assert len(logs) == 1
    result = logs[0]["result"]
    assert result["status"] == "failed" and "rank 1" in result["message"] and "boom" in result["message"], result
    first = logs[0]["epochs"][0]  # the epoch finished before the failure is kept
    assert first["epoch"] == 1 and first["loss"] > 0 and first["epoch_seconds"] > 0
    (line,) = one_error_line(run)
    assert line.startswith("airbench_ssl: error: rank 1: boom"), line



def refused_torchrun(tmp_path, root, *flags):
    """A tiny torchrun run expected to be refused -> its one error line; no log may have been written."""
    log_dir = str(tmp_path / "logs")
    run = torchrun(tmp_path, os.path.join(ROOT, "airbench_ssl.py"), *RUN, "--data-dir", root, "--log-dir", log_dir,
                   "--epochs", "1", *flags)
    assert run.returncode != 0 and read_logs(log_dir) == []  # refused before the run's log was created
    (line,) = one_error_line(run)
    return line


def test_torchrun_batch_that_does_not_split_is_one_error_line(tmp_path):
    line = refused_torchrun(tmp_path, str(tmp_path / "no data"), "--batch-size", "41")  # refused before any data read
    assert line.startswith("airbench_ssl: error: batches of [") and "do not split over 2 processes" in line
    assert ", 41] of the " in line  # an odd batch size: 41 cannot split over 2


def test_torchrun_sync_bn_on_cpu_is_one_error_line(fake_cifar_root, tmp_path):
    line = refused_torchrun(tmp_path, fake_cifar_root, "--sync-bn", "true")
    assert line == "airbench_ssl: error: sync_bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on CPUs"
