"""Records proven by recomputation: a run's kNN accuracy recomputed from its saved model, its epoch times held
against the GPU's peak rate, and a record re-run from its logged source.

    python tools/verify.py check logs/RUN.json [...] --data-dir DIR     # recompute each run's accuracy at stop
    python tools/verify.py reproduce records/DATE_Name --runs 3         # re-run a record on a GPU, compare (Welch)
    python tools/verify.py reproduce records/DATE_Name --dry-run --data-dir DIR   # on a CPU: does its source run?

A library first (tools/leaderboard.py's `verify`, `reproduce` and `add --models` call it); every refusal is a
VerifyError (a HarnessError) whose message starts with the name of the failed check.

API
  load_artefact(path, expected=None) -> Artefact
      The model file `<run_id>.model.pt` the harness writes beside its log, read safely: "weights" with torch.load
      (weights_only=True), checked to be exactly the state_dict of ab.CifarResNet(arch, width) (names, shapes,
      dtypes, finite) and loaded strictly; "export" (torch.export) only after the archive's JSON shows nothing but
      standard aten operators, no guard code and plain shape expressions, loaded with every pickle forced through
      the weights-only unpickler (torch.export.load alone runs code from a crafted file), then its graph checked
      again (aten operators only, no random operators, no state mutation). `expected` = log["model"]: the file's
      size and sha256 must match it. The bytes hashed are the bytes loaded.
  artefact_path(log, log_path=None, models_dir=None) -> str: where the run's model file is (beside its log, or
      in models_dir).
  read_log(path) -> dict: a run's JSON log (bounded, no NaN).
  verify_run(log, data=None, data_dir="", device="auto", model_path=None, models_dir=None, require_official=False)
      -> Verification
      Recomputes the run's kNN at stop in this process with the harness's own functions (ab.extract_features,
      ab.knn_accuracy; config knn_k, eval_batch_size, train_subset from the log; never the logged source), in fp32
      with TF32 off (on a GPU, if that does not match, again with the default numerics the harness's checks use:
      TF32 convolutions), and refuses (VerifyError) when: the log names no model or another file ("model file"), the
      file is unsafe or damaged ("artefact"), an epoch is faster than physics allows ("time floor"), the data
      differ from the run's ("data"), a feature depends on the rest of its batch ("batch independence"), the
      backbone changes its own state ("state"), or the accuracy differs by more than ACCURACY_TOLERANCE_PCT
      ("accuracy"). Pass `data` (from load_data) to share one data load between runs.
  load_data(data_dir="", device="cpu") -> dict: ab.load_cifar10 without download.
  check_time_floor(log, backbone) -> TimeFloor: the FLOP floor alone ("time floor" refusals).
  gpu_peak(gpu_name) -> (GpuPeak, known: bool); forward_flops(backbone, px) -> int.
  check_state_unchanged(backbone, work) -> work(), refused ("state") if it changed the backbone's weights or buffers.
  check_program(exported_program, path) -> None: the graph checks of an export ("artefact" refusals).
  check_launch_command(log) -> None: the run was launched as the harness itself ("launch command").
  read_record_logs(folder) -> list[dict]: the logs a record folder lists in record.json (not validated).
  reproduce(logs, folder, runs=3, dry_run=False, data_dir="", seeds=None, timeout_s=None) -> Reproduction
      Writes the logged source (and config file) into the new folder `folder`, runs `python airbench_ssl.py
      <logged argv>` `runs` times with fresh seeds, and compares time to target and kNN at stop with the record's
      runs (Welch) by judge(...). Without a CUDA GPU it refuses ("reproduce") unless dry_run: one tiny CPU run of
      the logged source that proves it runs. data_dir "" = the folder this checkout's harness finds.
  judge(statuses, times, knns, record_times, record_knn, gpu, record_gpu, runs) -> (time Welch, kNN Welch,
      reproduces, verdict line): every run reached the target on the record's GPU model, and the mean time to
      target is not both REPRODUCE_TIME_MARGIN (5 %) slower and significantly slower (Welch p < 0.05).
  Verification.summary() -> one line; Verification.as_dict() -> JSON-ready dict (for a record).
Long steps show the harness's progress counter (ab.counted) on a terminal only.

Tolerances (the reasons are beside the constants): accuracy 0.1 points, batch independence 1e-3 of the feature
norm. The floor: an epoch's training FLOPs (trained images x views x 3 x forward FLOPs of one view, counted by
torch.utils.flop_counter on the verified backbone) divided by the GPU's fastest dense tensor rate at any precision
times the number of GPUs; an epoch faster than that is impossible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import operator
import os
import re
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stats  # noqa: E402

import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/verify.py)

ARTEFACT_FORMAT = "airbench-ssl-model/1"
ARTEFACT_FORMATS = ("weights", "export")
MAX_ARTEFACT_BYTES = 2**31  # a width-64 ResNet50 is ~100 MB; anything near this bound is not a CIFAR backbone
MAX_ARCHIVE_JSON_BYTES = 256 * 2**20
MAX_LOG_BYTES = 64 * 2**20
MAX_FEATURE_DIM = 1 << 16
LAUNCH_SCRIPT = "airbench_ssl.py"
T = TypeVar("T")

# 0.1 points = 10 of the 10,000 test images. Recomputation is not bit-exact across machines: another GPU or the CPU
# sums in another order, and a test image whose 10th and 11th neighbours are nearly equally close, or whose vote is
# tied, can change its prediction. Measured on the 10,000 test vs 50,000 train images with an untrained ResNet18
# (width 16): a pessimistic case, its features crowd together (kNN 32%), so near-ties abound. fp32 in batches of 1000
# vs 1024: identical predictions; an image alone vs in a batch: 3e-7 of the feature norm apart. Features moved by
# 1e-4 of their norm: 46 predictions flip, accuracy +0.01 points; by 1e-3: 369 flip, -0.16 points. TF32 (every
# convolution's inputs rounded to 10 mantissa bits, emulated on the CPU) vs fp32: features 4.6e-4 apart (median),
# 168 flips, -0.20 points. So 0.1 points holds between fp32 evaluations (~1e-6 apart) with a wide margin, but not
# between TF32 and fp32: verify recomputes in fp32 and, on a GPU, also with the default TF32 convolutions that the
# harness's kNN checks use unless they turn TF32 off.
ACCURACY_TOLERANCE_PCT = 0.1
# Features of an image computed alone, in another batch, or in the canonical batches must agree within this fraction
# of the feature norm. In fp32 (TF32 off) batch compositions differ only by summation order and algorithm choice:
# measured on a CPU, 3e-7 (ResNet18 width 16, real images) and 1e-6 (width 4, the tests' data); batch statistics or
# cross-image mixing move features by O(1). 1e-3 leaves fp32 numerics a margin of 1000 and refuses any batch signal
# large enough to move kNN decisions by more than the accuracy tolerance allows.
BATCH_TOLERANCE = 1e-3
ALONE_SAMPLE = 64  # images whose features are also computed in a batch of one
MIXED_TRAIN_FRACTION = 0.1  # train images mixed into the reshuffled pass over all test images
# What an exported graph may call besides aten operators: indexing and integer arithmetic on symbolic sizes.
EXPORT_OPERATORS = {f"_operator.{f.__name__}": f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg)}
# aten operators whose output is random: features must be a function of the image alone.
RANDOM_OPS = re.compile(r"(rand|randn|randint|randperm|rand_like|randn_like|randint_like|bernoulli|multinomial|normal|"
                        r"poisson|dropout|native_dropout|feature_dropout|alpha_dropout|feature_alpha_dropout|uniform|"
                        r"exponential|geometric|cauchy|log_normal|random|rrelu|rrelu_with_noise)_?")
# The names a plain torch.export shape expression uses: sympy's Symbol and the integer functions of torch's shape
# language. Anything else (attributes, strings, dunders) could make sympify, which evaluates text, run code.
SHAPE_SYMBOL = re.compile(r"Symbol\('[a-z]+\d+'(?:, (?:positive|integer|nonnegative)=(?:True|False))*\)")
SHAPE_FUNCTIONS = frozenset({"Mod", "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "Max", "Min", "Integer",
                             "IntTrueDiv", "TruncToInt", "ModularIndexing", "PowByNatural", "Identity"})
SHAPE_EXPRESSION = re.compile(r"[A-Za-z][A-Za-z0-9]*|\d+|[-+*/%(), ]")


class VerifyError(ab.HarnessError):
    """A refusal: `check` names what failed; str() is 'check: reason'."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


#############################################
#              Model artefacts              #
#############################################
@dataclasses.dataclass
class Artefact:
    """A loaded model file: the backbone (CPU, fp32, eval mode) and what identifies the file."""

    path: str
    format: str  # "weights" or "export"
    backbone: nn.Module
    arch: str | None  # weights only: the CifarResNet it fits
    width: int | None
    sha256: str
    bytes: int


class ExportedBackbone(nn.Module):
    """An exported program as a backbone. ep.module() raises on .eval() and .train() (torch 2.11 and 2.14), and the
    program has no modes to switch (the harness exports the backbone in eval mode): these set only the flag, so the
    harness's extract_features can call them."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> ExportedBackbone:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _refuse(path: str, reason: str) -> VerifyError:
    return VerifyError("artefact", f"{path}: {reason}")


def _torch_load_reason(error: Exception) -> str:
    """torch's refusal in our words: its message advises reloading with weights_only=False, advice never passed on."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        return f"it holds a Python object ({found.group(1)}), not only tensors; refused unread"
    return "not a file torch.save wrote (or a damaged one)"


def _load_weights(raw: bytes, path: str) -> tuple[nn.Module, str, int]:
    try:
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file raises almost anything
        raise _refuse(path, _torch_load_reason(error)) from None
    if not isinstance(saved, dict) or saved.get("format") != ARTEFACT_FORMAT or saved.get("kind") != "weights":
        raise _refuse(path, f"not an airbench-ssl weights file (no format {ARTEFACT_FORMAT!r}, kind 'weights')")
    unknown = sorted(map(str, set(saved) - {"format", "kind", "arch", "width", "run_id", "state_dict"}))
    if unknown:
        raise _refuse(path, f"unexpected entries {unknown}")
    arch, width, state = saved.get("arch"), saved.get("width"), saved.get("state_dict")
    try:
        ab.validate_config(dataclasses.replace(ab.Config(), arch=arch, width=width))
    except ab.HarnessError as error:
        raise _refuse(path, str(error)) from None
    if not isinstance(state, dict):
        raise _refuse(path, f"its state_dict is {type(state).__name__}, not a dict")
    with torch.device("meta"):  # a file claiming a huge model allocates nothing
        expected = ab.CifarResNet(arch, width).state_dict()
    missing, extra = [k for k in expected if k not in state], [str(k) for k in state if k not in expected]
    if missing or extra:
        raise _refuse(path, f"weights do not fit {arch} width {width}: {len(missing)} missing (first: {missing[:1]}),"
                            f" {len(extra)} unexpected (first: {extra[:1]})")
    for name, want in expected.items():
        got = state[name]
        if type(got) is not torch.Tensor or got.shape != want.shape or got.dtype != want.dtype:
            found = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise _refuse(path, f"{name} is {found}, expected a plain tensor {tuple(want.shape)} {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise _refuse(path, f"{name} holds NaN or infinite values")
    backbone = ab.CifarResNet(arch, width)
    backbone.load_state_dict(state, strict=True)
    return backbone.eval(), arch, width


def _json_dicts(obj: Any) -> Iterator[dict]:
    """Every dict inside obj (obj too), depth first."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
            yield item
        elif isinstance(item, list):
            stack.extend(item)


def shape_expression_problem(text: str) -> str | None:
    """-> why this sympy text is not a plain shape expression, or None. sympify evaluates it as Python."""
    rest = SHAPE_SYMBOL.sub("S", text)
    tokens = SHAPE_EXPRESSION.findall(rest)
    if "".join(tokens) != rest or "**" in rest:  # a power of powers would keep sympy busy for ever
        return f"shape expression {text[:80]!r} has characters outside a plain expression"
    names = {t for t in tokens if t[0].isalpha()} - SHAPE_FUNCTIONS - {"S"}
    return f"shape expression {text[:80]!r} uses {sorted(names)[0]!r}" if names else None


def _check_export_archive(raw: bytes, path: str) -> None:
    """The archive's graph as JSON, before torch reads it: torch.export.load evaluates shape expressions with sympy
    (Python's eval), ep.module() executes the file's guard code, and the loader unpickles constants without the
    weights-only unpickler. Only what an honest export of a backbone holds is let through."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        models = [i for i in archive.infolist() if re.fullmatch(r"[^/]+/models/[^/]+\.json", i.filename)]
    except (zipfile.BadZipFile, ValueError, OSError):
        raise _refuse(path, "not a torch.export archive (not a zip file)") from None
    if len(models) != 1 or not models[0].filename.endswith("/models/model.json"):
        raise _refuse(path, f"not a torch.export archive of one program (models: {[i.filename for i in models]})")
    if models[0].file_size > MAX_ARCHIVE_JSON_BYTES:
        raise _refuse(path, f"its program description is {models[0].file_size:,} bytes")
    try:
        program = json.loads(archive.read(models[0]))
    except (ValueError, RecursionError, zipfile.BadZipFile, OSError, RuntimeError):  # RuntimeError: encrypted entry
        raise _refuse(path, "its program description is not readable JSON") from None
    if not isinstance(program, dict):
        raise _refuse(path, "its program description is not a JSON object")
    if program.get("guards_code"):
        raise _refuse(path, "it carries guard code (Python run on every call); the harness's export has none")
    try:
        dicts = list(_json_dicts(program))
    except RecursionError:
        raise _refuse(path, "its program description is nested too deeply") from None
    for item in dicts:
        if {"target", "inputs", "outputs"} <= set(item):  # a graph node
            target = item["target"]
            if not isinstance(target, str) or not (target.startswith("torch.ops.aten.") or target in EXPORT_OPERATORS):
                raise _refuse(path, f"it calls {str(target)[:80]!r}: only standard aten operators are allowed")
        if "expr_str" in item:
            text = item["expr_str"]
            problem = shape_expression_problem(text) if isinstance(text, str) else "a shape expression is not text"
            if problem:
                raise _refuse(path, problem)
        for key in ("as_custom_obj", "as_graph"):
            if key in item:
                raise _refuse(path, f"it holds a {key[3:].replace('_', ' ')}: only tensors and aten operators are "
                                    "allowed")


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Every torch.load inside, even one that asks for weights_only=False, uses the weights-only unpickler."""
    saved = {name: os.environ.pop(name, None) for name in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                          "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _argument(node: torch.fx.Node, name: str) -> Any:
    """The value a call passes for the named argument of its operator's schema (its default when not passed)."""
    arguments = node.target._schema.arguments
    index = [argument.name for argument in arguments].index(name)
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, arguments[index].default_value)


def aten_call_problem(node: torch.fx.Node) -> str | None:
    """-> why this aten call cannot be part of an evaluation backbone, or None."""
    schema = node.target._schema
    names = {argument.name for argument in schema.arguments}
    if RANDOM_OPS.fullmatch(schema.name.split("::")[-1]) and not ("train" in names and _argument(node, "train") is
                                                                  False):  # eval-mode dropout: the identity
        return f"calls the random operator {node.target}: features must depend on the image alone"
    for flag in ("training", "use_input_stats"):  # batch norm in training mode, instance norm: batch statistics
        if flag in names and _argument(node, flag) is not False:
            return f"calls {node.target} with {flag}={_argument(node, flag)}: statistics of the batch, not the image"
    for argument in schema.arguments:
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = _argument(node, argument.name)
            if isinstance(value, torch.fx.Node) and value.op == "placeholder":
                return f"writes into {value.name} ({node.target}): its state would change between calls"
    return None


def check_program(program: torch.export.ExportedProgram, path: str) -> None:
    """The loaded graph: aten operators (none random) and integer arithmetic only, no higher-order operators or
    submodules, one image batch in and one feature batch out, and nothing mutated (no state between calls)."""
    from torch.export.graph_signature import InputKind, OutputKind

    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        target = node.target
        if node.op != "call_function":
            raise _refuse(path, f"its graph has a {node.op} node ({str(target)[:80]}): only operator calls allowed")
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            problem = aten_call_problem(node)
            if problem:
                raise _refuse(path, f"it {problem}")
        elif target not in EXPORT_OPERATORS.values():
            raise _refuse(path, f"it calls {getattr(target, '__name__', target)!r}: only standard aten operators "
                                "are allowed")
    signature = program.graph_signature
    kinds = [spec.kind for spec in signature.input_specs]
    allowed = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR, InputKind.USER_INPUT}
    if kinds.count(InputKind.USER_INPUT) != 1 or not set(kinds) <= allowed:
        raise _refuse(path, f"its inputs are {sorted({k.name for k in kinds})}: expected one image batch, weights and "
                            "buffers")
    outputs = [spec.kind for spec in signature.output_specs]
    if outputs != [OutputKind.USER_OUTPUT]:
        raise _refuse(path, f"its outputs are {[k.name for k in outputs]}: expected one feature batch and no "
                            "mutated state")


def _load_export(raw: bytes, path: str) -> nn.Module:
    _check_export_archive(raw, path)
    try:
        with _weights_only_unpickling(), warnings_quiet():
            program = torch.export.load(io.BytesIO(raw))
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file raises almost anything
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        if "weights_only" in reason.lower() or "GLOBAL" in str(error):
            reason = _torch_load_reason(error)
        raise _refuse(path, f"torch.export cannot load it: {reason}") from None
    check_program(program, path)
    return ExportedBackbone(program.module()).eval()


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    """torch.export.load warns about read-only buffers (2.11): noise for a reader of verify's one-line results."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def load_artefact(path: str, expected: dict | None = None) -> Artefact:
    """A model file -> Artefact, refused with VerifyError('artefact' or 'model file', ...) when it is not exactly
    what the harness writes. expected = the log's `model` entry: the format, size and sha256 must match it."""
    try:
        size = os.stat(path).st_size
        if not os.path.isfile(path):
            raise _refuse(path, "not a regular file")
        if size > MAX_ARTEFACT_BYTES:
            raise _refuse(path, f"{size:,} bytes: larger than any CIFAR backbone")
        with open(path, "rb") as f:
            raw = f.read(MAX_ARTEFACT_BYTES + 1)
    except OSError as error:
        raise VerifyError("model file", f"cannot read {path}: {error.strerror or error}") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if expected is not None:
        if expected.get("sha256") != sha256 or expected.get("bytes") != len(raw):
            raise VerifyError("model file", f"{path} is not the file the run saved: sha256 {sha256[:16]}..., "
                                            f"{len(raw):,} bytes; the log says {str(expected.get('sha256'))[:16]}..., "
                                            f"{expected.get('bytes')} bytes")
        kind = expected.get("format")
    else:
        try:
            kind = "export" if any(n.endswith("/archive_format") for n in zipfile.ZipFile(io.BytesIO(raw)).namelist()) \
                else "weights"
        except (zipfile.BadZipFile, ValueError, OSError):
            kind = "weights"  # torch.load names the problem
    if kind not in ARTEFACT_FORMATS:
        raise VerifyError("model file", f"the log's model format {kind!r} is none of {', '.join(ARTEFACT_FORMATS)}")
    arch = width = None
    if kind == "weights":
        backbone, arch, width = _load_weights(raw, path)
    else:
        backbone = _load_export(raw, path)
    probe_features(backbone, path)
    return Artefact(path=path, format=kind, backbone=backbone, arch=arch, width=width, sha256=sha256, bytes=len(raw))


@torch.no_grad()
def probe_features(backbone: nn.Module, path: str) -> None:
    """Two random images in, (2, D) float features out, or a one-line refusal."""
    try:
        out = backbone(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    except Exception as error:  # noqa: BLE001 - whatever the program does wrong
        raise _refuse(path, f"it fails on a batch of images: {(str(error).splitlines() or [''])[0][:160]}") from None
    if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 2 and out.is_floating_point()
            and 0 < out.shape[1] <= MAX_FEATURE_DIM):
        found = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise _refuse(path, f"it maps 2 images to {found}, not (2, D) float features")


def artefact_path(log: dict, log_path: str | None = None, models_dir: str | None = None) -> str:
    """Where the run's model file is: log["model"]["file"] in models_dir, else beside the log."""
    model = log.get("model")
    if not isinstance(model, dict):
        raise VerifyError("model file", "the run saved no model (save_model false, an older harness, or it did not "
                                        "finish): nothing to recompute its accuracy from")
    name, run_id = model.get("file"), log.get("run_id")
    if not isinstance(name, str) or name != f"{run_id}.model.pt":
        raise VerifyError("model file", f"the log names the model file {str(name)[:80]!r}, not "
                                        f"'<run_id>.model.pt' ({run_id}.model.pt)")
    folder = models_dir if models_dir is not None else os.path.dirname(log_path or "")
    return os.path.join(folder, name)


def read_log(path: str) -> dict:
    """A run's JSON log: at most MAX_LOG_BYTES, standard JSON (no NaN), an object."""
    def no_constants(text: str) -> None:
        raise ValueError(f"{text} is not JSON")

    try:
        if os.path.getsize(path) > MAX_LOG_BYTES:
            raise VerifyError("log", f"{path} is larger than {MAX_LOG_BYTES:,} bytes")
        with open(path, encoding="utf-8") as f:
            log = json.load(f, parse_constant=no_constants)
    except OSError as error:
        raise VerifyError("log", f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:
        raise VerifyError("log", f"{path} is not a JSON log: {str(error)[:120]}") from None
    if not isinstance(log, dict):
        raise VerifyError("log", f"{path} is not a JSON object")
    return log


#############################################
#               The time floor              #
#############################################
@dataclasses.dataclass(frozen=True)
class GpuPeak:
    """A GPU model's fastest dense tensor-core rate at any number format (2:4 sparsity is not dense)."""

    model: str
    pattern: str  # regex on the lower-cased CUDA device name
    tflops: float
    precision: str
    source: str


# Ordered: the first pattern that matches a device name wins; the variants come before the bare model, which gets
# the faster variant's peak (a lower floor: an unclear name is never refused for being too fast).
GPU_PEAKS = (
    GpuPeak("A100", r"\ba100\b", 624.0, "INT8 (BF16 312)", "NVIDIA A100 Tensor Core GPU datasheet (SXM4 and PCIe, "
            "40 and 80 GB: same peaks), https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
            "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"),
    GpuPeak("H100 PCIe", r"\bh100\b.*\bpcie\b", 1513.0, "FP8 (BF16 756)",
            "NVIDIA H100 PCIe GPU product brief PB-11133-001_v02 and the H100 datasheet (3,026 sparse)"),
    GpuPeak("H100 NVL", r"\bh100\b.*\bnvl\b", 1671.0, "FP8 (BF16 835)", "NVIDIA H100 datasheet, H100 NVL column "
            "(3,341 sparse)"),
    GpuPeak("H100 SXM", r"\bh100\b", 1979.0, "FP8 (BF16 989)", "NVIDIA H100 datasheet, H100 SXM column (3,958 "
            "sparse); https://glennklockwood.com/garden/processors/h100 tabulates the same"),
    GpuPeak("H200 NVL", r"\bh200\b.*\bnvl\b", 1671.0, "FP8 (BF16 835)", "NVIDIA H200 datasheet, H200 NVL column "
            "(3,341 sparse)"),
    GpuPeak("H200 SXM", r"\bh200\b", 1979.0, "FP8 (BF16 989)", "NVIDIA H200 datasheet, H200 SXM column (3,958 "
            "sparse): the H100's GH100 chip"),
    GpuPeak("GB200", r"\bgb200\b", 10000.0, "FP4 (FP8 5,000, BF16 2,500)", "NVIDIA GB200 NVL72 specifications, per "
            "GPU at 1,200 W (20 PF FP4 sparse); https://glennklockwood.com/garden/processors/B200"),
    GpuPeak("B200", r"\bb200\b", 9000.0, "FP4 (FP8 4,500, BF16 2,250)", "NVIDIA HGX B200 specifications, per GPU "
            "at 1,000 W (18 PF FP4 sparse); https://glennklockwood.com/garden/processors/B200, "
            "https://hmc-tech.com/gpus/nvidia-b200-vs-nvidia-b100"),
    GpuPeak("B300", r"\bb300\b", 15000.0, "FP4 (FP8 ~7,000, BF16 ~3,500)", "third-party summary of the B300 "
            "(Blackwell Ultra) datasheet, https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html; "
            "NVIDIA's own sheet not consulted"),
    GpuPeak("L40S", r"\bl40s\b", 733.0, "FP8 (BF16 362)", "NVIDIA L40S datasheet (1,466 FP8 sparse); "
            "https://www.mullet.se/product.html?product_id=355414 reproduces its table"),
    GpuPeak("RTX 4090", r"\brtx 4090\b", 660.6, "FP8 and INT8 (BF16 165 with FP32 accumulate)",
            "NVIDIA Ada GPU Architecture whitepaper v2.01, Table 2 (1,321.2 sparse)"),
)
UNKNOWN_GPU = max(GPU_PEAKS, key=lambda peak: peak.tflops)


def gpu_peak(gpu_name: str | None) -> tuple[GpuPeak, bool]:
    """The peak table's entry for a CUDA device name -> (entry, known); an unknown GPU gets the highest known peak,
    so a GPU missing from the table is never refused for being fast."""
    name = " ".join((gpu_name or "").lower().split())
    for peak in GPU_PEAKS:
        if re.search(peak.pattern, name):
            return peak, True
    return UNKNOWN_GPU, False


@torch.no_grad()
def forward_flops(backbone: nn.Module, px: int) -> int:
    """FLOPs (2 per multiply-add, matrix products and convolutions as torch.utils.flop_counter counts them) of one
    image's forward pass at px x px. An exported program takes 32 px only: its count at 32 px is scaled by area,
    a lower bound for stride-2 stages (their outputs round up), so the floor stays on the lenient side."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(backbone.parameters()), torch.zeros(())).device
    size = 32 if isinstance(backbone, ExportedBackbone) else px
    with FlopCounterMode(display=False) as counter:
        backbone.eval()(torch.zeros(1, 3, size, size, device=device))
    return int(counter.get_total_flops() * (px * px) / (size * size))


TRAINED_VIEWS = 2  # views of each image the harness trains on: the floor's count, whatever a log's config says


@dataclasses.dataclass(frozen=True)
class TimeFloor:
    gpu_name: str | None  # as logged
    gpu: str  # its model in the peak table, or the highest-peak entry standing in for an unknown GPU
    gpu_known: bool
    peak_tflops: float
    world_size: int
    n_views: int
    trained_images_per_epoch: int
    forward_flops_32px: int
    fastest_epoch: int  # the epoch closest to its floor
    fastest_epoch_seconds: float
    fastest_floor_seconds: float

    @property
    def margin(self) -> float:  # how many times slower than the floor the closest epoch was
        return self.fastest_epoch_seconds / self.fastest_floor_seconds if self.fastest_floor_seconds else math.inf


def _int_field(obj: dict, key: str, where: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if type(value) is not int:
        raise VerifyError("log", f"{where}.{key} is {value!r}, not an integer")
    return value


def check_time_floor(log: dict, backbone: nn.Module) -> TimeFloor:
    """Every trained epoch of the log must take at least its training FLOPs / (peak x GPUs): trained images x 2
    views x 3 (forward + backward ~ 3 forwards) x the backbone's forward FLOPs at that epoch's view size. An entry
    that trains fewer pixels per image than the harness can be honestly faster: records/README.md says how it is
    judged."""
    config, environment = log.get("config"), log.get("environment")
    if not isinstance(config, dict) or not isinstance(environment, dict) or not isinstance(log.get("epochs"), list):
        raise VerifyError("log", "it lacks config, environment or epochs")
    n_views = TRAINED_VIEWS
    world_size = _int_field(environment, "world_size", "environment", default=1)
    train_subset, batch_size = _int_field(config, "train_subset", "config"), _int_field(config, "batch_size", "config")
    if world_size < 1 or batch_size < 1:
        raise VerifyError("log", "world_size and batch_size must be positive")
    n_train = train_subset or 50_000
    trained = n_train - (n_train % batch_size if config.get("drop_last") else 0)
    peak, known = gpu_peak(environment.get("gpu_name"))
    fields = {f.name for f in dataclasses.fields(ab.Config)}
    try:  # the view size of each epoch, by the harness's own rule (progressive resolution)
        cfg = dataclasses.replace(ab.Config(), **{k: v for k, v in config.items() if k in fields})
        ab.validate_config(cfg)
    except ab.HarnessError as error:
        raise VerifyError("log", str(error)) from None
    flops_at: dict[int, int] = {}
    closest = None
    for row in log["epochs"]:
        if not isinstance(row, dict) or type(row.get("epoch")) is not int or row["epoch"] < 1:
            continue  # epoch 0 trains nothing
        seconds = row.get("epoch_seconds")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
            raise VerifyError("log", f"epoch {row['epoch']} has no epoch_seconds")
        px = ab.view_px(cfg, row["epoch"] - 1)
        if px not in flops_at:
            flops_at[px] = forward_flops(backbone, px)
        floor = trained * n_views * 3 * flops_at[px] / (peak.tflops * 1e12 * world_size)
        if closest is None or seconds * closest[2] < closest[1] * floor:  # the smallest seconds / floor
            closest = (row["epoch"], float(seconds), floor)
    if closest is None:
        raise VerifyError("log", "no trained epoch to time")
    result = TimeFloor(gpu_name=environment.get("gpu_name"), gpu=peak.model, gpu_known=known,
                       peak_tflops=peak.tflops, world_size=world_size,
                       n_views=n_views, trained_images_per_epoch=trained,
                       forward_flops_32px=flops_at.get(32) or forward_flops(backbone, 32),
                       fastest_epoch=closest[0], fastest_epoch_seconds=closest[1], fastest_floor_seconds=closest[2])
    if result.margin < 1:
        raise VerifyError("time floor", f"epoch {closest[0]} took {closest[1]:.4g} s, but its {trained:,} images x "
                                        f"{n_views} views of training need at least {closest[2]:.4g} s at the "
                                        f"{peak.model} peak of {peak.tflops:g} TFLOPS ({peak.precision}, dense) on "
                                        f"{world_size} GPU(s): physically impossible")
    return result


#############################################
#               Recomputation               #
#############################################
@contextlib.contextmanager
def fp32_numerics() -> Iterator[None]:
    """TF32 off for convolutions and matrix products: verify's features are fp32 as the reference evaluates, and
    differently composed batches then agree to fp32 rounding, which BATCH_TOLERANCE relies on."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_deviation(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row: |features - reference| / |reference| (an all-zero reference row counts any difference as 1)."""
    diff = (features.double() - reference.double()).norm(dim=1)
    norm = reference.double().norm(dim=1)
    return torch.where(norm > 0, diff / norm.clamp(min=1e-300), (diff > 0).double())


@dataclasses.dataclass(frozen=True)
class BatchCheck:
    max_relative_deviation: float
    images_reshuffled: int  # every test image and a sample of train images, in batches of other images
    images_alone: int  # a sample computed in a batch of one
    tolerance: float = BATCH_TOLERANCE


def check_batch_independence(backbone: nn.Module, data: dict, train_features: torch.Tensor,
                             test_features: torch.Tensor, batch_size: int, seed: int = 0) -> BatchCheck:
    """Features must not depend on the rest of the batch: every test image and MIXED_TRAIN_FRACTION of the train
    images again, shuffled together into new batches of batch_size, and ALONE_SAMPLE of them in batches of one, must
    match the features of the canonical pass within BATCH_TOLERANCE of their norm. Batch statistics, cross-image
    mixing, position or batch-size tricks all show up as a difference."""
    generator = torch.Generator().manual_seed(seed)
    n_train, n_test = len(train_features), len(test_features)
    train_pick = torch.randperm(n_train, generator=generator)[:max(1, int(n_train * MIXED_TRAIN_FRACTION))]
    device = data["test_images"].device
    images = torch.cat([data["test_images"], data["train_images"][train_pick.to(device)]])
    reference = torch.cat([test_features, train_features[train_pick.to(train_features.device)]])
    order = torch.randperm(len(images), generator=generator)
    shuffled = ab.extract_features(backbone, images[order.to(device)], batch_size)
    deviation = relative_deviation(shuffled, reference[order.to(reference.device)])
    alone_pick = torch.cat([torch.randperm(n_test, generator=generator)[:ALONE_SAMPLE // 2],
                            n_test + torch.randperm(len(train_pick), generator=generator)[:ALONE_SAMPLE // 2]])
    alone = ab.extract_features(backbone, images[alone_pick.to(device)], 1)
    deviation = torch.cat([deviation, relative_deviation(alone, reference[alone_pick.to(reference.device)])])
    if not torch.isfinite(deviation).all():
        raise VerifyError("batch independence", "features of some images are not finite when computed in another "
                                                "batch or alone")
    worst = float(deviation.max())
    if worst > BATCH_TOLERANCE:
        raise VerifyError("batch independence", f"an image's features change by {worst:.3g} of their norm when the "
                                                f"rest of its batch changes (tolerance {BATCH_TOLERANCE:g}): the "
                                                "evaluation would depend on other images (batch statistics?)")
    return BatchCheck(max_relative_deviation=worst, images_reshuffled=len(images), images_alone=len(alone_pick))


def check_state_unchanged(backbone: nn.Module, work: Callable[[], T]) -> T:
    """work() -> its result, refused ("state") if it changed any of the backbone's weights or buffers: features
    must not depend on what the backbone saw before."""
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    result = work()
    changed = [name for name, value in backbone.state_dict().items() if not torch.equal(value, before[name])]
    if changed:
        raise VerifyError("state", f"the backbone changed its own {changed[0]} while extracting features: its "
                                   "evaluation would depend on what it saw before")
    return result


def load_data(data_dir: str = "", device: str | torch.device = "cpu") -> dict:
    """CIFAR-10 as the harness loads it (never downloading): see ab.load_cifar10."""
    return ab.load_cifar10(data_dir, torch.device(device), download=False)


@dataclasses.dataclass(frozen=True)
class Verification:
    """A run whose accuracy was recomputed and matched. as_dict() is JSON for a record."""

    run_id: str
    model_file: str
    model_format: str
    model_sha256: str
    device: str  # "cpu" or the CUDA device's name
    torch_version: str
    official_data: bool
    knn_k: int
    train_images: int  # the kNN's reference set
    test_images: int
    logged_knn_pct: float
    recomputed_knn_pct: float
    recomputed_final_eval: dict[str, float]  # knn5_pct and knn10_pct
    numerics: str  # "fp32" (TF32 off), or on a GPU "default (TF32)" when only the harness's default numerics matched
    tolerance_pct: float
    batch_check: BatchCheck
    time_floor: TimeFloor
    seconds: float

    @property
    def difference_pct(self) -> float:
        return self.recomputed_knn_pct - self.logged_knn_pct

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), difference_pct=self.difference_pct,
                    time_floor=dict(dataclasses.asdict(self.time_floor), margin=self.time_floor.margin
                                    if math.isfinite(self.time_floor.margin) else None))

    def summary(self) -> str:
        floor = self.time_floor
        return (f"{self.run_id}: VERIFIED on {self.device}: kNN k={self.knn_k} of {self.test_images:,} test images vs "
                f"{self.train_images:,} train images recomputed {self.recomputed_knn_pct:.2f}% ({self.numerics}), "
                f"logged {self.logged_knn_pct:.2f}% (difference {self.difference_pct:+.2f}, tolerance "
                f"{self.tolerance_pct:g}); batch-independent (max deviation "
                f"{self.batch_check.max_relative_deviation:.1e} of the feature norm); fastest epoch "
                f"{floor.margin:.1f}x its FLOP floor ({floor.world_size} x {floor.gpu_name or 'CPU'}"
                f"{'' if floor.gpu_known else f', priced at the highest known peak, {floor.gpu}'})"
                f"{'' if self.official_data else '; UNOFFICIAL DATA (md5 mismatch): not a record verification'}")


def _number(obj: Any, *keys: str) -> float:
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(obj, (int, float)) or isinstance(obj, bool) or not math.isfinite(obj):
        raise VerifyError("log", f"{'.'.join(keys)} is {obj!r}, not a number")
    return float(obj)


def check_same_data(log: dict, report: dict) -> None:
    """The data verify loaded are the files the run used (same md5 of each), or the recomputation means nothing."""
    logged = log.get("data", {}).get("files") if isinstance(log.get("data"), dict) else None
    if not isinstance(logged, dict):
        raise VerifyError("log", "it does not record the md5 of its data files")
    for name, check in report["files"].items():
        md5 = logged.get(name, {}).get("md5") if isinstance(logged.get(name), dict) else None
        if md5 != check["md5"]:
            raise VerifyError("data", f"{name} has md5 {check['md5']}, the run's had {md5}: verify needs the "
                                      "CIFAR-10 copy the run used")


def accuracy_mismatch(checks: Sequence[tuple[str, int, float]], accuracy: dict[int, float]) -> str | None:
    """checks: (where in the log, k, logged accuracy) -> the first that the recomputed accuracy[k] refutes, or None."""
    for where, k, claimed in checks:
        if abs(accuracy[k] - claimed) > ACCURACY_TOLERANCE_PCT + 1e-9:
            return f"{where} says {claimed:.2f}%, the saved model gives {accuracy[k]:.2f}% with k={k}"
    return None


def verify_run(log: dict | str, data: dict | None = None, data_dir: str = "", device: str = "auto",
               model_path: str | None = None, models_dir: str | None = None,
               require_official: bool = False) -> Verification:
    """Recompute a run's kNN accuracy at stop from its saved model; VerifyError on any refusal (see the module)."""
    start = time.perf_counter()
    log_path = log if isinstance(log, str) else None
    log = read_log(log) if isinstance(log, str) else log
    config, run_id = log.get("config"), log.get("run_id")
    if not isinstance(config, dict) or not isinstance(run_id, str):
        raise VerifyError("log", "it has no config or run_id")
    knn_k, eval_batch_size = _int_field(config, "knn_k", "config"), _int_field(config, "eval_batch_size", "config")
    train_subset = _int_field(config, "train_subset", "config")
    if knn_k < 1 or eval_batch_size < 1 or train_subset < 0:
        raise VerifyError("log", "knn_k, eval_batch_size and train_subset must be positive")
    logged = _number(log, "result", "knn_at_stop_pct")
    path = model_path or artefact_path(log, log_path, models_dir)
    artefact = load_artefact(path, expected=log.get("model") if isinstance(log.get("model"), dict) else None)
    time_floor = check_time_floor(log, artefact.backbone)
    if data is None:
        data = load_data(data_dir, ab.resolve_device(dataclasses.replace(ab.Config(), device=device)))
    report = data["report"]
    check_same_data(log, report)
    if require_official and not report["official"]:
        raise VerifyError("data", f"{report['data_dir']} is not the official CIFAR-10 (md5 mismatch)")
    train_images, train_labels = data["train_images"], data["train_labels"]
    if train_subset:
        if train_subset > len(train_images):
            raise VerifyError("data", f"the run used {train_subset} train images, the data hold {len(train_images)}")
        train_images, train_labels = train_images[:train_subset], train_labels[:train_subset]
    if knn_k > len(train_images):
        raise VerifyError("log", f"knn_k {knn_k} is more than the {len(train_images)} train images")
    device_ = data["test_images"].device
    backbone = artefact.backbone.to(device_)

    def features(fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with fp32_numerics() if fp32 else contextlib.nullcontext():
            return (ab.extract_features(backbone, train_images, eval_batch_size),
                    ab.extract_features(backbone, data["test_images"], eval_batch_size))

    def evaluate() -> tuple[torch.Tensor, torch.Tensor, BatchCheck]:
        train_features, test_features = features(fp32=True)
        with fp32_numerics():
            return train_features, test_features, check_batch_independence(
                backbone, dict(data, train_images=train_images), train_features, test_features, eval_batch_size)

    def knn(train_features: torch.Tensor, test_features: torch.Tensor) -> dict[int, float]:
        if not torch.isfinite(train_features).all() or not torch.isfinite(test_features).all():
            raise VerifyError("accuracy", "the backbone's features are not all finite")
        return {k: ab.knn_accuracy(train_features, train_labels, test_features, data["test_labels"], k)
                for k in sorted({knn_k, 5, 10})}

    try:
        train_features, test_features, batch_check = check_state_unchanged(backbone, evaluate)
        accuracy, numerics = knn(train_features, test_features), "fp32"
        checks = [("result.knn_at_stop_pct", knn_k, logged)]
        final = log.get("final_eval")
        if isinstance(final, dict):
            checks += [(f"final_eval.{key}", int(key[3:-4]), _number(final, key)) for key in sorted(final)
                       if re.fullmatch(r"knn(5|10)_pct", key)]
        if accuracy_mismatch(checks, accuracy) and device_.type == "cuda":
            # The harness's kNN checks run with PyTorch's default GPU numerics (TF32 convolutions on Ampere and
            # later GPUs): recompute as they did, and accept either.
            accuracy = knn(*check_state_unchanged(backbone, lambda: features(fp32=False)))
            numerics = "default (TF32)"
    except VerifyError:
        raise
    except Exception as error:  # noqa: BLE001 - an exported program can fail on a device or a batch size
        raise VerifyError("artefact", f"{path}: extracting features failed on {device_.type}: "
                                      f"{(str(error).splitlines() or [type(error).__name__])[0][:160]}") from None
    problem = accuracy_mismatch(checks, accuracy)
    if problem:
        ran_on_gpu = (log.get("environment") or {}).get("device") == "cuda" and device_.type != "cuda"
        raise VerifyError("accuracy", f"{problem} (kNN of {len(test_features):,} test images vs "
                                      f"{len(train_features):,} train images, tolerance {ACCURACY_TOLERANCE_PCT:g} "
                                      "points" + ("; the run's checks may have used TF32 convolutions, which only a "
                                                  "GPU reproduces: verify it on one)" if ran_on_gpu else ")"))
    device_name = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu"
    return Verification(run_id=run_id, model_file=os.path.basename(path), model_format=artefact.format,
                        model_sha256=artefact.sha256, device=device_name, torch_version=torch.__version__,
                        official_data=bool(report["official"]), knn_k=knn_k, train_images=len(train_features),
                        test_images=len(test_features), logged_knn_pct=logged, recomputed_knn_pct=accuracy[knn_k],
                        recomputed_final_eval={"knn5_pct": accuracy[5], "knn10_pct": accuracy[10]},
                        numerics=numerics, tolerance_pct=ACCURACY_TOLERANCE_PCT, batch_check=batch_check,
                        time_floor=time_floor, seconds=time.perf_counter() - start)


#############################################
#                 Reproduce                 #
#############################################
REPRODUCE_TIME_MARGIN = 0.05  # the spread of one GPU model between machines (clocks, power limits, drivers)
PER_RUN_CONFIG = frozenset({"seed", "data_dir", "log_dir", "download", "save_checkpoint"})  # may differ per run
PER_RUN_FLAGS = ("seed", "data-dir", "log-dir", "config", "save-checkpoint")  # replaced or dropped; others kept
# What a dry run overrides, where the logged config has the field: one tiny epoch on the CPU, nothing compiled.
DRY_RUN = dict(device="cpu", compile="off", width=4, train_subset=200, batch_size=100, epochs=1, warmup_epochs=0,
               check_first_epoch=1, check_every_epochs=1, eval_batch_size=256, download=False)


def check_launch_command(log: dict) -> None:
    """The run was launched as the harness itself, not by a wrapper that imports and patches it."""
    command = log.get("launch", {}).get("command") if isinstance(log.get("launch"), dict) else None
    if not isinstance(command, list) or not command or not isinstance(command[0], str):
        raise VerifyError("launch command", "the log has no launch command")
    if os.path.basename(command[0]) != LAUNCH_SCRIPT:
        raise VerifyError("launch command", f"the run was launched by {os.path.basename(command[0])[:80]!r}, not by "
                                            f"{LAUNCH_SCRIPT}: a wrapper can change the harness at runtime")


def read_record_logs(folder: str) -> list[dict]:
    """The run logs a record folder lists in its record.json (read, not validated: tools/leaderboard.py validates)."""
    meta = read_log(os.path.join(folder, "record.json"))
    names = meta.get("logs")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and "/" not in n and n.endswith(".json")
                                                           and not n.startswith(".") for n in names):
        raise VerifyError("record", f"{folder}/record.json lists no plain log file names")
    return [read_log(os.path.join(folder, name)) for name in names]


def split_flags(argv: Sequence[str]) -> list[tuple[str, str]]:
    """`--flag value` and `--flag=value` pairs -> [(flag name without dashes, value)]."""
    pairs, args = [], list(argv)
    while args:
        token = args.pop(0)
        if not token.startswith("--"):
            raise VerifyError("launch command", f"argument {token[:40]!r} is not a --flag")
        if "=" in token:
            name, value = token[2:].split("=", 1)
        elif args:
            name, value = token[2:], args.pop(0)
        else:
            raise VerifyError("launch command", f"{token[:40]} has no value")
        pairs.append((name, value))
    return pairs


@dataclasses.dataclass(frozen=True)
class Reproduction:
    folder: str
    dry_run: bool
    commands: list[list[str]]
    seeds: list[int]
    logs: list[str]  # the new runs' logs
    statuses: list[str]
    times_seconds: list[float | None]  # time to target
    knn_at_stop_pct: list[float | None]
    record_times_seconds: list[float]
    record_knn_at_stop_pct: list[float]
    gpu: str | None  # this machine's GPU, for comparison with the record's
    record_gpu: str
    time_welch: dict | None  # stats.welch(reproduced, record) of time to target
    knn_welch: dict | None
    reproduces: bool
    verdict: str


def _record_numbers(logs: Sequence[dict]) -> tuple[list[float], list[float]]:
    return ([_number(log, "result", "time_to_target_seconds") for log in logs],
            [_number(log, "result", "knn_at_stop_pct") for log in logs])


def _prepare_folder(logs: Sequence[dict], folder: str) -> tuple[dict, list[tuple[str, str]]]:
    """Checks the record's logs agree on one source and launch, writes the source and config file into the new
    folder -> (first log, the logged flags with the per-run ones removed and --config pointing into the folder)."""
    if not logs:
        raise VerifyError("record", "no logs")
    sources = {(log.get("code") or {}).get("source") if isinstance(log.get("code"), dict) else None for log in logs}
    source = sources.pop() if len(sources) == 1 else None
    first = logs[0]
    if not isinstance(source, str) or hashlib.sha256(source.encode()).hexdigest() != first["code"].get("sha256"):
        raise VerifyError("record", "its logs do not hold one source matching its sha256")
    for log in logs:
        check_launch_command(log)
    argv = first.get("argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise VerifyError("launch command", "the log has no argv")
    flags = [(name, value) for name, value in split_flags(argv) if name not in PER_RUN_FLAGS]
    sources_info = first.get("config_sources") if isinstance(first.get("config_sources"), dict) else {}
    try:
        os.makedirs(folder)
    except OSError as error:
        raise VerifyError("reproduce", f"cannot create the new folder {folder}: {error.strerror or error} (it must "
                                       "not exist: nothing is ever overwritten)") from None
    with open(os.path.join(folder, LAUNCH_SCRIPT), "x", encoding="utf-8") as f:
        f.write(source)
    if sources_info.get("config_file"):
        with open(os.path.join(folder, "config.json"), "x", encoding="utf-8") as f:
            json.dump(sources_info.get("file_overrides") or {}, f, indent=1)
        flags.append(("config", "config.json"))
    return first, flags


def _run_one(folder: str, command: list[str], index: int, timeout_s: float | None) -> tuple[str | None, dict | None]:
    """One run of the harness in `folder`, its transcript in run<index>.out -> (its log's path, the log)."""
    log_dir = os.path.join(folder, "logs")
    before = set(os.listdir(log_dir)) if os.path.isdir(log_dir) else set()
    with open(os.path.join(folder, f"run{index}.out"), "x", encoding="utf-8") as out:
        try:
            subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            pass
    new = sorted(n for n in set(os.listdir(log_dir)) - before if n.endswith(".json")) if os.path.isdir(log_dir) else []
    if len(new) != 1:
        return None, None
    path = os.path.join(log_dir, new[0])
    return path, read_log(path)


def reproduce(logs: Sequence[dict], folder: str, runs: int = 3, dry_run: bool = False, data_dir: str = "",
              seeds: Sequence[int] | None = None, timeout_s: float | None = None) -> Reproduction:
    """Re-run a record from its logged source in a new folder and compare (see the module docstring). Seeds: fresh
    ones by default (one above the record's highest, and up): the record claims a time for its recipe, not for its
    seeds, and GPU runs are not bit-reproducible anyway; fresh seeds also expose a record whose seeds were picked."""
    if runs < 1:
        raise VerifyError("reproduce", "runs must be at least 1")
    world_size = _int_field(logs[0].get("environment") or {}, "world_size", "environment", default=1) if logs else 1
    if not dry_run and torch.cuda.device_count() < world_size:
        raise VerifyError("reproduce", f"needs {world_size} CUDA GPU(s), this machine has "
                                       f"{torch.cuda.device_count()}: a record is a GPU race (--dry-run checks on "
                                       "the CPU that its source runs)")
    record_times, record_knn = _record_numbers(logs)
    first, flags = _prepare_folder(logs, folder)
    config = first.get("config") if isinstance(first.get("config"), dict) else {}
    record_seeds = [log.get("config", {}).get("seed", 0) for log in logs]
    if seeds is None:
        top = max([s for s in record_seeds if isinstance(s, int)], default=-1)
        seeds = [top + 1 + i for i in range(1 if dry_run else runs)]
    data_dir = data_dir or ab.find_cifar("") or ""  # the new folder has no data: this checkout's search finds it
    extra = [("log-dir", "logs")] + ([("data-dir", os.path.abspath(data_dir))] if data_dir else [])
    if dry_run:
        overrides = {k.replace("_", "-"): v for k, v in DRY_RUN.items() if k in config}
        flags = [(name, value) for name, value in flags if name not in overrides]
        extra += [(name, str(value).lower() if isinstance(value, bool) else str(value))
                  for name, value in overrides.items()]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={world_size}"]
                                   if world_size > 1 and not dry_run else [])
    commands, paths, statuses, times, knns = [], [], [], [], []
    for index, seed in ab.counted("reproduce: run", enumerate(seeds)):
        command = launcher + [LAUNCH_SCRIPT] + [x for name, value in flags + extra + [("seed", str(seed))]
                                                for x in (f"--{name}", value)]
        commands.append(command)
        path, log = _run_one(folder, command, index, timeout_s)
        result = log.get("result") if isinstance(log, dict) and isinstance(log.get("result"), dict) else {}
        paths.append(path or "")
        statuses.append(result.get("status", "no log"))
        other = [key for key in config if key not in PER_RUN_CONFIG and isinstance(log, dict)
                 and (log.get("config") or {}).get(key, config[key]) != config[key]]
        if other and not dry_run:  # the logged command resolved to another recipe here (a preset, a default)
            statuses[-1] = f"another config than the record's ({other[0]})"
        times.append(result.get("time_to_target_seconds"))
        knns.append(result.get("knn_at_stop_pct"))
        if statuses[-1] != "reached_target" and (not dry_run or statuses[-1] != "max_epochs"):
            break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record_gpu = str((first.get("environment") or {}).get("gpu_name"))
    if dry_run:
        ok = len(statuses) == len(seeds) and all(s in ("reached_target", "max_epochs") for s in statuses)
        verdict = (f"the logged source runs: a tiny CPU run finished ({statuses[0]}); only a GPU run can reproduce "
                   "the record's times" if ok else f"the logged source does not run: {statuses[-1]}; see "
                   f"{folder}/run{len(statuses) - 1}.out")
        return Reproduction(folder, True, commands, list(seeds), paths, statuses, times, knns, record_times,
                            record_knn, gpu, record_gpu, None, None, ok, verdict)
    time_welch, knn_welch, ok, verdict = judge(statuses, times, knns, record_times, record_knn, gpu, record_gpu,
                                               runs)
    return Reproduction(folder, False, commands, list(seeds), paths, statuses, times, knns, record_times, record_knn,
                        gpu, record_gpu, time_welch, knn_welch, ok, verdict)


def judge(statuses: Sequence[str], times: Sequence[float | None], knns: Sequence[float | None],
          record_times: Sequence[float], record_knn: Sequence[float], gpu: str | None, record_gpu: str,
          runs: int) -> tuple[dict | None, dict | None, bool, str]:
    """Does a reproduction reproduce? -> (Welch of times, Welch of kNN at stop, verdict, one line). Every one of the
    `runs` runs must reach the target on the record's GPU model, and the mean time to target may not be both more
    than REPRODUCE_TIME_MARGIN slower than the record's and significantly slower (Welch p < 0.05; with one run the
    margin alone decides)."""
    if len(statuses) < runs or any(status != "reached_target" for status in statuses):
        return None, None, False, f"does not reproduce: run {len(statuses) - 1} ended {statuses[-1]}"
    if gpu is None or " ".join(gpu.lower().split()) != " ".join(record_gpu.lower().split()):
        return None, None, False, (f"not comparable: this GPU is {gpu}, the record's {record_gpu} (every run "
                                   "reached the target)")
    time_welch = stats.welch(times, record_times) if len(times) >= 2 else None
    knn_welch = stats.welch(knns, record_knn) if len(knns) >= 2 else None
    mean, record_mean = sum(times) / len(times), sum(record_times) / len(record_times)
    slower = mean > (1 + REPRODUCE_TIME_MARGIN) * record_mean and (time_welch is None or time_welch["p_value"] < 0.05)
    verdict = (f"{'does not reproduce' if slower else 'reproduces'}: mean time to target {mean:.1f} s vs the "
               f"record's {record_mean:.1f} s ({100 * (mean / record_mean - 1):+.1f}%"
               + (f", Welch p = {time_welch['p_value']:.2g}" if time_welch else "") + "); every run reached the "
               f"target (kNN at stop {sum(knns) / len(knns):.2f}% vs {sum(record_knn) / len(record_knn):.2f}%)")
    return time_welch, knn_welch, not slower, verdict


#############################################
#                   Main                    #
#############################################
def build_parser() -> ab.OneLineErrorParser:
    parser = ab.OneLineErrorParser(prog="verify.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="recompute runs' accuracy from their saved models")
    check.add_argument("logs", nargs="+", help="run logs (their model files beside them, or in --models)")
    check.add_argument("--models", default=None, help="folder holding the <run_id>.model.pt files")
    check.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ (\"\": "
                                                      "$AIRBENCH_SSL_DATA, else ./data)")
    check.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    check.add_argument("--require-official", action="store_true", help="refuse unofficial data (records need it)")
    again = commands.add_parser("reproduce", help="re-run a record from its logged source and compare")
    again.add_argument("record", help="a record folder (records/DATE_Name)")
    again.add_argument("--runs", type=int, default=3)
    again.add_argument("--folder", default=None, help="new folder for source, logs and transcripts")
    again.add_argument("--data-dir", default="", help="CIFAR-10 for the runs (\"\": where this checkout's harness "
                                                      "finds it)")
    again.add_argument("--dry-run", action="store_true", help="one tiny CPU run: does the logged source run?")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "reproduce":
            name = os.path.basename(os.path.normpath(args.record))
            folder = args.folder or f"reproduce_{name}_{time.strftime('%Y%m%dT%H%M%S')}"
            result = reproduce(read_record_logs(args.record), folder, args.runs, args.dry_run, args.data_dir)
            print(f"{args.record}: {result.verdict}")
            return 0 if result.reproduces else 1
        device = ab.resolve_device(dataclasses.replace(ab.Config(), device=args.device))
        data, refused = load_data(args.data_dir, device), 0
        for path in args.logs:
            try:
                print(verify_run(path, data=data, models_dir=args.models,
                                 require_official=args.require_official).summary(), flush=True)
            except VerifyError as error:
                refused += 1
                print(f"{path}: REFUSED: {error}", flush=True)
        return 1 if refused else 0
    except ab.HarnessError as error:
        print(f"verify: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("verify: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
