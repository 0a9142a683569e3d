"""Model and loss: our CIFAR ResNet against torchvision's (names, shapes, init, outputs), the multi-view forward,
info_nce against the reference's two-view formula and naive float64 loops (two views and multi-crop)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def torchvision_cifar_resnet(arch):
    """The reference's backbone: torchvision's ResNet with a 3x3 stride-1 stem, no maxpool and no fc."""
    model = getattr(torchvision.models, arch)(weights=None)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def test_resnet18_has_the_reference_parameter_count():
    backbone = ab.make_model("resnet18").backbone
    assert sum(p.numel() for p in backbone.parameters()) == 11_168_832
    assert backbone.out_dim == 512


@pytest.mark.parametrize("arch", ab.ARCHS)
def test_backbone_is_torchvision_resnet_with_cifar_stem(arch):
    torch.manual_seed(0)
    reference = torchvision_cifar_resnet(arch)
    ours = ab.make_model(arch).backbone
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in reference_state.items()}

    ours.load_state_dict(reference_state)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for training in (False, True):  # train mode: BatchNorm uses batch statistics and updates its buffers
        ours.train(training)
        reference.train(training)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    for name, buffer in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], buffer, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_initialisation_matches_torchvision(arch):
    torch.manual_seed(0)
    ours = dict(ab.make_model(arch).backbone.named_parameters())
    reference = dict(torchvision_cifar_resnet(arch).named_parameters())
    for name, weight in ours.items():
        if name == "conv1.weight":  # the reference's replaced stem: see the next test
            continue
        if weight.ndim == 4:  # conv: kaiming_normal_, fan_out, relu
            fan_out = weight.shape[0] * weight.shape[2] * weight.shape[3]
            expected_std = math.sqrt(2 / fan_out)
            # The sampling error of a std over n weights is about std / sqrt(2n): under 2% for every layer here.
            assert weight.std().item() == pytest.approx(reference[name].std().item(), rel=0.1), name
            assert weight.std().item() == pytest.approx(expected_std, rel=0.1), name
            assert abs(weight.mean().item()) < 0.2 * expected_std, name
        elif name.endswith("weight"):  # BatchNorm
            assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(weight, reference[name]), name
        else:
            assert torch.equal(weight, torch.zeros_like(weight)) and torch.equal(weight, reference[name]), name


def test_stem_initialisation_matches_the_reference():
    # The reference assigns a fresh nn.Conv2d to conv1 after torchvision has initialised the model, so its stem
    # has PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 27: std 1/sqrt(81) = 0.111.
    torch.manual_seed(0)
    ours = ab.make_model("resnet18").backbone.conv1.weight
    reference = torchvision_cifar_resnet("resnet18").conv1.weight
    assert reference.std().item() == pytest.approx(1 / 9, rel=0.1)
    assert ours.std().item() == pytest.approx(reference.std().item(), rel=0.1)
    assert ours.abs().max().item() <= 1 / math.sqrt(27)


@pytest.mark.parametrize("arch, width, out_dim", [("resnet18", 16, 128), ("resnet50", 16, 512),
                                                  ("resnet34", 8, 64), ("resnet18", 64, 512)])
def test_width_knob_projector_and_forward_shapes(arch, width, out_dim):
    model = ab.make_model(arch, width)
    assert model.backbone.out_dim == out_dim
    assert model.backbone.conv1.out_channels == width
    projector = model.projector
    assert [type(m) for m in projector] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (projector[0].in_features, projector[0].out_features) == (out_dim, 1024)
    assert (projector[2].in_features, projector[2].out_features) == (1024, 128)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    h = model.backbone(x)
    assert h.shape == (3, out_dim)
    z = model([x])
    assert z.shape == (3, 128)
    torch.testing.assert_close(z, projector(h))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_blocks_are_torchvisions(arch):
    block = torchvision.models.resnet.BasicBlock if arch == "resnet18" else torchvision.models.resnet.Bottleneck
    backbone = ab.make_model(arch, 8).backbone
    blocks = [m for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4) for m in layer]
    assert len(blocks) == (8 if arch == "resnet18" else 16) and all(type(b) is block for b in blocks)


def test_forward_concatenates_views_view_major_with_batchnorm_statistics_per_view():
    torch.manual_seed(0)
    model = ab.make_model("resnet18", 8, 32, 16).train()
    g = torch.Generator().manual_seed(1)
    views = [torch.rand(4, 3, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g) * 0.5]
    z = model(views)
    assert z.shape == (8, 16)
    separately = torch.cat([model.projector(model.backbone(view)) for view in views])
    torch.testing.assert_close(z, separately, rtol=1e-5, atol=1e-6)
    # train-mode BatchNorm over both full-size views at once gives other outputs: the views really ran apart
    together = model.projector(model.backbone(torch.cat(views[:2])))
    assert (together - z[:8]).abs().max() > 1e-3


def test_unknown_arch_is_a_harness_error():
    with pytest.raises(ab.HarnessError, match="resnet18"):
        ab.make_model("resnet101")


def naive_info_nce(z, temperature):
    """Float64, one row at a time: row i's positive is the other view of the same image, i.e. row (i + N) mod 2N;
    its negatives are every other row except itself."""
    z = z.double()
    two_n = len(z)
    losses = []
    for i in range(two_n):
        positive = (i + two_n // 2) % two_n
        sims = [torch.dot(z[i], z[j]) / (z[i].norm() * z[j].norm()) / temperature for j in range(two_n)]
        denominator = sum(torch.exp(sims[j]) for j in range(two_n) if j != i)
        losses.append(-torch.log(torch.exp(sims[positive]) / denominator))
    return sum(losses) / two_n


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_info_nce_matches_naive_loop(n, temperature):
    z = torch.randn(2 * n, 12, generator=torch.Generator().manual_seed(n)) * 3
    loss = ab.info_nce(z, temperature)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(naive_info_nce(z, temperature).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.2, 0.5])
def test_info_nce_gradient_matches_naive_loop(temperature):
    z = torch.randn(10, 7, generator=torch.Generator().manual_seed(3))
    ours = z.clone().requires_grad_()
    reference = z.double().requires_grad_()
    ab.info_nce(ours, temperature).backward()
    naive_info_nce(reference, temperature).backward()
    assert ours.grad.abs().max() > 1e-3  # a gradient that could be wrong
    torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)


def test_info_nce_is_log_of_negatives_plus_one_for_random_directions():
    # Random high-dimensional vectors are nearly orthogonal: every logit is ~0, so the loss is ~log(2N - 1).
    n = 64
    z = torch.randn(2 * n, 8192, generator=torch.Generator().manual_seed(0))
    assert ab.info_nce(z, 0.5).item() == pytest.approx(math.log(2 * n - 1), abs=0.02)


def test_info_nce_of_bf16_input_is_fp32():
    z = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    loss = ab.info_nce(z, 0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(naive_info_nce(z.float(), 0.5).item(), rel=1e-5)


def reference_two_view_info_nce(z, temperature):
    """The reference's two-view formula: cross-entropy over the 2N x 2N masked cosine logits, image i's two views
    at rows i and N + i."""
    z = F.normalize(z.float(), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    n = len(z) // 2
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_two_view_info_nce_is_the_reference_formula_exactly(n, temperature):
    z = torch.randn(2 * n, 12, generator=torch.Generator().manual_seed(n)) * 3
    ours, reference = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = ab.info_nce(ours, temperature)
    expected = reference_two_view_info_nce(reference, temperature)
    assert torch.equal(loss, expected)
    loss.backward()
    expected.backward()
    assert torch.equal(ours.grad, reference.grad)
    assert loss.item() == pytest.approx(naive_info_nce(z, temperature).item(), rel=1e-5, abs=1e-6)

