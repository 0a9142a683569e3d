"""Augmentation section: the batched `augment` and its parts against torchvision, the reference's per-image pipeline.

Deterministic parts (crop + resize, each colour op, grayscale) are compared value by value with
torchvision.transforms.functional on float tensors (the reference applies its transforms after ToTensor). Random
parts are compared in distribution with torchvision's own samplers over a few thousand draws; every generator is
seeded, so the p-value thresholds can never flake. Last, the Trainer's two views, in the configured memory format.
"""

import dataclasses
import itertools

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from conftest import synthetic_images

import airbench_ssl as ab

pytestmark = pytest.mark.usefixtures("one_compute_thread")

P_MIN = 1e-3  # smallest acceptable p-value of a distribution comparison
RECIPE = ab.Config()
# every random part switched off: augment must then return images / 255 exactly
IDENTITY = dataclasses.replace(RECIPE, crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0,
                               flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
NO_JITTER = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation, hue factors that leave an image untouched


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_images(n, seed, size=32):
    """Float images in [0, 1] from uint8 values (so channel ties, where hue picks a branch, are common), plus
    a few special ones: black, white, grey (zero saturation) and saturated primaries."""
    x = torch.randint(0, 256, (n, 3, size, size), generator=generator(seed), dtype=torch.uint8).float() / 255
    x[0], x[1], x[2] = 0.0, 1.0, 0.5
    x[3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    x[4] = torch.tensor([0.0, 1.0, 1.0]).view(3, 1, 1)
    return x


def factor_table(n, op, value):
    """Factors for color_jitter where only `op` (0 brightness .. 3 hue) is not the identity."""
    factors = torch.tensor(NO_JITTER).repeat(n, 1)
    factors[:, op] = value
    return factors


def all_orders(n):
    """Each image gets one of the 24 op orders, cycling, so every order is exercised."""
    perms = torch.tensor(list(itertools.permutations(range(4))))
    return perms[torch.arange(n) % 24]


# --------------------------------------------------------------------------- deterministic parts vs torchvision

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


@pytest.mark.parametrize("op", [0, 1, 2])
@pytest.mark.parametrize("value", [0.0, 0.6, 1.0, 1.37, 2.5])
def test_blend_ops_match_torchvision(op, value):
    x = random_images(30, seed=op)
    ours = ab.color_jitter(x, all_orders(len(x)), factor_table(len(x), op, value))
    reference = torch.stack([TV_OPS[op](image, value) for image in x])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.37, -0.1, -0.01, 0.01, 0.05, 0.1, 0.25, 0.5])
def test_hue_matches_torchvision(shift):
    x = random_images(30, seed=11)
    reference = torch.stack([TF.adjust_hue(image, shift) for image in x])
    torch.testing.assert_close(ab.adjust_hue(x, torch.full((len(x),), shift)), reference, atol=1e-5, rtol=0)
    ours = ab.color_jitter(x, all_orders(len(x)), factor_table(len(x), 3, shift))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_hue_with_a_different_shift_per_image():
    x = random_images(40, seed=12)
    shifts = torch.linspace(-0.5, 0.5, len(x))
    reference = torch.stack([TF.adjust_hue(image, shift.item()) for image, shift in zip(x, shifts)])
    torch.testing.assert_close(ab.adjust_hue(x, shifts), reference, atol=1e-5, rtol=0)


def test_zero_factors_leave_images_exactly_unchanged():
    x = random_images(24, seed=13)
    assert torch.equal(ab.color_jitter(x, all_orders(len(x)), torch.tensor(NO_JITTER).repeat(len(x), 1)), x)


def test_grayscale_matches_torchvision():
    x = random_images(20, seed=14)
    reference = torch.stack([TF.rgb_to_grayscale(image, num_output_channels=1) for image in x])
    torch.testing.assert_close(ab.grayscale(x), reference, atol=1e-6, rtol=0)


BOXES = [(0, 0, 32, 32), (5, 7, 3, 4), (29, 0, 3, 32), (0, 31, 1, 1), (3, 2, 20, 11), (10, 10, 22, 22),
         (0, 0, 32, 7), (12, 25, 17, 7), (31, 31, 1, 1), (1, 0, 14, 30)]


def test_resized_crop_matches_torchvision_per_box():
    x = random_images(len(BOXES), seed=15)
    top, left, h, w = torch.tensor(BOXES, dtype=torch.float64).T
    ours = ab.resized_crop(x, top, left, h, w, 32)
    for image, out, box in zip(x, ours, BOXES):
        reference = TF.resized_crop(image, *box, [32, 32], antialias=True)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=f"box (top, left, h, w) = {box}")


def test_full_color_jitter_matches_torchvision_in_each_order():
    x = random_images(48, seed=16)
    g = generator(16)
    factors = torch.cat([0.6 + 0.8 * torch.rand(len(x), 3, generator=g),
                         0.2 * torch.rand(len(x), 1, generator=g) - 0.1], dim=1)
    order = all_orders(len(x))
    ours = ab.color_jitter(x, order, factors)
    for image, out, image_order, image_factors in zip(x, ours, order.tolist(), factors.tolist()):
        reference = image
        for op in image_order:  # ColorJitter.forward: for fn_id in fn_idx
            reference = TV_OPS[op](reference, image_factors[op])
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=f"order {image_order}")


# --------------------------------------------------------------------------- crop boxes vs RandomResizedCrop.get_params


def crop_config(scale, ratio):
    return dataclasses.replace(RECIPE, crop_scale_min=scale[0], crop_scale_max=scale[1], crop_ratio_min=ratio[0],
                               crop_ratio_max=ratio[1])


def torchvision_boxes(n, scale, ratio, seed):
    image = torch.empty(3, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return np.array([T.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])


def our_boxes(n, scale, ratio, seed):
    boxes = ab.sample_crop_boxes(n, 32, 32, crop_config(scale, ratio), generator(seed), torch.device("cpu"))
    return np.stack([b.numpy() for b in boxes], axis=1)


def box_statistics(boxes):
    top, left, h, w = boxes.T
    return {"area fraction": h * w / 1024, "aspect ratio": w / h, "top": top, "left": left}


@pytest.mark.parametrize("scale, ratio", [((0.2, 1.0), (3 / 4, 4 / 3)),  # the recipe
                                          ((0.9, 1.0), (3 / 4, 4 / 3)),  # many attempts fail: retries matter
                                          ((0.08, 1.0), (0.5, 2.0))])
def test_crop_boxes_match_torchvision_in_distribution(scale, ratio):
    n = 4000
    ours, theirs = our_boxes(n, scale, ratio, seed=1), torchvision_boxes(n, scale, ratio, seed=2)
    top, left, h, w = ours.T
    assert np.all((h >= 1) & (w >= 1) & (h <= 32) & (w <= 32))
    assert np.all((top >= 0) & (left >= 0) & (top + h <= 32) & (left + w <= 32))
    assert np.all(ours == np.round(ours))  # whole pixels, as torchvision's ints
    for name, values in box_statistics(ours).items():
        p = scipy.stats.ks_2samp(values, box_statistics(theirs)[name]).pvalue
        assert p > P_MIN, f"{name}: ours vs torchvision KS p = {p:.2g}"
    # the comparison has power: a scale range with a lower bound halfway to the upper one is told apart
    other = torchvision_boxes(n, ((scale[0] + scale[1]) / 2, scale[1]), ratio, seed=3)
    assert scipy.stats.ks_2samp(box_statistics(ours)["area fraction"],
                                box_statistics(other)["area fraction"]).pvalue < 1e-6


@pytest.mark.parametrize("ratio, expected", [((2.0, 3.0), (8, 0, 16, 32)),  # image too tall for the range
                                             ((0.3, 0.5), (0, 8, 32, 16)),  # too wide
                                             ((3 / 4, 4 / 3), (0, 0, 32, 32))])  # within: the whole image
def test_crop_fallback_matches_torchvision(ratio, expected):
    scale = (1e-4, 1e-4)  # ~0.1 pixel: every attempt rounds to an empty box, so the fallback is always taken
    theirs = torchvision_boxes(50, scale, ratio, seed=4)
    assert np.all(theirs == expected)  # the case really is torchvision's fallback
    assert np.all(our_boxes(200, scale, ratio, seed=5) == expected)


# --------------------------------------------------------------------------- random choices inside augment


def assert_rate(successes, n, p, what):
    pvalue = scipy.stats.binomtest(int(successes), n, p).pvalue
    assert pvalue > P_MIN, f"{what}: {successes}/{n} vs expected rate {p} (binomial p = {pvalue:.2g})"


def test_flip_rate_and_flips_are_exact():
    images = torch.randint(0, 256, (3000, 3, 8, 8), generator=generator(20), dtype=torch.uint8)
    x = images.float() / 255
    out = ab.augment(images, dataclasses.replace(IDENTITY, flip_p=0.5), generator(21), size=8)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same ^ flipped)  # each output is the image or its exact mirror (random images: never both)
    assert_rate(flipped.sum(), len(x), 0.5, "flip")


@pytest.mark.parametrize("p", [0.1, 0.2])
def test_grayscale_rate_and_grayscale_outputs(p):
    images = torch.randint(0, 256, (3000, 3, 8, 8), generator=generator(22), dtype=torch.uint8)
    x = images.float() / 255
    out = ab.augment(images, dataclasses.replace(IDENTITY, grayscale_p=p), generator(23), size=8)
    gray = (out[:, :1] == out).flatten(1).all(1)  # all three channels equal
    assert torch.equal(out[gray], ab.grayscale(x[gray]).expand(-1, 3, -1, -1))
    assert torch.equal(out[~gray], x[~gray])
    assert_rate(gray.sum(), len(x), p, "grayscale")


def spy_on_color_jitter(monkeypatch):
    """Record the (order, factors) that augment passes to color_jitter."""
    calls, original = [], ab.color_jitter

    def spy(x, order, factors):
        calls.append((order.clone(), factors.clone()))
        return original(x, order, factors)

    monkeypatch.setattr(ab, "color_jitter", spy)
    return calls


@pytest.mark.parametrize("spans, jitter_p", [((0.4, 0.4, 0.4, 0.1), 0.8), ((1.5, 0.2, 0.0, 0.5), 0.5)])
def test_jitter_rate_and_factor_ranges(monkeypatch, spans, jitter_p):
    brightness, contrast, saturation, hue = spans
    cfg = dataclasses.replace(IDENTITY, jitter_p=jitter_p, brightness=brightness, contrast=contrast,
                              saturation=saturation, hue=hue)
    calls = spy_on_color_jitter(monkeypatch)
    n = 4000
    ab.augment(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), cfg, generator(24), size=4)
    (_, factors), = calls
    applied = (factors != torch.tensor(NO_JITTER)).any(1)
    assert torch.equal(factors[~applied], torch.tensor(NO_JITTER).expand(int((~applied).sum()), 4))
    assert_rate(applied.sum(), n, jitter_p, "ColorJitter applied")
    # torchvision's ranges: U[max(0, 1 - s), 1 + s] for brightness, contrast, saturation; U[-h, h] for hue
    ranges = [(max(0.0, 1 - s), 1 + s) for s in (brightness, contrast, saturation)] + [(-hue, hue)]
    for op, (low, high) in enumerate(ranges):
        values = factors[applied, op].double().numpy()
        if low == high:
            assert np.all(values == low)
            continue
        assert low <= values.min() and values.max() <= high
        p = scipy.stats.kstest(values, "uniform", args=(low, high - low)).pvalue
        assert p > P_MIN, f"op {op}: factors vs U[{low}, {high}] KS p = {p:.2g}"


def test_op_order_is_a_uniform_permutation(monkeypatch):
    calls = spy_on_color_jitter(monkeypatch)
    n = 4800
    ab.augment(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), dataclasses.replace(IDENTITY, jitter_p=1.0),
               generator(25), size=4)
    (order, _), = calls
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # every row is a permutation
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[[sum(4 ** (3 - i) * v for i, v in enumerate(perm))
                                                   for perm in itertools.permutations(range(4))]]
    assert counts.sum() == n  # all 24 permutations and nothing else
    p = scipy.stats.chisquare(counts.numpy()).pvalue
    assert p > P_MIN, f"op orders not uniform over the 24 permutations: counts {counts.tolist()}, p = {p:.2g}"


def test_brightness_factors_recovered_from_outputs():
    # brightness only, on constant mid-grey images: output / input is the factor (no clipping below 1.4 * 0.5)
    cfg = dataclasses.replace(IDENTITY, jitter_p=0.8, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0)
    n = 3000
    images = torch.full((n, 3, 4, 4), 128, dtype=torch.uint8)
    out = ab.augment(images, cfg, generator(26), size=4)
    factors = (out / (128 / 255)).flatten(1)
    assert torch.allclose(factors, factors[:, :1], atol=1e-6)  # one factor per image, all pixels and channels
    factors = factors[:, 0].double()
    applied = (factors - 1).abs() > 1e-6
    assert_rate(applied.sum(), n, 0.8, "brightness applied")
    values = factors[applied].numpy()
    assert 0.6 - 1e-6 <= values.min() and values.max() <= 1.4 + 1e-6
    assert scipy.stats.kstest(values, "uniform", args=(0.6, 0.8)).pvalue > P_MIN


def test_whole_pipeline_matches_torchvision_in_distribution():
    """The recipe end to end against the reference's per-image tensor pipeline on the same images: a coarse
    backstop (it tells jitter_p 0.5 from 0.8, not a crop scale of 0.08 from 0.2); the tests above carry the power."""
    data, _ = synthetic_images(1000, seed=27)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
    pipeline = T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.1)])
    with torch.random.fork_rng():
        torch.manual_seed(28)
        theirs = torch.stack([pipeline(image) for image in images.float() / 255])
    ours = ab.augment(images, RECIPE, generator(29))

    def statistics(x):
        return {"mean": x.mean((1, 2, 3)), "std": x.std((1, 2, 3)), "channel spread": (x - x.mean(1, True)).abs().mean(
            (1, 2, 3)), "left-right balance": x[..., :16].mean((1, 2, 3)) - x[..., 16:].mean((1, 2, 3))}

    for name, values in statistics(ours).items():
        p = scipy.stats.ks_2samp(values.numpy(), statistics(theirs)[name].numpy()).pvalue
        assert p > P_MIN, f"{name}: ours vs torchvision KS p = {p:.2g}"
    gray_ours, gray_theirs = ((x[:, :1] == x).flatten(1).all(1).sum().item() for x in (ours, theirs))
    assert scipy.stats.fisher_exact([[gray_ours, 1000 - gray_ours], [gray_theirs, 1000 - gray_theirs]]).pvalue > P_MIN


# --------------------------------------------------------------------------- augment's contract


def test_output_type_range_and_shape():
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator(30), dtype=torch.uint8)
    out = ab.augment(images, RECIPE, generator(31))
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()


def test_seeded_determinism():
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator(32), dtype=torch.uint8)
    first = ab.augment(images, RECIPE, generator(33))
    assert torch.equal(first, ab.augment(images, RECIPE, generator(33)))
    assert not torch.equal(first, ab.augment(images, RECIPE, generator(34)))
    g = generator(33)
    ab.augment(images, RECIPE, g)
    assert not torch.equal(first, ab.augment(images, RECIPE, g))  # the stream moves on: the two views differ


def test_identity_config_returns_images_over_255_exactly():
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator(35), dtype=torch.uint8)
    out = ab.augment(images, IDENTITY, generator(36))
    assert torch.equal(out, images.float() / 255)


def test_output_is_plain_nchw_contiguous_whatever_the_input_layout():
    # the memory format is the Trainer's choice (Trainer.views), not augment's
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=generator(37), dtype=torch.uint8)
    for layout in (torch.contiguous_format, torch.channels_last):
        for size in (32, 16):
            out = ab.augment(images.contiguous(memory_format=layout), RECIPE, generator(38), size=size)
            assert out.shape == (8, 3, size, size) and out.is_contiguous()
            assert not out.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- the Trainer's views


def tiny_trainer(**fields):
    cfg = dataclasses.replace(RECIPE, **dict(width=8, projector_hidden_dim=32, projector_out_dim=16, device="cpu",
                                             compile="off", bf16="off", channels_last="off") | fields)
    return ab.Trainer(cfg, torch.device("cpu"), cfg.batch_size)


def test_a_step_has_exactly_two_independent_views():
    trainer = tiny_trainer()
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=generator(46), dtype=torch.uint8)
    views = trainer.views(images, generator(47))
    assert len(views) == 2 and all(v.shape == (6, 3, 32, 32) for v in views)
    assert not torch.equal(views[0], views[1])  # two independent draws


def test_views_come_in_the_configured_memory_format():
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=generator(48), dtype=torch.uint8)
    plain = tiny_trainer().views(images, generator(49))
    trainer = tiny_trainer(channels_last="on")
    assert trainer.memory_format == torch.channels_last
    views = trainer.views(images, generator(49))
    for view, reference in zip(views, plain):
        assert view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous()
        assert reference.is_contiguous()
        assert torch.equal(view, reference)  # the layout changes, the values do not
