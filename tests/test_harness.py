"""The harness end to end on CPU: the schedule, one epoch's contract, evaluation mode, the compiled path rehearsed on
CPU, the run log, and every way a run can go wrong (one stderr line, the right exit code, nothing lost)."""

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid

import pytest
import torch
import torch.nn as nn
from conftest import ROOT
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils._python_dispatch import TorchDispatchMode

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

SCRIPT = os.path.join(ROOT, "airbench_ssl.py")
# 80 training images in 2 steps of 40: an epoch is ~0.3 s at width 8.
TINY = ["--preset", "recipe", "--device", "cpu", "--width", "8", "--batch-size", "40", "--train-subset", "80",
        "--projector-hidden-dim", "32", "--projector-out-dim", "16", "--download", "false"]
ROW_KEYS = {"epoch", "loss", "lr", "epoch_seconds", "timed_seconds", "knn_pct", "knn_seconds"}
CPU = torch.device("cpu")


def run_main(root, log_dir, *extra):
    """main() in this process -> (exit code, the logs in log_dir, oldest name first)."""
    code = ab.main(["--data-dir", root, "--log-dir", str(log_dir), *TINY, *extra])
    return code, read_logs(log_dir)


def read_logs(log_dir):
    names = sorted(n for n in os.listdir(log_dir) if n.endswith(".json")) if os.path.isdir(log_dir) else []
    return [json.load(open(os.path.join(log_dir, name))) for name in names]


def error_line(stderr):
    """The one error line a failure prints; nothing else on stderr (no traceback, no second error)."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("airbench_ssl: error: "), stderr
    return lines[0]


@pytest.fixture
def official_fake_root(fake_cifar_root, monkeypatch):
    """The synthetic data with OFFICIAL_MD5 set to its own sums: official as far as the harness can tell, so no
    UNOFFICIAL DATA warning shares stderr with the line under test."""
    folder = os.path.join(fake_cifar_root, ab.CIFAR_FOLDER)
    sums = {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in ab.OFFICIAL_MD5}
    monkeypatch.setattr(ab, "OFFICIAL_MD5", sums)
    return fake_cifar_root


def tiny_trainer(n_train=10, **fields):
    """A Trainer at width 8 over n_train images in batches of 4 (10 images: batches 4, 4 and a tail of 2)."""
    cfg = ab.Config(**dict(dict(device="cpu", width=8, projector_hidden_dim=16, projector_out_dim=8, batch_size=4,
                                epochs=4), **fields))
    ab.validate_config(cfg)
    torch.manual_seed(0)
    return cfg, ab.Trainer(cfg, CPU, n_train)


def numbered_images(n, seed=0):
    """Random uint8 images whose pixel [0, 0, 0] is their index: the images a step sees can be named."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images


def expected_lr(cfg, epoch, step, steps_per_epoch):
    """The schedule as specified, written out: lr = base_lr * batch_size / 256 at its peak; linear warm-up per step
    over warmup_epochs, reaching the peak on the last warm-up step; then cosine to 0 at `epochs`, stepped per epoch or
    per step."""
    peak = cfg.base_lr * cfg.batch_size / 256
    if epoch < cfg.warmup_epochs:
        return peak * (epoch * steps_per_epoch + step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    t = epoch - cfg.warmup_epochs + (step / steps_per_epoch if cfg.lr_schedule == "step" else 0)
    return peak * (1 + math.cos(math.pi * t / (cfg.epochs - cfg.warmup_epochs))) / 2


#############################################
#          Schedule and stop rule           #
#############################################
def test_check_schedule_is_a_rule_fixed_by_config():
    cfg = ab.Config(epochs=50, check_first_epoch=10, check_every_epochs=15)
    checks = lambda c: [e for e in range(c.epochs + 1) if ab.is_check_epoch(c, e)]  # noqa: E731
    assert checks(cfg) == [10, 25, 40, 50]
    assert checks(dataclasses.replace(cfg, check_first_epoch=0, check_every_epochs=50)) == [0, 50]
    assert checks(dataclasses.replace(cfg, check_first_epoch=80)) == [50]  # the last epoch is always checked
    huge = types.SimpleNamespace(epochs=10**11, check_first_epoch=5, check_every_epochs=10)  # a logged config
    assert ab.is_check_epoch(huge, 10**11) and ab.is_check_epoch(huge, 10**10 + 5)
    assert not ab.is_check_epoch(huge, 10**10) and not ab.is_check_epoch(huge, 4)
    target = types.SimpleNamespace(target_pct=90.0)
    assert ab.reached_target(target, 90.0) and not ab.reached_target(target, 89.99)
    assert not ab.reached_target(target, None)


@pytest.mark.parametrize("warmup_epochs", [0, 2])
def test_cosine_schedule_matches_torch_schedulers(warmup_epochs):
    """Per epoch: torch's CosineAnnealingLR stepped once an epoch (the reference). Per step: the same stepped once a
    step. Warm-up: torch's LinearLR from 1/(warm-up steps) to 1, one step at a time."""
    epochs, spe, peak = 7, 3, 0.06
    for schedule in ("epoch", "step"):
        cfg = ab.Config(epochs=epochs, warmup_epochs=warmup_epochs, lr_schedule=schedule)
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=peak)
        warm = warmup_epochs * spe
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 1 / warm, 1.0, warm - 1) if warm else None
        torch_lrs = []
        for _ in range(warm):
            torch_lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            warmup.step()
        optimizer.param_groups[0]["lr"] = peak
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=(epochs - warmup_epochs) * (spe if schedule == "step" else 1))
        for _ in range(epochs - warmup_epochs):
            for _ in range(spe):
                torch_lrs.append(optimizer.param_groups[0]["lr"])
                if schedule == "step":
                    optimizer.step()
                    cosine.step()
            if schedule == "epoch":
                optimizer.step()
                cosine.step()
        ours = [ab.learning_rate(cfg, peak, e, s, spe) for e in range(epochs) for s in range(spe)]
        assert ours == pytest.approx(torch_lrs, rel=1e-12, abs=1e-15)


#############################################
#           One epoch's contract            #
#############################################
@pytest.mark.parametrize("lr_schedule, warmup_epochs, epochs", [
    ("epoch", 0, 4), ("step", 0, 4), ("step", 2, 5), ("epoch", 1, 4)])
def test_each_step_uses_the_scheduled_lr(lr_schedule, warmup_epochs, epochs):
    cfg, trainer = tiny_trainer(base_lr=0.3, batch_size=4, lr_schedule=lr_schedule, warmup_epochs=warmup_epochs,
                                epochs=epochs)
    used, losses = [], iter(range(1, 1000))

    def update(views):  # the lr this step really runs with, read where the optimizer reads it
        used.append({group["lr"] for group in trainer.optimizer.param_groups})
        return torch.tensor(float(next(losses)))

    trainer.update = update
    images, order, augment = numbered_images(10), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    spe = len(trainer.batch_sizes)
    assert spe == 3
    for epoch in range(epochs):
        loss, epoch_lr = trainer.train_epoch(epoch, images, order, augment)
        steps = used[-spe:]
        assert all(len(lrs) == 1 for lrs in steps)  # every parameter group at the same lr
        steps = [next(iter(lrs)) for lrs in steps]
        assert steps == pytest.approx([expected_lr(cfg, epoch, i, spe) for i in range(spe)], rel=1e-12)
        assert steps == [ab.learning_rate(cfg, trainer.peak_lr, epoch, i, spe) for i in range(spe)]
        assert epoch_lr == steps[0]  # the lr a log row reports: the epoch's first step
        assert loss.item() == pytest.approx(3 * epoch + 2)  # the plain mean of the step losses 1, 2, 3, ...
    peak = 0.3 * 4 / 256
    if warmup_epochs == 2:  # 6 warm-up steps climb to the peak, then the cosine starts from it
        first = [expected_lr(cfg, 0, i, 3) for i in range(3)] + [expected_lr(cfg, 1, i, 3) for i in range(3)]
        assert first == pytest.approx([peak / 6, 2 * peak / 6, peak / 2, 4 * peak / 6, 5 * peak / 6, peak])
        assert ab.learning_rate(cfg, peak, 2, 0, 3) == pytest.approx(peak)
        assert ab.learning_rate(cfg, peak, 0, 0, 3) == pytest.approx(peak / 6)
    elif warmup_epochs == 0:
        assert ab.learning_rate(cfg, peak, 0, 0, 3) == pytest.approx(peak)


def test_peak_lr_is_scaled_by_batch_size():
    for batch_size in (4, 512):
        cfg, trainer = tiny_trainer(base_lr=0.3, batch_size=batch_size, n_train=1024)
        assert trainer.peak_lr == pytest.approx(0.3 * batch_size / 256, rel=1e-12)
    cfg, trainer = tiny_trainer(base_lr=0.3, batch_size=8)
    used = []
    trainer.update = lambda views: used.append(trainer.optimizer.param_groups[0]["lr"]) or torch.zeros(())
    trainer.train_epoch(0, numbered_images(10), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert used[0] == pytest.approx(0.3 * 8 / 256, rel=1e-12)  # cosine at t = 0: the peak itself


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_uses_the_configs_hyperparameters_and_decays_every_weight(nesterov, monkeypatch):
    momentum, weight_decay, lr = 0.8, 0.05, 2.56 * 4 / 256
    cfg, trainer = tiny_trainer(base_lr=2.56, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    groups = trainer.optimizer.param_groups
    assert all((g["momentum"], g["weight_decay"], g["nesterov"]) == (momentum, weight_decay, nesterov) for g in groups)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in trainer.model.parameters()}  # BatchNorm and biases included
    # a loss with zero gradient: each step moves the weights by weight decay (through momentum) alone
    monkeypatch.setattr(ab, "info_nce", lambda z, *args, **kwargs: (z * 0).sum())
    views = trainer.views(numbered_images(4), torch.Generator().manual_seed(0))
    p0 = [p.detach().clone() for p in trainer.model.parameters()]
    for g in groups:
        g["lr"] = lr
    trainer.update(views)
    p1 = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.update(views)
    p2 = [p.detach().clone() for p in trainer.model.parameters()]
    for a, b, c in zip(p0, p1, p2):
        buf1 = weight_decay * a  # SGD: d = grad + wd * p; buf = d on the first step, then momentum * buf + d
        buf2 = momentum * buf1 + weight_decay * b
        step1 = weight_decay * a + momentum * buf1 if nesterov else buf1
        step2 = weight_decay * b + momentum * buf2 if nesterov else buf2
        torch.testing.assert_close(b, a - lr * step1, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(c, b - lr * step2, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.parametrize("drop_last", [False, True])
def test_an_epoch_sees_every_image_once_in_a_fresh_order_with_two_different_views(drop_last):
    cfg, trainer = tiny_trainer(drop_last=drop_last)
    expected_sizes = [4, 4] if drop_last else [4, 4, 2]
    assert trainer.batch_sizes == expected_sizes
    seen, sizes, losses = [], [], []
    real_views, real_update = trainer.views, trainer.update

    def views(images_uint8, generator, size):
        seen.append(images_uint8[:, 0, 0, 0].tolist())
        return real_views(images_uint8, generator, size)

    def update(step_views):
        assert len(step_views) == 2 and step_views[0].shape == step_views[1].shape
        assert step_views[0].dtype == torch.float32 and step_views[0].shape[1:] == (3, 32, 32)
        assert not torch.equal(step_views[0], step_views[1])  # two independent augmentations
        sizes.append(len(step_views[0]))
        losses.append(real_update(step_views))
        return losses[-1]

    trainer.views, trainer.update = views, update
    images, order, augment = numbered_images(10), torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    orders = []
    for epoch in range(2):
        seen.clear(), sizes.clear(), losses.clear()
        loss, _ = trainer.train_epoch(epoch, images, order, augment)
        assert sizes == expected_sizes and [len(s) for s in seen] == expected_sizes
        flat = [i for batch in seen for i in batch]
        assert len(set(flat)) == len(flat) == sum(expected_sizes)  # no image twice
        if not drop_last:
            assert sorted(flat) == list(range(10))  # a permutation of the whole training set, tail included
        orders.append(flat)
        torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-6, atol=0)
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert orders[0] != sorted(orders[0]) or orders[1] != sorted(orders[1])


#############################################
#         Evaluation: eval-mode BN          #
#############################################
@pytest.mark.parametrize("was_training", [True, False])
def test_extract_features_is_the_eval_mode_forward_and_leaves_the_model_as_it_was(was_training):
    torch.manual_seed(0)
    backbone = ab.CifarResNet("resnet18", 8)
    with torch.no_grad():  # running statistics far from a batch's: eval and train mode give different features
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    backbone.train(was_training)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        eval_forward = copy.deepcopy(backbone).eval()(images.float() / 255)
        train_forward = copy.deepcopy(backbone).train()(images.float() / 255)
    assert not torch.allclose(eval_forward, train_forward, atol=1e-3)  # the test can tell the two modes apart
    features = ab.extract_features(backbone, images, batch_size=7)  # 7 + 7 + 6: batching must not matter
    assert features.dtype == torch.float32 and not features.requires_grad
    torch.testing.assert_close(features, eval_forward, rtol=1e-5, atol=1e-6)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched
    assert all(m.training == was_training for m in backbone.modules())


@pytest.mark.parametrize("tf32_before", [True, False])
def test_features_are_computed_without_tf32_and_the_setting_is_restored(tf32_before, monkeypatch):
    """GPUs convolve fp32 in TF32 by default (~1e-3 relative error): enough to move kNN by tenths of a point between
    devices, so evaluation pins IEEE fp32 and a verifier anywhere recomputes the logged number."""
    seen, backbone = [], ab.CifarResNet("resnet18", 4)
    backbone.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cudnn.allow_tf32))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32_before)
    ab.extract_features(backbone, torch.zeros(5, 3, 32, 32, dtype=torch.uint8), batch_size=2)
    assert seen == [False, False, False] and torch.backends.cudnn.allow_tf32 is tf32_before


#############################################
#     Compiled path, rehearsed on CPU       #
#############################################
@pytest.mark.parametrize("levers", [[], pytest.param(["--low-res-px", "16", "--low-res-epochs", "1"],
                                                      marks=pytest.mark.slow)],  # ~40 s: compiles 4 shapes
                         ids=["recipe", "progressive resolution"])
def test_compiled_run_has_no_recompile_or_graph_break_in_timed_epochs(levers, official_fake_root, tmp_path,
                                                                      monkeypatch):
    """--compile on --bf16 on --channels-last on, compiled by dynamo with the aot_eager backend (no C++ build):
    graph breaks and recompiles are dynamo's, so they show here as they would on a GPU. Warm-up must compile every
    batch shape of the run (40 images in batches of 16: 16 and a tail of 8) at every view size (progressive
    resolution: 16 px in epoch 1, 32 px in epoch 2), for the model and the augmentation, so the timed epochs compile
    nothing."""
    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **dict(kw, backend="aot_eager")))
    snapshot = lambda: {k: dict(v) for k, v in dynamo_counters.items()}  # noqa: E731
    marks, shapes, formats = {}, {"warm_up": [], "train": []}, []
    phase = ["train"]
    real_warm_up, real_update, real_epoch = ab.Trainer.warm_up, ab.Trainer.update, ab.Trainer.train_epoch

    def warm_up(self):
        marks["before_warm_up"] = snapshot()
        phase[0] = "warm_up"
        real_warm_up(self)
        phase[0] = "train"
        marks["after_warm_up"], marks["batch_sizes"] = snapshot(), list(self.batch_sizes)

    def update(self, views):
        assert len(views) == 2 and len({v.shape for v in views}) == 1
        shapes[phase[0]].append((len(views[0]), views[0].shape[-1]))
        formats.extend(v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous() for v in views)
        return real_update(self, views)

    def train_epoch(self, *args):
        result = real_epoch(self, *args)
        marks["after_training"] = snapshot()
        return result

    monkeypatch.setattr(ab.Trainer, "warm_up", warm_up)
    monkeypatch.setattr(ab.Trainer, "update", update)
    monkeypatch.setattr(ab.Trainer, "train_epoch", train_epoch)
    try:
        code, logs = run_main(official_fake_root, tmp_path, "--train-subset", "40", "--batch-size", "16",
                              "--compile", "on", "--bf16", "on", "--channels-last", "on", "--compile-warmup-steps",
                              "1", "--epochs", "2", "--check-first-epoch", "2", "--target-pct", "100", *levers)
    finally:
        torch._dynamo.reset()
    assert code == 0 and logs[0]["result"]["status"] == "max_epochs"
    assert marks["batch_sizes"] == [16, 16, 8]
    sizes = [16, 32] if levers else [32]
    assert sorted(shapes["warm_up"]) == [(b, px) for b in (8, 16) for px in sizes]  # a step per shape of the run
    assert shapes["train"] == [(16, sizes[0]), (16, sizes[0]), (8, sizes[0]), (16, 32), (16, 32), (8, 32)]
    assert formats and all(formats)  # channels_last views reach the compiled model
    before, warm, after = marks["before_warm_up"], marks["after_warm_up"], marks["after_training"]
    graphs = lambda c: c.get("stats", {}).get("unique_graphs", 0)  # noqa: E731
    assert graphs(warm) > graphs(before)  # warm-up really compiled (the test is not vacuous)
    assert sum(after.get("graph_break", {}).values()) == 0  # none at all: a break splits the step into graphs
    for key in ("frames", "graph_break", "aot_autograd"):  # a recompile is a new frame, a new graph, a new AOT trace
        assert after.get(key, {}) == warm.get(key, {}), key
    assert graphs(after) == graphs(warm)
    assert all(math.isfinite(r["loss"]) for r in logs[0]["epochs"])


@pytest.mark.parametrize("drop_last", [False, True])
def test_warm_up_runs_every_batch_shape_and_restores_model_and_optimizer_exactly(drop_last, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)  # the warm-up logic, without the compile time
    cfg, trainer = tiny_trainer(compile="on", compile_warmup_steps=2, drop_last=drop_last, momentum=0.9)
    assert trainer.compiled
    trainer.step(numbered_images(4), torch.Generator().manual_seed(0))  # momentum buffers and BN statistics to keep
    model_state = copy.deepcopy(trainer.model.state_dict())
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    shapes, changed, real_update = [], [], trainer.update

    def update(views):
        shapes.append(len(views[0]))
        loss = real_update(views)
        changed.append(not torch.equal(trainer.model.backbone.conv1.weight, model_state["backbone.conv1.weight"]))
        return loss

    trainer.update = update
    trainer.warm_up()
    assert sorted(shapes) == ([4, 4] if drop_last else [2, 2, 4, 4])  # no tail shape when the tail is dropped
    assert any(changed)  # warm-up trained: restoring is not a no-op
    state = trainer.model.state_dict()
    assert state.keys() == model_state.keys() and all(torch.equal(state[k], model_state[k]) for k in state)
    restored = trainer.optimizer.state_dict()
    assert restored["param_groups"] == optimizer_state["param_groups"]
    assert restored["state"].keys() == optimizer_state["state"].keys()
    for key, value in optimizer_state["state"].items():
        assert torch.equal(restored["state"][key]["momentum_buffer"], value["momentum_buffer"])


def test_warm_up_is_skipped_on_cpu_without_compile():
    cfg, trainer = tiny_trainer()
    trainer.update = lambda views: pytest.fail("warm-up ran a step on CPU without compile")
    trainer.warm_up()


@pytest.mark.parametrize("channels_last", ["on", "off"])
def test_views_follow_the_configured_memory_format(channels_last):
    cfg, trainer = tiny_trainer(channels_last=channels_last)
    views = trainer.views(numbered_images(4), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32), (4, 3, 32, 32)]
    for view in views:
        if channels_last == "on":
            assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()
        else:
            assert view.is_contiguous()
    weight = trainer.model.backbone.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == (channels_last == "on")


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Fails on what makes the host wait for the device: a tensor made from Python data (copied host -> device),
    a value read back (.item(), bool(), float()), or an op whose output shape depends on the data."""

    BANNED = {"aten::" + name for name in ("lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "item", "nonzero",
                                           "masked_select", "_unique", "_unique2", "unique_dim",
                                           "unique_consecutive")}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.BANNED:
            raise HostSync(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def run_without_host_sync(fn):
    """fn() with factory calls that name no device making meta tensors (mixing one with a real tensor fails), under
    NoHostSync."""
    saved = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        with NoHostSync():
            return fn()
    finally:
        torch.set_default_device(saved)


PLANTED_SYNCS = {  # name: (a change to the step's loss, how the checker must catch it)
    "torch.tensor": (lambda loss: loss * torch.tensor([1.0], device=loss.device).sum(), HostSync, "lift_fresh"),
    ".item()": (lambda loss: loss * (1.0 if loss.item() else 1.0), HostSync, "_local_scalar_dense"),
    "bool()": (lambda loss: loss if bool(loss > -1) else loss, HostSync, "_local_scalar_dense"),
    "nonzero": (lambda loss: loss + (loss > 0).nonzero().sum() * 0, HostSync, "nonzero"),
    "factory without device": (lambda loss: loss + torch.zeros(()), (NotImplementedError, RuntimeError), "meta"),
}


@pytest.mark.parametrize("planted", [None, *PLANTED_SYNCS])
def test_a_training_step_has_no_host_sync(planted, monkeypatch):
    cfg, trainer = tiny_trainer()
    if planted:  # the checker must catch a sync planted in the step's loss
        real_loss, (plant, error, match) = ab.info_nce, PLANTED_SYNCS[planted]
        monkeypatch.setattr(ab, "info_nce", lambda *a, **k: plant(real_loss(*a, **k)))
    images, generator = numbered_images(4), torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    if planted:
        with pytest.raises(error, match=match):
            run_without_host_sync(lambda: trainer.step(images, generator))
        return
    loss = run_without_host_sync(lambda: trainer.step(images, generator))
    assert loss.device == CPU and math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # the step really ran
    # the whole epoch (shuffle, slicing, lr setting, loss sum) obeys the same rule
    epoch_images, order = numbered_images(10), torch.Generator().manual_seed(1)
    loss, _ = run_without_host_sync(lambda: trainer.train_epoch(0, epoch_images, order, generator))
    assert loss.device == CPU and math.isfinite(loss.item())


#############################################
#     Runs, logs, and the stop rule         #
#############################################
def test_run_log_is_self_contained_and_follows_the_format(official_fake_root, tmp_path):
    argv_tail = ["--epochs", "3", "--check-first-epoch", "0", "--check-every-epochs", "2", "--target-pct", "100"]
    code, logs = run_main(official_fake_root, tmp_path / "logs", *argv_tail)
    assert code == 0 and len(logs) == 1
    name, model_name = sorted(os.listdir(tmp_path / "logs"))
    text = open(tmp_path / "logs" / name).read()
    log = json.loads(text, parse_constant=lambda c: pytest.fail(f"log is not strict JSON: {c}"))
    assert {"format", "kind", "run_id", "created_utc", "argv", "launch", "config_sources", "config", "code",
            "environment", "data", "eligible", "ineligible_reasons", "timing", "epochs", "untimed_seconds", "result",
            "final_eval", "model", "total_wall_seconds"} <= set(log)
    assert (log["format"], log["kind"], log["run_id"]) == ("airbench-ssl-log/2", "train", name[:-5])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", log["created_utc"])
    assert log["argv"] == ["--data-dir", official_fake_root, "--log-dir", str(tmp_path / "logs"), *TINY, *argv_tail]
    assert log["launch"]["world_size"] == 1 and log["launch"]["torchrun"] is False
    assert log["config_sources"] == dict(preset="recipe", config_file=None, file_overrides={})
    assert log["config"] == dataclasses.asdict(ab.Config(**{**log["config"]}))
    assert set(log["config"]) == {f.name for f in dataclasses.fields(ab.Config)}
    assert (log["config"]["width"], log["config"]["train_subset"], log["config"]["epochs"]) == (8, 80, 3)
    # the exact source that ran, its hash, versions and hardware
    assert log["code"]["source"] == open(SCRIPT, encoding="utf-8").read()
    assert log["code"]["sha256"] == hashlib.sha256(log["code"]["source"].encode()).hexdigest()
    env = log["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["world_size"] == 1
    assert env["gpu_names"] == [None] and env["gpu_name"] is None
    folder = os.path.join(official_fake_root, ab.CIFAR_FOLDER)
    assert log["data"]["official"] is True and log["data"]["train_images"] == 200 and log["data"]["test_images"] == 60
    for file_name, entry in log["data"]["files"].items():
        assert entry["md5"] == hashlib.md5(open(os.path.join(folder, file_name), "rb").read()).hexdigest()
    assert set(log["data"]["files"]) == set(ab.OFFICIAL_MD5)
    assert log["eligible"] is False and len(log["ineligible_reasons"]) == 3  # CPU, subset, target
    assert "timed" in log["timing"] and "not_timed" in log["timing"]
    # the rows: consecutive, kNN exactly on check epochs, timed_seconds the running sum
    rows, cfg = log["epochs"], types.SimpleNamespace(**log["config"])
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and all(set(r) == ROW_KEYS for r in rows)
    assert [r["knn_pct"] is not None for r in rows] == [ab.is_check_epoch(cfg, r["epoch"]) for r in rows]
    assert [r["knn_pct"] is not None for r in rows] == [True, False, True, True]
    assert rows[0]["loss"] is None and rows[0]["lr"] is None and rows[0]["epoch_seconds"] == 0.0
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in rows[1:])
    running = 0.0
    for r in rows:
        running += r["epoch_seconds"]
        assert r["timed_seconds"] == pytest.approx(running)
    result = log["result"]
    assert result["status"] == "max_epochs" and result["reached_target"] is False and result["epochs_run"] == 3
    assert result["timed_seconds"] == pytest.approx(running) and result["time_to_target_seconds"] is None
    assert result["knn_at_stop_pct"] == rows[-1]["knn_pct"] and result["target_pct"] == 100
    assert set(log["untimed_seconds"]) == {"data_load", "warmup", "knn_checks", "final_eval"}
    assert log["total_wall_seconds"] >= result["timed_seconds"] + sum(log["untimed_seconds"].values())
    # the final table reuses the last check's features: its k=10 is that check's number
    assert log["final_eval"]["knn10_pct"] == rows[-1]["knn_pct"] and 0 <= log["final_eval"]["knn5_pct"] <= 100
    # the trained backbone beside the log, named by it, its hash and size in the log; weights only, plain fp32 tensors
    artefact = (tmp_path / "logs" / model_name).read_bytes()
    assert model_name == log["run_id"] + ".model.pt" and log["model"] == dict(
        file=model_name, format="weights", sha256=hashlib.sha256(artefact).hexdigest(), bytes=len(artefact))
    saved = torch.load(io.BytesIO(artefact), weights_only=True)
    assert {k: v for k, v in saved.items() if k != "state_dict"} == dict(
        format="airbench-ssl-model/1", kind="weights", arch="resnet18", width=8)
    backbone = ab.CifarResNet("resnet18", 8)
    backbone.load_state_dict(saved["state_dict"])  # strict: every weight and buffer, nothing else
    assert all(v.dtype in (torch.float32, torch.int64) and v.is_contiguous() for v in saved["state_dict"].values())
    # the saved backbone gives the logged accuracy when evaluated as the run's checks did
    data = ab.load_cifar10(official_fake_root, CPU)
    train, test = (ab.extract_features(backbone, images) for images in (data["train_images"][:80], data["test_images"]))
    assert ab.knn_accuracy(train, data["train_labels"][:80], test, data["test_labels"]) == result["knn_at_stop_pct"]


def test_run_stops_at_the_first_check_that_reaches_the_target(fake_cifar_root, tmp_path, monkeypatch, capsys):
    scripted, checked_after = iter([5.0, 20.0, 35.0, 40.0]), []
    real_check = ab.knn_check

    def knn_check(model, data, cfg):  # the real check, its number replaced by a script
        checked_after.append(1)
        return next(scripted), real_check(model, data, cfg)[1]

    monkeypatch.setattr(ab, "knn_check", knn_check)
    code, logs = run_main(fake_cifar_root, tmp_path, "--epochs", "6", "--check-first-epoch", "0",
                          "--check-every-epochs", "2", "--target-pct", "30")
    assert code == 0 and len(checked_after) == 3
    rows, result = logs[0]["epochs"], logs[0]["result"]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]  # checks after 0, 2, 4: 35 >= 30 at epoch 4
    assert [r["knn_pct"] for r in rows] == [5.0, None, 20.0, None, 35.0]
    assert result["status"] == "reached_target" and result["reached_target"] and result["epochs_run"] == 4
    assert result["time_to_target_seconds"] == result["timed_seconds"] == rows[-1]["timed_seconds"] > 0
    assert result["knn_at_stop_pct"] == 35.0
    out = capsys.readouterr().out
    assert "TARGET REACHED" in out and "TARGET NOT REACHED" not in out


def test_seeded_runs_repeat_exactly_and_the_seed_matters(fake_cifar_root, tmp_path):
    results = []
    for attempt, seed in enumerate(["3", "3", "4"]):
        _, logs = run_main(fake_cifar_root, tmp_path / str(attempt), "--epochs", "1", "--check-first-epoch", "1",
                           "--target-pct", "100", "--seed", seed)
        results.append((logs[0]["epochs"][-1]["loss"], logs[0]["epochs"][-1]["knn_pct"], logs[0]["final_eval"]))
    assert results[0] == results[1]
    assert results[0][0] != results[2][0]


def test_nan_loss_fails_loudly_and_keeps_the_log(official_fake_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ab, "info_nce", lambda z, *args, **kwargs: z.sum() * float("nan"))
    code, logs = run_main(official_fake_root, tmp_path, "--epochs", "3", "--check-first-epoch", "3",
                          "--target-pct", "100")
    assert code == 1
    assert "loss became nan in epoch 1" in error_line(capsys.readouterr().err)
    result = logs[0]["result"]
    assert result["status"] == "failed" and "loss became nan" in result["message"]
    assert [r["epoch"] for r in logs[0]["epochs"]] == [1] and result["epochs_run"] == 1
    # a single-process failure leaves the caller's SIGTERM handling alone (children inherit an ignored SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN


def test_interrupted_run_keeps_only_finished_epochs(official_fake_root, tmp_path, monkeypatch, capsys):
    real_epoch = ab.Trainer.train_epoch

    def interrupt_second(self, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(self, epoch, *args)

    monkeypatch.setattr(ab.Trainer, "train_epoch", interrupt_second)
    code, logs = run_main(official_fake_root, tmp_path, "--epochs", "4", "--check-first-epoch", "4",
                          "--target-pct", "100")
    assert code == 1
    assert "interrupted" in error_line(capsys.readouterr().err)
    result = logs[0]["result"]
    assert result["status"] == "interrupted" and "traceback" in result
    assert [r["epoch"] for r in logs[0]["epochs"]] == [1]  # epoch 2 never finished: no row for it
    assert result["epochs_run"] == 1 and logs[0]["epochs"][0]["loss"] > 0


def test_sigterm_is_logged_as_an_interruption(fake_cifar_root, tmp_path):
    log_dir = tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, SCRIPT, "--data-dir", fake_cifar_root, "--log-dir", str(log_dir), *TINY,
                             "--epochs", "500", "--target-pct", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline, logs = time.monotonic() + 120, []
        while time.monotonic() < deadline:  # wait until a finished epoch is logged, then stop the run
            try:
                logs = read_logs(log_dir)
            except ValueError:  # not yet written
                logs = []
            if logs and logs[0]["epochs"]:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    log = read_logs(log_dir)[0]
    assert proc.returncode == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("airbench_ssl:")]
    assert len(errors) == 1 and "interrupted (Ctrl-C or SIGTERM)" in errors[0]
    assert log["result"]["status"] == "interrupted" and len(log["epochs"]) >= 1
    assert all(r["loss"] is not None for r in log["epochs"])


#############################################
#      Logs are never lost or overwritten   #
#############################################
FIXED_UUID = uuid.UUID(int=0xABCDEF << 104)


def freeze_clock(monkeypatch):
    """Every time.strftime in the harness renders one fixed second: two names made now are made 'at once'."""
    real_strftime, moment = time.strftime, time.gmtime(1_900_000_000)
    monkeypatch.setattr(ab.time, "strftime", lambda fmt, t=None: real_strftime(fmt, moment))


def test_colliding_log_names_get_a_new_name_and_leave_the_first_log_untouched(tmp_path, monkeypatch):
    freeze_clock(monkeypatch)
    names = iter([FIXED_UUID, FIXED_UUID])
    calls = []
    monkeypatch.setattr(ab.uuid, "uuid4", lambda: calls.append(1) or next(names, None) or uuid.UUID(int=len(calls)))
    cfg = ab.Config(log_dir=str(tmp_path))
    first = ab.reserve_log_path(cfg)
    ab.write_atomic(first, lambda f: f.write(b'{"keep": 1}'))
    second = ab.reserve_log_path(cfg)
    assert len(calls) >= 3  # the second reservation hit the first's name, then drew another
    assert second != first and os.path.exists(second)
    assert open(first, "rb").read() == b'{"keep": 1}'
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(first), os.path.basename(second)])


def test_two_runs_with_the_same_seed_in_the_same_second_both_keep_their_logs(fake_cifar_root, tmp_path, monkeypatch):
    freeze_clock(monkeypatch)
    calls, fixed_until = [], [math.inf]
    monkeypatch.setattr(ab.uuid, "uuid4", lambda: calls.append(1) or (
        FIXED_UUID if len(calls) <= fixed_until[0] else uuid.UUID(int=len(calls))))
    extra = ["--epochs", "1", "--check-first-epoch", "1", "--target-pct", "100", "--seed", "5"]
    assert run_main(fake_cifar_root, tmp_path, *extra)[0] == 0
    first_calls = len(calls)
    first_names = sorted(os.listdir(tmp_path))  # the log and the model
    first_bytes = [open(tmp_path / name, "rb").read() for name in first_names]
    fixed_until[0] = 2 * first_calls + 1  # the second run draws the first run's names, then collides once more
    code, logs = run_main(fake_cifar_root, tmp_path, *extra)
    assert code == 0 and len(calls) > 2 * first_calls  # it did collide and draw again
    assert len(logs) == 2 and len(set(os.listdir(tmp_path))) == 4
    assert [open(tmp_path / name, "rb").read() for name in first_names] == first_bytes
    assert [log["result"]["status"] for log in logs] == ["max_epochs", "max_epochs"]
    assert logs[0]["run_id"] != logs[1]["run_id"] and logs[0]["config"]["seed"] == logs[1]["config"]["seed"] == 5


@pytest.mark.parametrize("death", [RuntimeError("disk gone"), KeyboardInterrupt()])
def test_write_atomic_that_dies_half_way_keeps_the_old_file(tmp_path, death):
    path = str(tmp_path / "log.json")
    ab.write_atomic(path, lambda f: f.write(b"old"))

    def write_half(f):
        f.write(b"new, half")
        raise death

    with pytest.raises(type(death)):
        ab.write_atomic(path, write_half)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["log.json"]
    with pytest.raises(type(death)):
        ab.write_atomic(str(tmp_path / "new.json"), write_half)
    assert os.listdir(tmp_path) == ["log.json"]  # no new file, no temp file


def test_unofficial_data_is_ineligible_and_official_md5s_are_eligible(fake_cifar_root, monkeypatch):
    recipe, gpu = ab.Config(), torch.device("cuda")
    report = ab.load_cifar10(fake_cifar_root, CPU)["report"]
    assert report["official"] is False and not any(entry["ok"] for entry in report["files"].values())
    (reason,) = ab.ineligibility(recipe, gpu, report)
    assert "unofficial" in reason.lower()
    folder = os.path.join(fake_cifar_root, ab.CIFAR_FOLDER)
    sums = {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in ab.OFFICIAL_MD5}
    monkeypatch.setattr(ab, "OFFICIAL_MD5", sums)
    report = ab.load_cifar10(fake_cifar_root, CPU)["report"]
    assert report["official"] is True and ab.ineligibility(recipe, gpu, report) == []
    for cfg, device, word in [(recipe, CPU, "gpu"), (dataclasses.replace(recipe, train_subset=100), gpu, "subset"),
                              (dataclasses.replace(recipe, target_pct=80.0), gpu, "target"),
                              (dataclasses.replace(recipe, knn_k=5), gpu, "k=10")]:
        (reason,) = ab.ineligibility(cfg, device, report)
        assert word in reason.lower()
    monkeypatch.setattr(ab, "OFFICIAL_MD5", dict(sums, test_batch="0" * 32))  # one file off is enough
    report = ab.load_cifar10(fake_cifar_root, CPU)["report"]
    assert report["official"] is False and [n for n, e in report["files"].items() if not e["ok"]] == ["test_batch"]
    assert len(ab.ineligibility(recipe, gpu, report)) == 1


#############################################
#   Bad input: one line, exit code, log     #
#############################################
@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**64)], f"bad config: seed={2**64} must be in [0, {2**63 - 1}]"),
    (["--seed", "-1"], "bad config: seed=-1 must be in"),
    (["--brightness", "inf"], "bad config: brightness=inf must be in [0, 100]"),
    (["--weight-decay", "inf"], "bad config: weight_decay=inf must be in"),
    (["--temperature", "nan"], "bad config: temperature=nan must be in"),
    (["--base-lr", "nan"], "bad config: base_lr=nan must be in"),
    (["--width", "100000"], "bad config: width=100000 must be in [1, 1024]"),
    (["--batch-size", "0"], "bad config: batch_size=0 must be in"),
    (["--arch", "vgg"], "arch='vgg'"),
    (["--warmup-epochs", "6", "--epochs", "6"], "warmup_epochs < epochs"),
    (["--data-dir", "/nonexistent/cifar"], "CIFAR-10 not found in /nonexistent/cifar"),
])
def test_bad_flag_values_are_one_line_and_leave_no_log(flags, message, tmp_path, capsys):
    log_dir = tmp_path / "logs"
    assert ab.main(["--device", "cpu", "--download", "false", "--log-dir", str(log_dir), *flags]) == 1
    assert message in error_line(capsys.readouterr().err)
    assert read_logs(log_dir) == []


def test_absurd_epochs_are_refused_at_once(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--epochs", str(10**11), "--check-every-epochs",
                           "1", "--log-dir", str(tmp_path / "logs")], capture_output=True, text=True, timeout=90,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    assert f"epochs={10**11} must be in" in error_line(proc.stderr)
    assert not (tmp_path / "logs").exists()


DEEP = "[" * 100_000 + "]" * 100_000
CONFIG_FILES = [
    (bytes(range(256)) * 8, "cannot read config file"),
    (DEEP.encode(), "cannot read config file"),
    (('{"seed": 1' + "0" * 4999 + "}").encode(), "cannot read config file"),
    (json.dumps({"seed": 10**100}).encode(), f"seed={10**100} must be in"),
    (b'{"base_lr": 1e999}', "base_lr=inf must be in"),
    (b'{"temperature": NaN}', "temperature=nan must be in"),
    (b'{"epochs": "many"}', "epochs='many' should be of type int"),
    (b'{"epochs": 2.5}', "epochs=2.5 should be of type int"),
    (b'{"epoch": 3}', "unknown fields ['epoch']"),
    (b"[1, 2]", "must hold a JSON object"),
]


@pytest.mark.parametrize("content, message", CONFIG_FILES, ids=["binary", "deep", "5000 digits", "10**100", "inf",
                                                                 "nan", "str", "float", "unknown", "list"])
def test_bad_config_files_are_one_line_and_leave_no_log(content, message, tmp_path, capsys):
    config_file = tmp_path / "c.json"
    config_file.write_bytes(content)
    code = ab.main(["--config", str(config_file), "--device", "cpu", "--log-dir", str(tmp_path / "logs")])
    assert code == 1
    line = error_line(capsys.readouterr().err)
    assert message in line and len(line) < 1000
    assert not (tmp_path / "logs").exists()


def unwritable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):  # root writes anyway
        folder.chmod(0o700)
        pytest.skip("running as root: chmod cannot make a folder unwritable")
    return folder


@pytest.mark.parametrize("where", ["log_dir is a file", "log_dir unwritable"])
def test_unwritable_outputs_are_refused_before_the_data_load(where, fake_cifar_root, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    log_dir, expect = (a_file if where == "log_dir is a file" else unwritable_folder(tmp_path)), "log_dir"
    loads = []
    monkeypatch.setattr(ab, "load_cifar10", lambda *args, **kwargs: loads.append(args) or pytest.fail("data loaded"))
    code, _ = run_main(fake_cifar_root, log_dir)
    assert code == 1 and loads == []
    assert expect in error_line(capsys.readouterr().err)
    assert a_file.read_text() == "keep"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".json")]


@pytest.mark.parametrize("where, error", [
    ("model", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")),
    ("model", RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")),
    ("warm_up", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")),
])
def test_out_of_memory_before_training_is_logged_as_failed(where, error, official_fake_root, tmp_path, monkeypatch,
                                                           capsys):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(*((ab, "make_model") if where == "model" else (ab.Trainer, "warm_up")), fail)
    code, logs = run_main(official_fake_root, tmp_path, "--epochs", "2", "--target-pct", "100")
    assert code == 1
    reason = str(error)[:40]
    line = error_line(capsys.readouterr().err)
    assert reason in line and os.path.join(str(tmp_path), "") in line  # the reason and where the log is
    result = logs[0]["result"]
    assert result["status"] == "failed" and reason in result["message"]
    assert type(error).__name__ in result["traceback"] and logs[0]["epochs"] == []


@pytest.mark.parametrize("error, reason", [(RuntimeError("final table broke"), "final table broke"),
                                           (KeyboardInterrupt(), "interrupted")])
def test_failure_in_the_final_evaluation_keeps_the_training_result(error, reason, official_fake_root, tmp_path,
                                                                   monkeypatch, capsys):
    real_accuracy = ab.knn_accuracy

    def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=10):
        if k == 5:  # only the final table asks for k=5 (the checks use knn_k=10)
            raise error
        return real_accuracy(train_feats, train_labels, test_feats, test_labels, k)

    monkeypatch.setattr(ab, "knn_accuracy", knn_accuracy)
    code, logs = run_main(official_fake_root, tmp_path, "--epochs", "1", "--check-first-epoch", "1",
                          "--target-pct", "100")
    assert code == 1
    line = error_line(capsys.readouterr().err)
    assert reason in line and "after training" in line
    assert "nothing was logged" not in line and "before the run's log" not in line
    log = logs[0]
    assert log["result"]["status"] == "max_epochs" and "did not reach" in log["result"]["message"]
    assert reason in log["result"]["after_training_error"] and log["result"]["epochs_run"] == 1
    assert log["epochs"][-1]["knn_pct"] is not None and log["final_eval"] is None


def test_model_failing_to_save_at_the_end_keeps_the_final_evaluation(official_fake_root, tmp_path, monkeypatch,
                                                                      capsys):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    code, logs = run_main(official_fake_root, tmp_path / "logs", "--epochs", "1", "--check-first-epoch", "1",
                          "--target-pct", "100")
    assert code == 1
    assert "No space left on device" in error_line(capsys.readouterr().err)
    log = logs[0]
    assert log["result"]["status"] == "max_epochs" and "No space left" in log["result"]["after_training_error"]
    assert log["final_eval"]["knn10_pct"] == log["epochs"][-1]["knn_pct"] and log["final_eval"]["knn5_pct"] >= 0
    assert log["model"] is None and os.listdir(tmp_path / "logs") == [log["run_id"] + ".json"]  # no model, no temp


@pytest.mark.parametrize("occupant", ["file", "symlink", "dangling symlink", "folder"])
def test_the_model_never_replaces_what_is_already_at_its_path(occupant, official_fake_root, tmp_path, monkeypatch,
                                                              capsys):
    """The artefact's name is the log's plus .model.pt; whatever already holds that name stays as it was."""
    real_reserve, target = ab.reserve_log_path, tmp_path / "elsewhere"
    target.write_text("keep")

    def reserve_and_occupy(cfg):
        path = real_reserve(cfg)
        model_path = path[:-len(".json")] + ".model.pt"
        if occupant == "file":
            open(model_path, "w").write("keep")
        elif occupant == "folder":
            os.mkdir(model_path)
        else:
            os.symlink(target if occupant == "symlink" else tmp_path / "missing", model_path)
        return path

    monkeypatch.setattr(ab, "reserve_log_path", reserve_and_occupy)
    code, logs = run_main(official_fake_root, tmp_path / "logs", "--epochs", "1", "--check-first-epoch", "1",
                          "--target-pct", "100")
    assert code == 1 and "exists" in error_line(capsys.readouterr().err)
    log = logs[0]
    assert log["result"]["status"] == "max_epochs" and log["model"] is None
    model_path = tmp_path / "logs" / (log["run_id"] + ".model.pt")
    assert target.read_text() == "keep" and not (tmp_path / "missing").exists()
    assert {"file": model_path.is_file, "folder": model_path.is_dir}.get(occupant, model_path.is_symlink)()
    assert sorted(os.listdir(tmp_path / "logs")) == sorted([log["run_id"] + ".json", model_path.name])  # no temp


@pytest.mark.parametrize("save_model", ["false", "export"])
def test_save_model_false_saves_nothing_and_export_saves_a_program(save_model, official_fake_root, tmp_path):
    code, logs = run_main(official_fake_root, tmp_path, "--epochs", "1", "--check-first-epoch", "1", "--target-pct",
                          "100", "--save-model", save_model)
    (log,) = logs
    assert code == 0 and log["config"]["save_model"] == save_model
    if save_model == "false":
        assert log["model"] is None and os.listdir(tmp_path) == [log["run_id"] + ".json"]
        return
    program = torch.export.load(str(tmp_path / log["model"]["file"]))
    assert log["model"]["format"] == "export" and log["model"]["sha256"] == hashlib.sha256(
        (tmp_path / log["model"]["file"]).read_bytes()).hexdigest()
    targets = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert targets and all(isinstance(t, torch._ops.OpOverload) and t.namespace == "aten" for t in targets)
    data, module = ab.load_cifar10(official_fake_root, CPU), program.module()
    with torch.no_grad():  # an exported program is fixed in eval mode: called as it is
        train, test = (module(images.float().div(255)) for images in (data["train_images"][:80], data["test_images"]))
    assert ab.knn_accuracy(train, data["train_labels"][:80], test, data["test_labels"]) == \
        log["result"]["knn_at_stop_pct"]


#############################################
#        Config, presets, the CPU demo      #
#############################################
def test_config_file_and_flags_override_in_order(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"_note": "ignored", "batch_size": 1024, "grayscale_p": 0.2, "epochs": 7,
                                       "width": 32}))
    args = ab.build_parser().parse_args(["--config", str(config_file), "--epochs", "9"])
    cfg, sources = ab.config_from_args(args, cuda_available=True)
    assert (cfg.batch_size, cfg.grayscale_p, cfg.epochs, cfg.width) == (1024, 0.2, 9, 32)
    assert sources == dict(preset="recipe", config_file=str(config_file),
                           file_overrides={"batch_size": 1024, "grayscale_p": 0.2, "epochs": 7, "width": 32})
    args = ab.build_parser().parse_args(["--config", str(config_file), "--preset", "cpu_demo", "--batch-size", "64"])
    cfg, sources = ab.config_from_args(args, cuda_available=True)  # defaults <- preset <- file <- flags
    assert (cfg.width, cfg.batch_size, cfg.train_subset) == (32, 64, ab.CPU_DEMO["train_subset"])
    assert sources["preset"] == "cpu_demo"


def test_without_gpu_the_default_is_the_cpu_demo():
    args = ab.build_parser().parse_args([])
    cfg, sources = ab.config_from_args(args, cuda_available=False)
    assert cfg == ab.Config(**ab.CPU_DEMO) and sources == dict(preset="cpu_demo", config_file=None, file_overrides={})
    assert ab.config_from_args(args, cuda_available=True) == (ab.Config(), dict(preset="recipe", config_file=None,
                                                                                  file_overrides={}))
    recipe = ab.build_parser().parse_args(["--preset", "recipe"])
    assert ab.config_from_args(recipe, cuda_available=False)[0] == ab.Config()


def test_unknown_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ab.main(["--no-such-field", "1"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unrecognized arguments: --no-such-field" in lines[0]


def test_cpu_demo_reads_as_a_success(fake_cifar_root, tmp_path, capsys):
    code = ab.main(["--preset", "cpu_demo", "--device", "cpu", "--data-dir", fake_cifar_root, "--log-dir",
                    str(tmp_path), "--download", "false", "--train-subset", "80", "--epochs", "1", "--width", "8",
                    "--batch-size", "40", "--check-every-epochs", "1", "--projector-hidden-dim", "32"])
    assert code == 0
    (log,) = read_logs(tmp_path)
    rows = log["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1] and log["config_sources"]["preset"] == "cpu_demo"
    lines = capsys.readouterr().out.strip().splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("CPU DEMO DONE")]
    assert at >= len(lines) - 2  # the summary closes the transcript (at most the final-numbers line after it)
    percents = re.findall(r"(\d+\.\d+)%", lines[at])
    assert percents[:2] == [f"{rows[0]['knn_pct']:.2f}", f"{rows[-1]['knn_pct']:.2f}"]  # kNN before -> after
    assert not any("TARGET NOT REACHED" in line or "TARGET REACHED" in line for line in lines)


#############################################
#               Real CIFAR-10               #
#############################################
def test_real_data_runs_end_to_end_on_the_subset(real_cifar_root, tmp_path, monkeypatch):
    trained_on = []
    real_init, real_epoch = ab.Trainer.__init__, ab.Trainer.train_epoch

    def init(self, cfg, device, n_train):
        trained_on.append(("n_train", n_train))
        real_init(self, cfg, device, n_train)

    def train_epoch(self, epoch, train_images, *args):
        trained_on.append(("epoch", len(train_images), sum(self.batch_sizes)))
        return real_epoch(self, epoch, train_images, *args)

    monkeypatch.setattr(ab.Trainer, "__init__", init)
    monkeypatch.setattr(ab.Trainer, "train_epoch", train_epoch)
    code, logs = run_main(real_cifar_root, tmp_path, "--train-subset", "200", "--epochs", "1",
                          "--check-first-epoch", "1", "--target-pct", "100", "--eval-batch-size", "2000")
    assert code == 0
    log = logs[0]
    assert trained_on == [("n_train", 200), ("epoch", 200, 200)]  # trained on the subset, not the 50,000
    assert log["data"]["train_images"] == 50_000 and log["data"]["test_images"] == 10_000  # before the subset
    assert log["config"]["train_subset"] == 200
    assert log["data"]["official"] == all(entry["ok"] for entry in log["data"]["files"].values())
    assert log["eligible"] is False
    assert 10 < log["epochs"][-1]["knn_pct"] < 100
