"""baselines/: the rebuilt reference script feeds images as the cited reference version does by default (PIL
transforms, ToTensor last, pinned memory, non_blocking copies) and as the older one with --variant, trains on CPU, is
the same model as the harness's, and every named configuration of a published row passes the harness's validation
and says what it reproduces."""

import copy
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
from PIL import Image

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
    cfg, _ = ab.config_from_args(ab.build_parser().parse_args(["--config", path]), True)
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


OLD = "2025-06-02"


def test_default_variant_is_the_cited_reference_version():
    assert ref.DEFAULT_VARIANT == "2025-07-28" and ref.VARIANTS[ref.DEFAULT_VARIANT].commits.startswith("781f889")
    assert ref.build_parser().parse_args([]).variant == ref.DEFAULT_VARIANT
    assert ref.build_parser().parse_args(["--variant", OLD]).variant == OLD
    with pytest.raises(ab.HarnessError, match="unknown variant '2024'"):
        ref.make_transform(0.1, "2024")


class SpyTransform:
    """Records what each view is drawn from, then applies the real transform."""

    def __init__(self, transform):
        self.transform, self.inputs = transform, []

    def __call__(self, x):
        self.inputs.append(x)
        return self.transform(x)


@pytest.mark.parametrize("variant", [ref.DEFAULT_VARIANT, OLD])
def test_views_are_drawn_from_a_pil_image_by_default_and_from_a_tensor_in_the_old_variant(variant):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    dataset = ref.make_dataset(images, torch.arange(4), 0.1, variant)
    dataset.transform = spy = SpyTransform(dataset.transform)
    torch.manual_seed(0)
    views = [view for i in range(4) for view in dataset[i][:2]]
    is_pil = [isinstance(x, Image.Image) for x in spy.inputs]
    steps = spy.transform.transforms
    if variant == ref.DEFAULT_VARIANT:
        # PIL in, ToTensor last: every value of every view is a whole number of 1/255 steps (uint8 / 255)
        assert all(is_pil) and len(is_pil) == 8 and isinstance(steps[-1], ref.T.ToTensor)
        assert not any(isinstance(step, ref.T.ToTensor) for step in steps[:-1])
        assert all(torch.equal((v * 255).round() / 255, v) for v in views)
    else:
        # a float tensor in [0, 1] in, no ToTensor in the view: bilinear resizing leaves values between the steps
        assert not any(is_pil) and all(x.dtype == torch.float32 for x in spy.inputs)
        assert not any(isinstance(step, ref.T.ToTensor) for step in steps)
        assert any(not torch.equal((v * 255).round() / 255, v) for v in views)


@pytest.mark.parametrize("variant", [ref.DEFAULT_VARIANT, OLD])
def test_reference_dataset_gives_two_different_float_views(variant):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    dataset = ref.make_dataset(images, torch.arange(4), 0.1, variant)
    torch.manual_seed(0)
    v1, v2, label = dataset[3]
    assert v1.dtype == v2.dtype == torch.float32 and v1.shape == v2.shape == (3, 32, 32) and label == 3
    assert 0 <= v1.min() and v1.max() <= 1 and not torch.equal(v1, v2)
    gray = ref.make_dataset(images, torch.arange(4), 1.0, variant)[0][0]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # grayscale p=1: equal channels


def test_views_start_from_the_right_image_in_both_variants():
    """Without augmentation a view is ToTensor of the stored image, uint8 / 255 in CHW order, in either order of
    ToTensor and transforms, so the HWC array the PIL image is made from holds the image the right way round."""
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    pil_view = ref.ReferencePairs(images, torch.zeros(2), ref.T.Compose([ref.T.ToTensor()]))[1][0]
    tensor_view = ref.ReferencePairs(images, torch.zeros(2), ref.T.Compose([]), to_tensor_first=True)[1][0]
    assert torch.equal(pil_view, images[1].float() / 255) and torch.equal(tensor_view, pil_view)


def test_default_view_is_torchvisions_pil_pipeline_exactly():
    """The same seed gives the same view as the reference's own chain: CIFAR10's Image.fromarray(HWC), then the
    SSL transforms with ToTensor last; the old variant's tensor chain gives a different view from the same draws."""
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    steps = [ref.T.RandomResizedCrop(32, scale=(0.2, 1.0)), ref.T.RandomHorizontalFlip(),
             ref.T.RandomApply([ref.T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), ref.T.RandomGrayscale(p=0.1)]
    pil = Image.fromarray(images[0].permute(1, 2, 0).numpy())
    torch.manual_seed(3)
    expected = ref.T.Compose(steps + [ref.T.ToTensor()])(pil)
    torch.manual_seed(3)
    assert torch.equal(ref.make_dataset(images, torch.zeros(1), 0.1).transform(pil), expected)
    torch.manual_seed(3)
    assert not torch.equal(ref.make_dataset(images, torch.zeros(1), 0.1, OLD)[0][0], expected)


@pytest.mark.parametrize(("variant", "device", "pinned"), [(ref.DEFAULT_VARIANT, "cuda", True),
                                                           (ref.DEFAULT_VARIANT, "cpu", False), (OLD, "cuda", False)])
def test_loader_is_the_reference_loader_and_pins_memory_where_the_variant_does(variant, device, pinned):
    """Constructing a loader needs no GPU, so the CUDA configuration is checked on any machine."""
    images = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    loader = ref.make_loader(ref.make_dataset(images, torch.zeros(10), 0.1, variant), 4, 2, torch.device(device),
                             variant)
    assert loader.pin_memory is pinned
    assert (loader.batch_size, loader.num_workers, loader.drop_last, loader.persistent_workers) == (4, 2, False, False)
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler) and len(loader) == 3  # 4 + 4 + 2


class CopyRecorder(torch.Tensor):
    non_blocking: list[bool] = []

    def to(self, *args, **kwargs):
        CopyRecorder.non_blocking.append(kwargs.get("non_blocking", False))
        return super().to(*args, **kwargs).as_subclass(torch.Tensor)


@pytest.mark.parametrize(("variant", "non_blocking"), [(ref.DEFAULT_VARIANT, True), (OLD, False)])
def test_views_are_copied_non_blocking_in_the_default_variant(variant, non_blocking):
    torch.manual_seed(0)
    model = ref.ReferenceSimCLR("resnet18", width=8)
    optimizer, _ = ref.make_optimizer(model, batch_size=4, epochs=10)
    CopyRecorder.non_blocking = []
    batch = [torch.rand(4, 3, 32, 32).as_subclass(CopyRecorder) for _ in range(2)] + [torch.zeros(4)]
    losses = ref.train_epoch(model, optimizer, [batch], torch.device("cpu"), variant)
    assert CopyRecorder.non_blocking == [non_blocking, non_blocking] and len(losses) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_reference_trains_a_few_steps_on_cpu(fake_cifar_root, workers):
    data = ab.load_cifar10(fake_cifar_root, torch.device("cpu"))
    dataset = ref.make_dataset(data["train_images"][:64], data["train_labels"][:64], 0.1)
    torch.manual_seed(0)
    model = ref.ReferenceSimCLR("resnet18", width=8)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = ref.make_optimizer(model, batch_size=16, epochs=10)
    loader = ref.make_loader(dataset, 16, workers, torch.device("cpu"))
    with ref.threads_beside_workers(torch.device("cpu"), workers):
        losses = ref.train_epoch(model, optimizer, loader, torch.device("cpu"), max_steps=3)
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("variant", [ref.DEFAULT_VARIANT, OLD])
def test_reference_script_end_to_end_on_cpu(easy_cifar_root, capsys, variant):
    args = ref.build_parser().parse_args(["--device", "cpu", "--width", "8", "--data-dir", easy_cifar_root,
                                          "--batch-size", "32", "--epochs", "2", "--workers", "0",
                                          "--train-subset", "80", "--variant", variant])
    result = ref.run(args)
    assert result["steps"] == 2 * 3  # the last partial batch is kept, as the reference
    assert len(result["epoch_losses"]) == 2 and all(math.isfinite(x) for x in result["epoch_losses"])
    assert result["knn5_pct"] >= 90 and result["knn10_pct"] >= 90  # ten solid colours: a working kNN separates them
    out = capsys.readouterr().out
    assert "epoch 1: loss" in out and "kNN (cosine) k=5" in out
    assert f"({variant}, commits {ref.VARIANTS[variant].commits})" in out
    assert ("transforms on PIL images" in out) is (variant == ref.DEFAULT_VARIANT)
    assert "pinned memory off" in out  # nothing to pin for on the CPU
    # --steps stops early, mid-epoch
    args.steps, args.skip_eval = 3, True
    result = ref.run(args)
    assert result["steps"] == 3 and len(result["epoch_losses"]) == 1 and "knn10_pct" not in result


def test_reference_step_is_infonce_of_its_two_views_then_one_sgd_step():
    """One step of the rebuild against the step written out: each view through the model on its own (BatchNorm
    statistics per view), InfoNCE (temperature 0.5) over both projections stacked, one SGD step with the
    reference's momentum and weight decay; the returned loss is that InfoNCE."""
    torch.manual_seed(0)
    model = ref.ReferenceSimCLR("resnet18", width=8)
    expected, one_view = copy.deepcopy(model), copy.deepcopy(model)
    optimizer, _ = ref.make_optimizer(model, batch_size=8, epochs=10)
    view1, view2 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    loss = ab.info_nce(torch.cat([expected(view1)[1], expected(view2)[1]]), 0.5)
    sgd = torch.optim.SGD(expected.parameters(), lr=0.03 * 8 / 256, momentum=0.9, weight_decay=5e-4)
    loss.backward()
    sgd.step()
    assert ref.train_step(model, optimizer, view1, view2) == pytest.approx(loss.item(), rel=1e-6)
    for (name, value), reference in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-7, msg=name)
    one_view_loss = ab.info_nce(torch.cat([one_view(view1)[1], one_view(view1)[1]]), 0.5)
    assert abs(one_view_loss.item() - loss.item()) > 1e-2  # the test tells a step on one view twice apart


def test_reference_lr_is_scaled_by_batch_and_annealed_per_epoch_as_cosineannealinglr(easy_cifar_root, monkeypatch):
    """The lr every step of a run really uses: base lr x batch / 256, then torch's CosineAnnealingLR over the run's
    epochs, stepped once per epoch (every step of an epoch at one lr, a new lr each epoch)."""
    used, real_step = [], ref.train_step

    def train_step(model, optimizer, view1, view2):
        used.append({group["lr"] for group in optimizer.param_groups})
        return real_step(model, optimizer, view1, view2)

    monkeypatch.setattr(ref, "train_step", train_step)
    epochs, batch = 4, 16
    ref.run(ref.build_parser().parse_args(["--device", "cpu", "--width", "8", "--data-dir", easy_cifar_root,
                                           "--batch-size", str(batch), "--epochs", str(epochs), "--workers", "0",
                                           "--train-subset", "40", "--skip-eval"]))
    assert len(used) == epochs * 3 and all(len(lrs) == 1 for lrs in used)  # 16 + 16 + 8 images an epoch
    peak = 0.03 * batch / 256
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    expected = []
    for _ in range(epochs):
        expected += [optimizer.param_groups[0]["lr"]] * 3
        optimizer.step()
        schedule.step()
    assert [lr for lrs in used for lr in lrs] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(peak) and len(set(expected)) == epochs


@pytest.mark.parametrize("argv", [["--batch-size", "1"], ["--grayscale-p", "2"], ["--data-dir", "/nonexistent"]])
def test_reference_script_bad_input_is_one_line_and_nonzero(argv, capsys):
    assert ref.main(["--device", "cpu", "--width", "8", "--epochs", "1", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("simclr_reference: error:") and len(err.splitlines()) == 1


def test_reference_script_unknown_variant_is_one_line_and_nonzero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ref.main(["--variant", "2024"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--variant" in err and "2025-07-28" in err
