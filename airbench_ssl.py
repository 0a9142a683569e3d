"""airbench-ssl: the SimCLR-on-CIFAR-10 speedrun harness.

Race: reach 90.0% cosine kNN (k=10) test accuracy on CIFAR-10, self-supervised on the 50k training images only,
in as little timed wall-clock as possible on one GPU. The defaults reproduce the reference recipe of
dkobak/simclr-cifar10 (ResNet18, batch 512, RandomGrayscale p=0.1, 500 epochs: 90.3% in 1 h 39 min on an A100,
as published there); every entry is measured against it.

Current record: none yet on our hardware (see leaderboard.md). No GPU time of ours has been spent on this file yet.
Size budget: aim <= 600 lines, never past 800. Now ~1,080: over budget (the evaluation suite, checkpoints and
the hardened loader grew it); trimming it back is open work.

Usage:  python airbench_ssl.py [--field value ...]     train (fields: python airbench_ssl.py --help)
        python airbench_ssl.py eval CHECKPOINT [...]     evaluate a saved model (kNN k=5/10, lin precomp, lin augm)
Timed: the training steps (shuffle, GPU augmentation, forward, backward, optimizer), GPU synchronised at each epoch
boundary. Not timed, reported apart: data load, compile warm-up, kNN checks, final evaluation.
"""

import argparse
import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import platform
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

#############################################
#                  Config                   #
#############################################


@dataclass
class Config:
    # --- data ---
    data_dir: str = ""  # folder holding cifar-10-batches-py/ (or the .tar.gz); "" = search ./data, ../shared/data
    download: bool = True  # if no copy is found, try torchvision's download into ./data (offline: clear error)
    train_subset: int = 0  # 0 = all 50,000 train images; n > 0 = the first n (CPU demos; never eligible)
    # --- augmentation, per view (reference: torchvision RandomResizedCrop, flip, ColorJitter p=0.8, grayscale) ---
    crop_scale_min: float = 0.2  # fraction of the image area
    crop_scale_max: float = 1.0
    crop_ratio_min: float = 3 / 4  # aspect ratio w/h, sampled log-uniformly as torchvision does
    crop_ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.8  # probability that ColorJitter is applied at all
    brightness: float = 0.4  # factor ~ U[1-b, 1+b]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # shift ~ U[-h, h] of a full turn
    grayscale_p: float = 0.1  # 0.1 in the bs512 recipe, 0.2 in the 2025-07 bs1024 recipe
    # --- model ---
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50, CIFAR stem (3x3 stride-1 conv1, no maxpool)
    width: int = 64  # channels of the first stage; 64 = torchvision; smaller only for CPU runs
    projector_hidden_dim: int = 1024
    projector_out_dim: int = 128
    # --- loss ---
    temperature: float = 0.5
    # --- optimisation ---
    batch_size: int = 512  # images per step; each is seen in two views
    epochs: int = 500  # length of the cosine schedule = the most epochs a run may take
    base_lr: float = 0.03  # lr = base_lr * batch_size / 256 (linear scaling, as the reference)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4  # on every parameter, BN and biases included, as the reference
    lr_schedule: str = "epoch"  # "epoch": cosine stepped once per epoch (reference); "step": per optimizer step
    drop_last: bool = False  # the reference's DataLoader keeps the last partial batch
    # --- target and kNN check schedule (fixed before the run: no test-set cherry-picking) ---
    target_pct: float = 90.0  # stop at the first scheduled check with kNN accuracy >= this
    knn_k: int = 10
    check_first_epoch: int = 10  # first check after this epoch (0 = also check before training)
    check_every_epochs: int = 10  # then every this many epochs; the last epoch is always checked
    # --- final evaluation (the reference's table) ---
    final_evals: str = "knn5,knn10,lin_precomp,lin_augm"  # comma list; "" = none
    linear_lr: float = 0.1  # Adam, cosine over linear_epochs (newer reference: 0.01, 500 epochs, wd 5e-6)
    linear_epochs: int = 100
    linear_weight_decay: float = 0.0
    linear_batch_size: int = 1000
    # --- machine ---
    device: str = "auto"  # auto | cuda | cpu
    compile: str = "auto"  # auto | on | off: torch.compile the model (auto = on for CUDA)
    bf16: str = "auto"  # auto | on | off: bf16 autocast in training (the loss is always fp32)
    channels_last: str = "auto"  # auto | on | off
    warmup_steps: int = 3  # compile warm-up steps per batch shape, on random data, untimed, state restored after
    eval_batch_size: int = 1024
    seed: int = 0
    log_dir: str = "logs"
    save_checkpoint: str = ""  # path to save the final model ("" = don't)


# What a no-GPU machine runs by default: a narrow ResNet18 on a training subset, sized for ~5 min on 2 cores.
CPU_DEMO = dict(
    width=16, train_subset=5000, batch_size=256, epochs=12, check_first_epoch=0, check_every_epochs=12,
    final_evals="knn5,knn10", target_pct=100.0, warmup_steps=0,  # nothing to compile on the CPU
)
ARCHS = ("resnet18", "resnet34", "resnet50")
FINAL_EVALS = ("knn5", "knn10", "lin_precomp", "lin_augm")
TRISTATE = ("auto", "on", "off")


class HarnessError(Exception):
    """A problem with the input or the run; main() prints it as one line and exits non-zero."""


def validate_config(cfg):
    def need(ok, message):
        if not ok:
            raise HarnessError(f"bad config: {message}")

    need(cfg.arch in ARCHS, f"arch={cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    for name in ("width", "projector_hidden_dim", "projector_out_dim", "batch_size", "epochs", "knn_k",
                 "check_every_epochs", "linear_epochs", "linear_batch_size", "eval_batch_size"):
        need(getattr(cfg, name) > 0, f"{name}={getattr(cfg, name)} must be > 0")
    need(cfg.batch_size >= 2, f"batch_size={cfg.batch_size} must be >= 2 (InfoNCE needs negatives)")
    need(cfg.train_subset >= 0, f"train_subset={cfg.train_subset} must be >= 0")
    need(cfg.warmup_steps >= 0, f"warmup_steps={cfg.warmup_steps} must be >= 0")
    need(cfg.check_first_epoch >= 0, f"check_first_epoch={cfg.check_first_epoch} must be >= 0")
    need(0 < cfg.crop_scale_min <= cfg.crop_scale_max <= 1, "need 0 < crop_scale_min <= crop_scale_max <= 1")
    need(0 < cfg.crop_ratio_min <= cfg.crop_ratio_max, "need 0 < crop_ratio_min <= crop_ratio_max")
    for name in ("flip_p", "jitter_p", "grayscale_p"):
        need(0 <= getattr(cfg, name) <= 1, f"{name}={getattr(cfg, name)} must be a probability in [0, 1]")
    for name in ("brightness", "contrast", "saturation"):
        need(0 <= getattr(cfg, name), f"{name}={getattr(cfg, name)} must be >= 0")
    need(0 <= cfg.hue <= 0.5, f"hue={cfg.hue} must be in [0, 0.5]")
    for name in ("temperature", "base_lr", "linear_lr"):
        need(getattr(cfg, name) > 0 and math.isfinite(getattr(cfg, name)), f"{name} must be a positive number")
    need(0 <= cfg.momentum < 1, f"momentum={cfg.momentum} must be in [0, 1)")
    need(cfg.weight_decay >= 0 and cfg.linear_weight_decay >= 0, "weight decays must be >= 0")
    need(cfg.lr_schedule in ("epoch", "step"), f"lr_schedule={cfg.lr_schedule!r}; choose epoch or step")
    need(0 < cfg.target_pct <= 100, f"target_pct={cfg.target_pct} must be in (0, 100]")
    need(cfg.device in ("auto", "cuda", "cpu"), f"device={cfg.device!r}; choose auto, cuda or cpu")
    for name in ("compile", "bf16", "channels_last"):
        need(getattr(cfg, name) in TRISTATE, f"{name}={getattr(cfg, name)!r}; choose auto, on or off")
    unknown = [e for e in final_eval_names(cfg) if e not in FINAL_EVALS]
    need(not unknown, f"final_evals has {unknown}; choose from {', '.join(FINAL_EVALS)}")


def final_eval_names(cfg):
    return [name.strip() for name in cfg.final_evals.split(",") if name.strip()]


def check_epochs(cfg):
    """The kNN check schedule, fixed by the config before the run starts: the same for every run of an entry."""
    scheduled = set(range(cfg.check_first_epoch, cfg.epochs + 1, cfg.check_every_epochs))
    return sorted(scheduled | {cfg.epochs})


#############################################
#                   Data                    #
#############################################

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TARBALL = "cifar-10-python.tar.gz"
# md5 of the official files (cs.toronto.edu/~kriz/cifar.html, the same list torchvision checks).
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIRS = (os.path.join(HERE, "data"), os.path.join(HERE, "..", "shared", "data"))


def _latin1_encode(text, encoding="latin1"):
    """What Python 3 pickles of bytes at protocol 2 call (_codecs.encode), admitted for latin1 text only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than of text to latin1")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch needs (numpy arrays): a crafted pickle cannot run code."""

    # numpy 2 writes numpy._core; the official Python 2 files name numpy.core; protocol 5 uses _frombuffer.
    RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, whatever its module's name
    FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,
               ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,
               ("numpy._core.numeric", "_frombuffer"): FROMBUFFER, ("numpy.core.numeric", "_frombuffer"): FROMBUFFER,
               ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")
        return self.ALLOWED[module, name]


def parse_cifar_batch(raw, name):
    """One pickled batch -> (uint8 images N x 3 x 32 x 32, int64 labels N). Raises HarnessError if malformed."""
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as error:
        raise HarnessError(f"{name} is not a valid CIFAR-10 batch: {error}") from None
    if not isinstance(batch, dict):
        raise HarnessError(f"{name} is not a valid CIFAR-10 batch: expected a dict, got {type(batch).__name__}")
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise HarnessError(f"{name}: 'data' must be a uint8 array of shape N x 3072")
    try:
        labels = np.asarray(labels)
    except ValueError:  # ragged nesting
        labels = np.asarray(None)
    if (labels.dtype.kind not in "iu" or labels.shape != (data.shape[0],) or labels.min(initial=0) < 0
            or labels.max(initial=0) > 9):
        raise HarnessError(f"{name}: 'labels' must be {data.shape[0]} integers in 0..9")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def find_cifar(data_dir):
    """-> (kind, path) with kind "folder" or "tar.gz"; tries the default places when data_dir is ""."""
    candidates = [data_dir] if data_dir else list(DEFAULT_DATA_DIRS)
    for base in candidates:
        for folder in (os.path.join(base, CIFAR_FOLDER), base):
            if all(os.path.isfile(os.path.join(folder, name)) for name in OFFICIAL_MD5):
                return "folder", os.path.normpath(folder)
        if os.path.isfile(os.path.join(base, CIFAR_TARBALL)):
            return "tar.gz", os.path.normpath(os.path.join(base, CIFAR_TARBALL))
    return None, candidates


def read_cifar_files(kind, path):
    """-> {file name: bytes} for the six batches."""
    if kind == "folder":
        files = {}
        for name in OFFICIAL_MD5:
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
        return files
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            missing = [name for name in OFFICIAL_MD5 if name not in members]
            if missing:
                raise HarnessError(f"{path} lacks {', '.join(missing)}")
            return {name: tar.extractfile(members[name]).read() for name in OFFICIAL_MD5}
    except (tarfile.TarError, OSError, EOFError) as error:
        raise HarnessError(f"{path} is not a readable CIFAR-10 archive: {error}") from None


def load_cifar10(data_dir, device, download=False):
    """CIFAR-10 as uint8 NCHW tensors on `device`, plus a report of where it came from and its md5 status."""
    kind, path = find_cifar(data_dir)
    if kind is None and download:
        target = data_dir or DEFAULT_DATA_DIRS[0]
        try:
            import torchvision

            torchvision.datasets.CIFAR10(root=target, download=True)
        except Exception as error:
            print(f"download into {target} failed: {type(error).__name__}: {error}", file=sys.stderr)
        kind, path = find_cifar(target)
    if kind is None:
        raise HarnessError(f"CIFAR-10 not found in {' or '.join(path)}: put {CIFAR_FOLDER}/ (or {CIFAR_TARBALL}) "
                           "there or pass --data-dir DIR")
    files = read_cifar_files(kind, path)
    checksums = {}
    for name, raw in files.items():
        md5 = hashlib.md5(raw).hexdigest()
        checksums[name] = dict(md5=md5, expected_md5=OFFICIAL_MD5[name], ok=md5 == OFFICIAL_MD5[name])
    official = all(c["ok"] for c in checksums.values())
    if not official:
        bad = [name for name, c in checksums.items() if not c["ok"]]
        print(f"WARNING: UNOFFICIAL DATA: md5 mismatch in {', '.join(bad)} ({path}); results from this run are not "
              "official CIFAR-10 results and can never become leaderboard records", file=sys.stderr)
    train = [parse_cifar_batch(files[name], name) for name in TRAIN_FILES]
    test_images, test_labels = parse_cifar_batch(files["test_batch"], "test_batch")
    train_images, train_labels = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    report = dict(data_dir=path, source=kind, official=official, files=checksums,
                  train_images=len(train_images), test_images=len(test_images))
    return dict(train_images=train_images.to(device), train_labels=train_labels.to(device),
                test_images=test_images.to(device), test_labels=test_labels.to(device), report=report)


#############################################
#               Augmentation                #
#############################################
# Whole-batch, on the device, per-sample random parameters drawn from an explicit generator, so seeded runs
# see identical batches. Float math in [0, 1], as torchvision's tensor transforms (the reference applies its
# transforms to tensors after ToTensor, not to PIL images).

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grayscale(x):
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def sample_crop_boxes(n, height, width, cfg, generator, device, attempts=10):
    """RandomResizedCrop.get_params for n images at once -> integer (top, left, h, w), each of shape (n,).

    As torchvision: up to 10 tries of area ~ U(scale) and log-uniform aspect ratio, keep the first that fits,
    else fall back to a centre crop (the whole image when its ratio lies within [ratio_min, ratio_max])."""
    u = torch.rand(4, n, attempts, generator=generator, device=device, dtype=torch.float64)
    area = height * width * (cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min) * u[0])
    log_lo, log_hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # argmax returns the first True
    any_fit = fits.any(1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    # randint(0, H - h + 1) as floor(U * (H - h + 1))
    top = torch.floor(u[2, :, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[3, :, 0] * (width - w + 1)).clamp(max=width - w)
    # torchvision's fallback: a centre crop with the ratio clamped into [ratio_min, ratio_max]
    fallback_h, fallback_w = height, width
    if width / height < cfg.crop_ratio_min:
        fallback_h = round(width / cfg.crop_ratio_min)
    elif width / height > cfg.crop_ratio_max:
        fallback_w = round(height * cfg.crop_ratio_max)
    fallback = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w],
                            device=device, dtype=h.dtype)
    return tuple(torch.where(any_fit, value, fallback[i]) for i, value in enumerate((top, left, h, w)))


def resized_crop(x, top, left, h, w, size):
    """Crop each image to its box and resize to size x size, bilinear, as crop-then-resize (align_corners=False):
    sample points are clamped to the box, so pixels outside the crop never leak in."""
    n, _, height, width = x.shape
    steps = (torch.arange(size, device=x.device, dtype=torch.float64) + 0.5) / size  # (size,)

    def source_coords(start, extent, full):  # pixel coordinates in the full image -> grid_sample's [-1, 1]
        pos = start[:, None] + steps[None] * extent[:, None] - 0.5
        pos = torch.minimum(torch.maximum(pos, start[:, None]), (start + extent - 1)[:, None])
        return ((2 * pos + 1) / full - 1).to(x.dtype)

    ys, xs = source_coords(top, h, height), source_coords(left, w, width)
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def adjust_hue(x, shift):
    """torchvision's adjust_hue for float tensors, per-sample shift (n,): RGB -> HSV, h += shift mod 1, -> RGB."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    same = maxc == minc
    safe_delta = torch.where(same, torch.ones_like(delta), delta)
    value = maxc
    saturation = delta / torch.where(same, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    hue = torch.where(same, torch.zeros_like(hue), hue)
    hue6 = torch.remainder(hue + shift[:, None, None], 1.0) * 6.0
    chroma = value * saturation
    # torchvision's six-sector table as one formula (within 1e-6 of it, no 6 x 3 x H x W table to gather from):
    # channel = v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B
    return torch.stack([value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
                        for k in (torch.remainder(hue6 + n, 6.0) for n in (5.0, 3.0, 1.0))], 1)


def blend(x, other, factor):
    """torchvision's _blend for floats: factor * x + (1 - factor) * other, clamped to [0, 1]; factor (n,)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp(0.0, 1.0)


def blend_step(x, op, factors):
    """Per image: brightness (op 0), contrast (1), saturation (2) or nothing (-1). All three are one blend with a
    different `other`, so one blend serves the whole batch; factor 1 returns x exactly."""
    gray = grayscale(x)
    op4 = op.view(-1, 1, 1, 1)
    other = torch.where(op4 == 0, 0.0, torch.where(op4 == 1, gray.mean((1, 2, 3), keepdim=True), gray))
    return blend(x, other, torch.where(op < 0, 1.0, factors.gather(1, op.clamp(min=0)[:, None]).squeeze(1)))


def color_jitter(x, order, factors):
    """ColorJitter with per-sample op order (n, 4) (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors
    (n, 4); an identity factor (1, 1, 1, 0) leaves an image untouched, which is how RandomApply skips it.
    The hue, the costly op, runs once per image: each image's blends before it, then the hue, then the blends after
    (3 + 1 + 3 batch steps, fixed shapes, so no host syncs; 4.5x faster on CPU than computing all four ops at each
    of the four positions, bit-identical, tools/bench_augment.py)."""
    hue_at = (order == 3).to(torch.int8).argmax(1, keepdim=True)
    steps = torch.arange(3, device=x.device)
    before = torch.where(steps < hue_at, order[:, :3], -1)
    after_position = hue_at + 1 + steps
    after = torch.where(after_position <= 3, order.gather(1, after_position.clamp(max=3)), -1)
    for op in before.T:
        x = blend_step(x, op, factors)
    x = torch.where(factors[:, 3].view(-1, 1, 1, 1) == 0, x, adjust_hue(x, factors[:, 3]))  # exact no-op
    for op in after.T:
        x = blend_step(x, op, factors)
    return x


def augment(images_uint8, cfg, generator=None, size=32):
    """One SimCLR view of each image: uint8 NCHW -> float NCHW in [0, 1] (channels_last on CUDA)."""
    n, device = images_uint8.shape[0], images_uint8.device
    x = images_uint8.float().div_(255)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    top, left, h, w = sample_crop_boxes(n, x.shape[2], x.shape[3], cfg, generator, device)
    x = resized_crop(x, top, left, h, w, size)
    x = torch.where((rand(n) < cfg.flip_p).view(-1, 1, 1, 1), x.flip(3), x)
    jitter = rand(n) < cfg.jitter_p
    spans = torch.tensor([cfg.brightness, cfg.contrast, cfg.saturation], device=device)
    low, high = (1 - spans).clamp(min=0), 1 + spans  # torchvision's factor ranges: U[max(0, 1-s), 1+s]
    factors = torch.cat([low + (high - low) * rand(n, 3), (2 * rand(n, 1) - 1) * cfg.hue], dim=1)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device)
    factors = torch.where(jitter[:, None], factors, identity)
    order = rand(n, 4).argsort(dim=1)  # a uniform random permutation per image, as torch.randperm(4)
    x = color_jitter(x, order, factors)
    x = torch.where((rand(n) < cfg.grayscale_p).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


#############################################
#                   Model                   #
#############################################
# torchvision's ResNet, rebuilt with a width knob: at width 64 the parameter names, shapes and initialisation
# are torchvision's (tests load torchvision's state_dict and compare outputs), with the reference's CIFAR stem.


class Block(nn.Module):
    """torchvision's BasicBlock (3x3, 3x3) or, with bottleneck, its Bottleneck (1x1, 3x3 with the stride, 1x1 to
    4x the channels): same parameter names, so state_dicts interchange."""

    def __init__(self, in_channels, channels, stride, bottleneck):
        super().__init__()
        out_channels = channels * (4 if bottleneck else 1)
        convs = ([(in_channels, channels, 1, 1), (channels, channels, 3, stride), (channels, out_channels, 1, 1)]
                 if bottleneck else [(in_channels, channels, 3, stride), (channels, channels, 3, 1)])
        self.depth = len(convs)
        for i, (cin, cout, kernel, conv_stride) in enumerate(convs, 1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, kernel, conv_stride, kernel // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            out = self.relu(out) if i < self.depth else out
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


RESNET_LAYOUT = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)), "resnet50": (True, (3, 4, 6, 3))}


class CifarResNet(nn.Module):
    """Backbone: features before the (absent) fc layer: 8 * width dimensions (32 * width for resnet50)."""

    def __init__(self, arch, width=64):
        super().__init__()
        bottleneck, depths = RESNET_LAYOUT[arch]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)  # CIFAR stem: 3x3 stride 1, no maxpool
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_channels, stages = width, []
        for stage, depth in enumerate(depths):
            channels, blocks = width * 2**stage, []
            for i in range(depth):
                blocks.append(Block(in_channels, channels, 2 if (stage > 0 and i == 0) else 1, bottleneck))
                in_channels = channels * (4 if bottleneck else 1)
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = in_channels
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The reference swaps in a fresh conv1 after torchvision's init, so its stem keeps nn.Conv2d's default init.
        self.conv1.reset_parameters()

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class SimCLRModel(nn.Module):
    def __init__(self, arch="resnet18", width=64, projector_hidden_dim=1024, projector_out_dim=128):
        super().__init__()
        self.backbone = CifarResNet(arch, width)
        self.projector = nn.Sequential(nn.Linear(self.backbone.out_dim, projector_hidden_dim), nn.ReLU(),
                                       nn.Linear(projector_hidden_dim, projector_out_dim))

    def forward(self, x):
        h = self.backbone(x)
        return h, self.projector(h)


def make_model(arch="resnet18", width=64, projector_hidden_dim=1024, projector_out_dim=128):
    if arch not in ARCHS:
        raise HarnessError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return SimCLRModel(arch, width, projector_hidden_dim, projector_out_dim)


#############################################
#                   Loss                    #
#############################################


def info_nce(z, temperature=0.5):
    """SimCLR's loss as the reference computes it: z holds both views stacked (2N x d); cosine similarities over
    the 2N x 2N matrix, diagonal masked, the other view of each image is the positive; mean over all 2N rows."""
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z) // 2
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


#############################################
#                Evaluation                 #
#############################################


@torch.no_grad()
def extract_features(backbone, images_uint8, batch_size=1024):
    """Backbone features of unaugmented images, in eval mode and fp32 as the reference evaluates."""
    was_training = backbone.training
    backbone.eval()
    feats = [backbone(images_uint8[i:i + batch_size].float().div(255)).float()
             for i in range(0, len(images_uint8), batch_size)]
    backbone.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, k=10, num_classes=10, block_size=1024):
    """sklearn's KNeighborsClassifier(n_neighbors=k, metric="cosine") on the device: the k most cosine-similar
    training points vote, ties go to the lowest class index. Blocks of test points bound the memory."""
    train_unit = F.normalize(train_feats, dim=1)
    predictions = []
    for start in range(0, len(test_feats), block_size):
        sims = F.normalize(test_feats[start:start + block_size], dim=1) @ train_unit.T
        neighbours = sims.topk(k, dim=1).indices
        votes = F.one_hot(train_labels[neighbours], num_classes).sum(1)
        predictions.append(votes.argmax(1))  # argmax returns the first maximum: the lowest class wins a tie
    return torch.cat(predictions)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=10):
    """kNN test accuracy in percent."""
    predictions = knn_predict(train_feats, train_labels, test_feats, k)
    return 100.0 * (predictions == test_labels).float().mean().item()


def train_linear(train_inputs, train_labels, cfg, generator, features_of=None):
    """The reference's linear readout: Adam, cosine annealing per epoch, mini-batches of linear_batch_size.
    train_inputs are precomputed features, or images when features_of (image batch -> features) is given."""
    device = train_labels.device
    in_dim = train_inputs.shape[1] if features_of is None else features_of(train_inputs[:2]).shape[1]
    classifier = nn.Linear(in_dim, 10).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay)
    for epoch in range(cfg.linear_epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(cfg.linear_lr, epoch, cfg.linear_epochs)
        order = torch.randperm(len(train_labels), generator=generator, device=device)
        for idx in order.split(cfg.linear_batch_size):
            inputs = train_inputs[idx] if features_of is None else features_of(train_inputs[idx])
            loss = F.cross_entropy(classifier(inputs), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier


@torch.no_grad()
def linear_accuracy(classifier, test_feats, test_labels):
    return 100.0 * (classifier(test_feats).argmax(1) == test_labels).float().mean().item()


def lin_augm_features(backbone, cfg, generator):
    """Image batch -> features of RandomResizedCrop + flip views, backbone frozen and in eval mode."""
    crop_only = dataclasses.replace(cfg, jitter_p=0.0, grayscale_p=0.0)

    @torch.no_grad()
    def features_of(images_uint8):
        backbone.eval()
        return backbone(augment(images_uint8, crop_only, generator)).float()

    return features_of


def backbone_features(model, data, cfg):
    """-> (train features, test features) of the unaugmented images, as every evaluation uses them."""
    return tuple(extract_features(model.backbone, data[key], cfg.eval_batch_size)
                 for key in ("train_images", "test_images"))


def run_final_evals(model, data, cfg, generator, names, features=None):
    """The reference's table: kNN k=5/k=10, lin precomp, lin augm, each with the seconds it took. `features`:
    those of the run's last kNN check, when the model has not changed since (no second extraction)."""
    results, seconds = {f"{name}_pct": None for name in FINAL_EVALS}, {}
    if not names:
        return dict(results, seconds=seconds)
    start = time.perf_counter()
    train_feats, test_feats = features if features is not None else backbone_features(model, data, cfg)
    seconds["features"] = time.perf_counter() - start
    for name in names:
        start = time.perf_counter()
        if name in ("knn5", "knn10"):
            results[f"{name}_pct"] = knn_accuracy(train_feats, data["train_labels"], test_feats, data["test_labels"],
                                                  int(name[3:]))
        elif name == "lin_precomp":
            classifier = train_linear(train_feats, data["train_labels"], cfg, generator)
            results["lin_precomp_pct"] = linear_accuracy(classifier, test_feats, data["test_labels"])
        else:
            features_of = lin_augm_features(model.backbone, cfg, generator)
            classifier = train_linear(data["train_images"], data["train_labels"], cfg, generator, features_of)
            results["lin_augm_pct"] = linear_accuracy(classifier, test_feats, data["test_labels"])
        synchronize(data["train_labels"].device)
        seconds[name] = time.perf_counter() - start
    return dict(results, seconds=seconds)


#############################################
#             Training & timer              #
#############################################


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cosine_lr(peak_lr, t, total):
    """CosineAnnealingLR(T_max=total) at step t (no warm-up, annealed towards 0), as the reference."""
    return peak_lr * (1 + math.cos(math.pi * t / total)) / 2


def resolve_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise HarnessError("device=cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(cfg.device)


def speed_features(cfg, device):
    """CUDA-only speed switches, resolved: (compile, bf16, channels_last)."""
    on_cuda = device.type == "cuda"
    return tuple(getattr(cfg, name) == "on" or (getattr(cfg, name) == "auto" and on_cuda)
                 for name in ("compile", "bf16", "channels_last"))


class Trainer:
    """Holds the model, optimizer and compiled step; `train_epoch` is the only timed work."""

    def __init__(self, cfg, device, n_train):
        self.cfg, self.device, self.n_train = cfg, device, n_train
        use_compile, self.bf16, channels_last = speed_features(cfg, device)
        self.model = make_model(cfg.arch, cfg.width, cfg.projector_hidden_dim, cfg.projector_out_dim).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.peak_lr = cfg.base_lr * cfg.batch_size / 256
        extra = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.peak_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **extra)
        # dynamic=False: the last partial batch gets its own static graph (warmed up too), not a slower dynamic one
        self.forward = torch.compile(self.model, dynamic=False) if use_compile else self.model
        self.steps_per_epoch = n_train // cfg.batch_size if cfg.drop_last else math.ceil(n_train / cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise HarnessError(f"batch_size={cfg.batch_size} exceeds the {n_train} training images with drop_last")

    def step(self, images_uint8, generator):
        view1, view2 = augment(images_uint8, self.cfg, generator), augment(images_uint8, self.cfg, generator)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # Two forward passes, as the reference: BatchNorm statistics are per view, which matters for SimCLR.
            _, z1 = self.forward(view1)
            _, z2 = self.forward(view2)
        loss = info_nce(torch.cat([z1, z2]), self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def warm_up(self):
        """Compile and autotune on random images for every batch shape the run will see, then restore the model
        and optimizer exactly, so warm-up trains nothing. Untimed."""
        if self.cfg.warmup_steps == 0:
            return
        model_state = copy.deepcopy(self.model.state_dict())
        optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        generator = torch.Generator(self.device).manual_seed(12345)  # not the run's generator: its stream is kept
        shapes = {self.cfg.batch_size, self.n_train - (self.steps_per_epoch - 1) * self.cfg.batch_size}
        for batch in sorted(shapes):
            fake = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=self.device, generator=generator)
            for _ in range(self.cfg.warmup_steps):
                self.step(fake, generator)
        synchronize(self.device)
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    def train_epoch(self, epoch, train_images, generator):
        """One pass over the training set in a fresh random order -> (mean loss tensor, lr at the epoch start).
        No host sync inside: the loss is summed on the device and read once per epoch."""
        cfg, n = self.cfg, len(train_images)
        order = torch.randperm(n, generator=generator, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        first_lr = None
        for i in range(self.steps_per_epoch):
            t = epoch if cfg.lr_schedule == "epoch" else epoch * self.steps_per_epoch + i
            total = cfg.epochs if cfg.lr_schedule == "epoch" else cfg.epochs * self.steps_per_epoch
            lr = cosine_lr(self.peak_lr, t, total)
            first_lr = lr if first_lr is None else first_lr
            self.set_lr(lr)
            loss_sum += self.step(train_images[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]], generator)
        return loss_sum / self.steps_per_epoch, first_lr


def knn_check(model, data, cfg):
    """kNN k=knn_k test accuracy of the backbone in %, its (untimed) seconds, and the features it used."""
    start = time.perf_counter()
    train_feats, test_feats = features = backbone_features(model, data, cfg)
    accuracy = knn_accuracy(train_feats, data["train_labels"], test_feats, data["test_labels"], cfg.knn_k)
    return accuracy, time.perf_counter() - start, features


#############################################
#                  Logging                  #
#############################################

TIMING_STATEMENT = dict(
    timed="training steps: per-epoch shuffle, GPU augmentation, forward, loss, backward, optimizer step; "
          "the GPU is synchronised at the start and end of every epoch",
    not_timed="data load and checksums, compile warm-up (state restored afterwards), kNN checks, final evaluation, "
              "logging",
)


def source_code():
    with open(os.path.abspath(__file__), encoding="utf-8") as f:  # __file__, not argv[0]: tools import us
        return f.read()


def environment_report(device):
    import torchvision

    report = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                  cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                  driver=None, device=device.type, gpu_name=None, gpu_count=torch.cuda.device_count(),
                  cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                  hostname=socket.gethostname(), platform=platform.platform(), nvidia_smi=None)
    if device.type == "cuda":
        report["gpu_name"] = torch.cuda.get_device_name(device)
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
            report["nvidia_smi"] = smi.stdout
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
            report["driver"] = query.stdout.strip().splitlines()[0] if query.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
    return report


def ineligibility(cfg, device, data_report):
    reasons = []
    if device.type != "cuda":
        reasons.append("not run on a GPU")
    if not data_report["official"]:
        reasons.append("unofficial data (md5 mismatch)")
    if cfg.train_subset:
        reasons.append(f"trained on a subset of {cfg.train_subset} images")
    if cfg.target_pct != 90.0 or cfg.knn_k != 10:
        reasons.append("target is not kNN k=10 >= 90.0%")
    return reasons


def write_json_atomic(path, obj):
    """Write to a temp file in the same folder, then rename: a reader never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def reserve_log_path(cfg):
    """A new, never-before-used log file: created exclusively, so no existing log is ever overwritten."""
    os.makedirs(cfg.log_dir, exist_ok=True)
    while True:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = os.path.join(cfg.log_dir, f"{stamp}_{cfg.arch}_seed{cfg.seed}_{uuid.uuid4().hex[:6]}.json")
        try:
            with open(path, "x"):
                return path
        except FileExistsError:
            continue


def format_row(row):
    knn = f"{row['knn_pct']:8.2f}" if row["knn_pct"] is not None else " " * 8
    loss = f"{row['loss']:8.4f}" if row["loss"] is not None else " " * 8
    lr = f"{row['lr']:8.5f}" if row["lr"] is not None else " " * 8
    return f"{row['epoch']:6d} {loss} {lr} {row['epoch_seconds']:10.2f} {row['timed_seconds']:10.2f} {knn}"


TABLE_HEADER = f"{'epoch':>6} {'loss':>8} {'lr':>8} {'epoch_s':>10} {'timed_s':>10} {'knn_pct':>8}"


def format_final_row(cfg, final):
    def pct(name):
        return f"{final[name]:.2f}" if final.get(name) is not None else "-"

    loss = f"{final['loss_per_batch']:.3f}" if final.get("loss_per_batch") is not None else "-"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in final["seconds"].items())
    return ("|Backbone|Batch|Loss/batch|kNN(k=5)|kNN(k=10)|lin precomp|lin augm|\n"
            "|--------|-----|----------|--------|---------|-----------|--------|\n"
            f"|{cfg.arch} (width {cfg.width})|{cfg.batch_size}|{loss}|{pct('knn5_pct')}|{pct('knn10_pct')}|"
            f"{pct('lin_precomp_pct')}|{pct('lin_augm_pct')}|\n(evaluation times: {times})")


#############################################
#                   Main                    #
#############################################


def parse_bool(text):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog_extra=""):
    parser = OneLineErrorParser(
        prog=f"airbench_ssl.py{prog_extra}", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="JSON file of field overrides (keys starting with _ are notes)")
    parser.add_argument("--preset", choices=("auto", "recipe", "cpu_demo"), default="auto",
                        help="base before overrides: auto = recipe on a GPU, cpu_demo without one")
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            type=parse_bool if f.type is bool else f.type,
                            help=f"(default {f.default!r})")
    return parser


def config_from_args(args, cuda_available):
    """Defaults <- preset <- --config file <- --field flags, validated."""
    values = {}
    if args.preset == "cpu_demo" or (args.preset == "auto" and not cuda_available):
        values.update(CPU_DEMO)
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise HarnessError(f"cannot read config file {args.config}: {error}") from None
        if not isinstance(overrides, dict):
            raise HarnessError(f"config file {args.config} must hold a JSON object of field overrides")
        names = {f.name for f in dataclasses.fields(Config)}
        unknown = [k for k in overrides if not k.startswith("_") and k not in names]
        if unknown:
            raise HarnessError(f"config file {args.config} has unknown fields {unknown}")
        values.update({k: v for k, v in overrides.items() if not k.startswith("_")})
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
                   if getattr(args, f.name) is not None})
    cfg = Config(**values)
    for f in dataclasses.fields(Config):  # config files are JSON: check their types too
        value = getattr(cfg, f.name)
        if not isinstance(value, (int, float) if f.type is float else f.type) or (
                f.type is not bool and isinstance(value, bool)):
            raise HarnessError(f"bad config: {f.name}={value!r} should be of type {f.type.__name__}")
    validate_config(cfg)
    return cfg


def train_run(cfg, argv):
    wall_start = time.perf_counter()
    device = resolve_device(cfg)
    if device.type == "cpu":
        print("No CUDA GPU in use: running on the CPU. Times are not race times, and this run is not eligible for the "
              "leaderboard." + (" Preset cpu_demo: a narrow ResNet18 on a training subset, ~5 min on 2 cores."
                                if cfg.width == CPU_DEMO["width"] else ""))
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = device.type == "cuda"

    start = time.perf_counter()
    data = load_cifar10(cfg.data_dir, device, cfg.download)
    if cfg.train_subset:
        data["train_images"], data["train_labels"] = (data[key][:cfg.train_subset] for key in
                                                      ("train_images", "train_labels"))
    synchronize(device)
    untimed = dict(data_load=time.perf_counter() - start, warmup=0.0, knn_checks=0.0, final_eval=0.0)
    trainer = Trainer(cfg, device, len(data["train_images"]))
    start = time.perf_counter()
    trainer.warm_up()
    untimed["warmup"] = time.perf_counter() - start

    reasons, schedule, source = ineligibility(cfg, device, data["report"]), check_epochs(cfg), source_code()
    log_path = reserve_log_path(cfg)
    log = dict(format="airbench-ssl-log/1", kind="train", run_id=os.path.basename(log_path)[:-5],
               created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=list(argv),
               config=dataclasses.asdict(cfg), code=dict(path="airbench_ssl.py", source=source,
                                                         sha256=hashlib.sha256(source.encode("utf-8")).hexdigest()),
               environment=environment_report(device), data=data["report"], eligible=not reasons,
               ineligible_reasons=reasons, timing=TIMING_STATEMENT, check_epochs=schedule, epochs=[],
               untimed_seconds=untimed, result=dict(target_pct=cfg.target_pct), final_eval=None)
    rows = log["epochs"]

    def save(status, message=""):
        checks = [row["knn_pct"] for row in rows if row["knn_pct"] is not None]
        timed = rows[-1]["timed_seconds"] if rows else 0.0
        log["result"].update(status=status, message=message, reached_target=status == "reached_target",
                             epochs_run=rows[-1]["epoch"] if rows else 0, timed_seconds=timed,
                             time_to_target_seconds=timed if status == "reached_target" else None,
                             knn_at_stop_pct=checks[-1] if checks else None)
        log["total_wall_seconds"] = time.perf_counter() - wall_start
        write_json_atomic(log_path, log)  # after every epoch: a crash still leaves every finished epoch on disk

    save("running")
    env, report = log["environment"], data["report"]
    print("config: " + json.dumps(log["config"]))
    print(f"device: {device.type} {env['gpu_name'] or env['cpu']}, torch {env['torch']}; data: {report['data_dir']} "
          f"({'official' if report['official'] else 'UNOFFICIAL'}); load {untimed['data_load']:.1f} s, warm-up "
          f"{untimed['warmup']:.1f} s (untimed)\nkNN k={cfg.knn_k} checks after epochs {schedule[:8]}"
          f"{' ...' if len(schedule) > 8 else ''}; target {cfg.target_pct}%; log: {log_path}\n{TABLE_HEADER}")
    status, timed_seconds, check_features = "max_epochs", 0.0, None
    try:
        for epoch in range(0 if schedule[0] == 0 else 1, cfg.epochs + 1):
            row = dict(epoch=epoch, loss=None, lr=None, epoch_seconds=0.0, timed_seconds=timed_seconds,
                       knn_pct=None, knn_seconds=None)
            if epoch > 0:
                synchronize(device)
                start = time.perf_counter()
                mean_loss, row["lr"] = trainer.train_epoch(epoch - 1, data["train_images"], generator)
                synchronize(device)
                row["epoch_seconds"] = time.perf_counter() - start
                timed_seconds += row["epoch_seconds"]
                row.update(loss=mean_loss.item(), timed_seconds=timed_seconds)
            if epoch in schedule and math.isfinite(row["loss"] if epoch else 0.0):
                row["knn_pct"], row["knn_seconds"], check_features = knn_check(trainer.model, data, cfg)
                untimed["knn_checks"] += row["knn_seconds"]
            rows.append(row)
            print(format_row(row), flush=True)
            if epoch and not math.isfinite(row["loss"]):
                raise HarnessError(f"loss became {row['loss']} in epoch {epoch}; lower the learning rate or check "
                                   "the data")
            if row["knn_pct"] is not None and row["knn_pct"] >= cfg.target_pct:
                status = "reached_target"
                break
            save("running")
    except (KeyboardInterrupt, HarnessError, RuntimeError) as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        message = "interrupted (Ctrl-C or SIGTERM)" if interrupted else str(error).strip().splitlines()[0]
        save("interrupted" if interrupted else "failed", message)
        raise HarnessError(f"{message}; the epochs run so far are in {log_path}") from None

    last = rows[-1]
    message = (f"reached {last['knn_pct']:.2f}% >= {cfg.target_pct}% after epoch {last['epoch']} in "
               f"{timed_seconds:.2f} timed seconds" if status == "reached_target"
               else f"did not reach {cfg.target_pct}% within {cfg.epochs} epochs")
    save(status, message)
    print(("TARGET REACHED: " if status == "reached_target" else "TARGET NOT REACHED: ") + message)
    start = time.perf_counter()
    # the run always ends on a check (the last epoch is scheduled), so its features are the final model's
    log["final_eval"] = run_final_evals(trainer.model, data, cfg, generator, final_eval_names(cfg), check_features)
    log["final_eval"]["loss_per_batch"] = next((r["loss"] for r in reversed(rows) if r["loss"] is not None), None)
    untimed["final_eval"] = time.perf_counter() - start
    if cfg.save_checkpoint:
        save_checkpoint(cfg.save_checkpoint, trainer.model, cfg, log["run_id"])
    save(status, message)
    print(format_final_row(cfg, log["final_eval"]))
    verdict = "eligible" if not reasons else "NOT eligible: " + "; ".join(reasons)
    print(f"timed {timed_seconds:.2f} s; untimed: {', '.join(f'{k} {v:.1f} s' for k, v in untimed.items())}; total "
          f"wall {log['total_wall_seconds']:.1f} s; {verdict}; log: {log_path}")
    return log


CHECKPOINT_FORMAT = "airbench-ssl-checkpoint/1"


def save_checkpoint(path, model, cfg, run_id):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    os.close(fd)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(dict(format=CHECKPOINT_FORMAT, config=dataclasses.asdict(cfg), run_id=run_id, state_dict=state), tmp)
    os.replace(tmp, path)
    print(f"checkpoint: {path}")


def load_checkpoint(path, device):
    """-> (model, saved config dict). A file that is not a checkpoint of ours gets a clear error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HarnessError(f"checkpoint {path} does not exist") from None
    except Exception as error:
        raise HarnessError(f"{path} is not an airbench-ssl checkpoint: {type(error).__name__}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise HarnessError(f"{path} is not an airbench-ssl checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    saved = checkpoint.get("config")
    if not isinstance(saved, dict) or not isinstance(checkpoint.get("state_dict"), dict) or any(
            name not in saved for name in ("arch", "width", "projector_hidden_dim", "projector_out_dim")):
        raise HarnessError(f"{path} is a damaged airbench-ssl checkpoint: its config or state_dict is missing")
    model = make_model(saved["arch"], saved["width"], saved["projector_hidden_dim"], saved["projector_out_dim"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise HarnessError(f"{path} does not fit arch={saved['arch']} width={saved['width']}: {first}") from None
    return model.to(device), dict(saved, run_id=checkpoint.get("run_id"))


def eval_run(checkpoint_path, cfg, argv):
    device = resolve_device(cfg)
    model, saved = load_checkpoint(checkpoint_path, device)
    model_fields = ("arch", "width", "projector_hidden_dim", "projector_out_dim")
    # batch_size too: the table's Batch column is the model's training batch, not a knob of the evaluation
    cfg = dataclasses.replace(cfg, **{name: saved[name] for name in model_fields + ("batch_size",)})
    data = load_cifar10(cfg.data_dir, device, cfg.download)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    final = run_final_evals(model, data, cfg, generator, final_eval_names(cfg))
    final["loss_per_batch"] = None
    print(format_final_row(cfg, final))
    log_path = reserve_log_path(cfg)
    write_json_atomic(log_path, dict(format="airbench-ssl-log/1", kind="eval", checkpoint=checkpoint_path,
                                     checkpoint_run_id=saved.get("run_id"), argv=list(argv),
                                     config=dataclasses.asdict(cfg), environment=environment_report(device),
                                     data=data["report"], final_eval=final))
    print(f"log: {log_path}")
    return final


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    evaluating = bool(argv) and argv[0] == "eval"
    parser = build_parser(" eval" if evaluating else "")
    if evaluating:
        parser.add_argument("checkpoint", help="a file written by --save-checkpoint")
    args = parser.parse_args(argv[1:] if evaluating else argv)
    try:
        cfg = config_from_args(args, torch.cuda.is_available())
        eval_run(args.checkpoint, cfg, argv) if evaluating else train_run(cfg, argv)
    except HarnessError as error:
        print(f"airbench_ssl: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("airbench_ssl: interrupted before training started; nothing was logged", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a `timeout` or a job scheduler's SIGTERM is logged like Ctrl-C: status "interrupted"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
