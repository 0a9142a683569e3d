"""tools/pack_cifar.py: lossless round trip (synthetic and real data), inputs read without running code, one-line
failures on every bad input, no half-written packs or datasets."""

import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import airbench_ssl as ab

_spec = importlib.util.spec_from_file_location("pack_cifar", Path(__file__).parents[1] / "tools" / "pack_cifar.py")
pack_cifar = importlib.util.module_from_spec(_spec)
sys.modules["pack_cifar"] = pack_cifar
_spec.loader.exec_module(pack_cifar)

N_IMAGES = 20


def write_fake_cifar(parent: Path, seed: int = 0, protocol: int = 4, order: str = "C") -> Path:
    """Seven files in the official on-disk layout, N_IMAGES smooth-ish images per batch (pixel array in `order`)."""
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
            "data": np.asarray(pixels.reshape(N_IMAGES, 3072), order=order),
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


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below folder (hidden temp files included) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class RunsShell:
    """Unpickling this runs a shell command: what a crafted dataset file would do to an unrestricted loader."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def reference_residuals(data: np.ndarray) -> bytes:
    """The codec's residuals computed pixel by pixel, as the format defines them: gradient prediction
    clip(left + up - upleft) (first row: left, first column: up, corner: 0), green residual subtracted from red
    and blue, bytes mod 256, grouped by channel plane."""
    x = data.reshape(-1, 3, 32, 32).astype(int)
    res = np.zeros_like(x)
    for n in range(x.shape[0]):
        for ch in range(3):
            img = x[n, ch]
            for i in range(32):
                for j in range(32):
                    if i == 0 and j == 0:
                        pred = 0
                    elif i == 0:
                        pred = img[i, j - 1]
                    elif j == 0:
                        pred = img[i - 1, j]
                    else:
                        pred = min(255, max(0, img[i, j - 1] + img[i - 1, j] - img[i - 1, j - 1]))
                    res[n, ch, i, j] = img[i, j] - pred
        res[n, 0] -= res[n, 1]
        res[n, 2] -= res[n, 1]
    return (res % 256).astype(np.uint8).transpose(1, 0, 2, 3).tobytes()


def test_pixel_codec_matches_the_per_pixel_definition_and_is_lossless(monkeypatch) -> None:
    # Chunks of 3 images make 7 images cross chunk boundaries in both directions.
    monkeypatch.setattr(pack_cifar, "ENCODE_CHUNK_IMAGES", 3)
    monkeypatch.setattr(pack_cifar, "DECODE_CHUNK_IMAGES", 3)
    rng = np.random.default_rng(1)
    smooth = (128 + rng.integers(-6, 7, (7, 3, 32, 32)).cumsum(-1).cumsum(-2) // 4).clip(0, 255).astype(np.uint8)
    for data in (
        rng.integers(0, 256, (7, 3072), dtype=np.uint8),
        smooth.reshape(7, 3072),
        np.full((3, 3072), 255, np.uint8),
        np.zeros((2, 3072), np.uint8),
        np.tile(np.array([0, 255], np.uint8), (4, 1536)),
    ):
        enc = pack_cifar.encode_pixels(data)
        assert enc == reference_residuals(data)  # the format of existing packs, not just some invertible transform
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


@pytest.mark.parametrize("protocol, order", [(3, "C"), (5, "C"), (4, "F")])
def test_pack_accepts_dataset_folder_itself_and_other_pickle_layouts(tmp_path: Path, protocol: int, order: str) -> None:
    # Protocol 5 stores arrays as in-band buffers; a Fortran-ordered array's bytes are not the images' bytes in
    # order, so its file is stored verbatim. Every layout must round-trip.
    src = write_fake_cifar(tmp_path / "src", seed=3, protocol=protocol, order=order)
    assert pack_cifar.main(["pack", str(src), str(tmp_path / "packed")]) == 0
    assert pack_cifar.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "dest")]) == 0
    assert digests(tmp_path / "dest" / "cifar-10-batches-py") == digests(src)


def test_pack_takes_exactly_the_batches_the_harness_loads(tmp_path: Path, capsys) -> None:
    # Python 3's protocol 2 pickles bytes through _codecs.encode, which the harness's loader may or may not admit.
    src = write_fake_cifar(tmp_path / "src", protocol=2)
    raw = (src / "data_batch_1").read_bytes()
    try:
        ab.parse_cifar_batch(raw, "data_batch_1")
        harness_loads = True
    except ab.HarnessError:
        harness_loads = False
    if harness_loads:
        assert pack_cifar.main(["pack", str(src), str(tmp_path / "packed")]) == 0
    else:
        err = run_error(["pack", str(src), str(tmp_path / "packed")], capsys)
        assert f"{src / 'data_batch_1'} is not a CIFAR-10 file the harness would load" in err


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


def test_failed_repack_keeps_the_old_pack(packed: tuple[Path, Path], monkeypatch, capsys) -> None:
    src, out = packed
    before = tree(out)
    real_write, calls = pack_cifar._write_synced, []

    def disk_full_on_second_write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(pack_cifar, "_write_synced", disk_full_on_second_write)
    assert "No space left on device" in run_error(["pack", str(src), str(out), "--part-mib", "0.01"], capsys)
    assert tree(out) == before  # old parts and manifest untouched, no temp folder left
    monkeypatch.undo()
    assert pack_cifar.main(["verify", str(out)]) == 0


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_3"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path: Path, capsys, name: str) -> None:
    src = write_fake_cifar(tmp_path / "src")
    marker = tmp_path / "code_ran"
    # Otherwise a valid batch: only the restricted unpickler stops the extra entry from running its command.
    batch = {"data": np.zeros((N_IMAGES, 3072), np.uint8), "labels": [0] * N_IMAGES, "x": RunsShell(f"touch {marker}")}
    (src / name).write_bytes(pickle.dumps(batch, protocol=4))
    err = run_error(["pack", str(src), str(tmp_path / "out")], capsys)
    assert f"{src / name} is not a CIFAR-10 file the harness would load" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_crafted_pickle_via_the_command_line_is_one_line_without_traceback(tmp_path: Path) -> None:
    src = write_fake_cifar(tmp_path / "src")
    marker = tmp_path / "code_ran"
    (src / "test_batch").write_bytes(pickle.dumps(RunsShell(f"touch {marker}")))
    script = Path(__file__).parents[1] / "tools" / "pack_cifar.py"
    proc = subprocess.run([sys.executable, str(script), "pack", str(src), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"pack_cifar: error: {src / 'test_batch'} is not a CIFAR-10 file")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def _damage_source(root: Path, case: str) -> tuple[list[str], str]:
    """Break a fresh synthetic dataset under root/src in one way: -> (pack argv, expected error text)."""
    src = write_fake_cifar(root / "src")
    out = str(root / "out")
    if case == "missing_folder":
        return ["pack", str(root / "nowhere"), out], "no cifar-10-batches-py in"
    if case == "missing_file":
        (src / "test_batch").unlink()
        return ["pack", str(src), out], "lacks test_batch"
    if case == "truncated_file":
        raw = (src / "data_batch_2").read_bytes()
        (src / "data_batch_2").write_bytes(raw[: len(raw) // 2])
        return ["pack", str(src), out], f"{src / 'data_batch_2'} is not a CIFAR-10 file the harness would load"
    if case == "not_a_pickle":
        (src / "data_batch_4").write_bytes(os.urandom(5000))
        return ["pack", str(src), out], f"{src / 'data_batch_4'} is not a CIFAR-10 file the harness would load"
    if case == "batch_without_pixels":
        (src / "data_batch_5").write_bytes(pickle.dumps({"labels": [1, 2], "data": [[0] * 3072] * 2}))
        return ["pack", str(src), out], f"{src / 'data_batch_5'} is not a CIFAR-10 batch: no 'data' array"
    if case == "not_a_dict":
        (src / "batches.meta").write_bytes(pickle.dumps(["airplane", "automobile"]))
        return ["pack", str(src), out], "it holds a list, not a dict"
    if case in ("part_mib_zero", "part_mib_nan"):
        value = {"part_mib_zero": "0", "part_mib_nan": "nan"}[case]
        return ["pack", str(src), out, "--part-mib", value], f"--part-mib must be a positive number, got {value}"
    if case == "output_is_a_file":
        (root / "out").write_text("not a folder")
        return ["pack", str(src), out], f"output {out} is not a folder"
    assert case == "output_below_a_file"
    (root / "file").write_text("not a folder")
    return ["pack", str(src), str(root / "file" / "out")], f"cannot be created: {root / 'file'} not a folder"


@pytest.mark.parametrize("case", ["missing_folder", "missing_file", "truncated_file", "not_a_pickle",
                                  "batch_without_pixels", "not_a_dict", "part_mib_zero", "part_mib_nan",
                                  "output_is_a_file", "output_below_a_file"])
def test_bad_pack_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys, case: str) -> None:
    argv, expected = _damage_source(tmp_path, case)
    before = tree(tmp_path)
    assert expected in run_error(argv, capsys)
    assert tree(tmp_path) == before and not (tmp_path / "out").is_dir()


def _damage_pack(out: Path, root: Path, case: str) -> tuple[list[str], str]:
    """Break a good pack in out, or the destination under root, in one way: -> (unpack argv, expected text)."""
    dest = root / "dest"
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if case == "no_manifest":
        manifest_path.unlink()
        return ["unpack", str(out), str(dest)], "manifest.json not found"
    if case == "manifest_truncated":
        manifest_path.write_text(manifest_path.read_text()[:100])
        return ["unpack", str(out), str(dest)], "is not valid JSON"
    if case == "manifest_not_utf8":
        manifest_path.write_bytes(b"\xff\xfe{}")
        return ["unpack", str(out), str(dest)], "is not valid JSON"
    if case == "manifest_is_a_list":
        manifest_path.write_text("[1, 2]")
        return ["unpack", str(out), str(dest)], "expected format airbench-ssl-cifar-pack v1, got None vNone"
    if case == "manifest_other_version":
        manifest_path.write_text(json.dumps(dict(manifest, version=99)))
        return ["unpack", str(out), str(dest)], "expected format airbench-ssl-cifar-pack v1, got airbench"
    if case == "manifest_without_parts":
        manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "parts"}))
        return ["unpack", str(out), str(dest)], "is malformed: 'parts' must be a non-empty list"
    if case == "manifest_part_outside_the_folder":
        manifest["parts"][0]["name"] = "../src/cifar-10-batches-py/data_batch_1"
        manifest_path.write_text(json.dumps(manifest))
        return ["unpack", str(out), str(dest)], "is malformed: part entry"
    if case == "manifest_file_without_md5":
        del manifest["files"][2]["md5"]
        manifest_path.write_text(json.dumps(manifest))
        return ["unpack", str(out), str(dest)], "file entry data_batch_2 needs size, md5 and sha256"
    if case == "truncated_part":
        part = out / "cifar10.part01"
        part.write_bytes(part.read_bytes()[:-10])
        return ["unpack", str(out), str(dest)], "part cifar10.part01 is corrupt"
    if case == "checksummed_garbage":
        # Checksums can only vouch for what the packer wrote: a consistent pack of a malformed stream.
        stream = pack_cifar.compress_stream(pack_cifar.STREAM_MAGIC + (5).to_bytes(8, "little") + b"{nope")
        for p in out.glob("cifar10.part*"):
            p.unlink()
        (out / "cifar10.part00").write_bytes(stream)
        digest = hashlib.sha256(stream).hexdigest()
        manifest["parts"] = [{"name": "cifar10.part00", "size": len(stream), "sha256": digest}]
        manifest["stream"] = {"size": len(stream), "sha256": digest}
        manifest_path.write_text(json.dumps(manifest))
        return ["unpack", str(out), str(dest)], "decompressed stream is malformed (JSONDecodeError"
    if case == "destination_is_a_file":
        dest.write_text("not a folder")
        return ["unpack", str(out), str(dest)], f"destination {dest} is not a folder"
    if case == "destination_below_a_file":
        dest.write_text("not a folder")
        return ["unpack", str(out), str(dest / "data")], f"cannot be created: {dest} not a folder"
    assert case == "dataset_folder_is_a_file"
    dest.mkdir()
    (dest / "cifar-10-batches-py").write_text("not a folder")
    return ["unpack", str(out), str(dest)], "cifar-10-batches-py exists and is not a folder"


@pytest.mark.parametrize("case", ["no_manifest", "manifest_truncated", "manifest_not_utf8", "manifest_is_a_list",
                                  "manifest_other_version", "manifest_without_parts",
                                  "manifest_part_outside_the_folder", "manifest_file_without_md5", "truncated_part",
                                  "checksummed_garbage", "destination_is_a_file", "destination_below_a_file",
                                  "dataset_folder_is_a_file"])
def test_bad_unpack_input_is_one_line_and_writes_nothing(packed: tuple[Path, Path], tmp_path: Path, capsys,
                                                          case: str) -> None:
    argv, expected = _damage_pack(packed[1], tmp_path, case)
    before = tree(tmp_path)
    assert expected in run_error(argv, capsys)
    assert tree(tmp_path) == before
    if case.startswith(("manifest", "no_manifest", "truncated")):  # `verify` checks the pack, not the codec
        assert expected in run_error(["verify", argv[1]], capsys)


# Names a manifest could give a part: only the packer's own, cifar10.partNN exactly, name a file in the pack folder.
FOREIGN_PART_NAMES = ["cifar10.part99/../../elsewhere/cifar10.part00", "cifar10.part00/", "cifar10.part00/x",
                      "cifar10.part00\n", "cifar10.part00 ", "cifar10.part00\x00", "cifar10.part0", "xcifar10.part00",
                      "cifar10.part00x", "cifar10.part00.bak", "/tmp/cifar10.part00", "cifar10Xpart00",
                      "CIFAR10.part00", "cifar10.part\u0660\u0660", "./cifar10.part00", ""]


def test_manifest_part_names_are_matched_exactly(packed: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    """A part name is the packer's own name, whole: none of the names above is read, even where the file it points
    to exists with the right checksum (a folder named like a part, then ../ out of the pack folder)."""
    _, out = packed
    manifest = json.loads((out / "manifest.json").read_text())
    (tmp_path / "elsewhere").mkdir()
    os.replace(out / "cifar10.part00", tmp_path / "elsewhere" / "cifar10.part00")
    (out / "cifar10.part99").mkdir()  # ../ resolves only through a folder
    assert (out / FOREIGN_PART_NAMES[0]).is_file()  # the checksummed part is there, outside the pack folder
    for name in FOREIGN_PART_NAMES:
        manifest["parts"][0]["name"] = name
        (out / "manifest.json").write_text(json.dumps(manifest))
        before = tree(tmp_path)
        assert "is malformed: part entry" in run_error(["verify", str(out)], capsys), name
        assert "is malformed: part entry" in run_error(["unpack", str(out), str(tmp_path / "dest")], capsys), name
        assert tree(tmp_path) == before
    for name in ("cifar10.part00", "cifar10.part100"):  # the packer's names, two digits or more
        manifest["parts"][0]["name"] = name
        (out / "manifest.json").write_text(json.dumps(manifest))
        assert pack_cifar.read_manifest(out)["parts"][0]["name"] == name


@pytest.mark.parametrize("argv", [["pack"], ["frobnicate"], ["pack", "a", "b", "--part-mib", "x"], []])
def test_usage_errors_are_one_line(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        pack_cifar.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("pack_cifar") and ": error: " in err and err.endswith("(see --help)\n"), err
    assert err.count("\n") == 1, err


def test_real_cifar_pack_unpack_round_trip(real_cifar_root: str, tmp_path: Path, monkeypatch) -> None:
    """The real files through pack and unpack: their pickles pass the restricted unpickler, the pixels of
    all six batches are found and coded, and unpacking gives the same bytes. lzma itself (a stdlib codec, ~500 s
    on this data at the shipped preset; covered by the synthetic tests and the slow test below) is replaced by the
    identity, which keeps this test at seconds; the parts then hold the stream itself, so its header is readable."""
    monkeypatch.setattr(pack_cifar, "compress_stream", lambda stream: stream)
    monkeypatch.setattr(pack_cifar, "decompress_stream", lambda stream: stream)
    src = Path(real_cifar_root) / "cifar-10-batches-py"
    assert pack_cifar.main(["pack", real_cifar_root, str(tmp_path / "packed")]) == 0
    manifest = pack_cifar.read_manifest(tmp_path / "packed")
    stream = b"".join((tmp_path / "packed" / p["name"]).read_bytes() for p in manifest["parts"])
    header_len = int.from_bytes(stream[8:16], "little")
    coded = {e["name"]: e["pixels"] for e in json.loads(stream[16 : 16 + header_len])["files"]}
    assert coded.pop("batches.meta") is None
    assert {name: pixels[1] for name, pixels in coded.items()} == {n: 10_000 for n in pack_cifar.FILE_NAMES[1:]}
    assert pack_cifar.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "dest")]) == 0
    for name in pack_cifar.FILE_NAMES:
        assert (tmp_path / "dest" / "cifar-10-batches-py" / name).read_bytes() == (src / name).read_bytes(), name
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["cifar-10-batches-py"]


@pytest.mark.slow
def test_real_cifar_round_trip_at_full_compression(real_cifar_root: str, tmp_path: Path) -> None:
    src = Path(real_cifar_root) / "cifar-10-batches-py"
    assert pack_cifar.main(["pack", real_cifar_root, str(tmp_path / "packed")]) == 0
    assert pack_cifar.read_manifest(tmp_path / "packed")["packed_bytes"] < 0.5 * sum(
        (src / n).stat().st_size for n in pack_cifar.FILE_NAMES)  # the residual coder is doing its job
    assert pack_cifar.main(["unpack", str(tmp_path / "packed"), str(tmp_path / "dest")]) == 0
    assert digests(tmp_path / "dest" / "cifar-10-batches-py") == {n: digests(src)[n] for n in pack_cifar.FILE_NAMES}
