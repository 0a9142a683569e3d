"""Count what one warmed training step launches, part by part: augmentation, forward, loss, backward, optimizer.

    python tools/count_kernels.py                               # the default config on this machine's device
    python tools/count_kernels.py --tiny --compile on           # width 8, batch 32, the compiled path on a CPU
    python tools/count_kernels.py --config my_trick.json --json counts.json

The step is the harness's own: Trainer.views, then Trainer.update, its calls to the model, to optimizer.zero_grad and
to optimizer.step marking where one part ends and the next begins (loss: between the model's output and zero_grad;
backward: from zero_grad to step). Each part runs in its own torch.profiler session, the device synchronised at each
boundary, so every kernel is counted in the part that launched it. Three steps on one batch: the first compiles
(untimed, uncounted but for what it compiles), the second settles autotuning, the third is counted.

How each number is obtained:
  ops        operator calls: aten:: events of the profiler (CPU activity) that no other aten:: event encloses, so an
             operator's own inner calls (to -> _to_copy -> copy_, contiguous -> clone -> copy_) count once; in a
             compiled part, the operators its generated code still calls (convolutions, matmuls, fallbacks)
  launching  of those, the calls that start at least one kernel: an operator whose events, its own and those it
             encloses, are all views, reshapes or allocations (view, expand, select, empty_strided, ...) starts none
  generated  kernels inductor generated for the part when it compiled: torch._inductor.metrics.
             generated_kernel_count read at the part's boundaries during the first step (see compiled_afresh for
             inductor's caches). On CUDA one Triton kernel each. On a CPU, C++ loop nests: the count less one per
             outer-loop fusion, which inductor counts besides the nests inside it (metrics.
             cpp_outer_loop_fused_inner_counts); inductor puts all of a graph's nests into one C++ function, so its
             runtime calls are no kernels to count
  graphs     graphs dynamo compiled for the part in the first step; the two later ones must compile none (recompiles)
  per view   the augmentation's calls and device kernels over the views; its generated kernels as they are, since
             the first view compiles them and every view runs them all
  device     CUDA only: the profiler's device kernels of the counted step (memcpy and memset apart) and their summed
             GPU time
On a CPU the operator counts are those a GPU runs (the same code path, bf16 and channels_last as --bf16 and
--channels-last say), but for the optimizer: SGD's loop over the parameters here, its fused multi-tensor kernels on
CUDA. Counts do not depend on width or batch size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/count_kernels.py)

PARTS = ("augmentation", "forward", "loss", "backward", "optimizer")
# operators that start no kernel: views, reshapes and allocations (a copying reshape or contiguous encloses a copy)
NO_KERNEL = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "view_as", "as_strided", "expand", "expand_as", "unsqueeze",
    "squeeze", "select", "slice", "narrow", "unbind", "split", "split_with_sizes", "chunk", "tensor_split", "t",
    "numpy_T", "transpose", "permute", "movedim", "flatten", "unflatten", "broadcast_tensors", "detach", "alias",
    "lift_fresh", "resolve_conj", "resolve_neg", "contiguous", "to", "empty", "empty_strided", "empty_like",
    "new_empty", "new_empty_strided", "diagonal", "set_"))


def quiet_profiler(device: torch.device) -> None:
    """Without a GPU, the profiler's tracing library logs that its GPU query failed (`ERROR ... gpuGetDeviceCount
    failed with code 35`, CUDA's "insufficient driver") and traces its start and stop: noise, since it has no GPU
    to trace. Silenced on CPU runs (before the first profiler session); on a GPU its messages mean something."""
    if device.type == "cpu":
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above its highest level: nothing


def start_profiler(device: torch.device) -> profile:
    """A torch.profiler session of CPU and (on CUDA) device activity, started; the caller ends it (__exit__)."""
    session = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    with warnings.catch_warnings():  # torch 2.11 warns that a session's events end with it: they are read before
        warnings.filterwarnings("ignore", ".*Profiler clears events")
        session.__enter__()
    return session


def is_op(event: Any) -> bool:
    return event.name.startswith("aten::")


def enclosed(event: Any) -> Iterator[Any]:
    yield event
    for child in event.cpu_children:
        yield from enclosed(child)


def summarize(events: list) -> dict:
    """One part's profiler events -> its counts (see the module docstring)."""
    def top_level(event: Any) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if is_op(parent):
                return False
            parent = parent.cpu_parent
        return True

    ops = [e for e in events if is_op(e) and top_level(e)]
    launching = [e for e in ops if any(is_op(x) and x.name not in NO_KERNEL for x in enclosed(e))]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    return dict(ops=len(ops), launching=len(launching),
                launching_by_name=dict(Counter(e.name for e in launching).most_common()),
                device_kernels=len(kernels) if device else None, device_copies=len(device) - len(kernels),
                device_ms=sum(e.time_range.elapsed_us() for e in kernels) / 1000 if device else None)


def compile_stats() -> tuple[int, int]:
    """-> (inductor's generated kernels, dynamo's compiled graphs), both counted since the process started."""
    from torch._dynamo.utils import counters
    from torch._inductor import metrics
    kernels = metrics.generated_kernel_count - len(metrics.cpp_outer_loop_fused_inner_counts)
    return kernels, counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def compiled_afresh(device: torch.device) -> Iterator[None]:
    """Each part's kernels counted where they are generated: no autograd-cache hit loading a backward together with
    its forward, and on a CPU no graph-cache hit (it restores generated_kernel_count, not the outer-loop fusions the
    count is corrected for). Inductor's compiler caches (C++, Triton) stay: they spare compilers, not counts."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    with (inductor_config.patch(fx_graph_cache=device.type != "cpu" and inductor_config.fx_graph_cache),
          functorch_config.patch(enable_autograd_cache=False)):
        yield


class PartSessions:
    """Runs the parts of a step one after another, each in a profiler session of its own (profiled=True) and with
    the kernels and graphs compiled during it counted: switch(part) ends the running part and starts the next."""

    def __init__(self, device: torch.device, profiled: bool):
        self.device, self.profiled, self.part, self.session = device, profiled, None, None
        self.seen: list[str] = []
        self.results: dict[str, dict] = {}

    def switch(self, part: str | None) -> None:
        ab.synchronize(self.device)  # the part's kernels have all run: none is left for the next part's session
        generated, graphs = compile_stats()
        if self.part is not None:
            result = dict(generated=generated - self.start[0], graphs=graphs - self.start[1])
            if self.session is not None:
                self.session.__exit__(None, None, None)
                result.update(summarize(list(self.session.events())))
                self.session = None
            self.results[self.part] = result
        self.part, self.start = part, (generated, graphs)
        if part is None:
            return
        self.seen.append(part)
        if self.profiled:
            self.session = start_profiler(self.device)

    def close(self) -> None:
        """End a step: its last part, or one cut short by an error (its session must not stay open)."""
        if self.session is not None:
            self.session.__exit__(None, None, None)
            self.session = None
        self.part = None


@contextlib.contextmanager
def marked_update(trainer: ab.Trainer, sessions: PartSessions) -> Iterator[None]:
    """Trainer.update as it is, its calls to the model, optimizer.zero_grad and optimizer.step switching the part."""
    forward, optimizer = trainer.forward, trainer.optimizer
    zero_grad, step = optimizer.zero_grad, optimizer.step

    def marked_forward(*args: Any, **kwargs: Any) -> Any:
        sessions.switch("forward")
        out = forward(*args, **kwargs)
        sessions.switch("loss")
        return out

    def marked(part: str, method: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            sessions.switch(part)
            return method(*args, **kwargs)
        return call

    trainer.forward = marked_forward
    optimizer.zero_grad, optimizer.step = marked("backward", zero_grad), marked("optimizer", step)
    try:
        yield
    finally:
        trainer.forward = forward
        del optimizer.zero_grad, optimizer.step  # the instance's own attributes: the class's methods show again


def backend_problem(backend: str) -> str | None:
    """-> why `backend` is not a torch.compile backend, or None."""
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend in backends:
        return None
    return f"--compile-backend {backend!r} is not a torch.compile backend; choose one of {', '.join(backends)}"


def recompile(trainer: ab.Trainer, model_backend: str, augment_backend: str, mode: str | None = None) -> None:
    """The compiled Trainer's own torch.compile calls again, for the model and for the augmentation, with another
    backend or a mode (what is left at inductor and no mode keeps the Trainer's own compile)."""
    options = dict(dynamic=False, **({"mode": mode} if mode else {}))
    if model_backend != "inductor" or mode:
        trainer.forward = torch.compile(trainer.model, backend=model_backend, **options)
    if augment_backend != "inductor" or mode:
        trainer.augment = torch.compile(ab.apply_augment, backend=augment_backend, **options)


def run_step(trainer: ab.Trainer, images: torch.Tensor, generator: torch.Generator, profiled: bool) -> dict:
    """One training step, part by part -> {part: counts}; the augmentation's also says how many views it made."""
    sessions = PartSessions(trainer.device, profiled)
    try:
        sessions.switch("augmentation")
        views = trainer.views(images, generator)
        with marked_update(trainer, sessions):
            trainer.update(views)
        sessions.switch(None)
        sessions.results["augmentation"]["views"] = len(views)
    finally:
        sessions.close()
    if tuple(sessions.seen) != PARTS:
        raise RuntimeError(f"Trainer.update ran its parts as {sessions.seen}, not {list(PARTS)}: count_kernels.py "
                           "marks them by its calls to the model, optimizer.zero_grad and optimizer.step")
    return sessions.results


def count_step(cfg: ab.Config, device: torch.device, compile_backend: str = "inductor",
               augment_backend: str = "inductor") -> dict:
    """Build the harness's Trainer for cfg, run three steps on one batch of random images -> the report: per part,
    the counts of the third step and what the first compiled; per view and per step totals."""
    quiet_profiler(device)
    torch._dynamo.reset()  # compiled code of an earlier Trainer would be reused: nothing would count as generated
    torch.manual_seed(cfg.seed)
    trainer = ab.Trainer(cfg, device, cfg.batch_size)
    if trainer.compiled:
        recompile(trainer, compile_backend, augment_backend)
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8, device=device,
                           generator=generator)
    with compiled_afresh(device):
        first = run_step(trainer, images, generator, profiled=False)
    second = run_step(trainer, images, generator, profiled=False)
    counted = run_step(trainer, images, generator, profiled=True)
    parts = {part: dict(counted[part], generated=first[part]["generated"], graphs=first[part]["graphs"],
                        recompiles=second[part]["graphs"] + counted[part]["graphs"]) for part in PARTS}
    n_views = parts["augmentation"]["views"]
    total = {key: sum(p[key] for p in parts.values()) if parts["forward"][key] is not None else None
             for key in ("ops", "launching", "generated", "graphs", "recompiles", "device_kernels", "device_ms")}
    # the first view compiles the augmentation's graphs and every view runs all of them: its generated kernels are
    # each view's; the calls and device kernels counted are all the views'
    per_view = {key: parts["augmentation"][key] / n_views if parts["augmentation"][key] is not None else None
                for key in ("ops", "launching", "device_kernels", "device_ms")}
    per_view["generated"] = parts["augmentation"]["generated"]
    return dict(format="airbench-ssl-kernel-count/1", harness=os.path.realpath(ab.__file__),
                torch=torch.__version__, device=device.type, compiled=trainer.compiled, bf16=trainer.bf16,
                channels_last=trainer.memory_format == torch.channels_last,
                compile_backend=compile_backend if trainer.compiled else None,
                augment_compiled=trainer.augment is not ab.apply_augment,
                config=dict(arch=cfg.arch, width=cfg.width, batch_size=cfg.batch_size, n_views=n_views),
                parts=parts, per_view=per_view, step=total)


def format_report(report: dict) -> str:
    cell = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    header = f"{'part':<14} {'ops':>6} {'launching':>9} {'generated':>9} {'graphs':>6} {'device kernels':>14} " \
             f"{'device ms':>9}"
    rows = [(name, report["parts"][name]) for name in PARTS] + [("step", report["step"])]
    lines = [f"harness {report['harness']}, torch {report['torch']}, {report['device']}; compiled "
             f"{report['compiled']} (backend {report['compile_backend']}, augmentation compiled "
             f"{report['augment_compiled']}), bf16 {report['bf16']}, channels_last {report['channels_last']}; "
             f"{report['config']['arch']} width {report['config']['width']}, batch {report['config']['batch_size']},"
             f" {report['config']['n_views']} views", header]
    for name, row in rows:
        lines.append(f"{name:<14} {row['ops']:>6} {row['launching']:>9} {row['generated']:>9} {row['graphs']:>6} "
                     f"{cell(row['device_kernels'], 'd'):>14} {cell(row['device_ms'], '.3f'):>9}")
    view = report["per_view"]
    lines.append(f"{'per view':<14} {view['ops']:>6g} {view['launching']:>9g} {view['generated']:>9g} {'':>6} "
                 f"{cell(view['device_kernels'], 'g'):>14} {cell(view['device_ms'], '.3f'):>9}")
    if report["step"]["recompiles"]:
        lines.append(f"WARNING: {report['step']['recompiles']} graph(s) compiled again after the first step")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="", help="JSON file of harness field overrides, as airbench_ssl.py's")
    parser.add_argument("--tiny", action="store_true", help="width 8, batch 32 (the counts are the same)")
    parser.add_argument("--width", type=int, default=None, help="model width (None: the config's)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (None: the config's)")
    for name in ("compile", "bf16", "channels_last"):
        parser.add_argument("--" + name.replace("_", "-"), choices=ab.TRISTATE, default="auto",
                            help="as the harness's field (auto = on for CUDA)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the model (the "
                        "augmentation keeps inductor's: on a CPU, 'eager' spares the model's minutes of C++)")
    parser.add_argument("--json", default="", help="also write the report here")
    return parser


def config_from(args: argparse.Namespace) -> ab.Config:
    """Harness defaults <- --config <- flags, validated by the harness (raises HarnessError)."""
    values = ab.read_config_file(args.config) if args.config else {}
    values.update(compile=args.compile, bf16=args.bf16, channels_last=args.channels_last, device=args.device)
    if args.tiny:
        values.update(width=8, batch_size=32)
    for name in ("width", "batch_size"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    cfg = ab.Config(**values)
    ab.validate_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from(args)
        device = ab.resolve_device(cfg)
        if problem := backend_problem(args.compile_backend):
            raise ab.HarnessError(problem)
        if args.json:
            ab.check_writable(os.path.dirname(os.path.abspath(args.json)), "--json's folder")
    except ab.HarnessError as error:
        print(f"count_kernels: error: {error}", file=sys.stderr)
        return 1
    report = count_step(dataclasses.replace(cfg, device=device.type), device, args.compile_backend)
    print(format_report(report))
    if args.json:
        ab.write_atomic(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
