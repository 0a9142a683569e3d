"""The reference recipe of dkobak/simclr-cifar10 (`simclr-cifar10.py`), rebuilt by us as a separate script.

This is what "the reference's speed" means on any machine: a torchvision DataLoader whose CPU worker processes
augment every image on its own, a torchvision ResNet in fp32 eager mode, two forward passes per step, InfoNCE,
SGD(lr = 0.03 * batch/256, momentum 0.9, wd 5e-4) with CosineAnnealingLR stepped once per epoch, and `loss.item()`
in every step (a host sync the reference pays). No channels_last, no autocast, no compile.

    python baselines/simclr_reference.py                                   # ResNet18, batch 512, 1000 epochs
    python baselines/simclr_reference.py --epochs 500                      # the cited 90.3 % / 1 h 39 min run
    python baselines/simclr_reference.py --variant 2025-06-02 --batch-size 1024 --grayscale-p 0.2   # older rows
    python baselines/simclr_reference.py --device cpu --width 8 --train-subset 512 --batch-size 64 --epochs 2

Which version (--variant; the script's training code changed twice, its evaluation more often):
- `2025-07-28` (default): the script from commit 781f889 (2025-07-28, "default grayscale, Adam, PairedTransform")
  to HEAD 44b2500 (2025-07-29), whose training code is the same throughout; its README gives the numbers we cite
  (ResNet18, batch 512: 11.9 s/epoch, 90.3 ± 0.3 % kNN after 500 epochs in 1 h 39 min, A100, 16 workers).
  torchvision's CIFAR10 hands each worker a PIL image; the SSL transforms run on it and `ToTensor` comes last
  (the script: "runtime faster when this line is last"); the loader pins memory (pin_memory=True, since 96266af,
  2025-07-18) and both views are copied with non_blocking=True.
- `2025-06-02`: the script from its first commit 63d0718 (2025-06-02) to 9d18c06 (2025-07-02), behind the README's
  older batch-1024 rows: CIFAR10(transform=ToTensor()) first, so the transforms run on float tensors in [0, 1];
  pageable memory and blocking copies.
Both: DataLoader(shuffle=True, num_workers=N) with every other argument at its default (last partial batch kept,
workers restarted each epoch, prefetch_factor 2); zero_grad, two forwards, the loss read, backward, step.

Faithful to the reference in what costs time: the per-image PIL or tensor pipeline in the workers, the pinned
copies, the step order. The backbone is torchvision's resnet18/34/50 with conv1 replaced by a 3x3 stride-1 conv and
maxpool and fc removed; the replaced conv1 keeps PyTorch's default init, as in the reference. torchvision has no
width knob, so any --width other than 64 (CPU tests and demos only) uses the harness's CifarResNet instead.
Shared with the harness on purpose: the data loader (airbench_ssl.load_cifar10, so no torchvision download), the
loss (airbench_ssl.info_nce) and the evaluation (extract_features + knn_accuracy, cosine kNN k=5 and k=10 on the
unaugmented train and test images, model in eval mode), so a difference in results is a difference in training.
The reference's linear readouts (lin precomp, lin augm) are not run here; baselines/README.md lists their settings.

The pieces (VARIANTS, make_transform, ReferencePairs, make_dataset, make_loader, ReferenceSimCLR, make_optimizer,
train_step, train_epoch, evaluate) are importable: tools/bench_throughput.py times exactly these.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl  # noqa: E402  (the repo root is not on sys.path when run as baselines/simclr_reference.py)

# The reference's hyperparameters (its README and script); the tunable ones are flags below.
BASE_LR = 0.03  # lr = BASE_LR * batch_size / 256
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
TEMPERATURE = 0.5
PROJECTOR_HIDDEN_DIM = 1024
PROJECTOR_OUT_DIM = 128


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one version of the reference script feeds its images to the model (batch, grayscale p, epochs: flags)."""
    commits: str  # the reference commits whose training code this is
    pil_transforms: bool  # transforms on the PIL image, ToTensor last (else ToTensor first, transforms on tensors)
    pin_memory: bool  # DataLoader(pin_memory=True); only takes effect on CUDA
    non_blocking: bool  # view.to(device, non_blocking=True)


VARIANTS = {
    "2025-07-28": Variant("781f889..44b2500", pil_transforms=True, pin_memory=True, non_blocking=True),
    "2025-06-02": Variant("63d0718..9d18c06", pil_transforms=False, pin_memory=False, non_blocking=False),
}
DEFAULT_VARIANT = "2025-07-28"  # the version behind the numbers we cite


def variant_of(name: str) -> Variant:
    if name not in VARIANTS:
        raise airbench_ssl.HarnessError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def make_transform(grayscale_p: float, variant: str = DEFAULT_VARIANT) -> T.Compose:
    """The reference's SSL view: crop (scale 0.2-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale.
    2025-07-28: on a PIL image, ending with ToTensor; 2025-06-02: on a float tensor (ToTensor came before)."""
    steps = [T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=grayscale_p)]
    return T.Compose(steps + [T.ToTensor()] if variant_of(variant).pil_transforms else steps)


class ReferencePairs(Dataset):
    """(view1, view2, label) per image, each view drawn independently by `transform` in the loader worker.

    Each item starts as torchvision's CIFAR10 does, a PIL image made from an HWC uint8 array; with to_tensor_first
    it is converted once (the 2025-06-02 script's CIFAR10(transform=ToTensor())) before both views are drawn."""

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, transform: T.Compose,
                 to_tensor_first: bool = False):
        self.images = images_uint8.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # CIFAR10.data's layout
        self.labels = labels.cpu().tolist()
        self.transform, self.to_tensor_first = transform, to_tensor_first

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = Image.fromarray(self.images[index])
        if self.to_tensor_first:
            image = to_tensor(image)
        return self.transform(image), self.transform(image), self.labels[index]


def make_dataset(images_uint8: torch.Tensor, labels: torch.Tensor, grayscale_p: float,
                 variant: str = DEFAULT_VARIANT) -> ReferencePairs:
    """The training pairs as `variant` of the reference builds them."""
    return ReferencePairs(images_uint8, labels, make_transform(grayscale_p, variant),
                          to_tensor_first=not variant_of(variant).pil_transforms)


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                variant: str = DEFAULT_VARIANT, seed: int = 0) -> DataLoader:
    """The reference's loader: shuffled, the last partial batch kept, workers restarted every epoch (every other
    argument at its default), memory pinned where the variant pins it and there is a GPU to copy to."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=variant_of(variant).pin_memory and device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


class ReferenceSimCLR(nn.Module):
    """torchvision ResNet with the CIFAR stem + projector Linear-ReLU-Linear; forward returns (h, z)."""

    def __init__(self, arch: str = "resnet18", width: int = 64):
        super().__init__()
        if arch not in airbench_ssl.ARCHS:
            raise airbench_ssl.HarnessError(f"unknown arch {arch!r}; choose one of {', '.join(airbench_ssl.ARCHS)}")
        if width == 64:
            backbone = getattr(torchvision.models, arch)(weights=None)
            backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
            out_dim = backbone.fc.in_features
            backbone.fc = nn.Identity()
        else:
            backbone = airbench_ssl.CifarResNet(arch, width)
            out_dim = backbone.out_dim
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(out_dim, PROJECTOR_HIDDEN_DIM), nn.ReLU(),
                                       nn.Linear(PROJECTOR_HIDDEN_DIM, PROJECTOR_OUT_DIM))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.projector(h)


@contextlib.contextmanager
def threads_beside_workers(device: torch.device, workers: int) -> Iterator[None]:
    """On the CPU, leave a core to each loader worker while the main process computes: on 2 cores, 2 workers
    beside 2 OpenMP compute threads made a width-8 step ~20x slower (19.7 s vs 1.0 s for 7 steps). The reference
    runs on a GPU, where the main process hardly computes, so this changes nothing there."""
    saved = torch.get_num_threads()
    if device.type == "cpu" and workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - workers))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def make_optimizer(model: nn.Module, batch_size: int, epochs: int, base_lr: float = BASE_LR):
    """-> (SGD, CosineAnnealingLR over `epochs`, stepped once per epoch by the caller)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr * batch_size / 256, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, nesterov=False)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, view1: torch.Tensor, view2: torch.Tensor) -> float:
    """One reference step, in the reference's order: zero_grad, two separate forward passes (BatchNorm statistics
    per view), InfoNCE over both, the loss read, backward, SGD."""
    optimizer.zero_grad()
    _, z1 = model(view1)
    _, z2 = model(view2)
    loss = airbench_ssl.info_nce(torch.cat([z1, z2]), TEMPERATURE)
    # The reference reads the loss before backward: a host sync per step that is part of its speed, and where it
    # sits decides which launches the GPU waits for.
    value = loss.item()
    loss.backward()
    optimizer.step()
    return value


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device,
                variant: str = DEFAULT_VARIANT, max_steps: int | None = None) -> list[float]:
    """One pass over `loader` (or its first max_steps batches) -> the per-step losses. The views are copied to the
    device as `variant` copies them (non_blocking from pinned memory in 2025-07-28)."""
    non_blocking = variant_of(variant).non_blocking
    model.train()
    losses = []
    for view1, view2, _ in loader:
        if max_steps is not None and len(losses) >= max_steps:
            break
        view1, view2 = view1.to(device, non_blocking=non_blocking), view2.to(device, non_blocking=non_blocking)
        losses.append(train_step(model, optimizer, view1, view2))
    return losses


def evaluate(model: ReferenceSimCLR, data: dict, batch_size: int = 1024) -> dict[str, float]:
    """Cosine kNN k=5 and k=10 test accuracy (%) of the backbone features, with the harness's evaluation code."""
    train_feats = airbench_ssl.extract_features(model.backbone, data["train_images"], batch_size)
    test_feats = airbench_ssl.extract_features(model.backbone, data["test_images"], batch_size)
    return {f"knn{k}_pct": airbench_ssl.knn_accuracy(train_feats, data["train_labels"], test_feats,
                                                     data["test_labels"], k) for k in (5, 10)}


def run(args: argparse.Namespace) -> dict:
    """Train as the reference does and evaluate -> dict(epoch_losses, epoch_seconds, steps, knn5_pct, knn10_pct)."""
    device = airbench_ssl.resolve_device(args)
    torch.manual_seed(args.seed)
    data = airbench_ssl.load_cifar10(args.data_dir, torch.device("cpu"), download=False)
    if args.train_subset:
        data["train_images"] = data["train_images"][:args.train_subset]
        data["train_labels"] = data["train_labels"][:args.train_subset]
    variant = variant_of(args.variant)
    dataset = make_dataset(data["train_images"], data["train_labels"], args.grayscale_p, args.variant)
    loader = make_loader(dataset, args.batch_size, args.workers, device, args.variant, args.seed)
    model = ReferenceSimCLR(args.arch, args.width).to(device)
    optimizer, scheduler = make_optimizer(model, args.batch_size, args.epochs)
    print(f"reference recipe ({args.variant}, commits {variant.commits}): {args.arch} (width {args.width}), batch "
          f"{args.batch_size}, grayscale p {args.grayscale_p}, {args.epochs} epochs, {args.workers} workers, "
          f"transforms on {'PIL images' if variant.pil_transforms else 'tensors'}, pinned memory "
          f"{'on' if loader.pin_memory else 'off'}, {len(dataset)} images, device {device.type}, fp32 eager")
    result = dict(epoch_losses=[], epoch_seconds=[], steps=0)
    for epoch in range(args.epochs):
        remaining = args.steps - result["steps"] if args.steps else None
        airbench_ssl.synchronize(device)
        start = time.perf_counter()
        with threads_beside_workers(device, args.workers):
            losses = train_epoch(model, optimizer, loader, device, args.variant, remaining)
        airbench_ssl.synchronize(device)
        seconds = time.perf_counter() - start
        scheduler.step()
        mean_loss = sum(losses) / len(losses)
        if not math.isfinite(mean_loss):
            raise airbench_ssl.HarnessError(f"loss became {mean_loss} in epoch {epoch}")
        result["epoch_losses"].append(mean_loss)
        result["epoch_seconds"].append(seconds)
        result["steps"] += len(losses)
        print(f"epoch {epoch}: loss {mean_loss:.4f}, {seconds:.1f} s ({len(losses)} steps)", flush=True)
        if args.steps and result["steps"] >= args.steps:
            break
    if not args.skip_eval:
        data = {key: value.to(device) for key, value in data.items() if key != "report"}
        result.update(evaluate(model, data))
        print(f"kNN (cosine) k=5 {result['knn5_pct']:.2f}%, k=10 {result['knn10_pct']:.2f}%")
    print(f"training {sum(result['epoch_seconds']):.1f} s in {result['steps']} steps")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = airbench_ssl.OneLineErrorParser(description=__doc__.split("\n\n")[0],
                                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=airbench_ssl.ARCHS)
    parser.add_argument("--width", type=int, default=64, help="64 = torchvision's ResNet (the reference); "
                        "other widths use the harness's CifarResNet (CPU demos only)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1000, help="cosine schedule length")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes")
    parser.add_argument("--grayscale-p", type=float, default=0.1)
    parser.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ (default: the harness's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--train-subset", type=int, default=0, help="0 = all training images, n = the first n")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps (0 = run every epoch)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, choices=tuple(VARIANTS),
                        help="version of the reference script: 2025-07-28 = commits 781f889..44b2500 (PIL transforms, "
                        "ToTensor last, pinned memory, non_blocking copies; the cited numbers); 2025-06-02 = commits "
                        "63d0718..9d18c06 (ToTensor first, transforms on tensors, pageable memory)")
    parser.add_argument("--skip-eval", action="store_true", help="no kNN evaluation at the end")
    parser.add_argument("--seed", type=int, default=0)
    return parser


LOWER_BOUNDS = dict(width=1, batch_size=2, epochs=1, workers=0, steps=0, train_subset=0)  # InfoNCE needs 2 images


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name, low in LOWER_BOUNDS.items():
            if getattr(args, name) < low:
                raise airbench_ssl.HarnessError(f"--{name.replace('_', '-')} {getattr(args, name)} is below {low}")
        if not 0 <= args.grayscale_p <= 1:
            raise airbench_ssl.HarnessError(f"--grayscale-p {args.grayscale_p} is not a probability in [0, 1]")
        run(args)
    except airbench_ssl.HarnessError as error:
        print(f"simclr_reference: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
