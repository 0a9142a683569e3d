"""The recipe lab: the CPU proxy's configs and the candidate fast recipe stay runnable by the harness of today."""

import glob
import json
import os

import pytest
from conftest import ROOT

import airbench_ssl as ab

PROXY = sorted(glob.glob(os.path.join(ROOT, "bench", "proxy", "*.json")))
# levers deleted after their measurement (bench/NOTES.md): arm file -> the field today's harness refuses
REMOVED = {"local_crops_4x16.json": "local_crops", "views_4_candidate.json": "n_views",
           "views_4_candidate_30ep.json": "n_views"}
LIVE = [p for p in PROXY if os.path.basename(p) not in REMOVED]
CANDIDATES = [os.path.join(ROOT, "bench", name) for name in ("candidate_fast.json", "candidate_conservative.json")]
# the levers an arm may change; the budget fields (epochs, checks) follow from its cost per epoch
LEVERS = {"temperature", "base_lr", "warmup_epochs", "grayscale_p", "low_res_px", "low_res_epochs"}
BUDGETS = {"": 10, "_30ep": 30}  # file-name suffix -> reference epochs of compute: the short and the long budget


def resolve(path, *flags):
    return ab.config_from_args(ab.build_parser().parse_args(["--config", path, *flags]), cuda_available=True)


def budget_of(path):
    stem = os.path.basename(path)[:-len(".json")]
    return BUDGETS["_30ep" if stem.endswith("_30ep") else ""]


def compute_in_reference_epochs(arm):
    """Training FLOPs of an arm (its JSON, removed levers too) in reference epochs (two 32 px views): convolutions
    scale with the pixels of a view, so an epoch costs n_views / 2 x (view px / 32)^2 of a reference epoch (the
    projector's share is negligible); progressive resolution trained low_res_px views for low_res_epochs epochs."""
    views, low_px, low_epochs = arm.get("n_views", 2), arm.get("low_res_px", 32), arm.get("low_res_epochs", 0)
    return sum(views / 2 * ((low_px if e < low_epochs else 32) / 32) ** 2 for e in range(arm["epochs"]))


@pytest.mark.parametrize("path", LIVE, ids=os.path.basename)
def test_proxy_arms_are_the_protocol_plus_one_lever_at_equal_compute(path):
    cfg, sources = resolve(path)
    reference, _ = resolve(os.path.join(ROOT, "bench", "proxy", "reference.json"))
    # the protocol: width-8 ResNet18, 10,000 images, batch 256, one check at the end of an equal-compute budget
    assert (cfg.width, cfg.train_subset, cfg.batch_size, cfg.device, cfg.compile) == (8, 10_000, 256, "cpu", "off")
    assert cfg.check_first_epoch == cfg.check_every_epochs == cfg.epochs and cfg.target_pct == 100.0
    assert json.load(open(path))["_description"] and sources["config_file"] == path
    changed = {k for k, v in vars(cfg).items() if getattr(reference, k) != v}
    assert changed - {"epochs", "check_first_epoch", "check_every_epochs"} <= LEVERS
    # equal compute: never more than the budget, and short of it by less than one reference epoch
    assert budget_of(path) - 1 < compute_in_reference_epochs(vars(cfg)) <= budget_of(path) + 1e-9


@pytest.mark.parametrize("name", sorted(REMOVED))
def test_removed_levers_are_refused_with_their_field_named_and_were_measured_at_equal_compute(name):
    path = os.path.join(ROOT, "bench", "proxy", name)
    with pytest.raises(ab.HarnessError, match=f"unknown fields .*{REMOVED[name]}"):
        resolve(path)
    arm = json.load(open(path))
    assert arm["_description"].startswith("REMOVED LEVER") and REMOVED[name] in arm
    if REMOVED[name] != "local_crops":  # 4 views cost 2 reference epochs each; a 16 px epoch a quarter of one
        assert budget_of(path) - 1 < compute_in_reference_epochs(arm) <= budget_of(path) + 1e-9


def test_budget_arithmetic_counts_views_and_pixels():
    assert compute_in_reference_epochs(dict(epochs=10)) == 10
    assert compute_in_reference_epochs(dict(n_views=4, epochs=5)) == 10
    assert compute_in_reference_epochs(dict(low_res_px=16, low_res_epochs=8, epochs=16)) == 8 / 4 + 8


@pytest.mark.parametrize("path", CANDIDATES, ids=os.path.basename)
def test_candidates_are_the_race_with_measured_winners_on_a_shorter_schedule(path):
    cfg, _ = resolve(path)
    notes = json.load(open(path))
    assert "UNMEASURED ON A GPU" in notes["_description"] and notes["_evidence"] and notes["_unknowns"]
    assert f"--config bench/{os.path.basename(path)}" in notes["_command"]
    # the race itself is untouched: full data, the target, kNN k=10, the reference's model and augmentation
    race = ("train_subset", "target_pct", "knn_k", "arch", "width", "batch_size", "crop_scale_min", "grayscale_p")
    assert all(getattr(cfg, name) == getattr(ab.Config(), name) for name in race)
    reference = ab.Config()
    changed = {k for k, v in vars(cfg).items() if getattr(reference, k) != v}
    assert changed <= LEVERS | {"epochs", "check_first_epoch", "check_every_epochs"}
    assert 0 < cfg.warmup_epochs < cfg.epochs and compute_in_reference_epochs(vars(cfg)) < reference.epochs
    # every lever value a candidate sets was measured by a proxy arm that has logs (the schedule's lengths excepted)
    measured = [json.load(open(arm)) for arm in LIVE
                if glob.glob(os.path.join(ROOT, "bench", "proxy", "logs", os.path.basename(arm)[:-5], "*.json"))]
    for field in changed & {"temperature", "base_lr", "grayscale_p", "low_res_px"}:
        assert any(arm.get(field) == getattr(cfg, field) for arm in measured), field


def test_the_conservative_candidate_trains_longer_than_the_fast_one():
    fast, conservative = (resolve(path)[0] for path in CANDIDATES)
    assert compute_in_reference_epochs(vars(conservative)) > compute_in_reference_epochs(vars(fast))
    assert conservative.epochs > fast.epochs and conservative.low_res_epochs <= fast.low_res_epochs


def test_proxy_protocol_runs_end_to_end_at_tiny_size(fake_cifar_root, tmp_path, one_compute_thread):
    log_dir = tmp_path / "logs"
    code = ab.main(["--config", os.path.join(ROOT, "bench", "proxy", "temperature_0.2.json"), "--data-dir",
                    fake_cifar_root, "--download", "false", "--log-dir", str(log_dir), "--train-subset", "40",
                    "--batch-size", "20", "--epochs", "2", "--check-first-epoch", "2", "--check-every-epochs", "2",
                    "--projector-hidden-dim", "32"])
    (log,) = [json.load(open(p)) for p in log_dir.glob("*.json")]
    assert code == 0 and log["config"]["temperature"] == 0.2 and log["data"]["trained_on_images"] == 40
    assert [r["epoch"] for r in log["epochs"] if r["knn_pct"] is not None] == [2]  # one check, at the budget's end
    assert log["result"]["status"] == "max_epochs" and 0 <= log["result"]["knn_at_stop_pct"] <= 100
