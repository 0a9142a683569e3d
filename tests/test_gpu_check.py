"""The GPU check script's CPU dry run: every code path a GPU session will take, at tiny size."""

import json

import gpu_check


def test_dry_run_reports_every_section(tmp_path):
    assert gpu_check.main(["--tiny", "--device", "cpu", "--steps", "1", "--out", str(tmp_path)]) == 0
    report = json.load(open(tmp_path / "gpu_check.json"))
    names = [v["name"] for v in report["variants"]]
    assert names == ["eager fp32", "+ channels_last", "+ bf16 autocast", "+ torch.compile = default"]
    for variant in report["variants"]:
        assert variant["step_seconds"] > 0
        assert variant["epoch_seconds"] == 50000 / variant["images_per_second"]
        assert variant["images_per_second"] == variant["batch_size"] / variant["step_seconds"]
    # a width-8 ResNet18 forward is 1/64 of the width-64 one's ~1.11 GFLOP (plus a small projector)
    assert 0.012 < report["forward_gflop_per_image"] < 0.03
    assert report["peak"]["peak_tflops"] > 0 and report["peak"]["copy_gb_per_s"] > 0
    assert 0 < report["augmentation"]["fraction_of_step"]
    assert "convolution" in report["profile"].lower()
    assert (tmp_path / "gpu_check.txt").read_text().startswith("device: ")
