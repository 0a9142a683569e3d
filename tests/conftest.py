"""Shared fixtures: a small synthetic CIFAR-10 written in the real on-disk format, and the real-data switch.

Tests never download. Tests that need the real CIFAR-10 read the folder named by AIRBENCH_SSL_DATA (the parent of
cifar-10-batches-py/) and skip cleanly when it is unset.
"""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def synthetic_images(n, seed):
    """n learnable images: each class has its own colour and stripe direction, plus noise; labels cycle 0..9."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    base = rng.integers(0, 256, size=(10, 3), dtype=np.int64)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        stripes = ((xx if label % 2 else yy) + label) % 8 < 4
        pixels = base[label][:, None, None] * (0.6 + 0.4 * stripes) + rng.normal(0, 12, size=(3, 32, 32))
        images[i] = np.clip(pixels, 0, 255).astype(np.uint8)
    return images.reshape(n, 3072), labels.tolist()


def easy_images(n, seed):
    """n images of ten classes of nearly solid, well-separated colours: kNN tells them apart after the first epoch of
    training, so a test can assert a known high accuracy. Labels cycle 0..9."""
    labels = np.arange(n) % 10
    colours = np.array([[230, 25, 25], [25, 230, 25], [25, 25, 230], [230, 230, 25], [230, 25, 230],
                        [25, 230, 230], [240, 240, 240], [15, 15, 15], [128, 128, 128], [200, 120, 40]])
    pixels = colours[labels][:, :, None, None] + np.random.default_rng(seed).integers(-8, 9, size=(n, 3, 32, 32))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072), labels.tolist()


def write_fake_cifar(root, per_batch=40, n_test=60, seed=0, protocol=4, images=synthetic_images):
    """Write cifar-10-batches-py/ under root in the official layout, pixels from images(n, seed); returns the folder."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for index, name in enumerate(CIFAR_FILES):
        n = n_test if name == "test_batch" else per_batch
        data, labels = images(n, seed + index)
        batch = {"batch_label": f"synthetic {name}", "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return folder


@pytest.fixture(scope="session")
def fake_cifar_root(tmp_path_factory):
    """A read-only-by-convention synthetic dataset: 200 train, 60 test images."""
    root = tmp_path_factory.mktemp("fake_cifar")
    write_fake_cifar(str(root))
    return str(root)


@pytest.fixture(scope="session")
def easy_cifar_root(tmp_path_factory):
    """A synthetic dataset that a working kNN classifies almost perfectly: 200 train, 60 test images."""
    root = tmp_path_factory.mktemp("easy_cifar")
    write_fake_cifar(str(root), images=easy_images)
    return str(root)


@pytest.fixture
def real_cifar_root():
    root = os.environ.get("AIRBENCH_SSL_DATA", "")
    if not root or not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        pytest.skip("set AIRBENCH_SSL_DATA to the folder holding cifar-10-batches-py/ to run real-data tests")
    return root


@pytest.fixture
def one_compute_thread():
    """Tiny models gain nothing from a second OpenMP thread, and on a busy 2-core machine the threads' spinning
    made tiny steps ~30x slower (measured: 10 s instead of 0.3 s for 2 steps at width 8)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
