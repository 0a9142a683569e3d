"""The reference recipe and the harness on the same device, model and batch size, timed side by side in one run.

    python tools/bench_throughput.py                          # GPU: ResNet18, batch 512, one 50k-image epoch a round
    python tools/bench_throughput.py --device cpu --width 8 --batch-size 16 --steps 2 --repeats 1 --workers 0
    python tools/bench_throughput.py --config my_trick.json --json out.json   # the harness with your overrides

Reference: baselines/simclr_reference.py's own pieces in its default variant (the reference script of commit
781f889 onward, whose 11.9 s/epoch we cite: PIL transforms with ToTensor last, pinned memory, non_blocking copies;
--reference-variant 2025-06-02 times the older tensor-transform script), a DataLoader whose --workers CPU processes
augment each image on its own, feeding fp32 eager steps with a host sync per step. A reference round starts a fresh
DataLoader iterator, as every reference epoch does, so worker start-up and the pipeline fill are counted once per
round; with the default (one epoch of 50,000 images a round) that is exactly the reference's per-epoch cost.
Harness: airbench_ssl.Trainer on device-resident uint8 images, its compile warm-up untimed, rounds timed as its
epochs are (shuffle, GPU augmentation, forward, backward, optimizer).
Rounds alternate reference, harness, reference, ... for --repeats rounds each after one untimed round each, the
device synchronised around every timing, and the medians are compared. Pixel values do not change the cost, so
random images are used unless --data-dir is given.

FLOPs: the model's forward FLOPs on one image are counted once with torch.utils.flop_counter; a training image costs
3 x forward (forward + backward) x 2 views. Peak: a timed large matmul (bf16 on CUDA, fp32 on the CPU); both sides
are reported against that one number. On the CPU, the rounds and the peak all compute with the threads left beside
the reference's loader workers (simclr_reference.threads_beside_workers), so the ratio compares code, not threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "baselines"))
import simclr_reference  # noqa: E402

import airbench_ssl  # noqa: E402  (the repo root is not on sys.path when run as tools/bench_throughput.py)

EPOCH_IMAGES = 50_000


def forward_flops(arch: str, width: int) -> int:
    """FLOPs of one forward pass (backbone + projector) on one 32x32 image."""
    model = airbench_ssl.make_model(arch, width).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model([torch.zeros(1, 3, 32, 32)])  # one view of one image
    return counter.get_total_flops()


def measured_peak_flops(device: torch.device, size: int, repeats: int = 10,
                        warmup_seconds: float | None = None) -> tuple[float, str, int]:
    """-> (FLOP/s of a size^3 matmul, a description, the warm-up matmuls run): bf16 on CUDA (the harness's compute
    type), fp32 on the CPU. Timed only after at least 10 matmuls and `warmup_seconds` of them (default 2 s on CUDA):
    a GPU that has idled runs its first ones at lower clocks, and the first call selects the kernel."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    warmup_seconds = (2.0 if device.type == "cuda" else 0.0) if warmup_seconds is None else warmup_seconds
    warmups, start = 0, time.perf_counter()
    while warmups < 10 or time.perf_counter() - start < warmup_seconds:
        for _ in range(10):
            a @ b
        warmups += 10
        airbench_ssl.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    airbench_ssl.synchronize(device)
    seconds = time.perf_counter() - start
    return 2 * size**3 * repeats / seconds, f"{str(dtype).replace('torch.', '')} matmul {size}x{size}x{size}", warmups


def harness_config(args: argparse.Namespace, device: torch.device) -> airbench_ssl.Config:
    """The recipe preset with the bench's model and batch, then --config overrides, validated by the harness."""
    argv = ["--preset", "recipe", "--arch", args.arch, "--width", str(args.width), "--batch-size",
            str(args.batch_size), "--grayscale-p", str(args.grayscale_p), "--device", device.type]
    cli = airbench_ssl.build_parser().parse_args(argv + (["--config", args.config] if args.config else []))
    return airbench_ssl.config_from_args(cli, torch.cuda.is_available())[0]  # (config, its sources)


def load_images(args: argparse.Namespace, count: int) -> torch.Tensor:
    """`count` uint8 training images on the CPU: real ones from --data-dir, else random pixels."""
    if args.data_dir:
        images = airbench_ssl.load_cifar10(args.data_dir, torch.device("cpu"))["train_images"]
        if len(images) < count:
            raise airbench_ssl.HarnessError(f"{args.data_dir} has {len(images)} training images, a round needs {count}")
        return images[:count]
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def timed(device: torch.device, fn) -> float:
    airbench_ssl.synchronize(device)
    start = time.perf_counter()
    fn()
    airbench_ssl.synchronize(device)
    return time.perf_counter() - start


def bench(args: argparse.Namespace) -> dict:
    device = airbench_ssl.resolve_device(args)
    count = args.steps * args.batch_size if args.steps else EPOCH_IMAGES
    images = load_images(args, count)
    steps = math.ceil(count / args.batch_size)
    torch.manual_seed(args.seed)

    # Reference: exactly baselines/simclr_reference.py's dataset, loader, model, optimizer and step.
    labels = torch.zeros(count, dtype=torch.int64)
    dataset = simclr_reference.make_dataset(images, labels, args.grayscale_p, args.reference_variant)
    ref_model = simclr_reference.ReferenceSimCLR(args.arch, args.width).to(device)
    ref_optimizer, _ = simclr_reference.make_optimizer(ref_model, args.batch_size, epochs=1000)

    def reference_round() -> None:
        torch.backends.cudnn.benchmark = False  # the reference leaves it at its default; the harness turns it on
        loader = simclr_reference.make_loader(dataset, args.batch_size, args.workers, device, args.reference_variant,
                                              args.seed)
        with simclr_reference.threads_beside_workers(device, args.workers):
            simclr_reference.train_epoch(ref_model, ref_optimizer, loader, device, args.reference_variant)

    # Harness: its Trainer on device-resident uint8 images; one round = one of its (timed) epochs.
    cfg = harness_config(args, device)
    trainer = airbench_ssl.Trainer(cfg, device, count)
    device_images = images.to(device)
    order_generator = torch.Generator(device).manual_seed(args.seed)
    augment_generator = torch.Generator(device).manual_seed(args.seed + 1)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    warmup_seconds = timed(device, trainer.warm_up)

    def harness_round() -> None:
        torch.backends.cudnn.benchmark = device.type == "cuda"  # as airbench_ssl.train_run sets it
        # On the CPU both sides compute with the same threads, so the ratio compares code, not thread counts.
        with simclr_reference.threads_beside_workers(device, args.workers):
            trainer.train_epoch(0, device_images, order_generator, augment_generator)

    # One untimed round each: cudnn autotuning, allocator growth, first-call paths of the loader.
    reference_round()
    harness_round()
    seconds = {"reference": [], "harness": []}
    for _ in range(args.repeats):
        seconds["reference"].append(timed(device, reference_round))
        seconds["harness"].append(timed(device, harness_round))

    flops = forward_flops(args.arch, args.width)
    train_flops_per_image = 3 * 2 * flops
    with simclr_reference.threads_beside_workers(device, args.workers):  # the CPU peak with the rounds' threads
        peak, peak_what, _ = measured_peak_flops(device, args.peak_size)
    result = dict(device=device.type, device_name=airbench_ssl.environment_report(device)["gpu_name"] or "CPU",
                  torch=torch.__version__, arch=args.arch, width=args.width, batch_size=args.batch_size,
                  steps_per_round=steps, images_per_round=count, repeats=args.repeats, workers=args.workers,
                  reference_variant=args.reference_variant,
                  reference_commits=simclr_reference.VARIANTS[args.reference_variant].commits,
                  harness_config=dataclasses.asdict(cfg),
                  harness_speed_features=dict(zip(("compile", "bf16", "channels_last"),
                                                  airbench_ssl.speed_features(cfg, device))),
                  harness_warmup_seconds=warmup_seconds, forward_flops_per_image=flops,
                  train_flops_per_image=train_flops_per_image, peak_flops=peak, peak_measured_with=peak_what,
                  round_seconds=seconds)
    for side in ("reference", "harness"):
        median = statistics.median(seconds[side])
        images_per_second = count / median
        result[side] = dict(median_round_seconds=median, images_per_second=images_per_second,
                            seconds_per_epoch=EPOCH_IMAGES / images_per_second,
                            tflops=train_flops_per_image * images_per_second / 1e12,
                            fraction_of_peak=train_flops_per_image * images_per_second / peak)
    result["speedup_harness_over_reference"] = result["harness"]["images_per_second"] / \
        result["reference"]["images_per_second"]
    return result


def report(r: dict) -> str:
    lines = [
        f"device: {r['device']} ({r['device_name']}), torch {r['torch']}; {r['arch']} width {r['width']}, batch "
        f"{r['batch_size']}; {r['steps_per_round']} steps ({r['images_per_round']} images) a round, median of "
        f"{r['repeats']} alternating rounds; reference {r['reference_variant']} (commits {r['reference_commits']}), "
        f"loader workers: {r['workers']}",
        f"harness speed features: {r['harness_speed_features']} (warm-up {r['harness_warmup_seconds']:.1f} s, untimed)",
        f"forward: {r['forward_flops_per_image'] / 1e9:.3f} GFLOP ({r['forward_flops_per_image'] / 2e9:.3f} GMACs) "
        f"per image; training: 3 x forward x 2 views = {r['train_flops_per_image'] / 1e9:.3f} GFLOP per image",
        f"measured peak: {r['peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_measured_with']})",
        f"{'':10} {'images/s':>10} {'s/epoch(50k)':>13} {'TFLOP/s':>9} {'of peak':>8}   round seconds",
    ]
    for side in ("reference", "harness"):
        s = r[side]
        rounds = " ".join(f"{x:.3f}" for x in r["round_seconds"][side])
        lines.append(f"{side:10} {s['images_per_second']:10.1f} {s['seconds_per_epoch']:13.2f} {s['tflops']:9.3f} "
                     f"{100 * s['fraction_of_peak']:7.1f}%   {rounds}")
    lines.append(f"ratio harness/reference (images/s): {r['speedup_harness_over_reference']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=airbench_ssl.ARCHS)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--grayscale-p", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=0, help="steps a round; 0 = one 50,000-image epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per side (after one untimed each)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="reference DataLoader workers")
    parser.add_argument("--reference-variant", default=simclr_reference.DEFAULT_VARIANT,
                        choices=tuple(simclr_reference.VARIANTS), help="version of the reference script timed "
                        "(see baselines/simclr_reference.py --help)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--data-dir", default="", help="real CIFAR-10 images (default: random pixels)")
    parser.add_argument("--config", default="", help="harness config JSON applied to the harness side")
    parser.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak (0: 8192 CUDA, 1024 CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [f"--{name.replace('_', '-')}" for name in ("width", "batch_size", "repeats") if getattr(args, name) < 1]
    bad += [f"--{name.replace('_', '-')}" for name in ("steps", "workers", "peak_size") if getattr(args, name) < 0]
    if bad or args.batch_size < 2:
        print(f"bench_throughput: error: {', '.join(bad) or '--batch-size'} out of range (see --help)", file=sys.stderr)
        return 1
    try:
        args.peak_size = args.peak_size or (8192 if airbench_ssl.resolve_device(args).type == "cuda" else 1024)
        result = bench(args)
    except airbench_ssl.HarnessError as error:
        print(f"bench_throughput: error: {error}", file=sys.stderr)
        return 1
    print(report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
