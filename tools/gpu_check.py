"""Every GPU check of the harness in one run, for a machine lent for a few minutes.

Prints, and writes to OUT/gpu_check.json and OUT/gpu_check.txt:
  1. the machine: GPU, driver, torch, CUDA, cuDNN, nvidia-smi;
  2. the device's measured peak: a large bf16 matmul (fp32 on CPU) in TFLOP/s, and device-to-device copy GB/s;
  3. harness step times for speed variants (eager fp32 -> channels_last -> bf16 -> compile, batch sizes), each with its
     untimed compile/warm-up seconds, seconds per 50k-image epoch, TFLOP/s and fraction of the measured peak;
  4. the augmentation's share of a step (two views of a batch, alone);
  5. a torch.profiler table of the top kernels of a few compiled steps;
  6. optionally (--reference) the side-by-side reference-vs-harness bench, tools/bench_throughput.py, as a subprocess.
Data: real CIFAR-10 train images when --data-dir finds them, else random uint8 images (throughput does not depend
on pixel values). On CPU, --tiny makes it a dry run in well under a minute: test it here before spending GPU time.

    python tools/gpu_check.py --out $OUT --reference          # on the GPU machine
    python tools/gpu_check.py --tiny --out /tmp/gpu_check      # dry run on a CPU
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_throughput  # noqa: E402  (tools/ is on sys.path: this file's own folder)

import airbench_ssl as ab  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))


def timed(fn, device, repeats=5):
    """Median seconds of fn() over repeats, device synchronised around each call."""
    return statistics.median(bench_throughput.timed(device, fn) for _ in range(repeats))


def measure_peak(device, tiny):
    """Measured, not nominal: the peak a real matmul reaches on this device (bench_throughput's), and copy bandwidth."""
    n = 1024 if tiny else 8192
    flops, description = bench_throughput.measured_peak_flops(device, n)
    nbytes = (16 if tiny else 1024) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    return dict(matmul=description, peak_tflops=flops / 1e12, copy_gb_per_s=2 * nbytes / copy_seconds / 1e9)


def time_harness(cfg, device, images, steps):
    """Harness training steps as the timed loop runs them: warm-up (compile) untimed, then `steps` steps timed."""
    torch.manual_seed(0)
    trainer = ab.Trainer(cfg, device, len(images))
    start = time.perf_counter()
    trainer.warm_up()
    warmup_seconds = time.perf_counter() - start
    generator = torch.Generator(device).manual_seed(0)
    batches = [images[torch.randint(0, len(images), (cfg.batch_size,), device=device, generator=generator)]
               for _ in range(steps)]
    trainer.step(batches[0], generator)  # eager runs: one untimed step fills caches (cudnn.benchmark)
    ab.synchronize(device)
    start = time.perf_counter()
    losses = [trainer.step(batch, generator) for batch in batches]
    ab.synchronize(device)
    step_seconds = (time.perf_counter() - start) / steps
    if not all(torch.isfinite(loss) for loss in losses):
        raise RuntimeError("non-finite loss while timing")
    return trainer, dict(warmup_seconds=warmup_seconds, step_seconds=step_seconds,
                         images_per_second=cfg.batch_size / step_seconds)


def time_augmentation(cfg, device, images):
    batch = images[:cfg.batch_size]
    generator = torch.Generator(device).manual_seed(0)
    ab.augment(batch, cfg, generator)
    return timed(lambda: (ab.augment(batch, cfg, generator), ab.augment(batch, cfg, generator)), device)


def profile_steps(trainer, device, images, steps=3):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    generator = torch.Generator(device).manual_seed(1)
    batch = images[:trainer.cfg.batch_size]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step(batch, generator)
        ab.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=20)


def variants(base, tiny):
    """The speed ladder of bench/NOTES.md, in order: each adds one change to the one before."""
    off = dict(compile="off", bf16="off", channels_last="off")
    ladder = [("eager fp32", off), ("+ channels_last", dict(off, channels_last="on")),
              ("+ bf16 autocast", dict(off, channels_last="on", bf16="on")),
              ("+ torch.compile = default", dict(compile="on", bf16="on", channels_last="on")),
              ("default, batch 1024", dict(compile="on", bf16="on", channels_last="on", batch_size=1024))]
    if tiny:  # inductor on a CPU compiles C++ for minutes: the dry run checks the code paths, not the compiler
        ladder = [(name, dict(changes, compile="off")) for name, changes in ladder if "batch_size" not in changes]
    return [(name, dataclasses.replace(base, **changes)) for name, changes in ladder]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for gpu_check.json and gpu_check.txt")
    parser.add_argument("--data-dir", default="", help="CIFAR-10 folder; random uint8 images if not found")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: width 8, batch 32, 2 steps, no compile")
    parser.add_argument("--reference", action="store_true", help="also run tools/bench_throughput.py side by side")
    args = parser.parse_args(argv)

    device = ab.resolve_device(ab.Config(device=args.device))
    base = ab.Config(device=device.type)
    if args.tiny:
        base = dataclasses.replace(base, width=8, batch_size=32, warmup_steps=1, compile="off")
        args.steps = min(args.steps, 2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    lines, report = [], {}

    def say(text):
        print(text, flush=True)
        lines.append(text)

    env = ab.environment_report(device)
    report["environment"] = env
    say(f"device: {env['gpu_name'] or env['cpu']} | driver {env['driver']} | torch {env['torch']} | "
        f"CUDA {env['cuda']} | cuDNN {env['cudnn']}")
    if env["nvidia_smi"]:
        say(env["nvidia_smi"])

    try:
        data = ab.load_cifar10(args.data_dir, device, download=False)
        images, source = data["train_images"], f"CIFAR-10 from {data['report']['data_dir']}"
    except ab.HarnessError:
        images = torch.randint(0, 256, (50000 if not args.tiny else 256, 3, 32, 32), dtype=torch.uint8, device=device)
        source = "random uint8 images (no CIFAR-10 found)"
    say(f"data: {source}")

    peak = measure_peak(device, args.tiny)
    report["peak"] = peak
    say(f"measured peak: {peak['peak_tflops']:.1f} TFLOP/s ({peak['matmul']}); "
        f"copy {peak['copy_gb_per_s']:.0f} GB/s")

    flops_image = bench_throughput.forward_flops(base.arch, base.width)
    report["forward_gflop_per_image"] = flops_image / 1e9
    say(f"forward: {flops_image / 1e9:.3f} GFLOP per image ({flops_image / 2e9:.3f} GMACs); a training step costs "
        "3 x forward x 2 views")

    report["variants"] = []
    say(f"{'variant':<28} {'warm-up s':>9} {'step ms':>9} {'img/s':>9} {'epoch s':>8} {'TFLOP/s':>8} {'% peak':>7}")
    default = None
    for name, cfg in variants(base, args.tiny):
        trainer, result = time_harness(cfg, device, images, args.steps)
        tflops = 3 * flops_image * 2 * result["images_per_second"] / 1e12
        result.update(name=name, batch_size=cfg.batch_size, epoch_seconds=50000 / result["images_per_second"],
                      tflops=tflops, fraction_of_peak=tflops / peak["peak_tflops"])
        report["variants"].append(result)
        say(f"{name:<28} {result['warmup_seconds']:9.1f} {1000 * result['step_seconds']:9.2f} "
            f"{result['images_per_second']:9.0f} {result['epoch_seconds']:8.2f} {tflops:8.1f} "
            f"{100 * result['fraction_of_peak']:6.1f}%")
        if "default" in name and cfg.batch_size == base.batch_size:
            default, default_trainer = result, trainer

    augment_seconds = time_augmentation(base, device, images)
    step_seconds = default["step_seconds"]
    report["augmentation"] = dict(two_views_seconds=augment_seconds, fraction_of_step=augment_seconds / step_seconds)
    say(f"augmentation, two views of {base.batch_size}: {1000 * augment_seconds:.2f} ms = "
        f"{100 * augment_seconds / step_seconds:.1f}% of a default step")

    table = profile_steps(default_trainer, device, images)
    report["profile"] = table
    say("profile of the default configuration, top kernels:\n" + table)

    if args.reference:
        bench = os.path.join(TOOLS, "bench_throughput.py")
        command = [sys.executable, bench, "--json", os.path.join(args.out, "bench_throughput.json")]
        command += ["--data-dir", args.data_dir] if args.data_dir else []
        command += ["--width", "8", "--batch-size", "16", "--steps", "2", "--repeats", "1", "--workers", "0"] \
            if args.tiny else []
        say("reference vs harness: " + " ".join(command))
        proc = subprocess.run(command, capture_output=True, text=True)
        say(proc.stdout + proc.stderr)
        report["reference_bench_returncode"] = proc.returncode

    with open(os.path.join(args.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/gpu_check.json and gpu_check.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
