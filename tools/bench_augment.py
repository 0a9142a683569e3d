"""Benchmark airbench_ssl's augmentation (one call per batch) against torchvision's per-image pipelines, side by side.

    python tools/bench_augment.py                              # 4,096 random images, at 1 and at 2 CPU threads
    python tools/bench_augment.py --threads 1 --data-dir DATA_DIR --parts
    python tools/bench_augment.py --device cuda                # ours on the GPU; torchvision stays on the CPU

Four ways to make one SimCLR view of every image, the recipe's transforms in each:
  pil       torchvision on PIL images, the classic pipeline: what torchvision.datasets.CIFAR10 + DataLoader do per
            sample (Image.fromarray, RandomResizedCrop, flip, ColorJitter p=0.8, RandomGrayscale, ToTensor), then
            the collate's torch.stack
  tensor    the same per sample, but ToTensor first and the transforms on the float tensor, as the reference repo
  eager     airbench_ssl.augment on a uint8 batch already in memory on --device (the harness with compile off)
  compiled  the same parameters drawn eagerly (draw_augment_params), applied by torch.compile(apply_augment), as
            the Trainer does with compile on; compiled anew for each thread count (inductor's C++ fixes its thread
            count when it compiles), before the timing
For each --threads count, all run with that many CPU threads in one process, alternated over --repeats rounds; the
median images/s of each is reported (the machine may be shared). --parts also times the pieces of the eager one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/bench_augment.py)


def recipe_transforms(cfg: ab.Config) -> list[Callable]:
    """The reference's random transforms, with the harness config's parameters."""
    return [T.RandomResizedCrop(32, scale=(cfg.crop_scale_min, cfg.crop_scale_max),
                                ratio=(cfg.crop_ratio_min, cfg.crop_ratio_max), antialias=True),
            T.RandomHorizontalFlip(cfg.flip_p),
            T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
            T.RandomGrayscale(cfg.grayscale_p)]


def per_image_runner(images_hwc: np.ndarray, pipeline: T.Compose, batch_size: int) -> Callable[[], None]:
    """One pass over the images as Dataset.__getitem__ + default collate would make it."""
    def run() -> None:
        for start in range(0, len(images_hwc), batch_size):
            torch.stack([pipeline(Image.fromarray(image)) for image in images_hwc[start:start + batch_size]])
    return run


def batched_runner(augment: Callable, images: torch.Tensor, cfg: ab.Config, batch_size: int,
                   seed: int) -> Callable[[], None]:
    generator = torch.Generator(images.device).manual_seed(seed)

    def run() -> None:
        for start in range(0, len(images), batch_size):
            augment(images[start:start + batch_size], cfg, generator)
        ab.synchronize(images.device)
    return run


def compiled_augment(device: torch.device) -> Callable:
    """augment's signature, the Trainer's compiled path: parameters drawn eagerly, applied by a compiled function."""
    torch._dynamo.reset()  # a compile of its own for this thread count
    apply = torch.compile(ab.apply_augment, dynamic=False)

    def augment(images: torch.Tensor, cfg: ab.Config, generator: torch.Generator) -> torch.Tensor:
        return apply(images, ab.draw_augment_params(len(images), generator, device), cfg)
    return augment


def part_runners(images: torch.Tensor, cfg: ab.Config, batch_size: int, seed: int) -> dict[str, Callable[[], None]]:
    """augment's pieces on one batch, with the recipe's random parameters: where does its time go?"""
    generator = torch.Generator(images.device).manual_seed(seed)
    batch = images[:batch_size]
    n, device = len(batch), batch.device
    x = batch.float().div(255)
    boxes = ab.sample_crop_boxes(n, 32, 32, cfg, generator, device)
    order = torch.rand(n, 4, generator=generator, device=device).argsort(1)
    factors = torch.cat([0.6 + 0.8 * torch.rand(n, 3, generator=generator, device=device),
                         0.2 * torch.rand(n, 1, generator=generator, device=device) - 0.1], dim=1)

    def timed(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            ab.synchronize(device)
        return run

    return {
        "augment (whole)": timed(lambda: ab.augment(batch, cfg, generator)),
        "uint8 -> float": timed(lambda: batch.float().div_(255)),
        "sample_crop_boxes": timed(lambda: ab.sample_crop_boxes(n, 32, 32, cfg, generator, device)),
        "resized_crop": timed(lambda: ab.resized_crop(x, *boxes, 32)),
        "color_jitter": timed(lambda: ab.color_jitter(x, order, factors)),
        "  1 x adjust_hue": timed(lambda: ab.adjust_hue(x, factors[:, 3])),
        "  1 x blend": timed(lambda: ab.blend(x, ab.grayscale(x), factors[:, 2])),
        "  1 x grayscale": timed(lambda: ab.grayscale(x)),
    }


def median_seconds(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Run every runner once per round, in turn, so machine load hits all of them alike; -> median seconds."""
    for run in runners.values():  # warm-up: allocator, lazy imports, CUDA context
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def load_images(args: argparse.Namespace) -> torch.Tensor:
    if args.data_dir:
        return ab.load_cifar10(args.data_dir, "cpu")["train_images"][:args.images]
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator)


def bench_threads(args: argparse.Namespace, images: torch.Tensor, cfg: ab.Config, threads: int) -> dict:
    """-> {way: median seconds per pass} at `threads` CPU threads, and the compile's seconds."""
    torch.set_num_threads(threads)
    images_hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # how torchvision's CIFAR10 dataset holds them
    on_device = images.to(args.device)
    runners = {
        "pil": per_image_runner(images_hwc, T.Compose(recipe_transforms(cfg) + [T.ToTensor()]), args.batch_size),
        "tensor": per_image_runner(images_hwc, T.Compose([T.ToTensor()] + recipe_transforms(cfg)), args.batch_size),
        "eager": batched_runner(ab.augment, on_device, cfg, args.batch_size, args.seed),
    }
    compile_seconds = None
    if args.compile:
        runners["compiled"] = batched_runner(compiled_augment(on_device.device), on_device, cfg, args.batch_size,
                                             args.seed)
        start = time.perf_counter()
        runners["compiled"]()  # compiles each batch shape of the pass: untimed
        compile_seconds = time.perf_counter() - start
    return dict(seconds=median_seconds(runners, args.repeats), compile_seconds=compile_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="images per pass")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch CPU thread counts, each benched in turn, the same for all four ways")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where ours runs")
    parser.add_argument("--data-dir", default="", help="real CIFAR-10 train images (else random uint8 images)")
    parser.add_argument("--compile", type=ab.parse_bool, default=True, help="also bench the compiled augmentation")
    parser.add_argument("--parts", action="store_true", help="also time the eager augment's pieces on one batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.images, args.batch_size, args.repeats, *args.threads) < 1:
        parser.error("--images, --batch-size, --repeats and --threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA GPU")
    torch.manual_seed(args.seed)  # torchvision's transforms draw from the global generator
    try:
        images = load_images(args)
    except ab.HarnessError as error:
        print(f"bench_augment: error: {error}", file=sys.stderr)
        return 1
    cfg, n, saved_threads = ab.Config(), len(images), torch.get_num_threads()
    print(f"torch {torch.__version__}, ours on {args.device}; {n} {'CIFAR-10' if args.data_dir else 'random'} "
          f"images, batch {args.batch_size}, median of {args.repeats}; images/s:")
    ways = ["pil", "tensor", "eager"] + ["compiled"] * args.compile
    print(f"{'threads':>7} " + " ".join(f"{way:>9}" for way in ways) + f" {'eager/pil':>9}"
          + f" {'compiled/pil':>12} {'compiled/eager':>14} {'compile_s':>9}" * args.compile)
    try:
        for threads in args.threads:
            result = bench_threads(args, images, cfg, threads)
            seconds = result["seconds"]
            line = f"{threads:>7} " + " ".join(f"{n / seconds[way]:9.0f}" for way in ways)
            line += f" {seconds['pil'] / seconds['eager']:8.2f}x"
            if args.compile:
                line += (f" {seconds['pil'] / seconds['compiled']:11.2f}x "
                         f"{seconds['eager'] / seconds['compiled']:13.2f}x {result['compile_seconds']:9.1f}")
            print(line, flush=True)
        if args.parts:
            parts = median_seconds(part_runners(images.to(args.device), cfg, args.batch_size, args.seed),
                                   args.repeats)
            print(f"the eager augment's pieces on one batch of {min(n, args.batch_size)}, {torch.get_num_threads()} "
                  "thread(s):")
            for name, s in parts.items():
                print(f"  {name:26s} {s * 1000:8.2f} ms")
    finally:
        torch.set_num_threads(saved_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
