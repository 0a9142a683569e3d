"""The reference's full evaluation table for a model the harness saved: kNN k=5 and k=10, lin precomp and lin augm.

    python airbench_ssl.py ...                                  # saves logs/RUN.json and logs/RUN.model.pt
    python tools/evaluate.py logs/RUN.json                      # all four, the reference's readout settings
    python tools/evaluate.py logs/RUN.model.pt --evals knn5,knn10   # the model file alone; kNN only: minutes on a CPU

Given the run's log, the model file beside it is evaluated (its sha256 checked against the log) and the table shows
the run's batch and last epoch loss. Model files are read by tools/verify.py's loader (weights only, or a torch.export
program of standard aten operators). Prints dkobak/simclr-cifar10's table
|Backbone|Batch|Loss/batch|kNN(k=5)|kNN(k=10)|lin precomp|lin augm| with the reference sets and the seconds each
evaluation took, and writes a JSON log (kind "eval", naming the model and its run) into --log-dir.
  knn5, knn10   cosine kNN of the 10,000 test images against the 50,000 train images, backbone features of the
                unaugmented images (the harness's knn_accuracy)
  lin_precomp   nn.Linear(dim, 10) on precomputed features: Adam lr 0.01, 500 epochs, cosine annealing stepped once
                per epoch, cross-entropy, batches of 1000 in a fresh order each epoch
  lin_augm      the same readout on features of RandomResizedCrop(32, scale=(0.2, 1)) + horizontal-flip views of the
                training images, backbone frozen in eval mode: Adam lr 0.1, 100 epochs, batches of 512; tested on the
                unaugmented test images
Both readouts use weight decay 5e-6 (resnet18, resnet34) or 0 (resnet50 and exported programs), as the reference
(at 44b2500). On a CPU the readouts take hours at these settings (lin augm runs the backbone on 5 million views):
--evals knn5,knn10 takes minutes; a counter on a terminal shows the estimate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
import types
import uuid
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verify  # noqa: E402

import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/evaluate.py)

EVALS = ("knn5", "knn10", "lin_precomp", "lin_augm")  # the table's order
# The reference's readouts; weight decay per backbone ("important" in its source: 0 is best for the wider resnet50).
READOUT_DEFAULTS = dict(lin_precomp=dict(lr=0.01, epochs=500, batch_size=1000),
                        lin_augm=dict(lr=0.1, epochs=100, batch_size=512))
LINEAR_WEIGHT_DECAY = dict(resnet18=5e-6, resnet34=5e-6, resnet50=0.0)
# lin augm's views: crop + flip only, a fixed protocol whatever the training run's augmentation was.
LIN_AUGM_VIEWS = dataclasses.replace(ab.Config(), crop_scale_min=0.2, crop_scale_max=1.0, crop_ratio_min=3 / 4,
                                     crop_ratio_max=4 / 3, flip_p=0.5, jitter_p=0.0, grayscale_p=0.0)
TABLE_HEADER = ("|Backbone|Batch|Loss/batch|kNN(k=5)|kNN(k=10)|lin precomp|lin augm|\n"
                "|--------|-----|----------|--------|---------|-----------|--------|")


@dataclasses.dataclass
class Readout:
    """A linear readout's optimisation: Adam, cosine annealing of lr over `epochs`, stepped once per epoch."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float


#############################################
#                 The model                 #
#############################################
@dataclasses.dataclass
class Subject:
    """What is evaluated: a saved backbone and, when its run's log was given, that run."""

    artefact: verify.Artefact
    arch: str | None  # from the model file, else the run's config
    width: int | None
    run_id: str
    log_path: str | None
    config: dict | None  # the training run's config, from its log
    loss_per_batch: float | None  # the run's last epoch loss

    @property
    def label(self) -> str:
        return f"{self.arch} (width {self.width})" if self.arch else "exported program"


def last_epoch_loss(log: dict, path: str) -> float:
    """The training loss of the run's last epoch, from its log."""
    rows = log.get("epochs") if isinstance(log.get("epochs"), list) else []
    losses = [row.get("loss") for row in rows if isinstance(row, dict)]
    losses = [loss for loss in losses if isinstance(loss, (int, float)) and not isinstance(loss, bool)]
    if not losses:
        raise ab.HarnessError(f"training log {path} has no epoch with a loss")
    return float(losses[-1])


def load_subject(path: str) -> Subject:
    """A run's log (.json: its model file beside it, the file's sha256 checked against the log) or a model file."""
    if not path.endswith(".json"):
        artefact = verify.load_artefact(path)
        run_id = os.path.basename(path).removesuffix(".pt").removesuffix(".model")
        return Subject(artefact, artefact.arch, artefact.width, run_id, None, None, None)
    log = verify.read_log(path)
    if log.get("kind") != "train" or not isinstance(log.get("config"), dict) or not isinstance(log.get("run_id"), str):
        raise ab.HarnessError(f"{path} is not a training log of the harness")
    artefact = verify.load_artefact(verify.artefact_path(log, path), expected=log["model"])
    config = log["config"]
    arch, width = (artefact.arch, artefact.width) if artefact.arch else (config.get("arch"), config.get("width"))
    return Subject(artefact, arch if isinstance(arch, str) else None, width, log["run_id"], path, config,
                   last_epoch_loss(log, path))


#############################################
#              Linear readouts              #
#############################################
def train_linear(inputs: torch.Tensor, labels: torch.Tensor, readout: Readout, seed: int,
                 features_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 what: str = "readout") -> nn.Linear:
    """The reference's readout: nn.Linear(dim, 10), Adam, cross-entropy, cosine lr stepped once per epoch, batches
    in a fresh random order each epoch. `inputs` are features, or images when features_of maps a batch to features."""
    device = labels.device
    dim = (inputs if features_of is None else features_of(inputs[:2])).shape[1]
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the caller's global generator alone
        torch.manual_seed(seed)
        classifier = nn.Linear(dim, 10).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=readout.lr, weight_decay=readout.weight_decay,
                                 **({"fused": True} if device.type == "cuda" else {}))
    schedule = types.SimpleNamespace(epochs=readout.epochs, warmup_epochs=0, lr_schedule="epoch")
    for epoch in ab.counted(f"{what}: epoch", range(readout.epochs)):  # a counter on a terminal only
        for group in optimizer.param_groups:
            group["lr"] = ab.learning_rate(schedule, readout.lr, epoch, 0, 1)
        for idx in torch.randperm(len(labels), generator=generator, device=device).split(readout.batch_size):
            batch = inputs[idx] if features_of is None else features_of(inputs[idx])
            loss = F.cross_entropy(classifier(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier


@torch.no_grad()
def linear_accuracy(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:  # in percent
    return 100.0 * (classifier(features).argmax(1) == labels).float().mean().item()


def crop_flip_features(backbone: nn.Module, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image batch -> backbone features of one crop + flip view of each, without gradient (the caller puts
    the backbone in eval mode, so BatchNorm statistics stay frozen too)."""

    @torch.no_grad()
    def features_of(images_uint8: torch.Tensor) -> torch.Tensor:
        return backbone(ab.augment(images_uint8, LIN_AUGM_VIEWS, generator)).float()

    return features_of


def lin_augm(backbone: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, readout: Readout, seed: int) -> float:
    """Readout trained on crop + flip views (backbone frozen, eval mode), tested on features of the unaugmented test
    images -> accuracy in percent. The backbone's training mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        generator = torch.Generator(train_labels.device).manual_seed(seed)
        classifier = train_linear(train_images, train_labels, readout, seed, crop_flip_features(backbone, generator),
                                  "lin_augm")
    finally:
        backbone.train(was_training)
    return linear_accuracy(classifier, test_features, test_labels)


def run_evals(backbone: nn.Module, data: dict, names: Sequence[str], readouts: dict[str, Readout], seed: int,
              eval_batch_size: int = 1024) -> tuple[dict, dict]:
    """-> ({name_pct: accuracy in percent}, {step: seconds}). Each readout is seeded on its own, so its result does
    not depend on which other evaluations ran. Progress counters appear on a terminal only."""
    device, results, seconds = data["train_labels"].device, {}, {}
    start = time.perf_counter()
    train_features, test_features = (ab.extract_features(backbone, data[key], eval_batch_size)
                                     for key in ("train_images", "test_images"))
    ab.synchronize(device)
    seconds["features"] = time.perf_counter() - start
    for name in names:
        start = time.perf_counter()
        if name in ("knn5", "knn10"):
            results[f"{name}_pct"] = ab.knn_accuracy(train_features, data["train_labels"], test_features,
                                                     data["test_labels"], int(name[3:]))
        elif name == "lin_precomp":
            classifier = train_linear(train_features, data["train_labels"], readouts[name], seed, what=name)
            results[f"{name}_pct"] = linear_accuracy(classifier, test_features, data["test_labels"])
        else:
            results[f"{name}_pct"] = lin_augm(backbone, data["train_images"], data["train_labels"], test_features,
                                              data["test_labels"], readouts[name], seed)
        seconds[name] = time.perf_counter() - start
    return results, seconds


#############################################
#                  Output                   #
#############################################
def format_table(subject: Subject, results: dict, seconds: dict, n_train: int, n_test: int) -> str:
    def cell(name: str) -> str:
        return f"{results[name]:.2f}" if results.get(name) is not None else "-"

    batch = subject.config.get("batch_size", "-") if subject.config else "-"
    loss = "-" if subject.loss_per_batch is None else f"{subject.loss_per_batch:.3f}"
    times = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    return (f"{TABLE_HEADER}\n|{subject.label}|{batch}|{loss}|{cell('knn5_pct')}|{cell('knn10_pct')}|"
            f"{cell('lin_precomp_pct')}|{cell('lin_augm_pct')}|\n"
            f"(accuracies in % of the {n_test:,} test images: kNN against the {n_train:,} train images, readouts "
            f"trained on the {n_train:,} train images; evaluation times: {times})")


def reserve_eval_log(log_dir: str, run_id: str) -> str:
    """A new file named after the evaluated run, created exclusively: no existing log is ever overwritten."""
    safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:80].lstrip(".") or "run"
    while True:
        name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}_eval_{safe_id}_{uuid.uuid4().hex[:6]}.json"
        try:
            with open(path := os.path.join(log_dir, name), "x"):
                return path
        except FileExistsError:
            continue


#############################################
#                   Main                    #
#############################################
def bounded(kind: type, low: float, high: float, open_low: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number of `kind` in [low, high] ((low, high] with open_low); a typo like 1e9 epochs
    or an lr of nan is refused before any data is loaded."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or not low <= value <= high or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in {'(' if open_low else '['}{low}, "
                                             f"{high}]")
        return value

    return parse


def eval_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EVALS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(EVALS)}")
    return [name for name in EVALS if name in names]


def build_parser() -> ab.OneLineErrorParser:
    parser = ab.OneLineErrorParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a training run's log (its <run_id>.model.pt beside it) or a model file")
    parser.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ (\"\": "
                                                       "$AIRBENCH_SSL_DATA, else ./data)")
    parser.add_argument("--download", type=ab.parse_bool, default=False, metavar="BOOL",
                        help="true: let torchvision download CIFAR-10 if none is found (as the harness's --download)")
    parser.add_argument("--evals", type=eval_names, default=",".join(EVALS), help="which columns to fill")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto = cuda if available")
    parser.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=0, help="readout init, order and views")
    parser.add_argument("--log-dir", default=os.path.join("logs", "eval"),
                        help="the JSON log goes here, apart from training logs")
    parser.add_argument("--eval-batch-size", type=bounded(int, 1, 1 << 20), default=1024,
                        help="images per forward pass when extracting features")
    for name, defaults in READOUT_DEFAULTS.items():
        flag, what = "--" + name.replace("_", "-"), name.replace("_", " ")
        parser.add_argument(f"{flag}-lr", type=bounded(float, 0, 10, open_low=True), default=defaults["lr"],
                            help=f"{what}: Adam's peak learning rate, annealed by cosine to 0")
        parser.add_argument(f"{flag}-epochs", type=bounded(int, 1, 100_000), default=defaults["epochs"],
                            help=f"{what}: passes over the 50,000 training images")
        parser.add_argument(f"{flag}-batch-size", type=bounded(int, 1, 1 << 20), default=defaults["batch_size"],
                            help=f"{what}: images per step")
    parser.add_argument("--lin-weight-decay", type=bounded(float, 0, 1), default=None,
                        help="Adam weight decay of both readouts; None = the reference's per backbone: " + ", ".join(
                            f"{arch} {wd:g}" for arch, wd in LINEAR_WEIGHT_DECAY.items()) + " (an exported program "
                        "without its log: resnet18's)")
    return parser


def readouts_from_args(args: argparse.Namespace, arch: str | None) -> dict[str, Readout]:
    reference = LINEAR_WEIGHT_DECAY.get(arch or "resnet18", LINEAR_WEIGHT_DECAY["resnet18"])
    weight_decay = reference if args.lin_weight_decay is None else args.lin_weight_decay
    return {name: Readout(lr=getattr(args, f"{name}_lr"), epochs=getattr(args, f"{name}_epochs"),
                          batch_size=getattr(args, f"{name}_batch_size"), weight_decay=weight_decay)
            for name in READOUT_DEFAULTS}


def evaluate(args: argparse.Namespace, argv: list[str]) -> dict:
    wall_start = time.perf_counter()
    device = ab.resolve_device(dataclasses.replace(ab.Config(), device=args.device))
    ab.check_writable(args.log_dir, "--log-dir")
    subject = load_subject(args.model)
    backbone, readouts = subject.artefact.backbone.to(device), readouts_from_args(args, subject.arch)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    start = time.perf_counter()
    data = ab.load_cifar10(args.data_dir, device, args.download)
    data_seconds = time.perf_counter() - start
    n_train, n_test = len(data["train_images"]), len(data["test_images"])
    print(f"model {subject.artefact.path} (run {subject.run_id}, {subject.artefact.format}, {subject.label}); data "
          f"{data['report']['data_dir']}; device {device}; evals {','.join(args.evals)}", flush=True)
    results, seconds = run_evals(backbone, data, args.evals, readouts, args.seed, args.eval_batch_size)
    print(format_table(subject, results, seconds, n_train, n_test))
    artefact = subject.artefact
    log = dict(format="airbench-ssl-log/2", kind="eval", created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               argv=list(argv), model=dict(file=artefact.path, format=artefact.format, sha256=artefact.sha256,
                                           bytes=artefact.bytes, arch=subject.arch, width=subject.width),
               run_id=subject.run_id, train_log=subject.log_path, config=subject.config,
               evaluation=dict(evals=list(args.evals), seed=args.seed, eval_batch_size=args.eval_batch_size,
                               readouts={name: dataclasses.asdict(r) for name, r in readouts.items()},
                               lin_augm_crop_scale=[LIN_AUGM_VIEWS.crop_scale_min, LIN_AUGM_VIEWS.crop_scale_max],
                               train_images=n_train, test_images=n_test),
               environment=ab.environment_report(device), data=data["report"],
               results=dict({f"{name}_pct": None for name in EVALS}, **results,
                            loss_per_batch=subject.loss_per_batch),
               seconds=dict(seconds, data_load=data_seconds), total_wall_seconds=time.perf_counter() - wall_start)
    path = reserve_eval_log(args.log_dir, subject.run_id)
    ab.write_atomic(path, lambda f: f.write(json.dumps(log, indent=1).encode()))
    print(f"log: {path}")
    return log


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        evaluate(args, argv)
    except ab.HarnessError as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError:
        print("evaluate: error: out of GPU memory; lower --eval-batch-size or --lin-augm-batch-size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("evaluate: interrupted; no log was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
