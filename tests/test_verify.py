"""tools/verify.py: a run's accuracy recomputed from its saved model (a tiny real run end to end), every unsafe or
tampered model file and every batch-dependent backbone refused with its reason, the FLOP floor against a slow
count, and reproduce --dry-run on a record made here."""

import contextlib
import copy
import glob
import hashlib
import io
import json
import os
import pickle
import re
import zipfile

import pytest
import torch
import torch.nn as nn
import verify as vf
from conftest import ROOT

import airbench_ssl as ab

RUN_FLAGS = ["--preset", "recipe", "--device", "cpu", "--width", "4", "--batch-size", "40", "--epochs", "1",
             "--check-first-epoch", "1", "--download", "false", "--projector-hidden-dim", "32",
             "--eval-batch-size", "16"]  # 16: the 60 test images fall into several batches


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def train(root, log_dir, *flags):
    """A tiny real run of the harness on the synthetic data -> its log (dict) and log path. One compute thread, as
    every test here (module fixtures run before the per-test one_compute_thread)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert ab.main(RUN_FLAGS + ["--data-dir", root, "--log-dir", str(log_dir), *flags]) == 0
    finally:
        torch.set_num_threads(saved)
    (path,) = glob.glob(os.path.join(str(log_dir), "*.json"))
    with open(path, encoding="utf-8") as f:
        return json.load(f), path


@pytest.fixture(scope="module")
def weights_run(fake_cifar_root, tmp_path_factory):
    return train(fake_cifar_root, tmp_path_factory.mktemp("weights_run"))


@pytest.fixture(scope="module")
def export_run(fake_cifar_root, tmp_path_factory):
    return train(fake_cifar_root, tmp_path_factory.mktemp("export_run"), "--save-model", "export")


def verify(log, root, **kwargs):
    return vf.verify_run(log, data_dir=root, device="cpu", **kwargs)


def save_log(log, folder, name=None):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), name or f"{log['run_id']}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(log, f)
    return path


def with_model(log, model_path, folder):
    """The log of a run whose model file is model_path (copied beside it, the log's entry updated to match): what a
    cheater who also edits the log would submit."""
    raw = open(model_path, "rb").read()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(str(folder), f"{log['run_id']}.model.pt"), "wb") as f:
        f.write(raw)
    fmt = "export" if "archive_format" in "".join(zipfile.ZipFile(model_path).namelist()) else "weights"
    changed = dict(log, model=dict(file=f"{log['run_id']}.model.pt", format=fmt, bytes=len(raw),
                                   sha256=hashlib.sha256(raw).hexdigest()))
    return save_log(changed, folder)


#############################################
#           End to end: honest runs         #
#############################################
@pytest.mark.parametrize("run", ["weights_run", "export_run"])
def test_verify_recomputes_the_logged_knn_of_a_real_run(run, fake_cifar_root, request):
    log, path = request.getfixturevalue(run)
    assert log["model"]["format"] == run.split("_")[0] and os.path.isfile(vf.artefact_path(log, path))
    result = verify(path, fake_cifar_root)
    # Same CPU, same fp32 numerics: the recomputation agrees exactly, not merely within the tolerance.
    assert result.recomputed_knn_pct == log["result"]["knn_at_stop_pct"] == log["final_eval"]["knn10_pct"]
    assert result.recomputed_final_eval == log["final_eval"]
    assert (result.train_images, result.test_images, result.knn_k) == (200, 60, 10)
    assert result.batch_check.max_relative_deviation < 1e-5  # fp32 rounding only, far inside the tolerance
    # every test image and 10 % of the train images reshuffled; alone: 32 test and the (only 20) mixed train images
    assert result.batch_check.images_reshuffled == 60 + 20 and result.batch_check.images_alone == 32 + 20
    assert result.time_floor.margin > 1 and not result.official_data
    line = result.summary()
    assert "VERIFIED" in line and "60 test images vs 200 train images" in line and "UNOFFICIAL" in line
    json.dumps(result.as_dict(), allow_nan=False)  # ready for a record


def test_the_model_file_is_found_in_a_models_folder_and_data_can_be_shared(weights_run, fake_cifar_root, tmp_path):
    log, path = weights_run
    os.makedirs(tmp_path / "models")
    os.link(vf.artefact_path(log, path), tmp_path / "models" / log["model"]["file"])
    log_only = save_log(log, tmp_path / "logs")
    data = vf.load_data(fake_cifar_root)
    result = vf.verify_run(log_only, data=data, models_dir=str(tmp_path / "models"))
    assert result.recomputed_knn_pct == log["result"]["knn_at_stop_pct"]
    with pytest.raises(vf.VerifyError, match="model file: cannot read"):
        vf.verify_run(log_only, data=data)  # not beside the log


#############################################
#         Tampered logs and models           #
#############################################
def test_a_tampered_accuracy_is_refused(weights_run, fake_cifar_root, tmp_path):
    log, path = weights_run
    logged = log["result"]["knn_at_stop_pct"]
    for where in ("result", "final_eval"):
        tampered = copy.deepcopy(log)
        key = "knn_at_stop_pct" if where == "result" else "knn10_pct"
        tampered[where][key] = logged + (5 if logged <= 95 else -5)
        with pytest.raises(vf.VerifyError) as refused:
            verify(tampered, fake_cifar_root, model_path=vf.artefact_path(log, path))
        assert refused.value.check == "accuracy" and f"{where}.{key} says" in str(refused.value)
    # Within the tolerance (0.1 points) is accepted: another GPU's numerics may flip a few of 10,000 predictions.
    close = copy.deepcopy(log)
    close["result"]["knn_at_stop_pct"] = logged + 0.09
    assert verify(close, fake_cifar_root, model_path=vf.artefact_path(log, path)).difference_pct == pytest.approx(-0.09)


def test_a_tampered_model_file_is_refused_and_so_is_the_log_edited_to_match(weights_run, fake_cifar_root, tmp_path):
    log, path = weights_run
    saved = torch.load(vf.artefact_path(log, path), weights_only=True)
    saved["state_dict"] = {k: torch.zeros_like(v) for k, v in saved["state_dict"].items()}
    torch.save(saved, tmp_path / "zeroed.pt")
    os.makedirs(tmp_path / "swapped")
    os.replace(tmp_path / "zeroed.pt", tmp_path / "swapped" / log["model"]["file"])
    with pytest.raises(vf.VerifyError) as refused:  # the log's sha256 no longer matches
        verify(save_log(log, tmp_path / "swapped"), fake_cifar_root)
    assert refused.value.check == "model file" and "not the file the run saved" in str(refused.value)
    # The determined cheater also rewrites the log's sha256: the model's own accuracy then gives it away. (All-zero
    # weights give equal features for every image: kNN then votes the first 10 train images' labels, 10.00%.)
    assert log["result"]["knn_at_stop_pct"] != 10.0
    with pytest.raises(vf.VerifyError) as refused:
        verify(with_model(log, tmp_path / "swapped" / log["model"]["file"], tmp_path / "edited"), fake_cifar_root)
    assert refused.value.check == "accuracy" and "gives 10.00%" in str(refused.value)


def test_an_evaluation_changed_at_runtime_in_the_training_process_is_refused(fake_cifar_root, tmp_path, monkeypatch):
    """The run's own process inflates its kNN (any patch of the evaluation does the same): the log claims what its
    saved model does not give when the harness's own evaluation runs in a fresh process."""
    honest = ab.knn_accuracy
    monkeypatch.setattr(ab, "knn_accuracy", lambda *args: min(100.0, honest(*args) + 20.0))
    log, path = train(fake_cifar_root, tmp_path / "cheat")
    monkeypatch.setattr(ab, "knn_accuracy", honest)
    with pytest.raises(vf.VerifyError) as refused:
        verify(path, fake_cifar_root)
    assert refused.value.check == "accuracy"


class BatchCentred(nn.Module):
    """A cheat: eval features minus the batch's mean feature, so every test feature depends on its batch."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        features = self.backbone(x)
        return features - features.mean(0, keepdim=True)


def export(module, path, train_mode=False):
    """As the harness exports a backbone: a dynamic batch of 32 px images (here in eval mode unless train_mode)."""
    example, batch = torch.rand(2, 3, 32, 32), torch.export.Dim("batch")
    program = torch.export.export(module.train(train_mode), (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)  # to a buffer, as the harness: torch warns about a file not named .pt2
    with open(path, "wb") as f:
        f.write(buffer.getvalue())
    return str(path)


def test_a_backbone_whose_features_depend_on_the_batch_is_refused(export_run, fake_cifar_root, tmp_path):
    log, path = export_run
    torch.manual_seed(0)
    cheat = BatchCentred(tiny_backbone()).eval()
    model = export(cheat, tmp_path / "cheat.pt")
    # The log claims exactly what the canonical evaluation of the cheat gives: only the batch check can see it.
    data = vf.load_data(fake_cifar_root)
    train_features, test_features = (ab.extract_features(cheat, data[key], 16) for key in ("train_images",
                                                                                              "test_images"))
    claims = {k: ab.knn_accuracy(train_features, data["train_labels"], test_features, data["test_labels"], k)
              for k in (5, 10)}
    claimed = copy.deepcopy(log)
    claimed["result"]["knn_at_stop_pct"], claimed["final_eval"] = claims[10], dict(knn5_pct=claims[5],
                                                                                   knn10_pct=claims[10])
    with pytest.raises(vf.VerifyError) as refused:
        verify(with_model(claimed, model, tmp_path / "submitted"), fake_cifar_root)
    assert refused.value.check == "batch independence" and "rest of its batch" in str(refused.value)


def test_a_backbone_that_changes_its_own_state_is_refused():
    class Counting(nn.Module):  # remembers how many images it has seen, which could steer its features
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen.add_(len(x))
            return self.conv(x).mean((2, 3))

    backbone = Counting()
    assert vf.check_state_unchanged(backbone, lambda: 7) == 7
    with pytest.raises(vf.VerifyError, match="state: the backbone changed its own seen"):
        vf.check_state_unchanged(backbone, lambda: backbone(torch.rand(2, 3, 32, 32)))


def test_verify_needs_the_data_the_run_used(weights_run, fake_cifar_root, easy_cifar_root):
    log, path = weights_run
    with pytest.raises(vf.VerifyError, match="data: data_batch_1 has md5 .* verify needs the CIFAR-10 copy"):
        verify(path, easy_cifar_root)
    with pytest.raises(vf.VerifyError, match="data: .* is not the official CIFAR-10"):
        verify(path, fake_cifar_root, require_official=True)


@pytest.mark.parametrize("change, message", [
    (lambda log: log.update(model=None), "model file: the run saved no model"),
    (lambda log: log["model"].update(file="../elsewhere.model.pt"), "model file: the log names the model file"),
    (lambda log: log["result"].update(knn_at_stop_pct=None), r"log: result.knn_at_stop_pct is None"),
    (lambda log: log["config"].update(knn_k="10"), "log: config.knn_k is '10', not an integer"),
    (lambda log: log["model"].update(format="onnx"), "model file: .*not the file the run saved|format 'onnx'"),
])
def test_broken_logs_are_refused_in_one_line(weights_run, fake_cifar_root, tmp_path, change, message):
    log, path = weights_run
    broken = copy.deepcopy(log)
    change(broken)
    with pytest.raises(vf.VerifyError, match=message) as refused:
        vf.verify_run(save_log(broken, os.path.dirname(path) if broken.get("model") else tmp_path, "broken.json"),
                      data_dir=fake_cifar_root)
    assert "\n" not in str(refused.value)


#############################################
#           Model files read safely          #
#############################################
class Payload:
    """Unpickling this creates `marker`: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def tiny_backbone():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def weights_file(**changes):
    backbone = ab.CifarResNet("resnet18", 4)
    saved = dict(format=vf.ARTEFACT_FORMAT, kind="weights", arch="resnet18", width=4,
                 state_dict=dict(backbone.state_dict()))
    saved.update(changes)
    return saved


def with_state(change):
    saved = weights_file()
    change(saved["state_dict"])
    return saved


def rewrite_archive(source, target, change):
    """Copy a torch.export archive, each member's bytes passed through change(name, bytes)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))


def edit_program(edit):
    def change(name, raw):
        if not name.endswith("/models/model.json"):
            return raw
        program = json.loads(raw)
        edit(program)
        return json.dumps(program).encode()
    return change


def pickled_weight(marker):
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)

    def change(name, raw):
        if name.endswith("/data/weights/weight_0"):
            return payload.getvalue()
        if name.endswith("model_weights_config.json"):
            config = json.loads(raw)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        return raw
    return change


def honest_export(tmp_path):
    return export(tiny_backbone(), tmp_path / "honest.pt")


def exported(module, train_mode=False):
    def write(tmp_path, marker):
        return export(module(), tmp_path / "module.pt", train_mode)
    return write


def archive(change_of_marker):
    def write(tmp_path, marker):
        rewrite_archive(honest_export(tmp_path), tmp_path / "crafted.pt", change_of_marker(marker))
        return str(tmp_path / "crafted.pt")
    return write


def saved(obj_of_marker):
    def write(tmp_path, marker):
        torch.save(obj_of_marker(marker), tmp_path / "model.pt")
        return str(tmp_path / "model.pt")
    return write


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_backbone()

    def forward(self, x):
        features = self.body(x)
        return features + 0.01 * torch.randn_like(features)


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.dropout = tiny_backbone(), nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(self.body(x))


@torch.library.custom_op("verify_test::double", mutates_args=())
def custom_double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@custom_double.register_fake
def _(x):
    return torch.empty_like(x)


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_backbone()

    def forward(self, x):
        return custom_double(self.body(x))


def plain(raw_of_marker):
    def write(tmp_path, marker):
        (tmp_path / "model.pt").write_bytes(raw_of_marker(marker))
        return str(tmp_path / "model.pt")
    return write


def folder(tmp_path, marker):
    os.mkdir(tmp_path / "dir")
    return str(tmp_path / "dir")


UNSAFE = [
    ("weights with a code payload", saved(lambda m: weights_file(extra=Payload(m))), "holds a Python object"),
    ("plain pickle payload", plain(lambda m: pickle.dumps(Payload(m), protocol=2)),
     r"holds a Python object \(io.open\)"),
    ("export: code in a shape expression", archive(lambda m: edit_program(lambda p: _poison_shapes(p, m))),
     "shape expression .* has characters outside a plain expression"),
    ("export: guard code", archive(lambda m: edit_program(lambda p: p.update(guards_code=[f"open({m!r}, 'w')"]))),
     "carries guard code"),
    ("export: a pickled weight", archive(pickled_weight), "holds a Python object"),
    ("export: custom operator", exported(Custom), "calls 'torch.ops.verify_test.double.default'"),
    ("export: random operator", exported(Noisy), "random operator aten.randn_like"),
    ("export: training-mode dropout", exported(Dropping, train_mode=True), "random operator aten.dropout"),
    ("export: training-mode batch norm", exported(lambda: nn.Sequential(tiny_backbone(), nn.BatchNorm1d(8)),
                                                  train_mode=True), "writes into b_1_num_batches_tracked"),
    ("text", plain(lambda m: b"not a model " * 300), "not a file torch.save wrote"),
    ("empty file", plain(lambda m: b""), "not a file torch.save wrote"),
    ("another dict", saved(lambda m: {"a": torch.zeros(2)}), "not an airbench-ssl weights file"),
    ("bare state_dict", saved(lambda m: ab.CifarResNet("resnet18", 4).state_dict()), "not an airbench-ssl weights"),
    ("unknown entry", saved(lambda m: weights_file(note="hi")), r"unexpected entries \['note'\]"),
    ("unknown arch", saved(lambda m: weights_file(arch="resnet99")), "choose one of"),
    ("width as text", saved(lambda m: weights_file(width="4")), "width='4' should be of type int"),
    ("other width", saved(lambda m: weights_file(width=8)), r"conv1.weight is \(4, 3, 3, 3\).*\(8, 3, 3, 3\)"),
    ("missing weight", saved(lambda m: with_state(lambda s: s.pop("bn1.bias"))), "1 missing"),
    ("extra weight", saved(lambda m: with_state(lambda s: s.update(extra=torch.zeros(1)))), "1 unexpected"),
    ("float64 weight", saved(lambda m: with_state(lambda s: s.update({"bn1.bias": torch.zeros(4).double()}))),
     "bn1.bias is .* torch.float64"),
    ("NaN weight", saved(lambda m: with_state(lambda s: s["conv1.weight"].view(-1)[3].fill_(float("nan")))),
     "conv1.weight holds NaN"),
    ("a folder", folder, "not a regular file"),
    ("missing", lambda t, m: str(t / "none.pt"), "model file: cannot read"),
]


def _poison_shapes(program, marker):
    """Code in the text torch.export.load hands to sympify (which evaluates it)."""
    for item in vf._json_dicts(program):
        if "expr_str" in item:
            item["expr_str"] = f"open({marker!r}, 'w') and 1 or {item['expr_str']}"


@pytest.mark.parametrize("write, message", [case[1:] for case in UNSAFE], ids=[case[0] for case in UNSAFE])
def test_unsafe_or_wrong_model_files_are_refused_unrun(tmp_path, write, message):
    marker = str(tmp_path / "payload_ran")
    path = write(tmp_path, marker)
    with pytest.raises(vf.VerifyError) as refused:
        vf.load_artefact(path)
    text = str(refused.value)
    assert refused.value.check in ("artefact", "model file") and "\n" not in text
    assert re.search(message, text), text
    assert "weights_only" not in text  # torch's advice to load unsafely is never passed on
    assert not os.path.exists(marker)


@pytest.mark.parametrize("text, ok", [
    ("Symbol('s77', positive=True, integer=True)", True),
    ("2*Symbol('s77', positive=True, integer=True) + 1", True),
    ("FloorDiv(Symbol('s0', positive=True, integer=True), 2)", True),
    ("Max(1, Mod(Symbol('s3', integer=True), 4))", True),
    ("__import__('os').system('true')", False),
    ("Symbol('s1', positive=True, integer=True).__class__", False),
    ("Symbol('s1; import os', integer=True)", False),
    ("(lambda: 1)()", False),
    ("eval(1)", False),
    ("S.true", False),
    ("9**9**9**9", False),  # not code, but sympy would compute for ever
])
def test_shape_expressions_are_plain_arithmetic_only(text, ok):
    assert (vf.shape_expression_problem(text) is None) == ok


def test_the_crafted_exports_would_run_their_code_under_a_plain_torch_export_load(tmp_path):
    """The refusals above are not theoretical: torch.export.load and ep.module() run code from these files."""
    marker = str(tmp_path / "payload_ran")
    path = archive(lambda m: edit_program(lambda p: _poison_shapes(p, m)))(tmp_path, marker)
    with contextlib.suppress(Exception):
        torch.export.load(path)
    assert os.path.exists(marker)


def test_honest_exports_load_including_eval_mode_dropout(tmp_path):
    torch.manual_seed(0)
    module = Dropping().eval()
    artefact = vf.load_artefact(export(module, tmp_path / "dropout.pt"))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(artefact.backbone(x), module(x))
    assert artefact.format == "export" and artefact.arch is None
    features = ab.extract_features(artefact.backbone, torch.zeros(5, 3, 32, 32, dtype=torch.uint8), 2)
    assert features.shape == (5, 8) and not artefact.backbone.training  # .eval() works on the wrapper


def test_weights_round_trip_exactly(tmp_path):
    backbone = ab.CifarResNet("resnet18", 4).train()
    backbone(torch.rand(8, 3, 32, 32))  # move the BatchNorm buffers
    torch.save(weights_file(state_dict=backbone.state_dict()), tmp_path / "w.pt")
    artefact = vf.load_artefact(str(tmp_path / "w.pt"))
    assert (artefact.format, artefact.arch, artefact.width) == ("weights", "resnet18", 4)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(artefact.backbone(x), backbone.eval()(x))
    raw = open(tmp_path / "w.pt", "rb").read()
    entry = dict(file="w.pt", format="weights", sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    assert vf.load_artefact(str(tmp_path / "w.pt"), entry).sha256 == entry["sha256"]
    with pytest.raises(vf.VerifyError, match="not the file the run saved"):
        vf.load_artefact(str(tmp_path / "w.pt"), dict(entry, bytes=len(raw) + 1))


#############################################
#               The time floor               #
#############################################
def slow_forward_flops(module, px):
    """2 x multiply-adds of every convolution and linear layer, from their shapes, by forward hooks."""
    total = []

    def count(layer, inputs, output):
        if isinstance(layer, nn.Conv2d):
            total.append(2 * output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0]
                         * layer.kernel_size[1])
        elif isinstance(layer, nn.Linear):
            total.append(2 * output.numel() * layer.in_features)

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    with torch.no_grad():
        module.eval()(torch.zeros(1, 3, px, px))
    for hook in hooks:
        hook.remove()
    return sum(total)


@pytest.mark.parametrize("px", [32, 24, 16])
def test_forward_flops_count_every_convolution(px):
    backbone = ab.CifarResNet("resnet18", 8)
    assert vf.forward_flops(backbone, px) == slow_forward_flops(backbone, px) > 0
    assert vf.forward_flops(ab.CifarResNet("resnet18", 64), 32) == pytest.approx(1.11e9, rel=0.01)  # ResNet18


def test_an_exported_backbone_is_counted_at_32_px_and_scaled_down_to_a_lower_bound(export_run):
    log, path = export_run
    backbone = ab.CifarResNet("resnet18", 4)  # what the run exported (its FLOPs do not depend on its weights)
    artefact = vf.load_artefact(vf.artefact_path(log, path))
    assert vf.forward_flops(artefact.backbone, 32) == vf.forward_flops(backbone, 32)
    for px in (16, 20, 24):  # stride-2 stages round up: the true count is at least the area-scaled one
        assert vf.forward_flops(artefact.backbone, px) <= vf.forward_flops(backbone, px)


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA B200", "B200"), ("NVIDIA GB200", "GB200"), ("nvidia  h100   pcie", "H100 PCIe"),
])
def test_gpu_names_find_their_peak(name, model):
    peak, known = vf.gpu_peak(name)
    assert known and peak.model == model and peak.source


def test_an_unknown_gpu_gets_the_highest_known_peak():
    for name in ("NVIDIA RTX PRO 9000", "", None, "NVIDIA L40"):
        peak, known = vf.gpu_peak(name)
        assert not known and peak.tflops == max(p.tflops for p in vf.GPU_PEAKS)
    # Each entry is the fastest dense rate: at least its bf16 rate, and a variant never above its bare model.
    assert vf.gpu_peak("NVIDIA H100 PCIe")[0].tflops < vf.gpu_peak("NVIDIA H100")[0].tflops


def timed_log(seconds, gpu="NVIDIA H100 80GB HBM3", world_size=1, **config):
    config = dict(dataclasses_config(), train_subset=0, **config)
    return dict(config=config, environment=dict(gpu_name=gpu, world_size=world_size),
                epochs=[dict(epoch=e + 1, epoch_seconds=s) for e, s in enumerate(seconds)])


def dataclasses_config():
    return {f: getattr(ab.Config(), f) for f in ab.Config.__dataclass_fields__}


def floor_seconds(backbone, px=32, n_views=2, peak=1979.0, world_size=1):
    return 50_000 * n_views * 3 * slow_forward_flops(backbone, px) / (peak * 1e12 * world_size)


def test_the_flop_floor_refuses_an_impossible_epoch_and_accepts_a_plausible_one():
    backbone = ab.CifarResNet("resnet18", 64)
    floor = floor_seconds(backbone)  # 50,000 images x 2 views x 3 x 1.11 GFLOP at 1,979 TFLOPS: 0.17 s
    assert 0.15 < floor < 0.2
    result = vf.check_time_floor(timed_log([12.0, 2.5, 3.0]), backbone)  # the reference's A100 epoch took 11.9 s
    assert result.fastest_epoch == 2 and result.margin == pytest.approx(2.5 / floor)
    with pytest.raises(vf.VerifyError, match=r"time floor: epoch 2 took 0.1 s.*at least 0.168.*H100 SXM peak of "
                                             r"1979 TFLOPS \(FP8"):
        vf.check_time_floor(timed_log([12.0, 0.1, 3.0]), backbone)
    # Eight GPUs share the work: eight times faster is possible; the same time on one GPU is not.
    assert vf.check_time_floor(timed_log([floor / 7], world_size=8), backbone).margin == pytest.approx(8 / 7)
    with pytest.raises(vf.VerifyError, match="time floor"):
        vf.check_time_floor(timed_log([floor / 7], world_size=1), backbone)


def test_the_floor_follows_drop_last_and_progressive_resolution():
    backbone = ab.CifarResNet("resnet18", 8)
    base = vf.check_time_floor(timed_log([1.0]), backbone).fastest_floor_seconds
    # the harness trains two views: a log's other fields cannot lower the floor
    assert vf.check_time_floor(timed_log([1.0], n_views=1), backbone).fastest_floor_seconds == pytest.approx(base)
    dropped = vf.check_time_floor(timed_log([1.0], batch_size=512, drop_last=True), backbone)
    assert dropped.trained_images_per_epoch == 50_000 - 50_000 % 512
    # A 16 px epoch costs a quarter (exactly, for this network): a time possible at 16 px is impossible at 32 px.
    quarter = base * slow_forward_flops(backbone, 16) / slow_forward_flops(backbone, 32)
    assert quarter == pytest.approx(base / 4)
    small = vf.check_time_floor(timed_log([0.5 * base, 1.0], low_res_px=16, low_res_epochs=1), backbone)
    assert small.fastest_epoch == 1 and small.fastest_floor_seconds == pytest.approx(quarter)
    with pytest.raises(vf.VerifyError, match="time floor: epoch 1"):
        vf.check_time_floor(timed_log([0.5 * base, 1.0]), backbone)


#############################################
#         Reproduce and the launch           #
#############################################
@pytest.fixture(scope="module")
def record(fake_cifar_root, tmp_path_factory):
    """A record of three tiny runs (seeds 0, 1, 2, target 1 %) as tools/leaderboard.py add files them: record.json and
    the logs. Runs made inside pytest log pytest as their launcher; a record's runs were launched as the harness."""
    folder = tmp_path_factory.mktemp("records") / "2026-01-01_Tiny"
    names = []
    for seed in range(3):
        log, _ = train(fake_cifar_root, tmp_path_factory.mktemp(f"seed{seed}"), "--seed", str(seed), "--target-pct",
                       "1")  # every run of a record reaches its target
        log["launch"]["command"] = ["airbench_ssl.py", *log["argv"]]
        names.append(os.path.basename(save_log(log, folder)))
    (folder / "record.json").write_text(json.dumps(dict(name="Tiny", date="2026-01-01", logs=names)))
    return str(folder)


@pytest.mark.slow  # a fresh Python process imports torch and trains: 15-25 s on 2 busy cores
def test_reproduce_dry_run_runs_the_logged_source_in_a_new_folder(record, fake_cifar_root, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the run's process: one thread, as every test here
    logs = vf.read_record_logs(record)
    folder = str(tmp_path / "again")
    result = vf.reproduce(logs, folder, dry_run=True, data_dir=fake_cifar_root)
    assert result.reproduces and result.dry_run and "the logged source runs" in result.verdict
    with open(os.path.join(folder, "airbench_ssl.py"), encoding="utf-8") as f:
        assert f.read() == logs[0]["code"]["source"]
    (path,) = result.logs
    with open(path, encoding="utf-8") as f:
        run = json.load(f)
    assert run["code"]["sha256"] == logs[0]["code"]["sha256"]  # the logged source ran, not this checkout's
    assert run["config"]["seed"] == 3 and run["config"]["width"] == 4 and run["config"]["epochs"] == 1
    assert run["launch"]["command"][0] == "airbench_ssl.py" and os.path.dirname(path) == os.path.join(folder, "logs")
    with pytest.raises(vf.VerifyError, match="reproduce: cannot create the new folder"):
        vf.reproduce(logs, folder, dry_run=True, data_dir=fake_cifar_root)
    assert os.path.exists(path)  # nothing overwritten


@pytest.mark.slow  # two fresh Python processes train: 30-50 s on 2 busy cores
def test_reproduce_reruns_the_record_with_fresh_seeds_and_compares(record, fake_cifar_root, tmp_path, monkeypatch):
    """The GPU path, on the CPU: this process pretends to hold the record's GPU; the runs' own logged argv says
    --device cpu, so they train here."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gpu = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: gpu)
    logs = vf.read_record_logs(record)
    for log in logs:
        log["environment"]["gpu_name"] = gpu
    result = vf.reproduce(logs, str(tmp_path / "again"), runs=2, data_dir=fake_cifar_root)
    assert result.seeds == [3, 4] and result.statuses == ["reached_target"] * 2 and not result.dry_run
    for path, seed in zip(result.logs, result.seeds):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        assert run["config"] == dict(logs[0]["config"], seed=seed, log_dir="logs", data_dir=run["config"]["data_dir"])
        assert run["result"]["time_to_target_seconds"] == result.times_seconds[result.seeds.index(seed)]
    assert result.time_welch is not None and result.time_welch["diff"] == pytest.approx(
        sum(result.times_seconds) / 2 - sum(result.record_times_seconds) / 3)
    assert result.verdict.split(":")[0] in ("reproduces", "does not reproduce") and "Welch p" in result.verdict


def test_reproduce_refuses_without_a_gpu_and_a_wrapper_launched_record(record, tmp_path, monkeypatch, capsys):
    logs = vf.read_record_logs(record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(vf.VerifyError, match="reproduce: needs 1 CUDA GPU"):
        vf.reproduce(logs, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")
    assert vf.main(["reproduce", record, "--folder", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dry-run" in err
    wrapped = copy.deepcopy(logs)
    wrapped[1]["launch"]["command"][0] = "run_patched.py"
    with pytest.raises(vf.VerifyError, match="launch command: the run was launched by 'run_patched.py'"):
        vf.reproduce(wrapped, str(tmp_path / "c"), dry_run=True)


@pytest.mark.parametrize("times, gpu, expect", [
    ([101.0, 99.0, 100.0], "NVIDIA H100 80GB HBM3", "reproduces"),  # the same time
    ([104.0, 104.5, 103.5], "NVIDIA H100 80GB HBM3", "reproduces"),  # 4 % slower: within one GPU model's spread
    ([111.0, 112.0, 110.0], "NVIDIA H100 80GB HBM3", "does not reproduce"),  # 11 % slower, p < 0.05
    ([100.0, 130.0, 92.0], "NVIDIA H100 80GB HBM3", "reproduces"),  # slower on average, not significantly
    ([100.0, 100.0, 100.0], "NVIDIA A100-SXM4-80GB", "not comparable"),
])
def test_a_reproduction_is_judged_by_time_and_hardware(times, gpu, expect):
    record_times, knn = [100.0, 100.5, 99.5], [90.1, 90.2, 90.05]
    welch, _, ok, verdict = vf.judge(["reached_target"] * 3, times, knn, record_times, knn, gpu,
                                     "NVIDIA  H100 80GB HBM3", 3)
    assert verdict.startswith(expect) and ok == (expect == "reproduces")
    _, _, ok, verdict = vf.judge(["reached_target", "max_epochs"], times[:2], knn[:2], record_times, knn, gpu,
                                 "NVIDIA H100 80GB HBM3", 3)
    assert not ok and verdict == "does not reproduce: run 1 ended max_epochs"


def test_the_launch_must_be_the_harness_itself():
    vf.check_launch_command(dict(launch=dict(command=["/home/me/airbench_ssl.py", "--seed", "1"])))
    for command in (["wrapper.py"], [], None, ["airbench_ssl.pyc"]):
        with pytest.raises(vf.VerifyError, match="launch command"):
            vf.check_launch_command(dict(launch=dict(command=command)))
    assert vf.split_flags(["--seed", "1", "--width=4", "--data-dir", "a=b"]) == [("seed", "1"), ("width", "4"),
                                                                             ("data-dir", "a=b")]


#############################################
#                Command line                #
#############################################
def test_the_command_line_prints_one_line_per_run_and_fails_on_a_refusal(weights_run, fake_cifar_root, tmp_path,
                                                                           capsys):
    log, path = weights_run
    tampered = copy.deepcopy(log)
    tampered["result"]["knn_at_stop_pct"] = 100.0 if log["result"]["knn_at_stop_pct"] != 100.0 else 0.0
    os.link(vf.artefact_path(log, path), tmp_path / log["model"]["file"])
    bad = save_log(tampered, tmp_path)
    args = ["check", path, "--data-dir", fake_cifar_root, "--device", "cpu"]
    assert vf.main(args) == 0
    assert capsys.readouterr().out.count("VERIFIED") == 1
    assert vf.main(args[:2] + [bad] + args[2:]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "VERIFIED" in out[0] and out[1].startswith(f"{bad}: REFUSED: accuracy: ")
    assert os.path.isfile(os.path.join(ROOT, "tools", "verify.py"))
