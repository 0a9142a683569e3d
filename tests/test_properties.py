"""Properties of the harness whose failure would be silent: what the epoch clock holds, which config values are
refused, which images the kNN evaluation sees. Each is stated over every field, every epoch or every check, so a
new field or a refactor is covered without a new test. (Several processes: tests/test_distributed.py.)"""

import dataclasses
import json
import math
import time
import types

import pytest
import torch
from conftest import write_fake_cifar

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

CPU = torch.device("cpu")
PER_BATCH, N_TEST = 16, 30  # 80 training images in 5 files, 30 test images
TINY = ["--preset", "recipe", "--device", "cpu", "--width", "8", "--projector-hidden-dim", "32",
        "--projector-out-dim", "16", "--batch-size", "40", "--download", "false"]


@pytest.fixture(scope="module")
def small_cifar_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("small_cifar"))
    write_fake_cifar(root, per_batch=PER_BATCH, n_test=N_TEST)
    return root


def run_main(root, log_dir, *extra):
    """main() in this process -> its one log."""
    assert ab.main(["--data-dir", root, "--log-dir", str(log_dir), *TINY, *extra]) == 0
    (log_file,) = log_dir.glob("*.json")
    return json.loads(log_file.read_text())


#############################################
#   The epoch clock holds the device's work #
#############################################
class VirtualDevice:
    """A device whose work finishes after the host has moved on, on a virtual clock that the harness reads as
    time.perf_counter: each training step queues STEP seconds of work and returns at once, as a CUDA step does;
    waiting for the device (ab.synchronize, where the harness waits) runs the clock on until the queue is empty.
    The untimed phases take virtual time too, each a different power of ten above an epoch's work, so a phase that
    leaks into an epoch shows in its epoch_seconds. The real host time of a tiny epoch is far below STEP."""

    STEP, KNN_QUEUED, KNN_HOST, WARM_UP, DATA_LOAD = 1e3, 1e4, 1e5, 1e6, 1e7

    def __init__(self):
        self.offset, self.queued, self.steps = 0.0, 0.0, 0

    def perf_counter(self):
        return time.perf_counter() + self.offset

    def wait(self):
        self.offset, self.queued = self.offset + self.queued, 0.0

    def install(self, monkeypatch):
        real_sync, real_update, real_check = ab.synchronize, ab.Trainer.update, ab.knn_check
        real_warm_up, real_load = ab.Trainer.warm_up, ab.load_cifar10

        def synchronize(device):
            real_sync(device)
            self.wait()

        def update(trainer, views):
            loss = real_update(trainer, views)
            self.queued += self.STEP
            self.steps += 1
            return loss

        def knn_check(*args, **kwargs):  # host time, and device work still queued when it returns
            self.offset += self.KNN_HOST
            self.queued += self.KNN_QUEUED
            return real_check(*args, **kwargs)

        def warm_up(trainer):
            self.offset += self.WARM_UP
            return real_warm_up(trainer)

        def load_cifar10(*args, **kwargs):
            self.offset += self.DATA_LOAD
            return real_load(*args, **kwargs)

        clock = types.SimpleNamespace(**{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
        clock.perf_counter = self.perf_counter
        monkeypatch.setattr(ab, "time", clock)
        monkeypatch.setattr(ab, "synchronize", synchronize)
        monkeypatch.setattr(ab.Trainer, "update", update)
        monkeypatch.setattr(ab, "knn_check", knn_check)
        monkeypatch.setattr(ab.Trainer, "warm_up", warm_up)
        monkeypatch.setattr(ab, "load_cifar10", load_cifar10)


def test_epoch_time_is_the_devices_work_and_nothing_untimed(small_cifar_root, tmp_path, monkeypatch):
    """Each epoch's time holds all the device work its steps queued (the clock stops after the device is done) and
    none of the work queued before it (it starts after the device is done), nor data load, warm-up or kNN checks."""
    device = VirtualDevice()
    device.install(monkeypatch)
    log = run_main(small_cifar_root, tmp_path, "--epochs", "3", "--check-first-epoch", "0", "--check-every-epochs",
                   "1", "--target-pct", "100")
    steps_per_epoch = 2  # 80 images in batches of 40
    rows = log["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and device.steps == 3 * steps_per_epoch
    work = steps_per_epoch * device.STEP
    for row in rows[1:]:
        assert work <= row["epoch_seconds"] < work + device.STEP, row
    assert log["result"]["timed_seconds"] == pytest.approx(3 * work, abs=3 * device.STEP)
    untimed = log["untimed_seconds"]
    assert untimed["data_load"] >= device.DATA_LOAD and untimed["warmup"] >= device.WARM_UP
    assert all(r["knn_seconds"] >= device.KNN_HOST for r in rows)
    assert untimed["knn_checks"] >= 4 * device.KNN_HOST
    assert log["total_wall_seconds"] >= device.DATA_LOAD + device.WARM_UP + 4 * device.KNN_HOST + 3 * work


def test_waiting_for_a_gpu_waits_for_that_gpu(monkeypatch):
    """ab.synchronize is where the harness waits for the device (the test above relies on it): on a GPU it must
    wait for that GPU's queued kernels, not only for the host."""
    waited = []  # torch.cuda.synchronize takes a device or its index
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(
        torch.device("cuda", device) if isinstance(device, int) else torch.device(device)))
    ab.synchronize(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]
    waited.clear()
    ab.synchronize(CPU)
    assert waited == []


#############################################
#   Every config field refuses other types  #
#############################################
FIELDS = dataclasses.fields(ab.Config)
WRONG_IN_JSON = {bool: [1, 0, 1.0, "true", None], int: [True, False, 2.0, "3", None],
                 float: [True, False, "0.5", None], str: [1, 0.5, True, None, ["x"]]}
WRONG_ON_CLI = {bool: ["2", "0.5", "maybe", ""], int: ["true", "false", "1.5", "1e3", "", "0x10"],
                float: ["true", "yes", "", "1,5"], str: []}


PARSER = ab.build_parser()


def resolve(argv, tmp_path=None, overrides=None):
    """config_from_args on argv (plus a config file of `overrides`) -> the config, or the refusal (exception)."""
    if overrides is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(overrides))
        argv = [*argv, "--config", str(path)]
    try:
        return ab.config_from_args(PARSER.parse_args(["--preset", "recipe", *argv]), False)[0]
    except (ab.HarnessError, SystemExit) as refusal:
        return refusal


def flag(field):
    return "--" + field.name.replace("_", "-")


def cli_text(value):
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)


def test_every_field_has_a_type_this_test_knows():
    assert FIELDS and all(f.type in WRONG_IN_JSON for f in FIELDS)


def test_every_field_refuses_a_value_of_another_type_from_a_config_file(tmp_path):
    wrongly_taken = [(f.name, value) for f in FIELDS for value in WRONG_IN_JSON[f.type]
                     if not (isinstance(refusal := resolve([], tmp_path, {f.name: value}), ab.HarnessError)
                             and f"{f.name}=" in str(refusal))]
    assert wrongly_taken == []
    for f in FIELDS:  # its own type is taken, and kept
        cfg = resolve([], tmp_path, {f.name: f.default})
        assert getattr(cfg, f.name) == f.default and type(getattr(cfg, f.name)) is f.type, (f.name, cfg)


def test_every_field_refuses_a_value_of_another_type_on_the_command_line(capsys):
    wrongly_taken = [(f.name, text) for f in FIELDS for text in WRONG_ON_CLI[f.type]
                     if not isinstance(resolve([flag(f), text]), (ab.HarnessError, SystemExit))]
    assert wrongly_taken == []
    for f in FIELDS:
        cfg = resolve([flag(f), cli_text(f.default)])
        assert getattr(cfg, f.name) == f.default and type(getattr(cfg, f.name)) is f.type, (f.name, cfg)
        other = other_value(f)  # a flag sets its field, whatever its value (0, false and "" too)
        cfg = resolve([*(["--epochs", "100000"] if f.name != "epochs" else []), flag(f), cli_text(other)])
        assert getattr(cfg, f.name) == other and type(getattr(cfg, f.name)) is f.type, (f.name, other, cfg)
        if f.type is bool:  # the command line's words for true and false
            for words, value in (("1", "true", "yes", "on", "True", "ON"), True), (("0", "false", "no", "off"), False):
                assert all(getattr(resolve([flag(f), word]), f.name) is value for word in words), f.name


def other_value(field):
    """A valid value of the field other than its default: the other bool, another choice, a bound, or a path."""
    if field.type is bool:
        return not field.default
    if field.metadata.get("choices"):
        return next(c for c in field.metadata["choices"] if c != field.default)
    lo, hi = field.metadata.get("bounds", (None, None))
    if lo is None:
        return "" if field.default else "some/folder"
    return field.type(hi if hi != field.default else lo)


def bounds_error(name, value):
    """validate_config's refusal of field `name` at `value` for its range, or None (another field's problem, as
    warmup_epochs >= epochs, is not one)."""
    try:
        ab.validate_config(dataclasses.replace(ab.Config(), **{name: value}))
    except ab.HarnessError as error:
        return str(error) if f" {name}=" in str(error) and "must be in" in str(error) else None
    return None


def test_every_bounded_field_takes_its_bounds_and_refuses_one_step_beyond():
    bounded = [f for f in FIELDS if f.metadata.get("bounds", (None, None))[0] is not None]
    assert len(bounded) > 20
    wrong = []
    for f in bounded:
        lo, hi = f.metadata["bounds"]
        beyond = [lo - 1, hi + 1] if f.type is int else [math.nextafter(lo, -math.inf),
                                                          math.nextafter(hi, math.inf), math.nan, math.inf, -math.inf]
        wrong += [(f.name, value, "refused") for value in (lo, hi) if bounds_error(f.name, value)]
        wrong += [(f.name, value, "taken") for value in beyond if not bounds_error(f.name, value)]
    assert wrong == []


def test_every_choice_field_takes_each_choice_and_nothing_else():
    for f in [f for f in FIELDS if f.metadata.get("choices")]:
        for choice in f.metadata["choices"]:
            ab.validate_config(dataclasses.replace(ab.Config(), **{f.name: choice}))
        for other in ("", f.metadata["choices"][0].upper(), f.metadata["choices"][0] + " "):
            with pytest.raises(ab.HarnessError, match=f"{f.name}="):
                ab.validate_config(dataclasses.replace(ab.Config(), **{f.name: other}))


#############################################
#  kNN: the full test set, whatever subset  #
#############################################
@pytest.mark.parametrize("train_subset, knn_k", [(0, 10), (20, 3)])
def test_knn_evaluates_the_whole_test_set_against_the_trained_images(train_subset, knn_k, small_cifar_root, tmp_path,
                                                                     monkeypatch):
    """train_subset cuts the training images (the first n) and nothing else: every kNN check and the final table
    compare all test images, by all their labels, with the features of exactly the images trained on; each check's
    logged number is kNN with the configured k, and the log says what was compared."""
    data = ab.load_cifar10(small_cifar_root, CPU)
    n_train = train_subset or len(data["train_images"])
    extracted, scored = [], []
    real_extract, real_accuracy = ab.extract_features, ab.knn_accuracy

    def extract_features(backbone, images_uint8, *args, **kwargs):
        extracted.append(images_uint8.clone())
        return real_extract(backbone, images_uint8, *args, **kwargs)

    def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=10):
        pct = real_accuracy(train_feats, train_labels, test_feats, test_labels, k)
        scored.append(dict(n_train=len(train_feats), train_labels=train_labels.clone(), n_test=len(test_feats),
                           test_labels=test_labels.clone(), k=k, pct=pct))
        return pct

    monkeypatch.setattr(ab, "extract_features", extract_features)
    monkeypatch.setattr(ab, "knn_accuracy", knn_accuracy)
    log = run_main(small_cifar_root, tmp_path, "--train-subset", str(train_subset), "--knn-k", str(knn_k), "--epochs",
                   "1", "--check-first-epoch", "0", "--check-every-epochs", "1", "--target-pct", "100")
    assert len(scored) >= 3  # the checks at epochs 0 and 1, the final table
    for call in scored:
        assert call["n_test"] == N_TEST and torch.equal(call["test_labels"], data["test_labels"])
        assert call["n_train"] == n_train and torch.equal(call["train_labels"], data["train_labels"][:n_train])
    assert extracted and all(torch.equal(images, data["test_images"]) or torch.equal(images, data["train_images"][
        :n_train]) for images in extracted)
    assert any(torch.equal(images, data["test_images"]) for images in extracted)
    checks = [row["knn_pct"] for row in log["epochs"] if row["knn_pct"] is not None]
    assert [call["pct"] for call in scored if call["k"] == knn_k][:len(checks)] == checks == [
        row["knn_pct"] for row in log["epochs"]]
    assert log["data"]["test_images"] == log["data"]["knn_test_images"] == N_TEST
    assert log["data"]["train_images"] == 5 * PER_BATCH
    assert log["data"]["trained_on_images"] == n_train and log["config"]["train_subset"] == train_subset


#############################################
#    Progressive resolution, epoch by epoch #
#############################################
def test_each_epoch_trains_views_of_its_scheduled_size(small_cifar_root, tmp_path, monkeypatch):
    """Epochs with 0-based index < low_res_epochs train views of low_res_px, every later epoch 32 px; every view of a
    step has its epoch's size."""
    sizes, real_update = [], ab.Trainer.update

    def update(trainer, views):
        sizes.append({tuple(view.shape[1:]) for view in views})
        return real_update(trainer, views)

    monkeypatch.setattr(ab.Trainer, "update", update)
    run_main(small_cifar_root, tmp_path, "--epochs", "3", "--low-res-px", "16", "--low-res-epochs", "2",
             "--check-first-epoch", "3", "--target-pct", "100")
    low, full = {(3, 16, 16)}, {(3, 32, 32)}
    assert sizes == [low] * 4 + [full] * 2  # 2 steps an epoch
