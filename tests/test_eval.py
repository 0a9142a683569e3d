"""Evaluation: the harness's kNN against sklearn; tools/evaluate.py's linear readouts (they learn, lin augm keeps
the backbone frozen), its model files (tools/verify.py's safe loader, every bad file refused in one line), its table
and log."""

import contextlib
import glob
import io
import json
import math
import os
import re
import runpy
import sys
import time

import evaluate as ev
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, synthetic_images
from sklearn.neighbors import KNeighborsClassifier

import airbench_ssl as ab


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread only spins (see conftest.one_compute_thread)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def vote_features(seed, n_train=600, n_test=300, dim=16, dtype=np.float64):
    """Random features with random labels over 10 classes: with k=10 votes, ties between classes are common."""
    rng = np.random.default_rng(seed)
    train = rng.standard_normal((n_train, dim)).astype(dtype)
    test = rng.standard_normal((n_test, dim)).astype(dtype)
    return train, rng.integers(0, 10, n_train), test, rng.integers(0, 10, n_test)


def cosine_distances64(train, test):
    train = train.astype(np.float64) / np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
    test = test.astype(np.float64) / np.linalg.norm(test.astype(np.float64), axis=1, keepdims=True)
    return 1 - test @ train.T


@pytest.mark.parametrize("k", [5, 10])
def test_knn_predict_is_sklearn_cosine_knn_including_vote_ties(k):
    train, train_labels, test, _ = vote_features(seed=k)
    expected = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train, train_labels).predict(test)
    ours = ab.knn_predict(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), k)
    np.testing.assert_array_equal(ours.numpy(), expected)

    # The vote ties really occur, and go to the lowest class index (what sklearn does and we must match).
    neighbours = np.argsort(cosine_distances64(train, test), axis=1)[:, :k]
    votes = np.stack([np.bincount(train_labels[row], minlength=10) for row in neighbours])
    tied = (votes == votes.max(1, keepdims=True)).sum(1) > 1
    assert tied.mean() > 0.2
    np.testing.assert_array_equal(ours.numpy()[tied], votes[tied].argmax(1))


def test_knn_predict_float32_disagrees_with_sklearn_only_at_distance_near_ties():
    train, train_labels, test, _ = vote_features(seed=1, n_train=3000, n_test=1000, dim=32, dtype=np.float32)
    k = 10
    expected = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train, train_labels).predict(test)
    ours = ab.knn_predict(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), k).numpy()
    distances = np.sort(cosine_distances64(train, test), axis=1)
    clear_boundary = distances[:, k] - distances[:, k - 1] > 1e-5
    assert clear_boundary.mean() > 0.9
    assert (ours != expected)[clear_boundary].sum() == 0


def test_knn_accuracy_is_sklearn_score_in_percent():
    train, train_labels, test, test_labels = vote_features(seed=2)
    expected = KNeighborsClassifier(n_neighbors=10, metric="cosine").fit(train, train_labels).score(test, test_labels)
    ours = ab.knn_accuracy(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test),
                           torch.from_numpy(test_labels), 10)
    assert ours == pytest.approx(100 * expected, abs=1e-4)


def test_knn_predict_does_not_depend_on_block_size():
    train, train_labels, test, _ = (torch.from_numpy(a) for a in vote_features(seed=3, n_test=101))
    whole = ab.knn_predict(train, train_labels, test, 10, block_size=1024)
    for block_size in (1, 7, 50, 100, 101, 102):
        assert torch.equal(ab.knn_predict(train, train_labels, test, 10, block_size=block_size), whole), block_size


#############################################
#              Linear readouts              #
#############################################
def gaussian_blobs(seed, n, dim=32):
    """Features around 10 well-separated class means (the same means for every seed)."""
    means = torch.randn(10, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(n) % 10
    return means[labels] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


def test_lin_precomp_readout_learns_separable_blobs():
    (train, train_labels), (test, test_labels) = gaussian_blobs(1, 500), gaussian_blobs(2, 200)
    readout = ev.Readout(lr=0.01, epochs=20, batch_size=50, weight_decay=5e-6)
    assert ev.linear_accuracy(ev.train_linear(train, train_labels, readout, seed=0), test, test_labels) >= 95
    # The blobs do not classify themselves: a readout that barely moves from its initialisation is far below.
    still = ev.Readout(lr=1e-7, epochs=1, batch_size=50, weight_decay=0.0)
    assert ev.linear_accuracy(ev.train_linear(train, train_labels, still, seed=0), test, test_labels) < 50


COLOURS = torch.tensor([[r, g, b] for r in (30, 225) for g in (30, 225) for b in (30, 225)]
                       + [[128, 128, 128], [225, 128, 30]], dtype=torch.float32)


def colour_blob_images(n, seed):
    """Images whose colour is a Gaussian blob around one of 10 class colours, with pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    colour = COLOURS[labels] + 10 * torch.randn(n, 3, generator=generator)
    pixels = colour[:, :, None, None] + 20 * torch.randn(n, 3, 32, 32, generator=generator)
    return pixels.round().clamp(0, 255).to(torch.uint8), labels


def colour_backbone():
    """Random colour features with BatchNorm: enough to separate the class colours, and buffers that could move."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("lr, expect_learned", [(0.1, True), (1e-7, False)])
def test_lin_augm_readout_learns_separable_images(lr, expect_learned):
    (train, train_labels), (test, test_labels) = colour_blob_images(200, 1), colour_blob_images(100, 2)
    backbone = colour_backbone()
    test_features = ab.extract_features(backbone, test)
    readout = ev.Readout(lr=lr, epochs=5, batch_size=50, weight_decay=5e-6)
    accuracy = ev.lin_augm(backbone, train, train_labels, test_features, test_labels, readout, seed=0)
    assert accuracy >= 95 if expect_learned else accuracy < 50


def test_readouts_anneal_lr_by_cosine_once_per_epoch(monkeypatch):
    seen = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    features, labels = gaussian_blobs(1, 25)
    ev.train_linear(features, labels, ev.Readout(lr=0.2, epochs=4, batch_size=10, weight_decay=0.0), seed=0)
    # 3 batches per epoch (10, 10 and the last 5 kept); lr constant within an epoch, CosineAnnealingLR(T_max=4)
    assert seen == pytest.approx([0.2 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4) for _ in "abc"])


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ab.make_model("resnet18", width=8, projector_hidden_dim=64)


def image_tensors(n, seed):
    images, labels = synthetic_images(n, seed)
    return torch.from_numpy(images.reshape(n, 3, 32, 32)), torch.tensor(labels)


def test_lin_augm_leaves_the_backbone_frozen():
    backbone = tiny_model().backbone
    backbone.train()  # as after training: lin augm must use eval mode, or BatchNorm statistics would move
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    images, labels = image_tensors(24, seed=5)
    test_features = ab.extract_features(backbone, images[:10])
    readout = ev.Readout(lr=0.1, epochs=2, batch_size=8, weight_decay=5e-6)
    ev.lin_augm(backbone, images, labels, test_features, labels[:10], readout, seed=0)

    after = backbone.state_dict()
    assert any("running_mean" in name for name in after) and any("num_batches_tracked" in name for name in after)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(p.grad is None and p.requires_grad for p in backbone.parameters())
    assert backbone.training  # its mode is given back


def test_lin_augm_views_are_crop_and_flip_only():
    backbone = tiny_model().backbone.eval()
    views = ev.crop_flip_features(backbone, torch.Generator().manual_seed(0))
    images, _ = image_tensors(8, seed=3)
    assert not torch.allclose(views(images), views(images), atol=1e-4)  # the views are random
    # Crops and flips of a one-colour image are that image: any colour jitter or grayscale would show.
    colours = np.random.default_rng(0).integers(0, 256, (8, 3, 1, 1), dtype=np.uint8)
    flat = torch.from_numpy(colours).expand(8, 3, 32, 32).contiguous()
    torch.testing.assert_close(views(flat), ab.extract_features(backbone, flat), atol=1e-5, rtol=0)


def test_readout_defaults_are_the_references_and_flags_override_them():
    args = ev.build_parser().parse_args(["ckpt.pt"])
    assert args.evals == ["knn5", "knn10", "lin_precomp", "lin_augm"]
    assert ev.readouts_from_args(args, "resnet18") == ev.readouts_from_args(args, None) == dict(
        lin_precomp=ev.Readout(lr=0.01, epochs=500, batch_size=1000, weight_decay=5e-6),
        lin_augm=ev.Readout(lr=0.1, epochs=100, batch_size=512, weight_decay=5e-6))
    assert ev.readouts_from_args(args, "resnet34")["lin_augm"].weight_decay == 5e-6
    assert {r.weight_decay for r in ev.readouts_from_args(args, "resnet50").values()} == {0.0}
    args = ev.build_parser().parse_args(["ckpt.pt", "--lin-weight-decay", "1e-4", "--lin-augm-lr", "0.05",
                                         "--lin-precomp-epochs", "7", "--lin-augm-batch-size", "64",
                                         "--evals", "lin_augm, knn5"])
    readouts = ev.readouts_from_args(args, "resnet50")
    assert readouts["lin_precomp"] == ev.Readout(lr=0.01, epochs=7, batch_size=1000, weight_decay=1e-4)
    assert readouts["lin_augm"] == ev.Readout(lr=0.05, epochs=100, batch_size=64, weight_decay=1e-4)
    assert args.evals == ["knn5", "lin_augm"]  # the table's order


@pytest.mark.parametrize("flag, value", [
    ("--lin-precomp-lr", "nan"), ("--lin-precomp-lr", "inf"), ("--lin-augm-lr", "0"), ("--lin-augm-lr", "-0.1"),
    ("--lin-precomp-lr", "11"), ("--lin-augm-epochs", "0"), ("--lin-precomp-epochs", "1.5"),
    ("--lin-precomp-epochs", "1000000"), ("--lin-precomp-batch-size", "0"), ("--lin-weight-decay", "-1e-6"),
    ("--lin-weight-decay", "nan"), ("--eval-batch-size", "0"), ("--seed", "-1"), ("--evals", "knn5,knn7"),
    ("--evals", ","), ("--device", "tpu"), ("--download", "maybe"),
])
def test_bad_flags_are_one_line_and_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["ckpt.pt", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


#############################################
#                Model files                #
#############################################
def refused_args(model, tmp_path):
    """An empty --data-dir: were a bad file ever accepted, the run fails at the data instead of evaluating."""
    return [model, "--device", "cpu", "--log-dir", str(tmp_path / "logs"), "--data-dir", str(tmp_path)]


class Payload:
    """Unpickling this creates `marker`: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def weights_file(**changes):
    """What the harness saves with --save-model weights, for a tiny backbone."""
    return dict(dict(format="airbench-ssl-model/1", kind="weights", arch="resnet18", width=8,
                     state_dict=tiny_model().backbone.state_dict()), **changes)


def test_model_files_are_read_with_weights_only_and_a_payload_never_runs(tmp_path, monkeypatch, capsys):
    marker, path = tmp_path / "payload_ran", str(tmp_path / "evil.model.pt")
    torch.save(weights_file(extra=Payload(str(marker))), path)
    calls, real_load = [], torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert ev.main(refused_args(path, tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error: artefact: ") and err.count("\n") == 1
    assert "holds a Python object (io.open)" in err
    assert "weights_only" not in err  # torch's advice to reload unsafely is never passed on
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)
    assert not marker.exists()


BAD_FILES = [
    ("missing", lambda path: None, "model file: cannot read"),
    ("folder", lambda path: os.mkdir(path), "not a regular file"),
    ("empty", lambda path: open(path, "wb").close(), "not a file torch.save wrote"),
    ("json", lambda path: open(path, "w").write('{"format": "airbench-ssl-model/1"}'), "not a file torch.save wrote"),
    ("old checkpoint", lambda path: torch.save(dict(format="airbench-ssl-checkpoint/1"), path),
     "not an airbench-ssl weights file"),
    ("bare state_dict", lambda path: torch.save(tiny_model().backbone.state_dict(), path), "not an airbench-ssl"),
    ("other width", lambda path: torch.save(weights_file(width=16), path), r"conv1.weight is \(8, 3, 3, 3\)"),
    ("NaN weight", lambda path: torch.save(weights_file(state_dict={
        k: v.fill_(float("nan")) if k == "bn1.bias" else v for k, v in tiny_model().backbone.state_dict().items()}),
        path), "bn1.bias holds NaN"),
]


@pytest.mark.parametrize("write, message", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_model_files_are_one_line_and_exit_1(tmp_path, write, message, capsys):
    path = str(tmp_path / "model.pt")
    write(path)
    assert ev.main(refused_args(path, tmp_path)) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("evaluate: error: ") and captured.err.count("\n") == 1, captured.err
    assert re.search(message, captured.err), captured.err
    assert os.listdir(tmp_path / "logs") == []  # nothing logged


def test_the_command_line_fails_in_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "none.model.pt")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", missing, "--log-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # as `python tools/evaluate.py none.model.pt` runs it
        runpy.run_path(os.path.join(ROOT, "tools", "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (f"evaluate: error: model file: cannot read {missing}: No such file or "
                                       "directory\n")


#############################################
#          The whole table and log          #
#############################################
@pytest.fixture(scope="module")
def trained(fake_cifar_root, tmp_path_factory):
    """A tiny training run on the synthetic data -> (its log path, its log); its model file is beside the log."""
    log_dir = str(tmp_path_factory.mktemp("trained") / "logs")
    with contextlib.redirect_stdout(io.StringIO()):
        code = ab.main(["--preset", "recipe", "--device", "cpu", "--width", "8", "--batch-size", "40", "--epochs", "1",
                        "--check-first-epoch", "1", "--data-dir", fake_cifar_root, "--log-dir", log_dir,
                        "--download", "false", "--projector-hidden-dim", "64"])
    assert code == 0
    (log_path,) = glob.glob(os.path.join(log_dir, "*.json"))
    with open(log_path, encoding="utf-8") as f:
        return log_path, json.load(f)


def eval_args(model, root, log_dir, *extra):
    return [model, "--data-dir", root, "--device", "cpu", "--log-dir", log_dir, "--lin-precomp-epochs", "3",
            "--lin-augm-epochs", "1", "--lin-augm-batch-size", "100", "--download", "false", *extra]


def test_evaluate_prints_the_table_and_logs_the_training_run(trained, fake_cifar_root, tmp_path, capsys):
    log_path, train_log = trained
    log_dir = str(tmp_path / "eval")
    assert ev.main(eval_args(log_path, fake_cifar_root, log_dir)) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # progress lines are for terminals only
    lines = out.splitlines()
    header = lines.index(ev.TABLE_HEADER.splitlines()[0])
    row = lines[header + 2].split("|")[1:-1]
    assert row[:3] == ["resnet18 (width 8)", "40", f"{train_log['epochs'][-1]['loss']:.3f}"]
    # The evaluated model is the trained one, bit for bit: kNN agrees exactly with the training run's final eval.
    assert row[3:5] == [f"{train_log['final_eval']['knn5_pct']:.2f}", f"{train_log['final_eval']['knn10_pct']:.2f}"]
    assert lines[header + 3].startswith("(accuracies in % of the 60 test images: kNN against the 200 train images, "
                                        "readouts trained on the 200 train images")

    (eval_path,) = glob.glob(os.path.join(log_dir, "*.json"))
    with open(eval_path, encoding="utf-8") as f:
        log = json.load(f)
    assert (log["kind"], log["run_id"], log["train_log"]) == ("eval", train_log["run_id"], log_path)
    assert {k: log["model"][k] for k in ("format", "sha256", "bytes")} == {
        k: train_log["model"][k] for k in ("format", "sha256", "bytes")}
    assert train_log["run_id"] in os.path.basename(eval_path)
    assert log["config"] == train_log["config"] and log["data"]["train_images"] == 200
    assert (log["evaluation"]["train_images"], log["evaluation"]["test_images"]) == (200, 60)
    results = log["results"]
    assert (results["knn5_pct"], results["knn10_pct"]) == (train_log["final_eval"]["knn5_pct"],
                                                           train_log["final_eval"]["knn10_pct"])
    assert row[5:7] == [f"{results['lin_precomp_pct']:.2f}", f"{results['lin_augm_pct']:.2f}"]
    assert set(log["seconds"]) == {"features", "knn5", "knn10", "lin_precomp", "lin_augm", "data_load"}
    assert log["evaluation"]["readouts"]["lin_augm"] == dict(lr=0.1, epochs=1, batch_size=100, weight_decay=5e-6)

    # The model file alone, here for lin precomp alone, gets its own log; the first is left as it was, and each
    # readout is seeded on its own, so lin precomp repeats exactly. Without the log, Batch and Loss are unknown.
    with open(eval_path, "rb") as f:
        first = f.read()
    model_path = os.path.join(os.path.dirname(log_path), train_log["model"]["file"])
    assert ev.main(eval_args(model_path, fake_cifar_root, log_dir, "--evals", "lin_precomp")) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|resnet18")][0].split("|")[1:-1]
    assert row[:5] == ["resnet18 (width 8)", "-", "-", "-", "-"]
    logs = sorted(glob.glob(os.path.join(log_dir, "*.json")))
    assert len(logs) == 2
    with open(eval_path, "rb") as f:
        assert f.read() == first
    with open(next(p for p in logs if p != eval_path), encoding="utf-8") as f:
        second = json.load(f)
    assert second["results"]["lin_precomp_pct"] == results["lin_precomp_pct"] and second["results"]["knn5_pct"] is None
    assert (second["run_id"], second["train_log"], second["config"]) == (train_log["run_id"], None, None)


def test_a_log_whose_model_file_was_swapped_is_refused(trained, fake_cifar_root, tmp_path, capsys):
    log_path, train_log = trained
    torch.save(weights_file(), tmp_path / train_log["model"]["file"])  # another model under the run's file name
    with open(tmp_path / "run.json", "w", encoding="utf-8") as f:
        json.dump(train_log, f)
    assert ev.main(eval_args(str(tmp_path / "run.json"), fake_cifar_root, str(tmp_path / "eval"))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model file: " in err and "is not the file the run saved" in err


def test_eval_log_names_are_never_reused(tmp_path, monkeypatch):
    frozen = time.gmtime(0)
    monkeypatch.setattr(ev.time, "gmtime", lambda *args: frozen)
    hexes = iter(["aaaaaa" + "0" * 26, "aaaaaa" + "0" * 26, "bbbbbb" + "0" * 26])
    monkeypatch.setattr(ev.uuid, "uuid4", lambda: type("U", (), {"hex": next(hexes)})())
    first = ev.reserve_eval_log(str(tmp_path), "run/../x")
    assert os.path.dirname(first) == str(tmp_path) and "aaaaaa" in first and "/../" not in first[len(str(tmp_path)):]
    with open(first, "w") as f:
        f.write("keep")
    second = ev.reserve_eval_log(str(tmp_path), "run/../x")  # same second, same first guess: a new name
    assert second != first and "bbbbbb" in second
    with open(first) as f:
        assert f.read() == "keep"
