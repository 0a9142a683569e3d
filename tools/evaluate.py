"""The reference's full evaluation table for a model saved by the harness: kNN k=5 and k=10, lin precomp and lin augm.

    python airbench_ssl.py --save-checkpoint ckpt.pt ...        # train, keep the final model
    python tools/evaluate.py ckpt.pt                            # all four, the reference's readout settings
    python tools/evaluate.py ckpt.pt --evals knn5,knn10,lin_precomp --train-log logs/RUN.json

Prints dkobak/simclr-cifar10's table |Backbone|Batch|Loss/batch|kNN(k=5)|kNN(k=10)|lin precomp|lin augm| with the
seconds each evaluation took, and writes a JSON log (kind "eval", naming the training run) into --log-dir.
  knn5, knn10   cosine kNN on backbone features of the unaugmented images (the harness's knn_accuracy)
  lin_precomp   nn.Linear(dim, 10) on precomputed features: Adam lr 0.01, 500 epochs, cosine annealing stepped once
                per epoch, cross-entropy, batches of 1000 in a fresh order each epoch
  lin_augm      the same readout on features of RandomResizedCrop(32, scale=(0.2, 1)) + horizontal-flip views of the
                training images, backbone frozen in eval mode: Adam lr 0.1, 100 epochs, batches of 512; tested on the
                unaugmented test images
Both readouts use weight decay 5e-6 (resnet18, resnet34) or 0 (resnet50), as the reference (at 44b2500). Loss/batch
is the training run's last epoch loss, shown when --train-log gives that run's log.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/evaluate.py)

CHECKPOINT_FORMAT = "airbench-ssl-checkpoint/1"
EVALS = ("knn5", "knn10", "lin_precomp", "lin_augm")  # the table's order
MODEL_FIELDS = ("arch", "width", "projector_hidden_dim", "projector_out_dim")
USED_FIELDS = MODEL_FIELDS + ("batch_size",)  # the table's Batch column is the training batch
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
#                Checkpoint                 #
#############################################
def read_checkpoint_file(path: str) -> dict:
    """The checkpoint's dict, unpickled by torch's weights-only loader: a crafted file cannot run code."""
    if not os.path.exists(path):
        raise ab.HarnessError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ab.HarnessError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    except Exception as error:  # noqa: BLE001 - a damaged or crafted file raises almost anything
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ab.HarnessError(f"{path} is not an airbench-ssl checkpoint: {type(error).__name__}: {reason}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ab.HarnessError(f"{path} is not an airbench-ssl checkpoint (no format {CHECKPOINT_FORMAT!r})")
    return checkpoint


def checked_config(path: str, config: object) -> dict:
    """The saved config, its fields this tool uses checked as the harness checks them. Other fields are only logged:
    a checkpoint from an older or newer harness evaluates the same."""
    if not isinstance(config, dict):
        raise ab.HarnessError(f"checkpoint {path}: its config is {type(config).__name__}, not a dict")
    try:
        json.dumps(config, allow_nan=False)  # it goes into the log, which is written only at the end
    except (TypeError, ValueError) as error:
        raise ab.HarnessError(f"checkpoint {path}: its config is not plain JSON data ({error})") from None
    missing = [name for name in USED_FIELDS if name not in config]
    if missing:
        raise ab.HarnessError(f"checkpoint {path}: its config lacks {', '.join(missing)}")
    try:
        ab.validate_config(dataclasses.replace(ab.Config(), **{name: config[name] for name in USED_FIELDS}))
    except ab.HarnessError as error:
        raise ab.HarnessError(f"checkpoint {path}: {error}") from None
    return config


def check_weights_fit(path: str, config: dict, state: object) -> None:
    """Compare names, shapes and dtypes with the model the config describes, built on the meta device: a file
    claiming a huge model allocates nothing, and every mismatch gets one readable line."""
    if not isinstance(state, dict):
        raise ab.HarnessError(f"checkpoint {path}: its state_dict is {type(state).__name__}, not a dict")
    with torch.device("meta"):
        expected = ab.make_model(*(config[name] for name in MODEL_FIELDS)).state_dict()
    model = ", ".join(f"{name}={config[name]}" for name in MODEL_FIELDS)
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise ab.HarnessError(f"checkpoint {path}: weights do not fit {model}: {len(missing)} missing (first: "
                              f"{missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]})")
    for name, want in expected.items():
        got = state[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            found = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise ab.HarnessError(f"checkpoint {path}: weights do not fit {model}: {name} is {found}, expected "
                                  f"{tuple(want.shape)} {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise ab.HarnessError(f"checkpoint {path}: {name} holds NaN or infinite values")


def load_checkpoint(path: str, device: torch.device) -> tuple[ab.SimCLRModel, dict, str]:
    """A checkpoint written by `airbench_ssl.py --save-checkpoint` -> (model on device, saved config, run_id)."""
    checkpoint = read_checkpoint_file(path)
    config, run_id = checked_config(path, checkpoint.get("config")), checkpoint.get("run_id")
    if not isinstance(run_id, str):
        raise ab.HarnessError(f"checkpoint {path}: its run_id is {type(run_id).__name__}, not a string")
    check_weights_fit(path, config, checkpoint.get("state_dict"))
    model = ab.make_model(*(config[name] for name in MODEL_FIELDS))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), config, run_id


#############################################
#              Linear readouts              #
#############################################
def train_linear(inputs: torch.Tensor, labels: torch.Tensor, readout: Readout, seed: int,
                 features_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 progress: Callable[[str], None] | None = None) -> nn.Linear:
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
    start = time.perf_counter()
    for epoch in range(readout.epochs):
        for group in optimizer.param_groups:
            group["lr"] = ab.learning_rate(schedule, readout.lr, epoch, 0, 1)
        loss_sum, batches = torch.zeros((), device=device), 0
        for idx in torch.randperm(len(labels), generator=generator, device=device).split(readout.batch_size):
            batch = inputs[idx] if features_of is None else features_of(inputs[idx])
            loss = F.cross_entropy(classifier(batch), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, batches = loss_sum + loss.detach(), batches + 1
        if progress and ((epoch + 1) % max(1, readout.epochs // 10) == 0 or epoch + 1 == readout.epochs):
            progress(f"epoch {epoch + 1}/{readout.epochs}, loss {loss_sum.item() / batches:.4f}, "
                     f"{time.perf_counter() - start:.1f} s")
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
             test_labels: torch.Tensor, readout: Readout, seed: int,
             progress: Callable[[str], None] | None = None) -> float:
    """Readout trained on crop + flip views (backbone frozen, eval mode), tested on features of the unaugmented test
    images -> accuracy in percent. The backbone's training mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        generator = torch.Generator(train_labels.device).manual_seed(seed)
        classifier = train_linear(train_images, train_labels, readout, seed, crop_flip_features(backbone, generator),
                                  progress)
    finally:
        backbone.train(was_training)
    return linear_accuracy(classifier, test_features, test_labels)


def run_evals(model: ab.SimCLRModel, data: dict, names: Sequence[str], readouts: dict[str, Readout], seed: int,
              eval_batch_size: int = 1024, progress: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """-> ({name_pct: accuracy in percent}, {step: seconds}). Each readout is seeded on its own, so its result does
    not depend on which other evaluations ran."""
    device, results, seconds = data["train_labels"].device, {}, {}

    def say(name: str) -> Callable[[str], None] | None:
        return None if progress is None else lambda text: progress(f"{name}: {text}")

    start = time.perf_counter()
    train_features, test_features = (ab.extract_features(model.backbone, data[key], eval_batch_size)
                                     for key in ("train_images", "test_images"))
    ab.synchronize(device)
    seconds["features"] = time.perf_counter() - start
    for name in names:
        start = time.perf_counter()
        if name in ("knn5", "knn10"):
            results[f"{name}_pct"] = ab.knn_accuracy(train_features, data["train_labels"], test_features,
                                                     data["test_labels"], int(name[3:]))
        elif name == "lin_precomp":
            classifier = train_linear(train_features, data["train_labels"], readouts[name], seed,
                                      progress=say(name))
            results[f"{name}_pct"] = linear_accuracy(classifier, test_features, data["test_labels"])
        else:
            results[f"{name}_pct"] = lin_augm(model.backbone, data["train_images"], data["train_labels"],
                                              test_features, data["test_labels"], readouts[name], seed, say(name))
        seconds[name] = time.perf_counter() - start
    return results, seconds


#############################################
#                  Output                   #
#############################################
def format_table(config: dict, results: dict, seconds: dict, loss_per_batch: float | None) -> str:
    def cell(name: str) -> str:
        return f"{results[name]:.2f}" if results.get(name) is not None else "-"

    loss = "-" if loss_per_batch is None else f"{loss_per_batch:.3f}"
    times = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    return (f"{TABLE_HEADER}\n|{config['arch']} (width {config['width']})|{config['batch_size']}|{loss}|"
            f"{cell('knn5_pct')}|{cell('knn10_pct')}|{cell('lin_precomp_pct')}|{cell('lin_augm_pct')}|\n"
            f"(evaluation times: {times})")


def last_epoch_loss(path: str, run_id: str) -> float:
    """The training loss of the last epoch, from the run's own log (refused when it is another run's)."""
    try:
        with open(path, encoding="utf-8") as f:
            log = json.load(f)
    except (OSError, ValueError, RecursionError) as error:
        raise ab.HarnessError(f"cannot read training log {path}: {str(error)[:200]}") from None
    if not isinstance(log, dict) or log.get("kind") != "train" or not isinstance(log.get("epochs"), list):
        raise ab.HarnessError(f"{path} is not a training log of the harness")
    if log.get("run_id") != run_id:
        raise ab.HarnessError(f"training log {path} is of run {log.get('run_id')!r}, the checkpoint of run {run_id!r}")
    losses = [row.get("loss") for row in log["epochs"] if isinstance(row, dict)]
    losses = [loss for loss in losses if isinstance(loss, (int, float)) and not isinstance(loss, bool)]
    if not losses:
        raise ab.HarnessError(f"training log {path} has no epoch with a loss")
    return float(losses[-1])


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    parser.add_argument("checkpoint", help="a file written by airbench_ssl.py --save-checkpoint")
    parser.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ (\"\": the harness's "
                                                       "search: ./data, then ../shared/data)")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 if none is found")
    parser.add_argument("--evals", type=eval_names, default=",".join(EVALS), help="which columns to fill")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto = cuda if available")
    parser.add_argument("--seed", type=bounded(int, 0, 2**63 - 1), default=0, help="readout init, order and views")
    parser.add_argument("--log-dir", default=os.path.join("logs", "eval"),
                        help="the JSON log goes here, apart from training logs")
    parser.add_argument("--train-log", default="", help="the training run's log, for the Loss/batch column")
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
                            f"{arch} {wd:g}" for arch, wd in LINEAR_WEIGHT_DECAY.items()))
    return parser


def readouts_from_args(args: argparse.Namespace, arch: str) -> dict[str, Readout]:
    weight_decay = LINEAR_WEIGHT_DECAY[arch] if args.lin_weight_decay is None else args.lin_weight_decay
    return {name: Readout(lr=getattr(args, f"{name}_lr"), epochs=getattr(args, f"{name}_epochs"),
                          batch_size=getattr(args, f"{name}_batch_size"), weight_decay=weight_decay)
            for name in READOUT_DEFAULTS}


def evaluate(args: argparse.Namespace, argv: list[str]) -> dict:
    wall_start = time.perf_counter()
    device = ab.resolve_device(dataclasses.replace(ab.Config(), device=args.device))
    ab.check_writable(args.log_dir, "--log-dir")
    model, config, run_id = load_checkpoint(args.checkpoint, device)
    checkpoint_sha256 = file_sha256(args.checkpoint)
    loss_per_batch = last_epoch_loss(args.train_log, run_id) if args.train_log else None
    readouts = readouts_from_args(args, config["arch"])
    torch.backends.cudnn.benchmark = device.type == "cuda"
    start = time.perf_counter()
    data = ab.load_cifar10(args.data_dir, device, args.download)
    data_seconds = time.perf_counter() - start
    print(f"checkpoint {args.checkpoint} (run {run_id}): {', '.join(f'{k}={config[k]}' for k in USED_FIELDS)}; "
          f"data {data['report']['data_dir']}; device {device}; evals {','.join(args.evals)}", flush=True)
    results, seconds = run_evals(model, data, args.evals, readouts, args.seed, args.eval_batch_size,
                                 progress=lambda text: print(text, flush=True))
    print(format_table(config, results, seconds, loss_per_batch))
    log = dict(format="airbench-ssl-log/2", kind="eval", created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               argv=list(argv), checkpoint=args.checkpoint, checkpoint_run_id=run_id,
               checkpoint_sha256=checkpoint_sha256, train_log=args.train_log or None, config=config,
               evaluation=dict(evals=list(args.evals), seed=args.seed, eval_batch_size=args.eval_batch_size,
                               readouts={name: dataclasses.asdict(r) for name, r in readouts.items()},
                               lin_augm_crop_scale=[LIN_AUGM_VIEWS.crop_scale_min, LIN_AUGM_VIEWS.crop_scale_max]),
               environment=ab.environment_report(device), data=data["report"],
               results=dict({f"{name}_pct": None for name in EVALS}, **results, loss_per_batch=loss_per_batch),
               seconds=dict(seconds, data_load=data_seconds), total_wall_seconds=time.perf_counter() - wall_start)
    path = reserve_eval_log(args.log_dir, run_id)
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
