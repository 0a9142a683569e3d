"""airbench-ssl: the SimCLR-on-CIFAR-10 speedrun harness.

Race: reach 90.0% cosine kNN (k=10) test accuracy on CIFAR-10, self-supervised on the 50k training images only, in
as little timed wall-clock as possible. Defaults: the reference recipe of dkobak/simclr-cifar10 (ResNet18, batch 512,
500 epochs: 90.3% in 1 h 39 min on an A100, as published). Record: none yet (leaderboard.md). Budget: <= 800 lines.
    python airbench_ssl.py [--field value ...]      one GPU (every field: --help); 8 GPUs, batch_size still global:
    torchrun --nproc_per_node=8 airbench_ssl.py [--field value ...]
Timed: the training epochs, all GPUs synchronised at each epoch boundary (TIMING_STATEMENT); not timed, reported
apart: data load, compile warm-up, kNN checks, final evaluation. The reference's full table: tools/evaluate.py."""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

########################## Config ##########################
ARCHS, TRISTATE = ("resnet18", "resnet34", "resnet50"), ("auto", "on", "off")
def knob(default, lo=None, hi=None, choices=None):
    """A field and its allowed values, bounds inclusive: a typo must not allocate terabytes or pass as inf or NaN."""
    return dataclasses.field(default=default, metadata=dict(bounds=(lo, hi), choices=choices))

@dataclasses.dataclass
class Config:  # --help shows each field's comment (and the comment lines below it), its range and its default
    data_dir: str = ""  # folder holding cifar-10-batches-py/ ("" = $AIRBENCH_SSL_DATA if set, else ./data)
    download: bool = True  # if CIFAR-10 is not in data_dir, download it there with torchvision
    train_subset: int = knob(0, 0, 50000)  # train on the first n images (0 = all 50,000; a subset is never eligible)
    crop_scale_min: float = knob(0.2, 1e-6, 1)  # RandomResizedCrop's area fraction, low end (as the reference)
    crop_scale_max: float = knob(1.0, 1e-6, 1)  # RandomResizedCrop's area fraction, high end
    crop_ratio_min: float = knob(3 / 4, 1e-3, 1e3)  # crop aspect ratio w/h, low end (log-uniform, as torchvision)
    crop_ratio_max: float = knob(4 / 3, 1e-3, 1e3)  # crop aspect ratio w/h, high end
    flip_p: float = knob(0.5, 0, 1)  # probability of a horizontal flip
    jitter_p: float = knob(0.8, 0, 1)  # probability that ColorJitter is applied at all
    brightness: float = knob(0.4, 0, 100)  # ColorJitter brightness: factor ~ U[1-b, 1+b]
    contrast: float = knob(0.4, 0, 100)  # ColorJitter contrast: factor ~ U[1-c, 1+c]
    saturation: float = knob(0.4, 0, 100)  # ColorJitter saturation: factor ~ U[1-s, 1+s]
    hue: float = knob(0.1, 0, 0.5)  # ColorJitter hue: shift ~ U[-h, h] of a full turn
    grayscale_p: float = knob(0.1, 0, 1)  # probability of grayscale (0.1: the bs512 recipe; 0.2: the bs1024 one)
    arch: str = knob("resnet18", choices=ARCHS)  # backbone, with the CIFAR stem: 3x3 stride-1 conv1, no maxpool
    width: int = knob(64, 1, 1024)  # channels of the first stage (64 = torchvision's; smaller only for CPU runs)
    projector_hidden_dim: int = knob(1024, 1, 65536)  # projector: Linear(features, hidden), ReLU, Linear(hidden, out)
    projector_out_dim: int = knob(128, 1, 65536)  # dimension of the projections the loss compares
    temperature: float = knob(0.5, 1e-4, 1e3)  # InfoNCE softmax temperature
    low_res_px: int = knob(32, 8, 32)  # progressive resolution: the views' size in the first low_res_epochs epochs
    low_res_epochs: int = knob(0, 0, 99_999)  # epochs at low_res_px, then 32 px (each size compiled and warmed up)
    batch_size: int = knob(512, 2, 1 << 20)  # images per step over all GPUs
    epochs: int = knob(500, 1, 100_000)  # length of the lr schedule = the most epochs a run may take
    base_lr: float = knob(0.03, 1e-9, 1e3)  # lr = base_lr * batch_size / 256 (linear scaling, as the reference)
    warmup_epochs: int = knob(0, 0, 99_999)  # linear lr warm-up, per step, before the cosine (the reference: none)
    momentum: float = knob(0.9, 0, 0.999)  # SGD momentum
    nesterov: bool = False  # Nesterov momentum (the reference: off)
    weight_decay: float = knob(5e-4, 0, 1)  # on every parameter, BN and biases included, as the reference
    lr_schedule: str = knob("epoch", choices=("epoch", "step"))  # cosine stepped per epoch (the reference) or step
    drop_last: bool = False  # drop each epoch's last partial batch (the reference keeps it)
    target_pct: float = knob(90.0, 1e-9, 100)  # stop at the first check with kNN accuracy >= this
    knn_k: int = knob(10, 1, 1000)  # neighbours of the cosine kNN check (the race: 10)
    check_first_epoch: int = knob(10, 0, 100_000)  # first kNN check after this epoch (0 = also before training)
    check_every_epochs: int = knob(10, 1, 100_000)  # then every this many epochs; the last epoch is always checked
    device: str = knob("auto", choices=("auto", "cuda", "cpu"))  # auto = CUDA if torch sees a GPU
    compile: str = knob("auto", choices=TRISTATE)  # torch.compile the model and the augmentation (auto = on for CUDA)
    bf16: str = knob("auto", choices=TRISTATE)  # bf16 autocast in training; the loss is fp32 (auto = on for CUDA)
    channels_last: str = knob("auto", choices=TRISTATE)  # memory format of the model and views (auto = on for CUDA)
    sync_bn: bool = False  # several GPUs: BatchNorm statistics over the global batch (default: per GPU)
    compile_warmup_steps: int = knob(3, 0, 100)  # untimed steps per batch shape on random data, state restored after
    eval_batch_size: int = knob(1024, 1, 1 << 20)  # images per forward pass in kNN checks
    seed: int = knob(0, 0, 2**63 - 1)  # seeds the initialisation, the order and the augmentations
    log_dir: str = "logs"  # where the JSON log and the model go
    save_model: str = knob("weights", choices=("weights", "export", "false"))  # the trained backbone beside the log,
    # for tools/leaderboard.py verify: its weights, or a torch.export program (a changed architecture); false: none

# What a no-GPU machine runs by default: a narrow ResNet18 on a training subset, sized for ~4 min on 2 cores.
CPU_DEMO = dict(width=16, train_subset=5000, batch_size=256, epochs=12, check_first_epoch=0, check_every_epochs=12)

class HarnessError(Exception):  # bad input or a failed run: main() prints one line and exits non-zero
    pass

def validate_config(cfg):
    for f in dataclasses.fields(cfg):  # config files are JSON: types are checked too
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        lo, hi = f.metadata.get("bounds", (None, None))
        if type(value) not in ((int, float) if f.type is float else (f.type,)):  # True is no int, 1 no bool
            raise HarnessError(f"bad config: {f.name}={value!r} should be of type {f.type.__name__}")
        if f.type is str and "\0" in value:  # no path or name holds one: refused here, not deep in os.makedirs
            raise HarnessError(f"bad config: {f.name}={value!r} holds a NUL character")
        if lo is not None and not lo <= value <= hi:
            raise HarnessError(f"bad config: {f.name}={value} must be in [{lo}, {hi}]")
        if choices and value not in choices:
            raise HarnessError(f"bad config: {f.name}={value!r}; choose one of {', '.join(choices)}")
    if cfg.warmup_epochs >= cfg.epochs:
        raise HarnessError(f"bad config: need warmup_epochs < epochs, not {cfg.warmup_epochs} and {cfg.epochs}")
def is_check_epoch(cfg, epoch):  # the kNN check schedule, fixed by the config before the run (a rule, not a list)
    return epoch == cfg.epochs or (cfg.check_first_epoch <= epoch <= cfg.epochs
                                   and (epoch - cfg.check_first_epoch) % cfg.check_every_epochs == 0)
def reached_target(cfg, knn_pct):  # the stop rule: the run ends at the first check that reaches the target
    return knn_pct is not None and knn_pct >= cfg.target_pct

########################### Data ###########################
CIFAR_FOLDER = "cifar-10-batches-py"  # then the md5s of the official files (cs.toronto.edu/~kriz/cifar.html)
OFFICIAL_MD5 = {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

class _CifarUnpickler(pickle.Unpickler):
    """Admits only numpy arrays, all a CIFAR batch needs: a crafted pickle cannot run code."""
    # numpy's own functions, named numpy.core in the official files, numpy._core by numpy 2, _frombuffer at protocol 5
    RECONSTRUCT, FROMBUFFER = np.ndarray.__reduce__(np.zeros(1))[0], np.zeros(1).__reduce_ex__(5)[0]
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT, ("numpy", "ndarray"): np.ndarray,
               ("numpy._core.numeric", "_frombuffer"): FROMBUFFER, ("numpy.core.numeric", "_frombuffer"): FROMBUFFER}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of the CIFAR-10 format")
        return self.ALLOWED[module, name]
def parse_cifar_batch(raw, name):  # one pickled batch -> (uint8 images N x 3 x 32 x 32, int64 labels N)
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
def find_cifar(data_dir):  # -> the folder holding the six batch files (data_dir or its CIFAR_FOLDER), or None
    for folder in (os.path.join(data_dir, CIFAR_FOLDER), data_dir):
        if all(os.path.isfile(os.path.join(folder, name)) for name in OFFICIAL_MD5):
            return os.path.normpath(folder)
def load_cifar10(data_dir, device, download=False):  # -> uint8 NCHW tensors on device, and a report: source, md5s
    data_dir, failed = data_dir or os.environ.get("AIRBENCH_SSL_DATA") or DEFAULT_DATA_DIR, ""
    if find_cifar(data_dir) is None and download:
        with tempfile.TemporaryDirectory() as tmp:  # a failed download leaves nothing behind, not even data_dir
            try:
                torchvision.datasets.CIFAR10(root=tmp, download=True)
                os.makedirs(data_dir, exist_ok=True)
                shutil.move(os.path.join(tmp, CIFAR_FOLDER), os.path.join(data_dir, CIFAR_FOLDER))
            except Exception as error:
                failed = f"; the download failed ({type(error).__name__}: {str(error)[:200]})"
    if (folder := find_cifar(data_dir)) is None:
        raise HarnessError(f"CIFAR-10 not found in {data_dir}{failed}: put {CIFAR_FOLDER}/ there or use --data-dir")
    files, parsed = {}, {}
    for name, expected in OFFICIAL_MD5.items():
        try:
            raw = open(os.path.join(folder, name), "rb").read()
        except OSError as error:
            raise HarnessError(f"cannot read {name} in {folder}: {error.strerror}") from None
        md5, parsed[name] = hashlib.md5(raw).hexdigest(), parse_cifar_batch(raw, name)
        files[name] = dict(md5=md5, expected_md5=expected, ok=md5 == expected)
    official = all(c["ok"] for c in files.values())
    if not official and is_main_process():
        print(f"WARNING: UNOFFICIAL DATA: md5 mismatch in {', '.join(n for n, c in files.items() if not c['ok'])} "
              f"({folder}); results from this run can never become leaderboard records", file=sys.stderr)
    train = [parsed[f"data_batch_{i}"] for i in range(1, 6)]
    data = dict(train_images=torch.cat([x for x, _ in train]), train_labels=torch.cat([y for _, y in train]),
                test_images=parsed["test_batch"][0], test_labels=parsed["test_batch"][1])
    report = dict(data_dir=folder, official=official, files=files, train_images=len(data["train_images"]),
                  test_images=len(data["test_images"]))
    return dict({key: value.to(device) for key, value in data.items()}, report=report)

####################### Augmentation #######################
# Whole-batch on the device: every random number drawn first from an explicit generator (seeded runs see identical
# batches), then applied by a pure function that torch.compile fuses (tools/count_kernels.py counts the kernels); float
# math in [0, 1] as torchvision's tensor transforms (the reference rounds to uint8 between PIL ops; baselines/README).
def grayscale(x):  # torchvision's rgb_to_grayscale weights
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
def crop_boxes(u, height, width, cfg, attempts=10):
    """torchvision's RandomResizedCrop.get_params for n images at once, from uniforms u (4, n, attempts) ->
    (top, left, h, w), each of shape (n,): of `attempts` tries the first box that fits, else the centre crop."""
    area = height * width * (cfg.crop_scale_min + (cfg.crop_scale_max - cfg.crop_scale_min) * u[0])
    log_lo, log_hi = math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # argmax: the first True
    first = fits.to(torch.int8).argmax(1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = torch.floor(u[2, :, 0] * (height - h + 1)).clamp(max=height - h)  # randint(0, H - h + 1)
    left = torch.floor(u[3, :, 0] * (width - w + 1)).clamp(max=width - w)
    # else the centre crop, its aspect ratio clamped into [ratio_min, ratio_max]
    fallback_h = round(width / cfg.crop_ratio_min) if width / height < cfg.crop_ratio_min else height
    fallback_w = round(height * cfg.crop_ratio_max) if width / height > cfg.crop_ratio_max else width
    fallback = ((height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w)
    return tuple(torch.where(fits.any(1), value, float(fallback[i])) for i, value in enumerate((top, left, h, w)))
def resized_crop(x, top, left, h, w, size):
    """Crop each image to its box and resize to size x size, bilinear, as crop-then-resize (align_corners=False):
    sample points are clamped to the box, so pixels outside the crop never leak in."""
    steps = (torch.arange(size, device=x.device, dtype=torch.float64) + 0.5) / size

    def source_coords(start, extent, full):  # pixel coordinates in the full image -> grid_sample's [-1, 1]
        pos = start[:, None] + steps[None] * extent[:, None] - 0.5
        pos = torch.minimum(torch.maximum(pos, start[:, None]), (start + extent - 1)[:, None])
        return ((2 * pos + 1) / full - 1).to(x.dtype)
    ys, xs = source_coords(top, h, x.shape[2]), source_coords(left, w, x.shape[3])
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (n, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
def adjust_hue(x, shift):  # torchvision's adjust_hue for floats, shift (n,): RGB -> HSV, h += shift mod 1, -> RGB
    r, g, b = x.unbind(1)
    value, minc = x.max(1)[0], x.min(1)[0]
    delta, same = value - minc, value == minc
    safe_delta = torch.where(same, torch.ones_like(delta), delta)
    rc, gc, bc = (value - r) / safe_delta, (value - g) / safe_delta, (value - b) / safe_delta
    hue = torch.where(value == r, bc - gc, torch.where(value == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue6 = torch.remainder(torch.where(same, 0.0, torch.fmod(hue / 6.0 + 1.0, 1.0)) + shift[:, None, None], 1.0) * 6
    # torchvision's six-sector table as one formula (within 1e-6 of it, no 6 x 3 x H x W table to gather from):
    # channel = v - v s clamp(min(k, 4 - k), 0, 1) with v s = delta, k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B
    return torch.stack([value - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
                        for k in (torch.remainder(hue6 + n, 6.0) for n in (5.0, 3.0, 1.0))], 1)
def blend(x, other, factor):  # torchvision's _blend for floats, factor (n,)
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0.0, 1.0)
def blend_step(x, op, factors):
    """Per image: brightness (op 0), contrast (1), saturation (2) or nothing (-1). All three are one blend with a
    different `other`, so one blend serves the whole batch; factor 1 returns x exactly."""
    gray, op4 = grayscale(x), op.view(-1, 1, 1, 1)
    other = torch.where(op4 == 0, 0.0, torch.where(op4 == 1, gray.mean((1, 2, 3), keepdim=True), gray))
    return blend(x, other, torch.where(op < 0, 1.0, factors.gather(1, op.clamp(min=0)[:, None]).squeeze(1)))
def color_jitter(x, order, factors):
    """ColorJitter, per-sample op order (n, 4) (0 brightness, 1 contrast, 2 saturation, 3 hue), factors (n, 4) (identity
    = RandomApply's skip). The costly hue once per image, between the blends before and after it (4.5x faster, CPU)."""
    hue_at, steps = (order == 3).to(torch.int8).argmax(1, keepdim=True), torch.arange(3, device=x.device)
    before = torch.where(steps < hue_at, order[:, :3], -1)
    after = torch.where(hue_at + 1 + steps <= 3, order.gather(1, (hue_at + 1 + steps).clamp(max=3)), -1)
    for op in before.T:
        x = blend_step(x, op, factors)
    x = torch.where(factors[:, 3].view(-1, 1, 1, 1) == 0, x, adjust_hue(x, factors[:, 3]))  # exact no-op
    for op in after.T:
        x = blend_step(x, op, factors)
    return x
def draw_augment_params(n, generator, device):
    """Every random number of one view of n images in six calls, in the order seeded runs have always drawn them: crop
    (float64, as torchvision's Python floats), flip, jitter on/off, jitter factors, jitter order, grayscale."""
    rand = lambda *shape, **kw: torch.rand(*shape, generator=generator, device=device, **kw)  # noqa: E731
    return rand(4, n, 10, dtype=torch.float64), rand(n), rand(n), rand(n, 4), rand(n, 4), rand(n)
def sample_crop_boxes(n, height, width, cfg, generator, device):  # the crop boxes alone, eagerly
    return crop_boxes(draw_augment_params(n, generator, device)[0], height, width, cfg)
def apply_augment(images_uint8, params, cfg, size=32):
    """One SimCLR view of each image from drawn params: uint8 NCHW -> float NCHW in [0, 1], size x size. Pure (no
    randomness, static shapes), so the Trainer compiles it into a few fused kernels per batch shape."""
    crop_u, flip_u, jitter_u, factor_u, order_u, gray_u = params
    x = images_uint8.float().div_(255)
    x = resized_crop(x, *crop_boxes(crop_u, x.shape[2], x.shape[3], cfg), size)
    x = torch.where((flip_u < cfg.flip_p).view(-1, 1, 1, 1), x.flip(3), x)
    jitter = jitter_u < cfg.jitter_p  # torchvision's ranges U[max(0, 1-s), 1+s], U[-hue, hue]; else the identity
    columns = [torch.where(jitter, max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * factor_u[:, i], 1.0)
               for i, s in enumerate((cfg.brightness, cfg.contrast, cfg.saturation))]
    factors = torch.stack(columns + [torch.where(jitter, (2 * factor_u[:, 3] - 1) * cfg.hue, 0.0)], dim=1)
    x = color_jitter(x, order_u.argsort(dim=1), factors)  # argsort of uniforms: a random order per image
    return torch.where((gray_u < cfg.grayscale_p).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
def augment(images, cfg, generator=None, size=32):  # one view, eagerly
    return apply_augment(images, draw_augment_params(len(images), generator, images.device), cfg, size)

########################## Model ###########################
# torchvision's ResNet blocks with a width knob: at width 64 parameter names, shapes and initialisation are
# torchvision's resnet18/34/50 (tests load its state_dict and compare outputs), with the reference's CIFAR stem.
RESNET_LAYOUT = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
                 "resnet50": (Bottleneck, (3, 4, 6, 3))}

class CifarResNet(nn.Module):
    """Backbone: features before the (absent) fc layer: 8 * width dimensions (32 * width for resnet50)."""
    def __init__(self, arch, width=64):
        super().__init__()
        block, depths = RESNET_LAYOUT[arch]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)  # CIFAR stem: 3x3 stride 1, no maxpool
        self.bn1, self.relu, in_channels, stages = nn.BatchNorm2d(width), nn.ReLU(inplace=True), width, []
        for stage, depth in enumerate(depths):
            channels, blocks = width * 2**stage, []
            for i in range(depth):
                stride, out_channels = 2 if stage > 0 and i == 0 else 1, channels * block.expansion
                downsample = None if stride == 1 and in_channels == out_channels else nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))
                blocks.append(block(in_channels, channels, stride, downsample))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        (self.layer1, self.layer2, self.layer3, self.layer4), self.out_dim = stages, in_channels
        for m in self.modules():  # torchvision's initialisation (BatchNorm's own default is its ones and zeros)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.conv1.reset_parameters()  # the reference swaps in a fresh conv1 after init: PyTorch's default init

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

class SimCLRModel(nn.Module):
    """Backbone + projector. forward(all views of a step): one call for DDP and torch.compile; each view batch runs on
    its own (BatchNorm statistics per view, as the reference's two passes) -> projections, view v of image i: v*n+i."""
    def __init__(self, arch="resnet18", width=64, projector_hidden_dim=1024, projector_out_dim=128):
        super().__init__()
        if arch not in ARCHS:
            raise HarnessError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.backbone = CifarResNet(arch, width)
        self.projector = nn.Sequential(nn.Linear(self.backbone.out_dim, projector_hidden_dim), nn.ReLU(),
                                       nn.Linear(projector_hidden_dim, projector_out_dim))

    def forward(self, views):
        return torch.cat([self.projector(self.backbone(view)) for view in views])

make_model = SimCLRModel

########################### Loss ###########################
def info_nce(z, temperature=0.5):
    """SimCLR's loss as the reference computes it: z holds both views stacked (2N x d); cosine similarities over the
    2N x 2N matrix, diagonal masked, the other view of each image is the positive; mean over all 2N rows."""
    z = F.normalize(z.float(), dim=1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, (torch.arange(len(z), device=z.device) + len(z) // 2) % len(z))

def gather_views(z):
    """Both views of every process's images, view-major over the global batch, with gradient: every process computes
    the one-GPU loss of the global batch; all_gather's backward sums their gradients, DDP averages: exactly its own."""
    if not dist.is_initialized():
        return z
    from torch.distributed.nn.functional import all_gather
    return torch.cat([part.view(2, -1, z.shape[1]) for part in all_gather(z)], dim=1).flatten(0, 1)

######################## Evaluation ########################
@torch.no_grad()
def extract_features(backbone, images_uint8, batch_size=1024):  # unaugmented images, eval mode, fp32 as the reference
    was_training, tf32 = backbone.training, torch.backends.cudnn.allow_tf32
    backbone.eval()
    torch.backends.cudnn.allow_tf32 = False  # IEEE fp32 convolutions, not TF32: a verifier on any device gets our kNN
    feats = [backbone(images_uint8[i:i + batch_size].float().div(255)).float()
             for i in counted("features: batch", range(0, len(images_uint8), batch_size))]
    backbone.train(was_training)
    torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(feats)
@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, k=10, num_classes=10, block_size=1024):
    """= sklearn's KNeighborsClassifier(k, metric="cosine"): ties go to the lowest class. Blocks bound the memory."""
    train_unit, predictions = F.normalize(train_feats, dim=1), []
    for start in range(0, len(test_feats), block_size):
        sims = F.normalize(test_feats[start:start + block_size], dim=1) @ train_unit.T
        votes = F.one_hot(train_labels[sims.topk(k, dim=1).indices], num_classes).sum(1)
        predictions.append(votes.argmax(1))  # argmax returns the first maximum: the lowest class wins a tie
    return torch.cat(predictions)
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=10):  # in percent
    return 100.0 * (knn_predict(train_feats, train_labels, test_feats, k) == test_labels).float().mean().item()
def knn_check(model, data, cfg):
    """-> (kNN k=knn_k test accuracy in %, the (train, test) features used). Several processes: rank 0 evaluates
    (DDP keeps every rank's weights equal) and all receive its number, so all take the same stop decision."""
    features, accuracy = None, torch.zeros((), dtype=torch.float64, device=data["train_labels"].device)
    if is_main_process():
        features = tuple(extract_features(model.backbone, data[key], cfg.eval_batch_size)
                         for key in ("train_images", "test_images"))
        accuracy.fill_(knn_accuracy(features[0], data["train_labels"], features[1], data["test_labels"], cfg.knn_k))
    if dist.is_initialized():
        dist.broadcast(accuracy, src=0)
    return accuracy.item(), features

##################### Training & timer #####################
def synchronize(device):  # this GPU and, with several processes, all of them: epochs are timed between barriers
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier(**({"device_ids": [device.index]} if device.type == "cuda" else {}))
def learning_rate(cfg, peak_lr, epoch, step, steps_per_epoch):
    """Linear warm-up (per step), then cosine to 0 at `epochs`: per epoch as the reference's CosineAnnealingLR."""
    if epoch < cfg.warmup_epochs:
        return peak_lr * (epoch * steps_per_epoch + step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    t = epoch - cfg.warmup_epochs + (step / steps_per_epoch if cfg.lr_schedule == "step" else 0.0)
    return peak_lr * (1 + math.cos(math.pi * t / (cfg.epochs - cfg.warmup_epochs))) / 2
def view_px(cfg, epoch):  # progressive resolution: the views' size in epoch `epoch` (counted from 0)
    return cfg.low_res_px if epoch < cfg.low_res_epochs else 32
def resolve_device(cfg):
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise HarnessError("device=cuda asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
def speed_features(cfg, device):  # -> the CUDA speed switches, resolved: (compile, bf16, channels_last)
    return tuple(getattr(cfg, name) == "on" or (getattr(cfg, name) == "auto" and device.type == "cuda")
                 for name in ("compile", "bf16", "channels_last"))
def epoch_batches(cfg, n_train, world_size):  # -> the global batch sizes of one epoch, each split over the processes
    full, tail = divmod(n_train, cfg.batch_size)
    sizes = [cfg.batch_size] * full + ([tail] if tail and not cfg.drop_last else [])
    if not sizes or any(b % world_size for b in sizes):
        raise HarnessError(f"batches of {sorted(set(sizes))} of the {n_train} training images (drop_last "
                           f"{cfg.drop_last}) do not split over {world_size} processes; change batch_size")
    return sizes

class Trainer:
    """Model, optimizer, compiled step; train_epoch is the timed work. A process trains its share of a global batch."""
    def __init__(self, cfg, device, n_train):
        self.cfg, self.device = cfg, device
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.compiled, self.bf16, channels_last = speed_features(cfg, device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = make_model(cfg.arch, cfg.width, cfg.projector_hidden_dim, cfg.projector_out_dim)
        if cfg.sync_bn and self.world_size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.sync_bn and self.world_size > 1 and self.compiled:
            say("WARNING: sync_bn with compile: torch.compile breaks the graph at every SyncBatchNorm, whose statistics"
                " also wait for the host (pytorch/pytorch#161302): expect a slower step")
        self.model = network = model.to(device, memory_format=self.memory_format)
        if self.world_size > 1:
            network = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        # dynamic=False: the last partial batch gets a static graph of its own (warmed up too), not a slower dynamic one
        self.forward = torch.compile(network, dynamic=False) if self.compiled else network
        self.augment = torch.compile(apply_augment, dynamic=False) if self.compiled else apply_augment
        self.peak_lr = cfg.base_lr * cfg.batch_size / 256
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.peak_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                         **({"fused": True} if device.type == "cuda" else {}))
        self.batch_sizes = epoch_batches(cfg, n_train, self.world_size)
    def views(self, images_uint8, generator, size=32):  # -> two views, in the configured memory format
        return [self.augment(images_uint8, draw_augment_params(len(images_uint8), generator, self.device), self.cfg,
                             size).contiguous(memory_format=self.memory_format) for _ in range(2)]
    def update(self, views):  # one optimizer step on this process's views -> the global batch's loss, on the device
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            z = self.forward(views)
        loss = info_nce(gather_views(z), self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
    def step(self, images_uint8, generator, size=32):
        return self.update(self.views(images_uint8, generator, size))
    def warm_up(self):
        """Compile and autotune each batch shape on random images, then restore model and optimizer: trains nothing."""
        if self.cfg.compile_warmup_steps == 0 or (self.device.type == "cpu" and not self.compiled):
            return
        states = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict()))
        generator = torch.Generator(self.device).manual_seed(12345)  # not the run's generators: their streams stay
        fake = torch.randint(0, 256, (sum(self.batch_sizes), 3, 32, 32), dtype=torch.uint8, device=self.device,
                             generator=generator)
        fake = fake[torch.randperm(len(fake), generator=generator, device=self.device)]  # the epoch's first shuffle
        sizes = {view_px(self.cfg, epoch) for epoch in (0, self.cfg.epochs - 1)}  # progressive resolution: two
        for batch, size in sorted({(b, px) for b in self.batch_sizes for px in sizes}):  # full and tail batch
            for _ in range(self.cfg.compile_warmup_steps):
                self.step(fake[:batch // self.world_size], generator, size)
        synchronize(self.device)
        self.model.load_state_dict(states[0])
        self.optimizer.load_state_dict(states[1])

    def train_epoch(self, epoch, train_images, order_generator, augment_generator):
        """One pass in a fresh order, the same on every process -> (mean loss on the device: no host sync, first lr)."""
        order = torch.randperm(len(train_images), generator=order_generator, device=self.device)
        loss_sum, lrs, batches = torch.zeros((), device=self.device), [], order[:sum(self.batch_sizes)]
        for i, batch in counted(f"epoch {epoch + 1}: step", enumerate(batches.split(self.batch_sizes))):  # drop_last
            lrs.append(learning_rate(self.cfg, self.peak_lr, epoch, i, len(self.batch_sizes)))
            for group in self.optimizer.param_groups:
                group["lr"] = lrs[-1]
            loss_sum += self.step(train_images[batch.tensor_split(self.world_size)[self.rank]], augment_generator,
                                  view_px(self.cfg, epoch))
        return loss_sum / len(self.batch_sizes), lrs[0]

######################### Logging ##########################
TIMING_STATEMENT = dict(timed="training epochs: shuffle, GPU augmentation, forward, loss, backward, optimizer step; "
                        "every GPU synchronised and all processes at a barrier at the start and end of each epoch",
                        not_timed="data load, compile warm-up (state restored), kNN checks, final evaluation, logging")
TABLE_HEADER = f"{'epoch':>6} {'loss':>8} {'lr':>8} {'epoch_s':>10} {'timed_s':>10} {'knn_pct':>8}"
def counted(what, items):  # items one by one; on a terminal, once they take over 2 s, a counter line (not in logs)
    start, items = time.perf_counter(), list(items)
    for done, item in enumerate(items, 1):
        yield item
        if (elapsed := time.perf_counter() - start) > 2 and sys.stderr.isatty() and is_main_process():
            left = f"{what} {done}/{len(items)}, ~{elapsed * (len(items) / done - 1):.0f} s left" * (done < len(items))
            print(f"\r{left}\033[K", end="", file=sys.stderr, flush=True)
def is_main_process():  # torchrun's RANK before the process group exists
    return dist.get_rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"
def say(*args):  # rank 0 prints: a run has one transcript however many processes it has
    if is_main_process():
        print(*args, flush=True)
def environment_report(device):
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    gpu_names = [torch.cuda.get_device_name(device) if device.type == "cuda" else None] * world_size
    if world_size > 1:
        dist.all_gather_object(gpu_names, gpu_names[0])
    smi = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = gpu_names[0] and subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    return dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                driver=((smi or "").partition("Driver Version:")[2].split() or [None])[0], device=device.type,
                gpu_name=gpu_names[0], gpu_names=gpu_names, gpu_count=torch.cuda.device_count(), world_size=world_size,
                cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                hostname=platform.node(), platform=platform.platform(), nvidia_smi=smi)
def ineligibility(cfg, device, data_report):
    return [reason for reason, broken in (
        ("not run on a GPU", device.type != "cuda"), ("unofficial data (md5 mismatch)", not data_report["official"]),
        (f"trained on a subset of {cfg.train_subset} images", cfg.train_subset),
        ("target is not kNN k=10 >= 90.0%", cfg.target_pct != 90.0 or cfg.knn_k != 10),
        ("no model saved (save_model false): nothing to verify", cfg.save_model == "false")) if broken]
def write_atomic(path, write, replace=True):
    """write(binary file) into a new file beside `path`, then move it there in one step: no reader sees half a file.
    It replaces only a regular file (the log, rewritten each epoch); replace=False never replaces anything."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp_{uuid.uuid4().hex}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:  # the user's umask
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not replace:
            os.link(tmp, path)  # fails if anything is there, a dangling link too
        elif os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
            raise HarnessError(f"{path} is no longer a regular file (a link, folder or device): not replacing it")
        else:
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
def check_writable(folder, what):  # -> a HarnessError now if a result could not be written there later
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(probe := os.path.join(folder, f".write_test_{uuid.uuid4().hex}"), os.O_CREAT | os.O_EXCL))
        os.unlink(probe)
    except OSError as error:
        raise HarnessError(f"{what} {folder!r} is not a writable folder: {error.strerror or error}") from None
def save_backbone(backbone, cfg, path):  # fp32 on the CPU, as the kNN checks evaluated it, in a new file -> log entry
    backbone, buffer = copy.deepcopy(backbone).float().cpu().eval(), io.BytesIO()
    if cfg.save_model == "export":  # standard aten operators only: loadable without this file's Python
        example, batch = torch.rand(2, 3, 32, 32), torch.export.Dim("batch")
        torch.export.save(torch.export.export(backbone, (example,), dynamic_shapes=({0: batch},)), buffer)
    else:
        torch.save(dict(format="airbench-ssl-model/1", kind="weights", arch=cfg.arch, width=cfg.width, state_dict={
            name: value.contiguous() for name, value in backbone.state_dict().items()}), buffer)
    write_atomic(path, lambda f: f.write(buffer.getvalue()), replace=False)
    return dict(file=os.path.basename(path), format=cfg.save_model, bytes=len(buffer.getvalue()),
                sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
def reserve_log_path(cfg):  # a new log file, created exclusively: no existing log is ever overwritten
    while True:
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}_{cfg.arch}_seed{cfg.seed}_{uuid.uuid4().hex[:6]}"
        with contextlib.suppress(FileExistsError), open(path := os.path.join(cfg.log_dir, name + ".json"), "x"):
            return path
def format_row(row):
    cell = lambda value, spec: " " * int(spec[0]) if value is None else format(value, spec)  # noqa: E731
    return (f"{row['epoch']:6d} {cell(row['loss'], '8.4f')} {cell(row['lr'], '8.5f')} {row['epoch_seconds']:10.2f} "
            f"{row['timed_seconds']:10.2f} {cell(row['knn_pct'], '8.2f')}")

class RunLog:
    """The run's JSON log, rewritten by rank 0 after every epoch. A failing rank posts its reason in torchrun's store; a
    thread on every other rank logs it and ends its process, which may hang in a collective until NCCL's timeout."""
    FAILURE_KEY = "airbench_ssl_failure"
    def __init__(self, log, path, wall_start):
        self.log, self.path, self.wall_start, self.lock = log, path, wall_start, threading.Lock()
        self.failed, self.store = False, dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        if self.store is not None:
            threading.Thread(target=self.watch_other_ranks, daemon=True).start()
    def save(self, status, message="", **extra):
        rows = self.log["epochs"]
        checks, timed = [r["knn_pct"] for r in rows if r["knn_pct"] is not None], sum(r["epoch_seconds"] for r in rows)
        with self.lock:
            self.log["result"].update(status=status, message=message, reached_target=status == "reached_target",
                                      epochs_run=rows[-1]["epoch"] if rows else 0, timed_seconds=timed,
                                      time_to_target_seconds=timed if status == "reached_target" else None,
                                      knn_at_stop_pct=checks[-1] if checks else None, **extra)
            self.log["total_wall_seconds"] = time.perf_counter() - self.wall_start
            if self.path:  # rank 0
                write_atomic(self.path, lambda f: f.write(json.dumps(self.log, indent=1).encode()))
    def fail(self, error, after_training=False):
        """Log a failure -> the one-line HarnessError to raise. After training, the training result stands."""
        self.failed, interrupted = True, isinstance(error, KeyboardInterrupt)
        if self.store is not None and threading.current_thread() is threading.main_thread():  # a torchrun worker:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's stop must not cut the logging short
        message = "interrupted (Ctrl-C or SIGTERM)" if interrupted else (
            str(error).strip().splitlines() or [type(error).__name__])[0][:500]
        if self.store is not None and (posted := self.posted_failure()):  # another rank failed first: its reason wins
            message, interrupted = posted, False
        elif self.store is not None and not interrupted:
            self.store.set(self.FAILURE_KEY, f"rank {dist.get_rank()}: {message}")
        if after_training:
            self.save(self.log["result"]["status"], self.log["result"]["message"], after_training_error=message)
        else:
            self.save("interrupted" if interrupted else "failed", message, traceback=traceback.format_exc()[-20000:])
        where = f"the log keeps all finished so far: {self.path}" if self.path else f"rank {dist.get_rank()}"
        return HarnessError(f"{message}{' (after training)' if after_training else ''}; {where}")
    def posted_failure(self):  # -> the reason a failed rank posted, or None (also once the store has gone)
        with contextlib.suppress(Exception):
            return self.store.get(self.FAILURE_KEY).decode() if self.store.check([self.FAILURE_KEY]) else None
    def watch_other_ranks(self):
        while not self.failed:
            if (reason := self.posted_failure()) and not self.failed:
                self.save("failed", reason)
                if is_main_process():
                    print(f"airbench_ssl: error: {reason}; log: {self.path}", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(0.5)

########################### Main ###########################
def parse_bool(text):
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes", "on")

CONFIG_MAX_BYTES, FIELD_COMMENT = 1 << 20, re.compile(r"^ +(\w+): .*?  # (.*(?:\n +# .*)*)", re.M)  # --help's text
class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
def build_parser(cuda_available=False):
    preset, texts = "recipe" if cuda_available else "cpu_demo", {name: re.sub(r"\n +# ", " ", text) for name, text in
                                                                 re.findall(FIELD_COMMENT, inspect.getsource(Config))}
    parser = OneLineErrorParser(prog="airbench_ssl.py", usage="%(prog)s [--config FILE] [--FIELD VALUE ...]",
                                allow_abbrev=False, description=__doc__.split("\n\n")[0] +
                                f" Defaults shown: the {preset} preset, in force on this machine unless --preset.")
    parser.add_argument("--config", default="", help="JSON file of field overrides (keys starting with _ are notes)")
    parser.add_argument("--preset", choices=("auto", "recipe", "cpu_demo"), default="auto",
                        help="base before overrides: auto = recipe on a GPU, cpu_demo without one (default auto)")
    for f in dataclasses.fields(Config):
        (lo, hi), choices = f.metadata.get("bounds", (None, None)), f.metadata.get("choices")
        default = CPU_DEMO.get(f.name, f.default) if preset == "cpu_demo" else f.default
        allowed = "{%s}" % ",".join(choices or ("true", "false")) if choices or f.type is bool else (
            f"[{lo}..{hi}]" if lo is not None else "TEXT")
        also = f"; recipe {json.dumps(f.default)}" * (default != f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=allowed,
                            help=texts[f.name].replace("%", "%%") + f" (default {json.dumps(default)}{also})",
                            type=parse_bool if f.type is bool else f.type)
    return parser
def read_config_file(path):  # the field overrides in a JSON config file, "_" notes dropped
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)  # not all of /dev/zero or a runaway file
        if len(raw) > CONFIG_MAX_BYTES:
            raise HarnessError(f"config file {path} is over {CONFIG_MAX_BYTES:,} bytes: not a config")
        overrides = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad JSON or UTF-8, a 5,000-digit number
        raise HarnessError(f"cannot read config file {path}: {str(error)[:200]}") from None
    if not isinstance(overrides, dict):
        raise HarnessError(f"config file {path} must hold a JSON object of field overrides")
    if unknown := [k for k in overrides if not k.startswith("_") and k not in Config.__dataclass_fields__]:
        raise HarnessError(f"config file {path} has unknown fields {unknown}")
    return {k: v for k, v in overrides.items() if not k.startswith("_")}
def config_from_args(args, cuda_available):
    """Defaults <- preset <- --config file <- --field flags, validated -> (config, where its values came from)."""
    preset = args.preset if args.preset != "auto" else ("recipe" if cuda_available else "cpu_demo")
    overrides = read_config_file(args.config) if args.config else {}
    values = dict(CPU_DEMO if preset == "cpu_demo" else {}, **overrides)
    values.update({k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__ and v is not None})
    cfg = Config(**values)
    validate_config(cfg)
    return cfg, dict(preset=preset, config_file=args.config or None, file_overrides=overrides)
def init_distributed(cfg):  # under torchrun (WORLD_SIZE > 1): join the group, a process per GPU (NCCL; gloo on CPUs)
    device = resolve_device(cfg)
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return device
    if cfg.sync_bn and device.type != "cuda":
        raise HarnessError("sync_bn needs CUDA GPUs: PyTorch's SyncBatchNorm does not run on CPUs")
    if device.type == "cuda":
        torch.cuda.set_device(device := torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")  # 2.11: no successor
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as error:
        raise HarnessError(f"cannot join the torchrun process group: {str(error).splitlines()[0]}") from None
    return device
def train_run(cfg, argv, sources):
    epoch_batches(cfg, cfg.train_subset or 50_000, int(os.environ.get("WORLD_SIZE", "1")))  # before torchrun's group
    wall_start, device = time.perf_counter(), init_distributed(cfg)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    as_measured = Config(**CPU_DEMO) == dataclasses.replace(  # the README's demo, whatever data, logs, seed
        cfg, data_dir="", download=True, device="auto", log_dir="logs", seed=0)
    if device.type == "cpu":
        say("No CUDA GPU: running on the CPU (not race times, not eligible)" + ", preset cpu_demo: a narrow ResNet18"
            " on a training subset, ~4 min on 2 cores" * as_measured)
    if rank == 0:  # before the data load and warm-up, not after an hour of training
        check_writable(cfg.log_dir, "log_dir")
    torch.manual_seed(cfg.seed)
    order_gen = torch.Generator(device).manual_seed(cfg.seed)  # the same order on every process
    augment_gen = torch.Generator(device).manual_seed(hash((cfg.seed, rank)) % 2**63)  # its own augmentations
    torch.backends.cudnn.benchmark, start = device.type == "cuda", time.perf_counter()
    data = load_cifar10(cfg.data_dir, device, cfg.download)
    for key in ("train_images", "train_labels") if cfg.train_subset else ():
        data[key] = data[key][:cfg.train_subset]
    data["report"].update(trained_on_images=len(data["train_images"]), knn_test_images=len(data["test_images"]))
    knn_set = f"{len(data['test_images']):,} test images vs {len(data['train_images']):,} training images"
    epoch_batches(cfg, len(data["train_images"]), world_size)  # a batch size that cannot work: refused before the log
    untimed = dict(data_load=time.perf_counter() - start, warmup=0.0, knn_checks=0.0, final_eval=0.0)
    source = open(os.path.abspath(__file__), encoding="utf-8").read()  # __file__, not argv[0]: tools import us
    reasons, environment, path = (ineligibility(cfg, device, data["report"]), environment_report(device),
                                  reserve_log_path(cfg) if rank == 0 else None)
    run = RunLog(dict(
        format="airbench-ssl-log/2", kind="train", run_id=os.path.basename(path or ".json")[:-5],
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), argv=list(argv),
        launch=dict(world_size=world_size, command=list(sys.argv), torchrun="TORCHELASTIC_RUN_ID" in os.environ),
        config_sources=sources, config=dataclasses.asdict(cfg),
        code=dict(path="airbench_ssl.py", source=source, sha256=hashlib.sha256(source.encode()).hexdigest()),
        environment=environment, data=data["report"], eligible=not reasons, ineligible_reasons=reasons,
        timing=TIMING_STATEMENT, epochs=[], untimed_seconds=untimed, result=dict(target_pct=cfg.target_pct),
        final_eval=None, model=None), path, wall_start)
    rows, status, timed_seconds, trained = run.log["epochs"], "max_epochs", 0.0, False
    try:
        run.save("running")
        report, defaults = data["report"], dataclasses.asdict(Config())
        changed = ", ".join(f"{k}={v!r}" for k, v in run.log["config"].items() if v != defaults[k]) or "nothing"
        say(f"config: the reference recipe, changed: {changed} (every field is in the log)\ndevice: {world_size} x "
            f"{environment['gpu_name'] or 'CPU'}, torch {environment['torch']}; data {report['data_dir']} (official: "
            f"{report['official']}); log: {path}")
        trainer, start = Trainer(cfg, device, len(data["train_images"])), time.perf_counter()
        trainer.warm_up()
        untimed["warmup"] = time.perf_counter() - start
        say(f"untimed: data load {untimed['data_load']:.1f} s, warm-up {untimed['warmup']:.1f} s\nknn_pct: kNN k="
            f"{cfg.knn_k} accuracy of the {knn_set} (unaugmented, eval mode)\n{TABLE_HEADER}")
        for epoch in range(0 if is_check_epoch(cfg, 0) else 1, cfg.epochs + 1):
            row = dict(epoch=epoch, loss=None, lr=None, epoch_seconds=0.0, timed_seconds=timed_seconds, knn_pct=None,
                       knn_seconds=None)
            if epoch > 0:
                synchronize(device)
                start = time.perf_counter()
                loss, row["lr"] = trainer.train_epoch(epoch - 1, data["train_images"], order_gen, augment_gen)
                synchronize(device)
                row["epoch_seconds"] = time.perf_counter() - start
                timed_seconds += row["epoch_seconds"]
                row.update(loss=loss.item(), timed_seconds=timed_seconds)
                if not math.isfinite(row["loss"]):
                    rows.append(dict(row, loss=None))  # a finished epoch; NaN is not a JSON number
                    raise HarnessError(f"loss became {row['loss']} in epoch {epoch}; lower the learning rate")
            if is_check_epoch(cfg, epoch):
                start = time.perf_counter()
                row["knn_pct"], features = knn_check(trainer.model, data, cfg)
                row["knn_seconds"] = time.perf_counter() - start
                untimed["knn_checks"] += row["knn_seconds"]
            rows.append(row)  # only finished epochs: an interrupted one leaves no row
            say(format_row(row))
            if reached_target(cfg, row["knn_pct"]):
                status = "reached_target"
                break
            run.save("running")
        message = (f"reached {row['knn_pct']:.2f}% >= {cfg.target_pct}% after epoch {epoch} in {timed_seconds:.2f} "
                   "timed seconds" if status == "reached_target" else
                   f"did not reach {cfg.target_pct}% within {cfg.epochs} epochs")
        run.save(status, message)
        trained = True
        if rank == 0:  # the run always ends on a check, so `features` are the final model's
            start = time.perf_counter()
            run.log["final_eval"] = {f"knn{k}_pct": knn_accuracy(features[0], data["train_labels"], features[1],
                                                                 data["test_labels"], k) for k in (5, 10)}
            untimed["final_eval"] = time.perf_counter() - start
            if cfg.save_model != "false":  # what tools/leaderboard.py verify recomputes the accuracy from
                run.log["model"] = save_backbone(trainer.model.backbone, cfg, artefact := path[:-5] + ".model.pt")
                say(f"model: {artefact}")
            run.save(status, message)
    except (KeyboardInterrupt, Exception) as error:  # OOM, compile errors, NaN, Ctrl-C: logged, then one line
        raise run.fail(error, after_training=trained) from None
    first = next(r for r in rows if r["knn_pct"] is not None)
    say(f"CPU DEMO DONE: kNN k={cfg.knn_k} of the {knn_set} went from {first['knn_pct']:.2f}% (epoch {first['epoch']})"
        f" to {row['knn_pct']:.2f}% (epoch {epoch}). On a CUDA GPU the same command trains the reference recipe "
        "(ResNet18, batch 512, up to 500 epochs) until kNN k=10 reaches 90.0%, and times it."
        if sources["preset"] == "cpu_demo" and device.type == "cpu" else
        f"TARGET {'REACHED' if status == 'reached_target' else 'NOT REACHED'}: {message} (kNN: {knn_set})")
    final = run.log["final_eval"] or dict(knn5_pct=math.nan, knn10_pct=math.nan)  # rank 0 evaluates
    say(f"final kNN ({knn_set}) k=5 {final['knn5_pct']:.2f}%, k=10 {final['knn10_pct']:.2f}%; timed {timed_seconds:.2f}"
        f" s; untimed: {', '.join(f'{k} {v:.1f} s' for k, v in untimed.items())}; "
        f"{'NOT eligible: ' + '; '.join(reasons) if reasons else 'eligible'}; log: {path}")
    return run.log

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):  # a path the terminal cannot print must not end the run
        getattr(stream, "reconfigure", lambda **_: None)(errors="backslashreplace")
    args = build_parser(torch.cuda.is_available()).parse_args(argv)
    try:
        cfg, sources = config_from_args(args, torch.cuda.is_available())
        train_run(cfg, argv, sources)
    except HarnessError as error:
        if is_main_process():  # under torchrun: one line, not one per process
            print(f"airbench_ssl: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("airbench_ssl: interrupted before the run's log was created", file=sys.stderr)
        return 130
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a `timeout` or scheduler's SIGTERM is logged as Ctrl-C
    sys.exit(main())
