"""Data section: load_cifar10 and its helpers on a synthetic copy in the real on-disk format (and the real copy).

The loader must read the official Python 2 pickles and numpy 2 re-pickles alike, flag any file whose md5 is not
the official one, refuse pickles that would run code, and fail with one clear line on anything malformed.
"""

import hashlib
import io
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import CIFAR_FILES, synthetic_images, write_fake_cifar

import airbench_ssl as ab

PER_BATCH, N_TEST = 40, 60  # write_fake_cifar's defaults, which the fake_cifar_root fixture uses
# md5 of the unofficial, JPEG-rebuilt copy used in development (as its README lists them)
SHARED_COPY_MD5 = {
    "data_batch_1": "0c0a3eab9e4d08cc4eecc13d070f28b0", "data_batch_2": "bb88303e1560b1aa081be6a3d015fce1",
    "data_batch_3": "cc539c17ba56dc66a24a141550f3267d", "data_batch_4": "33e500905b4ad905df838863106b4753",
    "data_batch_5": "6d830601996413736d9f78060cc23f1c", "test_batch": "61dedee628d33979a79b3c61e2b907c2",
}


def expected_fixture(seed=0):
    """What write_fake_cifar wrote: train = data_batch_1..5 concatenated in order, then test_batch."""
    train = [synthetic_images(PER_BATCH, seed + i) for i in range(5)]
    test_data, test_labels = synthetic_images(N_TEST, seed + 5)
    return (np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32), np.concatenate([y for _, y in train]),
            test_data.reshape(-1, 3, 32, 32), np.array(test_labels))


def file_md5s(folder):
    md5s = {}
    for name in CIFAR_FILES:
        with open(os.path.join(folder, name), "rb") as f:
            md5s[name] = hashlib.md5(f.read()).hexdigest()
    return md5s


@pytest.fixture
def writable_copy(fake_cifar_root, tmp_path):
    """A private copy of the fixture to damage: -> (data_dir, batches folder)."""
    folder = tmp_path / ab.CIFAR_FOLDER
    shutil.copytree(os.path.join(fake_cifar_root, ab.CIFAR_FOLDER), folder)
    return str(tmp_path), str(folder)


def assert_is_fixture(data):
    train_images, train_labels, test_images, test_labels = expected_fixture()
    assert data["train_images"].shape == (5 * PER_BATCH, 3, 32, 32) and data["train_images"].dtype == torch.uint8
    assert data["test_images"].shape == (N_TEST, 3, 32, 32) and data["test_images"].dtype == torch.uint8
    assert data["train_labels"].dtype == torch.int64 and data["test_labels"].dtype == torch.int64
    np.testing.assert_array_equal(data["train_images"].numpy(), train_images)
    np.testing.assert_array_equal(data["train_labels"].numpy(), train_labels)
    np.testing.assert_array_equal(data["test_images"].numpy(), test_images)
    np.testing.assert_array_equal(data["test_labels"].numpy(), test_labels)
    assert data["report"]["train_images"] == 5 * PER_BATCH and data["report"]["test_images"] == N_TEST


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (SHORT_BINSTRING / BINSTRING opcodes), as cPickle did for the official files.
    Python 3's own protocol-2 pickles store bytes as a call to _codecs.encode instead, which the official files
    never contain."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else
                   pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def python2_style_batch(data, labels):
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump({b"batch_label": b"training batch 1 of 5", b"labels": list(labels),
                                         b"data": data, b"filenames": [b"a.png"] * len(labels)})
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


# --------------------------------------------------------------------------- loading the synthetic copy


def test_fixture_loads_with_exact_values_and_order(fake_cifar_root, capsys):
    data = ab.load_cifar10(fake_cifar_root, "cpu")
    assert_is_fixture(data)
    report = data["report"]
    assert set(report) == {"data_dir", "official", "files", "train_images", "test_images"}
    assert report["data_dir"] == os.path.join(fake_cifar_root, ab.CIFAR_FOLDER)
    # the fixture is not the official data: every file flagged, and loudly
    assert report["official"] is False
    md5s = file_md5s(report["data_dir"])
    for name in ab.OFFICIAL_MD5:
        assert report["files"][name] == dict(md5=md5s[name], expected_md5=ab.OFFICIAL_MD5[name], ok=False)
    err = capsys.readouterr().err
    assert "WARNING: UNOFFICIAL DATA" in err and "data_batch_1" in err and "test_batch" in err


def test_matching_md5s_make_the_data_official(fake_cifar_root, monkeypatch, capsys):
    # A file with the official md5 cannot be faked, so declare the fixture's md5s official instead.
    md5s = file_md5s(os.path.join(fake_cifar_root, ab.CIFAR_FOLDER))
    monkeypatch.setattr(ab, "OFFICIAL_MD5", {name: md5s[name] for name in ab.OFFICIAL_MD5})
    report = ab.load_cifar10(fake_cifar_root, "cpu")["report"]
    assert report["official"] is True
    assert all(report["files"][name]["ok"] for name in ab.OFFICIAL_MD5)
    assert "WARNING" not in capsys.readouterr().err


def test_one_mismatching_file_is_named(fake_cifar_root, monkeypatch, capsys):
    md5s = file_md5s(os.path.join(fake_cifar_root, ab.CIFAR_FOLDER))
    monkeypatch.setattr(ab, "OFFICIAL_MD5", {name: md5s[name] for name in ab.OFFICIAL_MD5} | {"data_batch_4": "0" * 32})
    report = ab.load_cifar10(fake_cifar_root, "cpu")["report"]
    assert report["official"] is False
    assert [name for name, c in report["files"].items() if not c["ok"]] == ["data_batch_4"]
    err = capsys.readouterr().err
    assert "WARNING: UNOFFICIAL DATA" in err and "data_batch_4" in err and "data_batch_3" not in err


def test_data_dir_may_be_the_parent_or_the_batches_folder(fake_cifar_root):
    folder = os.path.join(fake_cifar_root, ab.CIFAR_FOLDER)
    for data_dir in (fake_cifar_root, folder):
        data = ab.load_cifar10(data_dir, "cpu")
        assert_is_fixture(data)
        assert data["report"]["data_dir"] == folder


def test_missing_dataset_names_the_place_searched(tmp_path, monkeypatch):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    with pytest.raises(ab.HarnessError) as error:
        ab.load_cifar10(str(empty), "cpu", download=False)
    assert str(empty) in str(error.value) and "--data-dir" in str(error.value)
    # data_dir "": $AIRBENCH_SSL_DATA if set, else ./data beside the harness; nothing else is searched
    monkeypatch.setattr(ab, "DEFAULT_DATA_DIR", str(tmp_path / "default"))
    for env, expect in ((None, tmp_path / "default"), (str(tmp_path / "from env"), tmp_path / "from env")):
        monkeypatch.delenv("AIRBENCH_SSL_DATA", raising=False) if env is None else monkeypatch.setenv(
            "AIRBENCH_SSL_DATA", env)
        with pytest.raises(ab.HarnessError) as error:
            ab.load_cifar10("", "cpu", download=False)
        assert f"not found in {expect}:" in str(error.value) and "shared" not in str(error.value)


@pytest.mark.parametrize("outcome", ["fails after writing", "succeeds"])
def test_a_download_leaves_nothing_behind_unless_it_succeeds(outcome, tmp_path, monkeypatch, capsys):
    """torchvision downloads into a temporary folder; data_dir is created only to receive a complete copy."""
    calls = []

    def fake_download(root, download):
        calls.append(root)
        write_fake_cifar(root, per_batch=2, n_test=2)  # what a download unpacks, or half of it
        with open(os.path.join(root, "cifar-10-python.tar.gz"), "wb") as f:
            f.write(b"partial archive")
        if outcome != "succeeds":
            raise RuntimeError("Connection refused")

    monkeypatch.setattr(ab.torchvision.datasets, "CIFAR10", fake_download)
    data_dir = tmp_path / "new" / "data"
    if outcome == "succeeds":
        assert ab.load_cifar10(str(data_dir), "cpu", download=True)["report"]["train_images"] == 10
        assert os.listdir(data_dir) == [ab.CIFAR_FOLDER]  # the batches, not the archive
    else:
        with pytest.raises(ab.HarnessError, match="download failed.*Connection refused") as error:
            ab.load_cifar10(str(data_dir), "cpu", download=True)
        assert "\n" not in str(error.value) and not (tmp_path / "new").exists()
        assert capsys.readouterr().err == ""  # one line, the error's own: nothing printed before it
    assert len(calls) == 1 and not os.path.exists(calls[0])  # the temporary folder is gone either way


def test_incomplete_folder_is_not_found(writable_copy):
    data_dir, folder = writable_copy
    os.remove(os.path.join(folder, "data_batch_2"))
    with pytest.raises(ab.HarnessError, match="not found"):
        ab.load_cifar10(data_dir, "cpu")


def test_find_cifar_returns_the_batches_folder_or_none(fake_cifar_root, tmp_path):
    folder = os.path.join(fake_cifar_root, ab.CIFAR_FOLDER)
    assert ab.find_cifar(fake_cifar_root) == folder
    assert ab.find_cifar(folder) == folder
    assert ab.find_cifar(folder + os.sep) == folder  # normalised: the same folder, however it was named
    assert ab.find_cifar(str(tmp_path)) is None
    assert ab.find_cifar(str(tmp_path / "does not exist")) is None


def test_find_cifar_needs_all_six_files(writable_copy):
    data_dir, folder = writable_copy
    assert ab.find_cifar(data_dir) == folder
    os.remove(os.path.join(folder, "test_batch"))
    assert ab.find_cifar(data_dir) is None
    os.mkdir(os.path.join(folder, "test_batch"))  # a folder of that name is not the file
    assert ab.find_cifar(data_dir) is None


def test_official_md5s_are_torchvisions():
    # torchvision checks the same six files against its own list: a typo in ours would fail here
    import torchvision

    listed = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list
    assert ab.OFFICIAL_MD5 == dict(listed)
    assert list(ab.OFFICIAL_MD5) == CIFAR_FILES


# --------------------------------------------------------------------------- pickle formats


def test_python2_style_pickle_loads():
    data, labels = synthetic_images(12, seed=3)
    raw = python2_style_batch(data, labels)
    # what the official files contain: the numpy 1 module name, the pixels as a Python 2 str, no _codecs call
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"numpy._core" not in raw and b"_codecs" not in raw
    images, parsed_labels = ab.parse_cifar_batch(raw, "data_batch_1")
    np.testing.assert_array_equal(images.numpy(), data.reshape(-1, 3, 32, 32))
    assert parsed_labels.dtype == torch.int64 and parsed_labels.tolist() == labels


def test_folder_of_python2_style_pickles_loads(writable_copy):
    data_dir, folder = writable_copy
    for index, name in enumerate(CIFAR_FILES):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(python2_style_batch(*synthetic_images(N_TEST if name == "test_batch" else PER_BATCH, index)))
    assert_is_fixture(ab.load_cifar10(data_dir, "cpu"))


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_python3_pickles_load(protocol):
    data, labels = synthetic_images(5, seed=1)
    raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol)
    images, parsed_labels = ab.parse_cifar_batch(raw, "data_batch_1")
    np.testing.assert_array_equal(images.numpy(), data.reshape(-1, 3, 32, 32))
    assert parsed_labels.tolist() == labels


def test_python3_protocol_2_pickle_is_refused_in_one_line():
    # Python 3 writes array bytes at protocol 2 through _codecs.encode, a call the loader does not admit; no copy of
    # CIFAR-10 in circulation is written that way (the official files are Python 2 pickles)
    data, labels = synthetic_images(5, seed=1)
    raw = pickle.dumps({b"data": data, b"labels": labels}, protocol=2)
    with pytest.raises(ab.HarnessError, match="data_batch_1 is not a valid CIFAR-10 batch: refusing to load "
                                              "_codecs.encode"):
        ab.parse_cifar_batch(raw, "data_batch_1")


class SystemCall:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalCall:
    def __init__(self, source):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def malicious_pickles(marker):
    """Pickles that would create `marker` when loaded by an unrestricted unpickler."""
    touch = f"touch '{marker}'"
    data = np.zeros((2, 3072), dtype=np.uint8)
    return {
        "os.system": pickle.dumps(SystemCall(touch)),
        "builtins.eval": pickle.dumps(EvalCall(f"open({str(marker)!r}, 'w').close()"), protocol=2),
        "hidden in the batch": pickle.dumps({"data": data, "labels": [0, 1], "filenames": SystemCall(touch)}),
        "protocol 0 GLOBAL posix.system": f"cposix\nsystem\n(S{touch!r}\ntR.".encode(),
    }


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "payload_ran"
    for label, raw in malicious_pickles(marker).items():
        with pytest.raises(ab.HarnessError, match="data_batch_3.*refusing to load"):
            ab.parse_cifar_batch(raw, "data_batch_3")
        assert not marker.exists(), label
    # the payloads are live: an ordinary unpickler runs the first one (which proves the test can fail)
    pickle.loads(malicious_pickles(marker)["os.system"])
    assert marker.exists()


def test_malicious_batch_file_is_refused_by_the_loader(writable_copy, tmp_path):
    data_dir, folder = writable_copy
    marker = tmp_path / "payload_ran"
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(malicious_pickles(marker)["hidden in the batch"])
    with pytest.raises(ab.HarnessError, match="data_batch_3"):
        ab.load_cifar10(data_dir, "cpu")
    assert not marker.exists()


def test_truncated_batch_file_is_refused_with_its_name(writable_copy):
    data_dir, folder = writable_copy
    path = os.path.join(folder, "data_batch_2")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])
    with pytest.raises(ab.HarnessError, match="data_batch_2 is not a valid CIFAR-10 batch"):
        ab.load_cifar10(data_dir, "cpu")


def test_garbage_batch_file_is_refused_with_its_name(writable_copy):
    data_dir, folder = writable_copy
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        f.write(b"\x00not a pickle at all" * 100)
    with pytest.raises(ab.HarnessError, match="test_batch"):
        ab.load_cifar10(data_dir, "cpu")


# --------------------------------------------------------------------------- malformed contents

GOOD_DATA = np.zeros((4, 3072), dtype=np.uint8)


@pytest.mark.parametrize("batch, message", [
    ([GOOD_DATA], "expected a dict"),
    ({"labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": np.zeros((4, 3071), dtype=np.uint8), "labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": np.zeros((4, 3, 32, 32), dtype=np.uint8), "labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": np.zeros((4, 3072), dtype=np.int16), "labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": np.zeros((4, 3072), dtype=np.float32), "labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": GOOD_DATA.tolist(), "labels": [0, 1, 2, 3]}, "'data' must be"),
    ({"data": GOOD_DATA}, "'labels' must be"),
    ({"data": GOOD_DATA, "labels": [0, 1, 2]}, "'labels' must be"),
    ({"data": GOOD_DATA, "labels": [0, 1, 2, 10]}, "'labels' must be"),
    ({"data": GOOD_DATA, "labels": [0, -1, 2, 3]}, "'labels' must be"),
    ({"data": GOOD_DATA, "labels": [[0, 1], [2, 3]]}, "'labels' must be"),
])
def test_malformed_batch_is_refused(batch, message):
    with pytest.raises(ab.HarnessError, match=f"data_batch_5.*{message}"):
        ab.parse_cifar_batch(pickle.dumps(batch), "data_batch_5")


@pytest.mark.parametrize("labels", [["a", "b", "c", "d"], [0.5, 1.0, 2.0, 3.0], [[0], [1, 2], [3], [4]]])
def test_non_integer_labels_are_refused(labels):
    with pytest.raises(ab.HarnessError, match="'labels' must be"):
        ab.parse_cifar_batch(pickle.dumps({"data": GOOD_DATA, "labels": labels}), "data_batch_5")


def test_malformed_file_in_folder_fails_the_load(writable_copy):
    data_dir, folder = writable_copy
    with open(os.path.join(folder, "data_batch_5"), "wb") as f:
        pickle.dump({"data": GOOD_DATA, "labels": [0, 1, 2, 12]}, f)
    with pytest.raises(ab.HarnessError, match="data_batch_5: 'labels'"):
        ab.load_cifar10(data_dir, "cpu")


def test_other_seed_gives_other_values(tmp_path):
    # guards assert_is_fixture against passing trivially: a differently seeded copy must not match it
    write_fake_cifar(str(tmp_path), seed=7)
    with pytest.raises(AssertionError):
        assert_is_fixture(ab.load_cifar10(str(tmp_path), "cpu"))


# --------------------------------------------------------------------------- the real copy


def test_real_data_counts_classes_and_md5(real_cifar_root):
    data = ab.load_cifar10(real_cifar_root, "cpu")
    assert data["train_images"].shape == (50000, 3, 32, 32) and data["test_images"].shape == (10000, 3, 32, 32)
    assert data["train_images"].dtype == torch.uint8
    assert torch.bincount(data["train_labels"], minlength=10).tolist() == [5000] * 10
    assert torch.bincount(data["test_labels"], minlength=10).tolist() == [1000] * 10
    report = data["report"]
    md5s = {name: c["md5"] for name, c in report["files"].items()}
    if md5s == ab.OFFICIAL_MD5:  # someone pointed AIRBENCH_SSL_DATA at the official files
        assert report["official"] is True
    else:
        assert md5s == SHARED_COPY_MD5 and report["official"] is False
