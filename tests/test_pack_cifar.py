"""tools/pack_cifar.py: lossless round trip, clear failures on damaged packs, no half-written datasets."""

import hashlib
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("pack_cifar", Path(__file__).parents[1] / "tools" / "pack_cifar.py")
pack_cifar = importlib.util.module_from_spec(_spec)
sys.modules["pack_cifar"] = pack_cifar
_spec.loader.exec_module(pack_cifar)

N_IMAGES = 20


def write_fake_cifar(parent: Path, seed: int = 0, protocol: int = 4) -> Path:
    """Seven files in the official on-disk layout, N_IMAGES smooth-ish images per batch."""
    rng = np.random.default_rng(seed)
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    meta = {"num_cases_per_batch": N_IMAGES, "label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        # Cumulative sums give natural-image-like local correlation, so the predictor path is really exercised.
        steps = rng.integers(-6, 7, size=(N_IMAGES, 3, 32, 32))
        pixels = (128 + steps.cumsum(axis=-1).cumsum(axis=-2) // 4).clip(0, 255).astype(np.uint8)
        batch = {
            "batch_label": f"fake {name}",
            "labels": rng.integers(0, 10, N_IMAGES).tolist(),
            "data": pixels.reshape(N_IMAGES, 3072),
            "filenames": [f"img_{name}_{i}.png" for i in range(N_IMAGES)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, Path]:
    src = write_fake_cifar(tmp_path / "src")
    out = tmp_path / "packed"
    assert pack_cifar.main(["pack", str(tmp_path / "src"), str(out), "--part-mib", "0.02"]) == 0
    return src, out


def run_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert pack_cifar.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pack_cifar: error: ") and err.count("\n") == 1, err
    return err


def test_pixel_codec_is_lossless_on_extremes() -> None:
    rng = np.random.default_rng(1)
    for data in (
        rng.integers(0, 256, (7, 3072), dtype=np.uint8),
        np.full((3, 3072), 255, np.uint8),
        np.zeros((2, 3072), np.uint8),
        np.tile(np.array([0, 255], np.uint8), (4, 1536)),
    ):
        enc = pack_cifar.encode_pixels(data)
        assert len(enc) == data.size
        assert pack_cifar.decode_pixels(enc, len(data)) == data.tobytes()


def test_round_trip_is_byte_identical(packed: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = packed
    manifest = pack_cifar.read_manifest(out)
    assert len(manifest["parts"]) >= 3
    assert sorted(p.name for p in out.iterdir()) == sorted([p["name"] for p in manifest["parts"]] + ["manifest.json"])
    assert [f["name"] for f in manifest["files"]] == list(pack_cifar.FILE_NAMES)
    assert all(f["md5"] == digests(src)[f["name"]] for f in manifest["files"])
    assert pack_cifar.main(["verify", str(out)]) == 0
    assert pack_cifar.main(["unpack", str(out), str(tmp_path / "dest")]) == 0
    assert digests(tmp_path / "dest" / "cifar-10-batches-py") == digests(src)
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["cifar-10-batches-py"]  # no temp folder left
    assert pack_cifar.main(["unpack", str(out), str(tmp_path / "dest")]) == 0  # idempotent


def test_pack_accepts_dataset_folder_itself_and_other_pickle_protocols(tmp_path: Path) -> None:
    # Protocol 2 (as in the official Python 2 files) stores arrays differently; it must still round-trip.
    src = write_fake_cifar(tmp_path / "src", seed=3, protocol=2)
    assert pack_cifar.main(["pack", str(src), str(tmp_path / "packed")]) == 0
    assert pack_cifar.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "dest")]) == 0
    assert digests(tmp_path / "dest" / "cifar-10-batches-py") == digests(src)


def test_repack_removes_stale_parts(packed: tuple[Path, Path]) -> None:
    src, out = packed
    assert pack_cifar.main(["pack", str(src), str(out), "--part-mib", "10"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cifar10.part00", "manifest.json"]


def test_corrupt_part_fails_cleanly(packed: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, out = packed
    part = out / "cifar10.part01"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    assert "cifar10.part01 is corrupt" in run_error(["verify", str(out)], capsys)
    assert "cifar10.part01 is corrupt" in run_error(["unpack", str(out), str(tmp_path / "dest")], capsys)
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_missing_part_fails_cleanly(packed: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, out = packed
    (out / "cifar10.part02").unlink()
    assert "cifar10.part02 is missing" in run_error(["unpack", str(out), str(tmp_path / "dest")], capsys)
    assert not (tmp_path / "dest" / "cifar-10-batches-py").exists()


def test_unpack_refuses_to_overwrite_different_data(packed: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, out = packed
    other = write_fake_cifar(tmp_path / "dest", seed=7)
    before = digests(other)
    assert "refusing to overwrite" in run_error(["unpack", str(out), str(tmp_path / "dest")], capsys)
    assert digests(other) == before


def test_unpack_completes_a_partial_identical_dataset(packed: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = packed
    partial = tmp_path / "dest" / "cifar-10-batches-py"
    partial.mkdir(parents=True)
    (partial / "batches.meta").write_bytes((src / "batches.meta").read_bytes())
    assert pack_cifar.main(["unpack", str(out), str(tmp_path / "dest")]) == 0
    assert digests(partial) == digests(src)


def test_missing_source_file_and_manifest_fail_cleanly(tmp_path: Path, capsys) -> None:
    src = write_fake_cifar(tmp_path / "src")
    (src / "test_batch").unlink()
    assert "test_batch" in run_error(["pack", str(tmp_path / "src"), str(tmp_path / "out")], capsys)
    assert "no cifar-10-batches-py" in run_error(["pack", str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys)
    assert "manifest.json not found" in run_error(["verify", str(tmp_path / "nowhere")], capsys)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AIRBENCH_SSL_DATA"), reason="set AIRBENCH_SSL_DATA to the real data's parent")
def test_real_cifar_round_trip(tmp_path: Path) -> None:
    src = pack_cifar.find_dataset_dir(Path(os.environ["AIRBENCH_SSL_DATA"]))
    assert pack_cifar.main(["pack", str(src), str(tmp_path / "packed")]) == 0
    assert pack_cifar.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "dest")]) == 0
    assert digests(tmp_path / "dest" / "cifar-10-batches-py") == {n: digests(src)[n] for n in pack_cifar.FILE_NAMES}
