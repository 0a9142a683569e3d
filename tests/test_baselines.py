"""baselines/: the rebuilt reference script trains on CPU, is the same model as the harness's, and every named
configuration of a published row passes the harness's validation and says what it reproduces."""

import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import airbench_ssl as ab

sys.path.insert(0, os.path.join(ROOT, "baselines"))
import simclr_reference as ref  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "baselines", "*.json")))


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_there_is_a_config_for_every_published_row():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"resnet18_bs1024", "resnet18_bs512", "resnet18_100ep", "resnet34", "resnet50_bs512"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_baseline_config_passes_harness_validation_and_matches_its_name(path):
    cfg = ab.config_from_args(ab.build_parser().parse_args(["--config", path]), True)
    name = os.path.basename(path)[:-5]
    assert name.startswith(cfg.arch)
    if match := re.search(r"_bs(\d+)", name):
        assert cfg.batch_size == int(match.group(1))
    if match := re.search(r"_(\d+)ep", name):
        assert cfg.epochs == int(match.group(1))
    # the race and the model are the reference's; only the recipe fields vary between rows
    assert (cfg.width, cfg.train_subset, cfg.target_pct, cfg.knn_k) == (64, 0, 90.0, 10)
    notes = json.load(open(path, encoding="utf-8"))
    published = notes["_published"]
    assert notes["_description"] and "dkobak/simclr-cifar10" in notes["_source"]
    assert 80 < published["knn10_pct"] < 95 and published["epochs"] == cfg.epochs


def test_harness_cli_help_works():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "airbench_ssl.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--config" in proc.stdout and "--grayscale-p" in proc.stdout


@pytest.mark.parametrize("arch", ab.ARCHS)
def test_reference_model_is_the_harness_model(arch):
    """torchvision's ResNet with the reference's surgery has exactly the harness's parameters, name for name."""
    reference = {k: v.shape for k, v in ref.ReferenceSimCLR(arch).state_dict().items()}
    harness = {k: v.shape for k, v in ab.make_model(arch).state_dict().items()}
    assert reference == harness
    # and the same initialisation, the reference's replaced conv1 included (PyTorch's default, not torchvision's)
    torch.manual_seed(0)
    reference, harness = ref.ReferenceSimCLR(arch).state_dict(), ab.make_model(arch).state_dict()
    for name, value in reference.items():
        if "bn" in name or "downsample.1" in name:  # BatchNorm: ones, zeros and its counters, exactly
            assert torch.equal(value, harness[name]), name
        elif value.numel() >= 1000:  # random weights: the same distribution
            assert 0.85 < value.std() / harness[name].std() < 1.18, name
    h, z = ref.ReferenceSimCLR(arch).eval()(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, 2048 if arch == "resnet50" else 512) and z.shape == (2, 128)


@pytest.mark.parametrize("pil", [False, True])
def test_reference_dataset_gives_two_different_float_views(pil):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    dataset = ref.ReferencePairs(images, torch.arange(4), ref.make_transform(0.1, pil), pil)
    torch.manual_seed(0)
    v1, v2, label = dataset[3]
    assert v1.dtype == v2.dtype == torch.float32 and v1.shape == v2.shape == (3, 32, 32) and label == 3
    assert 0 <= v1.min() and v1.max() <= 1 and not torch.equal(v1, v2)
    gray = ref.ReferencePairs(images, torch.arange(4), ref.make_transform(1.0, pil), pil)[0][0]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # grayscale p=1: equal channels


def test_identity_transform_path_is_to_tensor():
    """Without augmentation, a view is ToTensor of the PIL image: uint8 / 255 in CHW order (the reference's input)."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    identity = ref.T.Compose([])
    tensor_view = ref.ReferencePairs(images, torch.zeros(2), identity)[1][0]
    pil_view = ref.ReferencePairs(images, torch.zeros(2), ref.T.Compose([ref.T.ToTensor()]), pil=True)[1][0]
    assert torch.equal(tensor_view, images[1].float() / 255) and torch.allclose(pil_view, tensor_view)


@pytest.mark.parametrize("workers", [0, 2])
def test_reference_trains_a_few_steps_on_cpu(fake_cifar_root, workers):
    data = ab.load_cifar10(fake_cifar_root, torch.device("cpu"))
    dataset = ref.ReferencePairs(data["train_images"][:64], data["train_labels"][:64], ref.make_transform(0.1))
    torch.manual_seed(0)
    model = ref.ReferenceSimCLR("resnet18", width=8)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = ref.make_optimizer(model, batch_size=16, epochs=10)
    loader = ref.make_loader(dataset, 16, workers)
    with ref.threads_beside_workers(torch.device("cpu"), workers):
        losses = ref.train_epoch(model, optimizer, loader, torch.device("cpu"), max_steps=3)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reference_script_end_to_end_on_cpu(fake_cifar_root, capsys):
    args = ref.build_parser().parse_args(["--device", "cpu", "--width", "8", "--data-dir", fake_cifar_root,
                                          "--batch-size", "32", "--epochs", "2", "--workers", "0",
                                          "--train-subset", "80"])
    result = ref.run(args)
    assert result["steps"] == 2 * 3  # the last partial batch is kept, as the reference
    assert len(result["epoch_losses"]) == 2 and all(math.isfinite(x) for x in result["epoch_losses"])
    assert 0 <= result["knn5_pct"] <= 100 and 0 <= result["knn10_pct"] <= 100
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "kNN (cosine) k=5" in out
    # --steps stops early, mid-epoch
    args.steps, args.skip_eval = 3, True
    result = ref.run(args)
    assert result["steps"] == 3 and len(result["epoch_losses"]) == 1 and "knn10_pct" not in result


@pytest.mark.parametrize("argv", [["--batch-size", "1"], ["--grayscale-p", "2"], ["--data-dir", "/nonexistent"]])
def test_reference_script_bad_input_is_one_line_and_nonzero(argv, capsys):
    assert ref.main(["--device", "cpu", "--width", "8", "--epochs", "1", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("simclr_reference: error:") and len(err.splitlines()) == 1
