"""Every GPU check of the harness in one run, keeping what it measured even if it is cut off.

Sections, in order; OUT/gpu_check.json and OUT/gpu_check.txt are rewritten (atomically) after each one and after each
rung of the ladder, and a section that fails (compile error, out of memory) is recorded as {"error": ...} while the
rest still run:
  environment   GPU, driver, torch, CUDA, cuDNN, nvidia-smi
  data          real CIFAR-10 train images if found, else random uint8 images (throughput ignores pixel values)
  peak          measured, not nominal: a large bf16 matmul (fp32 on CPU) in TFLOP/s after matmuls that warm the GPU
                up (clocks, power state), and device-to-device copy GB/s
  forward       FLOPs of one forward pass (backbone + projector) on one image; a training image costs 3 x that x 2 views
  ladder        eager fp32 NCHW -> + channels_last -> + bf16 autocast -> + torch.compile of the model -> + compiled
                augmentation (= the default) [-> batch 1024 with --batch-1024] -> + CUDA graphs (mode
                "reduce-overhead", tried last: recorded as failed if it fails; CUDA only): compile/warm-up seconds, step
                ms, images/s, seconds per 50k-image epoch, TFLOP/s and fraction of the measured peak. Each rung warms
                up and times only the batch shape it times.
  sync_debug    CUDA only: one warmed epoch of the timed loop under torch.cuda.set_sync_debug_mode("error")
  augmentation  its cost inside a default step, as training pays it: the pipelined step minus the same step fed
                precomputed views, both warmed, alternated in one run; the profiler's device time of its kernels;
                and, for contrast, the views alone between two syncs (launch-bound: no share of a step)
  knn           airbench_ssl.knn_accuracy on random features of the real sizes (50,000 x 512 vs 10,000)
  profile       a torch.profiler table of a few default steps
  kernels       tools/count_kernels.py on the default config: operator calls, generated and device kernels per part
  reference     (--reference) tools/bench_throughput.py, the reference script vs the harness, as a subprocess with
                a timeout
--tiny is a CPU dry run of every section in well under a minute (width 8, batch 32, 2 steps, the compiled rungs with
a cheap --compile-backend, since inductor compiles C++ for minutes on a CPU): run it before spending GPU time.

    python tools/gpu_check.py --out bench/results/gpu_check --reference --batch-1024     # on the GPU machine
    python tools/gpu_check.py --tiny --out /tmp/gpu_check                                # dry run on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_throughput  # noqa: E402  (tools/ is on sys.path: this file's own folder)
import count_kernels  # noqa: E402

import airbench_ssl as ab  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
EPOCH_IMAGES = 50_000
DEFAULT_RUNG = "+ compiled augment = default"
CUDA_GRAPHS_RUNG = "+ CUDA graphs"
OFF, ON = dict(compile="off", bf16="off", channels_last="off"), dict(compile="on", bf16="on", channels_last="on")


@dataclasses.dataclass(frozen=True)
class Rung:
    name: str
    cfg: ab.Config
    eager_augment: bool = False  # the model compiled, the augmentation not
    mode: str | None = None  # torch.compile's mode for the model and the augmentation


LADDER = (("eager fp32", OFF, {}), ("+ channels_last", dict(OFF, channels_last="on"), {}),
          ("+ bf16 autocast", dict(OFF, channels_last="on", bf16="on"), {}),
          ("+ torch.compile (model)", ON, dict(eager_augment=True)), (DEFAULT_RUNG, ON, {}))


def failure(error: BaseException) -> dict:
    """A section's or rung's failure as recorded: one line to read, the traceback to debug from."""
    line = (str(error).strip().splitlines() or [""])[0][:500]
    return dict(error=f"{type(error).__name__}: {line}", traceback=traceback.format_exc()[-4000:])


def free_memory(device: torch.device) -> None:
    gc.collect()  # a failed rung's traceback frames hold its tensors until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Results:
    """The report and its transcript, both rewritten whole after every section: a run cut off keeps what it did."""

    def __init__(self, out: str, report: dict):
        self.out, self.report, self.lines, self.start = out, report, [], time.perf_counter()

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self) -> None:
        text = json.dumps(self.report, indent=1).encode()
        ab.write_atomic(os.path.join(self.out, "gpu_check.json"), lambda f: f.write(text))
        transcript = "\n".join(self.lines + [""]).encode()
        ab.write_atomic(os.path.join(self.out, "gpu_check.txt"), lambda f: f.write(transcript))

    def section(self, name: str, run: Callable[[], dict], summary: Callable[[dict], str] | None = None) -> dict:
        """run() -> its result, or its failure, recorded under `name` and saved; summary(result) is printed."""
        self.begin(name)
        try:
            result = run()
            line = summary(result) if summary else None
        except Exception as error:
            result = failure(error)
            line = f"{name} failed: {result['error']}"
        self.report[name] = result
        if line:
            self.say(line)
        self.save()
        return result

    def begin(self, name: str, announce: bool = True) -> None:
        """On disk too: a run cut off (a timeout's SIGKILL, a lost machine) shows what it was doing."""
        self.report["status"] = f"running {name}"
        if announce:
            self.say(f"== {name} ({time.perf_counter() - self.start:.0f} s in)")
        self.save()


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of fn() over repeats, the device synchronised around each call."""
    return statistics.median(bench_throughput.timed(device, fn) for _ in range(repeats))


def measure_peak(device: torch.device, tiny: bool) -> dict:
    size = 512 if tiny else 8192 if device.type == "cuda" else 1024
    flops, description, warmup_matmuls = bench_throughput.measured_peak_flops(device, size,
                                                                              warmup_seconds=0.0 if tiny else None)
    nbytes = (16 if tiny or device.type != "cuda" else 1024) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_seconds = timed(lambda: dst.copy_(src), device, repeats=10)
    return dict(matmul=description, warmup_matmuls=warmup_matmuls, peak_tflops=flops / 1e12,
                copy_gb_per_s=2 * nbytes / copy_seconds / 1e9)


def build_trainer(rung: Rung, device: torch.device, n_train: int, compile_backend: str) -> ab.Trainer:
    """The harness's Trainer for the rung: its own torch.compile calls, or the same with another backend or mode."""
    trainer = ab.Trainer(rung.cfg, device, n_train)
    if trainer.compiled:
        count_kernels.recompile(trainer, compile_backend, compile_backend, rung.mode)
    if rung.eager_augment:
        trainer.augment = ab.apply_augment
    return trainer


def time_harness(rung: Rung, device: torch.device, images: torch.Tensor, steps: int,
                 compile_backend: str) -> tuple[ab.Trainer, torch.Tensor, dict]:
    """One epoch of `steps` full batches timed as the race times an epoch (Trainer.train_epoch between device
    syncs), after the harness's own warm-up. The trainer sees exactly steps * batch_size images, so its only batch
    shape is the timed one: the warm-up compiles nothing that is not timed. -> (trainer, its images, the timing)."""
    cfg = rung.cfg
    torch.manual_seed(0)
    generator = torch.Generator(device).manual_seed(0)
    subset = images[torch.randint(0, len(images), (steps * cfg.batch_size,), device=device, generator=generator)]
    trainer = build_trainer(rung, device, len(subset), compile_backend)
    start = time.perf_counter()
    trainer.warm_up()
    ab.synchronize(device)
    warmup_seconds = time.perf_counter() - start
    trainer.step(subset[:cfg.batch_size], generator)  # eager on a CPU has no warm-up: first-call costs go here
    losses = []
    seconds = bench_throughput.timed(device, lambda: losses.append(trainer.train_epoch(0, subset, generator,
                                                                                       generator)[0]))
    if not torch.isfinite(losses[0]):
        raise RuntimeError(f"loss {losses[0].item()} while timing")
    view = trainer.views(subset[:2], generator)[0]  # what the rung claims, read off what the model is fed
    return trainer, subset, dict(
        batch_size=cfg.batch_size, steps=steps, compiled=trainer.compiled,
        augment_compiled=trainer.augment is not ab.apply_augment, mode=rung.mode,
        compile_backend=compile_backend if trainer.compiled else None, bf16=trainer.bf16,
        views_channels_last=view.is_contiguous(memory_format=torch.channels_last) and not view.is_contiguous(),
        warmup_seconds=warmup_seconds, step_ms=1000 * seconds / steps,
        images_per_second=steps * cfg.batch_size / seconds)


def rungs(base: ab.Config, big_batch: int) -> list[Rung]:
    """The speed ladder of bench/NOTES.md: each rung adds one change to the one before; CUDA graphs come last, so
    that their failure (they are the least tried) costs nothing else."""
    ladder = [Rung(name, dataclasses.replace(base, **changes), **how) for name, changes, how in LADDER]
    default = ladder[-1]
    if big_batch:
        ladder.append(Rung(f"default, batch {big_batch}", dataclasses.replace(default.cfg, batch_size=big_batch)))
    return ladder + [Rung(CUDA_GRAPHS_RUNG, default.cfg, mode="reduce-overhead")]


def run_ladder(results: Results, base: ab.Config, device: torch.device, images: torch.Tensor, args: argparse.Namespace,
               train_flops_per_image: float | None, peak_tflops: float | None) -> dict | None:
    """Every rung, each in its own try: a rung that fails is recorded and the next runs. -> the default rung's
    trainer, its images and result, kept for the later sections (None if it failed)."""
    ladder, kept = [], None
    results.report["ladder"] = ladder
    results.say(f"{'rung':<28} {'warm-up s':>9} {'step ms':>9} {'img/s':>9} {'epoch s':>8} {'TFLOP/s':>8} "
                f"{'% peak':>7}")
    for rung in rungs(base, args.big_batch):
        name = rung.name
        results.begin(f"ladder: {name}", announce=False)
        if rung.mode and device.type != "cuda":
            ladder.append(dict(name=name, batch_size=rung.cfg.batch_size, skipped="CUDA graphs need a CUDA GPU"))
            results.say(f"{name:<28} skipped: {ladder[-1]['skipped']}")
            results.save()
            continue
        try:
            trainer, subset, result = time_harness(rung, device, images, args.steps, args.compile_backend)
            result = dict(name=name, **result, epoch_seconds=EPOCH_IMAGES / result["images_per_second"])
            tflops = train_flops_per_image * result["images_per_second"] / 1e12 if train_flops_per_image else None
            result.update(tflops=tflops, fraction_of_peak=tflops / peak_tflops if tflops and peak_tflops else None)
            percent = f"{100 * result['fraction_of_peak']:6.1f}%" if result["fraction_of_peak"] else "      -"
            results.say(f"{name:<28} {result['warmup_seconds']:9.1f} {result['step_ms']:9.2f} "
                        f"{result['images_per_second']:9.0f} {result['epoch_seconds']:8.2f} "
                        f"{tflops if tflops else float('nan'):8.3g} {percent}")
            if name == DEFAULT_RUNG:
                kept = dict(trainer=trainer, images=subset, result=result)
            del trainer, subset
        except Exception as error:
            result = dict(name=name, batch_size=rung.cfg.batch_size, **failure(error))
            results.say(f"{name:<28} failed: {result['error']}")
        ladder.append(result)
        results.save()
        free_memory(device)
    return kept


def under_sync_debug(run: Callable[[], Any]) -> dict:
    """run() under set_sync_debug_mode("error"), which raises at the first op that makes the host wait for the GPU
    -> dict(passed) or, on such an op, its message and the harness line it came from."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as error:
        if "synchroniz" not in str(error):  # not the sync check's error (say, out of memory): the section's failure
            raise
        frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.endswith("airbench_ssl.py")]
        where = f"airbench_ssl.py:{frames[-1].lineno} in {frames[-1].name}: {frames[-1].line}" if frames else None
        return dict(passed=False, message=(str(error).strip().splitlines() or [""])[0][:500], where=where)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(passed=True)


def sync_debug(default: dict | None, device: torch.device) -> dict:
    """The timed loop must never wait for the GPU (no .item(), no host copies, no data-dependent shapes): one warmed
    epoch of it, exactly as timed, under the sync check."""
    if device.type != "cuda":
        return dict(skipped="CUDA only: torch.cuda.set_sync_debug_mode checks CUDA synchronisations")
    if default is None:
        raise RuntimeError(f"needs the warmed trainer of the '{DEFAULT_RUNG}' rung, which failed")
    trainer, images = default["trainer"], default["images"]
    generator = torch.Generator(device).manual_seed(2)
    torch.cuda.synchronize(device)
    result = under_sync_debug(lambda: trainer.train_epoch(0, images, generator, generator))
    torch.cuda.synchronize(device)
    return dict(result, steps=len(trainer.batch_sizes))


def time_augmentation(default: dict | None, device: torch.device, repeats: int = 5) -> dict:
    """What the augmentation costs a default step in training: there its kernels queue behind the previous step's
    backward, so its time alone between two syncs (launch-bound) says little. Measured as the warmed, pipelined
    step (views made, then the update) minus the same step fed views made beforehand, the two alternated `repeats`
    times, `steps` steps each between syncs; plus the profiler's device time of its kernels (CUDA), and its time
    alone for contrast."""
    if default is None:
        raise RuntimeError(f"needs the warmed trainer of the '{DEFAULT_RUNG}' rung, which failed")
    trainer, steps = default["trainer"], default["result"]["steps"]
    batch, generator = default["images"][:trainer.cfg.batch_size], torch.Generator(device).manual_seed(0)
    made = trainer.views(batch, generator)  # the same shapes and memory format as those made in the step

    def normal() -> None:
        for _ in range(steps):
            trainer.update(trainer.views(batch, generator))

    def fed() -> None:
        for _ in range(steps):
            trainer.update(made)

    seconds: dict[str, list[float]] = {"normal": [], "fed": [], "alone": []}
    runs = dict(normal=normal, fed=fed, alone=lambda: trainer.views(batch, generator))
    for run in runs.values():  # warm: the allocator, and views made outside a step
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name].append(bench_throughput.timed(device, run))
    step, fed_step = (statistics.median(seconds[name]) / steps for name in ("normal", "fed"))
    parts = count_kernels.run_step(trainer, batch, generator, profiled=True)
    n_views = len(made)
    return dict(n_views=n_views, batch_size=len(batch), steps=steps, repeats=repeats, step_ms=1000 * step,
                step_fed_views_ms=1000 * fed_step, augmentation_ms=1000 * (step - fed_step),
                fraction_of_step=(step - fed_step) / step, kernel_ms=parts["augmentation"]["device_ms"],
                views_alone_ms=1000 * statistics.median(seconds["alone"]))


def time_knn(cfg: ab.Config, device: torch.device, tiny: bool) -> dict:
    """The kNN check's classifier on random features of the race's sizes: it runs at every check, so it must stay
    a small fraction of a second on the GPU."""
    n_train, n_test, dim = (2000, 500, 64) if tiny else (EPOCH_IMAGES, 10_000, 512)
    generator = torch.Generator(device).manual_seed(0)
    train = torch.randn(n_train, dim, device=device, generator=generator)
    test = torch.randn(n_test, dim, device=device, generator=generator)
    train_labels = torch.randint(0, 10, (n_train,), device=device, generator=generator)
    test_labels = torch.randint(0, 10, (n_test,), device=device, generator=generator)
    accuracy = ab.knn_accuracy(train, train_labels, test, test_labels, cfg.knn_k)  # first call: kernel selection
    seconds = timed(lambda: ab.knn_accuracy(train, train_labels, test, test_labels, cfg.knn_k), device, repeats=3)
    return dict(n_train=n_train, n_test=n_test, dim=dim, k=cfg.knn_k, seconds=seconds, chance_accuracy_pct=accuracy)


def profile_steps(default: dict | None, device: torch.device, steps: int = 3) -> dict:
    if default is None:
        raise RuntimeError(f"needs the warmed trainer of the '{DEFAULT_RUNG}' rung, which failed")
    trainer, images = default["trainer"], default["images"]
    generator = torch.Generator(device).manual_seed(1)
    batch = images[:trainer.cfg.batch_size]
    prof = count_kernels.start_profiler(device)
    try:
        for _ in range(steps):
            trainer.step(batch, generator)
        ab.synchronize(device)
    finally:
        prof.__exit__(None, None, None)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return dict(steps=steps, sort_by=sort_by, table=prof.key_averages().table(sort_by=sort_by, row_limit=20))


def reference_command(args: argparse.Namespace, device: torch.device) -> list[str]:
    command = [sys.executable, os.path.join(TOOLS, "bench_throughput.py"), "--device", device.type,
               "--json", os.path.join(args.out, "bench_throughput.json")]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    if args.tiny:
        command += ["--width", "8", "--batch-size", "16", "--steps", "2", "--repeats", "1", "--workers", "0",
                    "--peak-size", "256"]
    return command


def run_reference(args: argparse.Namespace, device: torch.device, say: Callable[[str], None]) -> dict:
    """bench_throughput.py as a subprocess, its output relayed line by line. It runs in its own process group, so that
    a timeout (or an interrupt of this tool) ends its DataLoader workers with it."""
    command, lines = reference_command(args, device), []
    say("$ " + " ".join(command))
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def relay() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            say("  " + lines[-1])

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=args.reference_timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    result = dict(command=command, returncode=proc.returncode, seconds=time.perf_counter() - start,
                  output_tail="\n".join(lines)[-6000:])
    if timed_out:
        result["error"] = f"TimeoutExpired: no result within --reference-timeout {args.reference_timeout:g} s"
    elif proc.returncode != 0:
        result["error"] = f"bench_throughput.py exited with {proc.returncode}"
    else:
        with open(os.path.join(args.out, "bench_throughput.json"), encoding="utf-8") as f:
            bench = json.load(f)
        result["speedup_harness_over_reference"] = bench["speedup_harness_over_reference"]
        result["seconds_per_epoch"] = {side: bench[side]["seconds_per_epoch"] for side in ("reference", "harness")}
    return result


def load_images(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Real CIFAR-10 if --data-dir is given (or, outside --tiny, found in the default places), else random pixels."""
    if args.data_dir or not args.tiny:
        try:
            data = ab.load_cifar10(args.data_dir, device, download=False)
            return data["train_images"], dict(source=f"CIFAR-10 from {data['report']['data_dir']}",
                                              official=data["report"]["official"], images=len(data["train_images"]))
        except ab.HarnessError as error:
            if args.data_dir:
                raise
            missing = str(error)
    else:
        missing = "--tiny without --data-dir"
    generator = torch.Generator(device).manual_seed(0)
    # 300 is not a multiple of the tiny batch, as 50,000 is not of 512: a rung must still warm up only what it times
    count = 300 if args.tiny else EPOCH_IMAGES
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator)
    return images, dict(source=f"random uint8 images ({missing})", official=None, images=count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="bench/results/gpu_check", help="folder for gpu_check.json and gpu_check.txt")
    parser.add_argument("--data-dir", default="", help="CIFAR-10 folder; random uint8 images if not found")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per rung")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: width 8, batch 32, 2 steps, compile "
                        "backend aot_eager unless --compile-backend is given")
    parser.add_argument("--batch-1024", dest="batch_1024", action="store_true",
                        help="add the default at batch 1024 (twice the batch in --tiny): one more compile")
    parser.add_argument("--compile-backend", default="", help="torch.compile backend of the compiled rungs "
                        "(default: inductor, as the harness; aot_eager in --tiny)")
    parser.add_argument("--reference", action="store_true", help="also run tools/bench_throughput.py side by side")
    parser.add_argument("--reference-timeout", type=float, default=600, help="seconds before the reference bench "
                        "is killed and recorded as timed out")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """-> what is wrong with the arguments, or None."""
    if args.steps < 1:
        return f"--steps {args.steps} must be at least 1"
    if not args.reference_timeout > 0:
        return f"--reference-timeout {args.reference_timeout} must be positive"
    return count_kernels.backend_problem(args.compile_backend)


def run_sections(args: argparse.Namespace, device: torch.device, base: ab.Config, results: Results) -> None:
    say = results.say
    results.section("environment", lambda: ab.environment_report(device), lambda env: (
        f"device: {env['gpu_name'] or env['cpu']} | driver {env['driver']} | torch {env['torch']} | CUDA "
        f"{env['cuda']} | cuDNN {env['cudnn']}" + (f"\n{env['nvidia_smi'].rstrip()}" if env["nvidia_smi"] else "")))
    loaded = []

    def data() -> dict:
        images, report = load_images(args, device)
        loaded.append(images)
        return report

    if "error" in results.section("data", data, lambda report: f"data: {report['source']}"):
        raise ab.HarnessError("no images to time")
    images = loaded[0]
    peak = results.section("peak", lambda: measure_peak(device, args.tiny), lambda peak: (
        f"measured peak: {peak['peak_tflops']:.3g} TFLOP/s ({peak['matmul']}); copy {peak['copy_gb_per_s']:.0f} GB/s"))

    def forward() -> dict:
        flops = bench_throughput.forward_flops(base.arch, base.width)
        return dict(forward_gflop_per_image=flops / 1e9, train_gflop_per_image=6 * flops / 1e9)

    flops = results.section("forward", forward, lambda f: (
        f"forward: {f['forward_gflop_per_image']:.3f} GFLOP per image; a training image costs 3 x forward x 2 views "
        f"= {f['train_gflop_per_image']:.3f} GFLOP"))
    results.begin("ladder")
    default = run_ladder(results, base, device, images, args, flops.get("train_gflop_per_image", 0) * 1e9,
                         peak.get("peak_tflops"))
    results.section("sync_debug", lambda: sync_debug(default, device), lambda r: "sync debug: " + (
        r.get("skipped") or ("passed" if r["passed"] else f"FAILED: {r['message']} at {r['where']}")))
    results.section("augmentation", lambda: time_augmentation(default, device), lambda r: (
        f"augmentation, {r['n_views']} views of {r['batch_size']}: {r['augmentation_ms']:.2f} ms of a "
        f"{r['step_ms']:.2f} ms step = {100 * r['fraction_of_step']:.1f}% (step fed made views: "
        f"{r['step_fed_views_ms']:.2f} ms); kernels "
        + (f"{r['kernel_ms']:.2f} ms on the device" if r["kernel_ms"] is not None else "- (CUDA only)")
        + f"; alone between syncs {r['views_alone_ms']:.2f} ms"))
    results.section("knn", lambda: time_knn(base, device, args.tiny), lambda r: (
        f"kNN k={r['k']}, {r['n_train']} x {r['dim']} vs {r['n_test']}: {r['seconds']:.3f} s"))
    results.section("profile", lambda: profile_steps(default, device), lambda r: (
        f"profile of {r['steps']} default steps, by {r['sort_by']}:\n{r['table']}"))
    default = None
    free_memory(device)
    default_cfg = next(rung.cfg for rung in rungs(base, 0) if rung.name == DEFAULT_RUNG)
    results.section("kernels", lambda: count_kernels.count_step(default_cfg, device, args.compile_backend,
                                                                args.compile_backend), count_kernels.format_report)
    free_memory(device)  # the reference bench needs the device to itself
    if args.reference:
        results.section("reference", lambda: run_reference(args, device, say), lambda r: (
            f"reference failed: {r['error']}" if "error" in r else
            f"reference vs harness: harness {r['speedup_harness_over_reference']:.2f}x the reference's images/s"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    if args.tiny:
        args.steps = min(args.steps, 2)
    problem = check_args(args)
    try:
        device = ab.resolve_device(ab.Config(device=args.device))
        if not problem:
            ab.check_writable(args.out, "--out")
    except ab.HarnessError as error:
        problem = problem or str(error)
    if problem:
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 1
    count_kernels.quiet_profiler(device)
    base = ab.Config(device=device.type)
    if args.tiny:
        base = dataclasses.replace(base, width=8, batch_size=32, compile_warmup_steps=1)
    args.big_batch = (2 * base.batch_size if args.tiny else 1024) if args.batch_1024 else 0
    results = Results(args.out, dict(
        format="airbench-ssl-gpu-check/1", argv=argv, status="starting",
        settings=dict(tiny=args.tiny, device=device.type, arch=base.arch, width=base.width,
                      batch_size=base.batch_size, steps=args.steps, compile_backend=args.compile_backend,
                      big_batch=args.big_batch or None, reference=args.reference)))
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    # tiny steps gain nothing from a second thread, and on a shared CPU OpenMP's spinning made them ~30x slower
    torch.set_num_threads(1 if args.tiny else threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as airbench_ssl.train_run sets it
    try:
        run_sections(args, device, base, results)
        finish(results, args, "complete")
    except KeyboardInterrupt:
        finish(results, args, f"interrupted during {results.report['status'].removeprefix('running ')}")
        print(f"gpu_check: interrupted; what finished is in {args.out}/gpu_check.json", file=sys.stderr)
        return 130
    except ab.HarnessError as error:
        finish(results, args, f"stopped: {error}")
        print(f"gpu_check: error: {error}; see {args.out}/gpu_check.json", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
    return 0


def finish(results: Results, args: argparse.Namespace, status: str) -> None:
    results.report["status"] = status
    failed = [name for name, value in results.report.items() if isinstance(value, dict) and "error" in value]
    failed += [f"ladder: {rung['name']}" for rung in results.report.get("ladder", []) if "error" in rung]
    results.report["failed"] = failed
    results.say(f"{status}; {'failed: ' + ', '.join(failed) if failed else 'nothing failed'}; "
                f"{time.perf_counter() - results.start:.0f} s; wrote {args.out}/gpu_check.json and gpu_check.txt")
    results.save()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a `timeout` or scheduler's SIGTERM: keep the file and say where it stopped


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
