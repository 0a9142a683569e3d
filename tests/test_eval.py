"""Evaluation: kNN against sklearn, linear readouts, the frozen backbone of lin augm, final evals, checkpoints and
the `eval` command."""

import contextlib
import dataclasses
import glob
import io
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from conftest import synthetic_images
from sklearn.neighbors import KNeighborsClassifier

import airbench_ssl as ab


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


def linearly_separable(seed, n, dim=32):
    """Features around 10 well-separated class means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(10, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(n) % 10
    return means[labels] + torch.randn(n, dim, generator=generator), labels


def test_linear_readout_learns_separable_features():
    train_feats, train_labels = linearly_separable(seed=1, n=500)
    test_feats, test_labels = linearly_separable(seed=2, n=200)
    cfg = dataclasses.replace(ab.Config(), linear_epochs=20, linear_batch_size=50)
    classifier = ab.train_linear(train_feats, train_labels, cfg, torch.Generator().manual_seed(0))
    assert ab.linear_accuracy(classifier, test_feats, test_labels) > 95
    # chance is 10%: the readout, not the data, does the work
    untrained = torch.nn.Linear(32, 10)
    assert ab.linear_accuracy(untrained, test_feats, test_labels) < 60


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ab.make_model("resnet18", width=8)


def image_tensors(n, seed):
    images, labels = synthetic_images(n, seed)
    return torch.from_numpy(images.reshape(n, 3, 32, 32)), torch.tensor(labels)


def test_lin_augm_leaves_the_backbone_frozen():
    model = tiny_model()
    backbone = model.backbone
    backbone.train()  # as after training: lin augm must switch it to eval, or BatchNorm statistics would move
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    images, labels = image_tensors(24, seed=5)
    cfg = dataclasses.replace(ab.Config(), linear_epochs=2, linear_batch_size=8)
    generator = torch.Generator().manual_seed(0)
    features_of = ab.lin_augm_features(backbone, cfg, generator)
    classifier = ab.train_linear(images, labels, cfg, generator, features_of)

    assert classifier.weight.shape == (10, backbone.out_dim)
    after = backbone.state_dict()
    assert any("running_mean" in name for name in after) and any("num_batches_tracked" in name for name in after)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert all(p.grad is None for p in backbone.parameters())
    # The views are augmented, not the plain images: two calls on the same images give different features.
    assert not torch.equal(features_of(images[:4]), features_of(images[:4]))


def fake_data(n_train=40, n_test=20):
    train_images, train_labels = image_tensors(n_train, seed=1)
    test_images, test_labels = image_tensors(n_test, seed=2)
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels)


@pytest.mark.parametrize("names", [[], ["knn5"], ["knn10", "lin_precomp"]])
def test_final_evals_report_every_key_and_none_for_evals_not_run(names):
    model, data = tiny_model(), fake_data()
    cfg = dataclasses.replace(ab.Config(), linear_epochs=2, linear_batch_size=16)
    final = ab.run_final_evals(model, data, cfg, torch.Generator().manual_seed(0), names)
    assert set(final) == {f"{name}_pct" for name in ab.FINAL_EVALS} | {"seconds"}
    for name in ab.FINAL_EVALS:
        value = final[f"{name}_pct"]
        assert (value is None) == (name not in names), name
        assert value is None or 0 <= value <= 100
    assert set(final["seconds"]) == (set(names) | {"features"} if names else set())
    if "knn5" in names:
        feats = [ab.extract_features(model.backbone, data[key]) for key in ("train_images", "test_images")]
        assert final["knn5_pct"] == ab.knn_accuracy(feats[0], data["train_labels"], feats[1], data["test_labels"], 5)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=3)
    model.train()
    model(torch.rand(4, 3, 32, 32))  # move the BatchNorm buffers away from their initial values
    cfg = dataclasses.replace(ab.Config(), width=8)
    path = str(tmp_path / "model.pt")
    ab.save_checkpoint(path, model, cfg, "run-1")
    loaded, saved = ab.load_checkpoint(path, torch.device("cpu"))
    assert saved["width"] == 8 and saved["arch"] == "resnet18"
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert list(state) == list(loaded_state)
    assert all(torch.equal(state[name], loaded_state[name]) for name in state)
    x = torch.rand(3, 3, 32, 32)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))


def write_random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("write, message", [
    (lambda p: torch.save({"a": 1}, p), "not an airbench-ssl checkpoint"),
    (write_random_bytes, "not an airbench-ssl checkpoint"),
    (lambda p: torch.save(torchvision.models.resnet18(weights=None).state_dict(), p), "not an airbench-ssl"),
    (lambda p: None, "does not exist"),
])
def test_foreign_files_are_refused_in_one_line(tmp_path, write, message):
    path = tmp_path / "file.pt"
    write(path)
    with pytest.raises(ab.HarnessError, match=message) as error:
        ab.load_checkpoint(str(path), torch.device("cpu"))
    assert "\n" not in str(error.value)


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path):
    model = tiny_model()
    config = dataclasses.asdict(dataclasses.replace(ab.Config(), width=16))
    path = str(tmp_path / "mismatch.pt")
    torch.save(dict(format=ab.CHECKPOINT_FORMAT, config=config, run_id="x", state_dict=model.state_dict()), path)
    with pytest.raises(ab.HarnessError, match="does not fit arch=resnet18 width=16") as error:
        ab.load_checkpoint(path, torch.device("cpu"))
    assert "\n" not in str(error.value)


def test_checkpoint_with_marker_but_no_config_is_refused(tmp_path):
    path = str(tmp_path / "broken.pt")
    torch.save(dict(format=ab.CHECKPOINT_FORMAT, state_dict={}), path)
    with pytest.raises(ab.HarnessError):
        ab.load_checkpoint(path, torch.device("cpu"))


TRAIN_ARGS = ["--download", "false", "--device", "cpu", "--width", "8", "--batch-size", "32", "--epochs", "1",
              "--check-first-epoch", "1", "--check-every-epochs", "1", "--final-evals", "knn10", "--warmup-steps", "0",
              "--target-pct", "100"]


@pytest.fixture(scope="module")
def trained_checkpoint(fake_cifar_root, tmp_path_factory):
    """One short training run on the synthetic data that saves a checkpoint: -> (checkpoint path, its train log)."""
    folder = tmp_path_factory.mktemp("trained")
    path, log_dir = str(folder / "model.pt"), str(folder / "logs")
    with contextlib.redirect_stdout(io.StringIO()):
        code = ab.main(["--data-dir", fake_cifar_root, *TRAIN_ARGS, "--log-dir", log_dir, "--save-checkpoint", path])
    assert code == 0
    (log_path,) = glob.glob(os.path.join(log_dir, "*.json"))
    with open(log_path, encoding="utf-8") as f:
        return path, json.load(f)


def eval_args(checkpoint, root, log_dir):
    return ["eval", checkpoint, "--data-dir", root, "--download", "false", "--device", "cpu", "--final-evals",
            "knn5,knn10,lin_precomp,lin_augm", "--linear-epochs", "2", "--log-dir", log_dir]


def test_eval_command_prints_the_reference_table(trained_checkpoint, fake_cifar_root, tmp_path, capsys):
    checkpoint, train_log = trained_checkpoint
    assert ab.main(eval_args(checkpoint, fake_cifar_root, str(tmp_path))) == 0
    lines = capsys.readouterr().out.splitlines()
    header = "|Backbone|Batch|Loss/batch|kNN(k=5)|kNN(k=10)|lin precomp|lin augm|"
    row = lines[lines.index(header) + 2].split("|")[1:-1]
    assert row[0] == "resnet18 (width 8)"
    knn5, knn10, lin_precomp, lin_augm = (float(cell) for cell in row[3:7])
    assert all(0 <= pct <= 100 for pct in (knn5, knn10, lin_precomp, lin_augm))
    # The saved model is the trained one: its kNN k=10 is exactly what the training run measured at the end.
    assert row[4] == f"{train_log['final_eval']['knn10_pct']:.2f}"
    (log_path,) = glob.glob(str(tmp_path / "*.json"))
    with open(log_path, encoding="utf-8") as f:
        log = json.load(f)
    assert log["kind"] == "eval" and log["checkpoint"] == checkpoint
    assert log["final_eval"]["knn10_pct"] == train_log["final_eval"]["knn10_pct"]


def test_eval_table_shows_the_training_batch_size(trained_checkpoint, fake_cifar_root, tmp_path, capsys):
    checkpoint, _ = trained_checkpoint
    args = eval_args(checkpoint, fake_cifar_root, str(tmp_path))
    args[args.index("knn5,knn10,lin_precomp,lin_augm")] = "knn5"
    assert ab.main(args) == 0
    out = capsys.readouterr().out
    assert "|resnet18 (width 8)|32|" in out


def test_eval_log_names_the_training_run(trained_checkpoint, fake_cifar_root, tmp_path):
    checkpoint, train_log = trained_checkpoint
    args = eval_args(checkpoint, fake_cifar_root, str(tmp_path))
    args[args.index("knn5,knn10,lin_precomp,lin_augm")] = "knn5"
    with contextlib.redirect_stdout(io.StringIO()):
        assert ab.main(args) == 0
    (log_path,) = glob.glob(str(tmp_path / "*.json"))
    with open(log_path, encoding="utf-8") as f:
        assert json.load(f)["checkpoint_run_id"] == train_log["run_id"]


def test_eval_of_a_missing_checkpoint_is_one_line_and_exit_1(fake_cifar_root, tmp_path, capsys):
    assert ab.main(eval_args(str(tmp_path / "nonexistent.pt"), fake_cifar_root, str(tmp_path))) == 1
    err = capsys.readouterr().err
    assert err.startswith("airbench_ssl: error: ") and "nonexistent.pt" in err
    assert err.count("\n") == 1
