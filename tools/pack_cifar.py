"""Pack CIFAR-10 (official python layout) into checksummed parts small enough to upload to a GPU machine.

A GPU machine without internet access may take uploads only in small pieces, while `cifar-10-batches-py/` is
177.6 MiB. So we pack it once where the data is, move the parts, and unpack them there:

    python tools/pack_cifar.py pack DATA_DIR .packed           # /.packed/ is git-ignored
    python tools/pack_cifar.py verify .packed                  # optional: checks the parts only
    python tools/pack_cifar.py unpack .packed data             # on the GPU machine, with .packed/ copied there

`unpack` writes `data/cifar-10-batches-py/` byte-identical to the source (md5s preserved, so the harness's
official/unofficial check still works), verifying every part and every file first and never leaving a
half-written dataset behind. `pack` reads its inputs with the harness's restricted unpickler (a crafted file
cannot run code) and refuses any file the harness would not load.

Codec. Measured on a JPEG-q75 rebuild of CIFAR-10 (186,282,035 bytes; ratios on 2,000 images of
data_batch_1 unless noted):
- lzma 9e on the raw pixels: 0.770 of the input; bz2 -9: 0.813. Pixels are high-entropy (7.9 bit/byte).
- left / up delta then lzma: 0.675 / 0.654; median (LOCO-I) predictor: 0.610; gradient a+b-c clipped: 0.594.
- gradient residuals with the green residual subtracted from red and blue (the channels share edges): 0.491;
  lzma literal context lc=4, pb=0 (no byte alignment in residuals): 0.489; residuals grouped by channel
  plane instead of by image: 0.480  <- used. bz2 on the same residuals: 0.545.
- An ideal order-0 coder on those residuals would reach 0.52, and one conditioned on local activity (8 levels x
  3 channels) 0.47, so a hand-written context coder would gain little over lzma here.
- PRESET_EXTREME buys 0.15% over preset 6/9 at about the same speed (~1.2 MB/s on a 6 MB sample).
Full dataset (2-core CPU): 88,428,374 bytes = 84.3 MiB (0.475 of input), pack 510 s (lzma 496 s), unpack 15 s
with the unchunked pixel coder (decoding all pixels took 6.9 s of that; chunked now: 1.6 s, encoding 0.7 s).
That does NOT fit one 60 MiB upload: upload it in two (e.g. manifest.json + parts 00-02 to a folder outside
the repository, then parts 03-05, then `unpack`).

The transform touches only the pixel array inside each pickle: the rest of each file is stored verbatim and
the array is put back at the same byte offset, so unpacking reproduces the files exactly; `pack` proves it by
decoding what it wrote before it reports success.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/pack_cifar.py)

FORMAT = "airbench-ssl-cifar-pack"
VERSION = 1
DATASET_DIR = "cifar-10-batches-py"
FILE_NAMES = (
    "batches.meta",
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
)
PART_PREFIX = "cifar10.part"
PART_NAME = re.compile(re.escape(PART_PREFIX) + r"[0-9]{2,}")  # a plain file name: a manifest cannot point elsewhere
MANIFEST = "manifest.json"
STREAM_MAGIC = b"CIFARPK1"
FIT_LIMIT_MIB = 60  # a run accepts 64 MiB in all; leave ~4 MiB for the code
IMAGE_BYTES = 3072  # 3 planes (R, G, B) of 32x32, row-major
ENCODE_CHUNK_IMAGES = 512  # measured on data_batch_1: 0.10 s per batch (whole batch at once: 0.3-1.3 s)
DECODE_CHUNK_IMAGES = 256  # measured on data_batch_1: 0.25 s per batch (whole batch at once: 1.0-1.2 s)
# lc=4/pb=0: residual bytes carry no 2/4-byte alignment, and the previous byte's high bits predict the next.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 4, "lp": 0, "pb": 0}]


class PackError(Exception):
    """A problem the user can fix (missing file, corrupt part, conflicting destination): one line, exit 1."""


########################################
#  Pixel transform (lossless)
########################################


def encode_pixels(data: np.ndarray) -> bytes:
    """uint8 (n, 3072) planar RGB images -> residual bytes, same length, grouped by channel plane.

    Each pixel is predicted from left (a), up (b), up-left (c) as clip(a+b-c); the first row and column use
    their one neighbour, the corner 0. Chunks of images keep the temporaries in cache."""
    planes = np.empty((3, data.shape[0], 32, 32), np.uint8)
    for start in range(0, data.shape[0], ENCODE_CHUNK_IMAGES):
        x = data[start : start + ENCODE_CHUNK_IMAGES].reshape(-1, 3, 32, 32).astype(np.int16)
        pred = np.zeros_like(x)
        inner = pred[..., 1:, 1:]
        np.add(x[..., 1:, :-1], x[..., :-1, 1:], out=inner)
        np.subtract(inner, x[..., :-1, :-1], out=inner)
        np.clip(inner, 0, 255, out=inner)
        pred[..., 0, 1:] = x[..., 0, :-1]
        pred[..., 1:, 0] = x[..., :-1, 0]
        r = x - pred
        r[:, 0] -= r[:, 1]
        r[:, 2] -= r[:, 1]
        planes[:, start : start + len(x)] = (r & 0xFF).transpose(1, 0, 2, 3)
    return planes.tobytes()


def decode_pixels(buf: bytes, n_images: int) -> bytes:
    """Inverse of encode_pixels; sequential over the 32x32 positions, vectorised over images and channels.

    Each chunk is laid out position-major (row, column, channel, image), so every step reads and writes
    contiguous rows; in the image-major layout every step touched one cache line per image."""
    planes = np.frombuffer(buf, np.uint8).reshape(3, n_images, IMAGE_BYTES // 3)
    out = np.empty((n_images, 3, IMAGE_BYTES // 3), np.uint8)
    for start in range(0, n_images, DECODE_CHUNK_IMAGES):
        chunk = planes[:, start : start + DECODE_CHUNK_IMAGES]
        r = np.ascontiguousarray(chunk.transpose(2, 0, 1), dtype=np.int16).reshape(32, 32, 3, chunk.shape[1])
        r[:, :, 0] += r[:, :, 1]
        r[:, :, 2] += r[:, :, 1]
        x = np.empty_like(r)
        x[0] = np.cumsum(r[0], axis=0) & 0xFF
        x[1:, 0] = (np.cumsum(r[1:, 0], axis=0) + x[0, 0]) & 0xFF
        pred = np.empty_like(r[0, 0])
        for i in range(1, 32):
            for j in range(1, 32):
                np.add(x[i, j - 1], x[i - 1, j], out=pred)
                np.subtract(pred, x[i - 1, j - 1], out=pred)
                np.maximum(pred, 0, out=pred)  # two ufuncs: np.clip's Python wrapper cost more than its work
                np.minimum(pred, 255, out=pred)
                np.add(pred, r[i, j], out=pred)
                np.bitwise_and(pred, 0xFF, out=x[i, j])
        out[start : start + chunk.shape[1]] = x.reshape(IMAGE_BYTES // 3, 3, -1).transpose(2, 1, 0)
    return out.tobytes()


def locate_pixels(raw: bytes, path: Path) -> tuple[int, int] | None:
    """(byte offset, image count) of the pickled pixel array inside a file, or None where the images are not one
    verbatim run of bytes there (batches.meta; an array pickled in Fortran order): such files are stored as they are.

    Raises PackError for a file the harness would refuse: not a pickle, a pickle that names anything beyond
    numpy arrays (the restricted unpickler never runs what a crafted file asks for), or a batch without pixels."""
    try:
        obj = ab._CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()  # latin1 reads the Python 2 originals
    except Exception as error:  # noqa: BLE001 - damaged or crafted pickles raise almost anything
        raise PackError(f"{path} is not a CIFAR-10 file the harness would load ({error}); not packed") from None
    if not isinstance(obj, dict):
        raise PackError(f"{path} is not a CIFAR-10 file: it holds a {type(obj).__name__}, not a dict")
    if path.name == "batches.meta":
        return None
    data = obj.get("data", obj.get(b"data"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == IMAGE_BYTES and data.shape[0] > 0):
        raise PackError(f"{path} is not a CIFAR-10 batch: no 'data' array of uint8 images, N x {IMAGE_BYTES}")
    offset = raw.find(data.tobytes())
    return (offset, data.shape[0]) if offset >= 0 else None


########################################
#  Stream: header + verbatim bytes + residuals
########################################


def build_stream(files: dict[str, bytes], locations: dict[str, tuple[int, int] | None]) -> bytes:
    """Concatenate the files in FILE_NAMES order: header, every file minus its pixels, then all residuals."""
    entries, rest, residuals = [], [], []
    for name in FILE_NAMES:
        raw, loc = files[name], locations[name]
        entries.append({"name": name, "size": len(raw), "pixels": None if loc is None else list(loc)})
        if loc is None:
            rest.append(raw)
            continue
        offset, n = loc
        end = offset + n * IMAGE_BYTES
        rest.append(raw[:offset] + raw[end:])
        residuals.append(encode_pixels(np.frombuffer(raw[offset:end], np.uint8).reshape(n, IMAGE_BYTES)))
    header = json.dumps({"files": entries}).encode()
    return b"".join([STREAM_MAGIC, len(header).to_bytes(8, "little"), header, *rest, *residuals])


def parse_stream(stream: bytes) -> dict[str, bytes]:
    """Inverse of build_stream."""
    if not stream.startswith(STREAM_MAGIC):
        raise PackError("decompressed stream has the wrong magic; was it written by another tool?")
    try:
        return _parse_stream(stream)
    except (ValueError, KeyError, TypeError, IndexError) as error:  # checksums matched, so written by a bad packer
        raise PackError(f"decompressed stream is malformed ({type(error).__name__}: {error})") from None


def _parse_stream(stream: bytes) -> dict[str, bytes]:
    pos = len(STREAM_MAGIC) + 8
    header_len = int.from_bytes(stream[len(STREAM_MAGIC) : pos], "little")
    entries = json.loads(stream[pos : pos + header_len])["files"]
    pos += header_len
    rests = []
    for e in entries:
        n = e["pixels"][1] if e["pixels"] else 0
        rests.append(stream[pos : pos + e["size"] - n * IMAGE_BYTES])
        pos += e["size"] - n * IMAGE_BYTES
    files = {}
    for e, rest in zip(entries, rests):
        if e["pixels"] is None:
            files[e["name"]] = rest
            continue
        offset, n = e["pixels"]
        pixels = decode_pixels(stream[pos : pos + n * IMAGE_BYTES], n)
        pos += n * IMAGE_BYTES
        files[e["name"]] = rest[:offset] + pixels + rest[offset:]
    if pos != len(stream):
        raise PackError(f"decompressed stream has {len(stream) - pos} unexpected trailing bytes")
    return files


def compress_stream(stream: bytes) -> bytes:
    return lzma.compress(stream, format=lzma.FORMAT_XZ, filters=LZMA_FILTERS)


def decompress_stream(compressed: bytes) -> bytes:
    try:
        return lzma.decompress(compressed)
    except lzma.LZMAError as e:
        raise PackError(f"compressed stream does not decompress ({e})") from None


########################################
#  Helpers
########################################


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def find_dataset_dir(src: Path) -> Path:
    """Accept either the cifar-10-batches-py folder itself or its parent."""
    for cand in (src, src / DATASET_DIR):
        if (cand / "data_batch_1").is_file():
            return cand
    raise PackError(f"no {DATASET_DIR} in {src} (expected {src}/data_batch_1 or {src}/{DATASET_DIR}/data_batch_1)")


def check_writable_folder(path: Path, what: str) -> None:
    """Fail before the slow work when `path` cannot become a folder we write into."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        blocker = "is" if existing == path else f"cannot be created: {existing}"
        raise PackError(f"{what} {path} {blocker} not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PackError(f"{what} {path} is not writable ({existing} does not allow writing)")


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and re.fullmatch(f"[0-9a-f]{{{length}}}", value) is not None


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_problem(manifest: object) -> str | None:
    """What is wrong with a manifest's structure, or None; the checksums are checked later, against the data."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    files, parts, stream = manifest.get("files"), manifest.get("parts"), manifest.get("stream")
    if not isinstance(files, list) or [f.get("name") if isinstance(f, dict) else None for f in files] != list(
        FILE_NAMES
    ):
        return f"'files' must list {', '.join(FILE_NAMES)} in that order"
    for f in files:
        if not (_is_size(f.get("size")) and _is_hex(f.get("md5"), 32) and _is_hex(f.get("sha256"), 64)):
            return f"file entry {f['name']} needs size, md5 and sha256"
    if not isinstance(parts, list) or not parts:
        return "'parts' must be a non-empty list"
    for part in parts:
        if not (isinstance(part, dict) and isinstance(part.get("name"), str) and PART_NAME.fullmatch(part["name"])
                and _is_size(part.get("size")) and _is_hex(part.get("sha256"), 64)):
            return f"part entry {part!r:.80} needs a name {PART_PREFIX}NN, size and sha256"
    if len({part["name"] for part in parts}) != len(parts):
        return "'parts' names a part twice"
    if not (isinstance(stream, dict) and _is_size(stream.get("size")) and _is_hex(stream.get("sha256"), 64)):
        return "'stream' needs size and sha256"
    if not _is_size(manifest.get("packed_bytes")):
        return "'packed_bytes' must be a byte count"
    return None


def read_manifest(pack_dir: Path) -> dict:
    path = pack_dir / MANIFEST
    if not path.is_file():
        raise PackError(f"{path} not found; run `pack` first or copy the whole pack folder")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise PackError(f"{path}: expected format {FORMAT} v{VERSION}, got {got[0]} v{got[1]}")
    problem = _manifest_problem(manifest)
    if problem:
        raise PackError(f"{path} is malformed: {problem}; re-copy it or re-pack")
    return manifest


def read_parts(pack_dir: Path, manifest: dict) -> bytes:
    """All parts concatenated, after checking each one's size and sha256 against the manifest."""
    chunks = []
    for part in manifest["parts"]:
        path = pack_dir / part["name"]
        if not path.is_file():
            raise PackError(f"part {part['name']} is missing from {pack_dir} ({len(manifest['parts'])} parts expected)")
        data = path.read_bytes()
        if len(data) != part["size"] or _sha256(data) != part["sha256"]:
            raise PackError(
                f"part {part['name']} is corrupt ({len(data)} bytes, expected {part['size']}; "
                "sha256 mismatch); re-copy or re-pack"
            )
        chunks.append(data)
    stream = b"".join(chunks)
    if _sha256(stream) != manifest["stream"]["sha256"]:
        raise PackError("parts are individually intact but their concatenation does not match the manifest")
    return stream


def decode_and_check(compressed: bytes, manifest_files: list[dict]) -> dict[str, bytes]:
    files = parse_stream(decompress_stream(compressed))
    for f in manifest_files:
        data = files.get(f["name"])
        if data is None or len(data) != f["size"] or _sha256(data) != f["sha256"] or _md5(data) != f["md5"]:
            raise PackError(f"{f['name']} decodes to different bytes than were packed (codec bug?)")
    return files


########################################
#  Commands
########################################


def pack(src: Path, out: Path, part_mib: float) -> dict:
    if not (math.isfinite(part_mib) and part_mib > 0):
        raise PackError(f"--part-mib must be a positive number, got {part_mib}")
    src_dir = find_dataset_dir(src)
    missing = [n for n in FILE_NAMES if not (src_dir / n).is_file()]
    if missing:
        raise PackError(f"{src_dir} lacks {', '.join(missing)}; all of {', '.join(FILE_NAMES)} are needed")
    check_writable_folder(out, "output")
    t0 = time.perf_counter()
    files = {n: (src_dir / n).read_bytes() for n in FILE_NAMES}
    locations = {n: locate_pixels(raw, src_dir / n) for n, raw in files.items()}
    file_entries = [{"name": n, "size": len(b), "md5": _md5(b), "sha256": _sha256(b)} for n, b in files.items()]
    compressed = compress_stream(build_stream(files, locations))
    t_compress = time.perf_counter() - t0
    decode_and_check(compressed, file_entries)  # never ship a pack that does not unpack

    part_bytes = max(1, int(part_mib * 2**20))
    chunks = [compressed[start : start + part_bytes] for start in range(0, len(compressed), part_bytes)]
    parts = [{"name": f"{PART_PREFIX}{k:02d}", "size": len(c), "sha256": _sha256(c)} for k, c in enumerate(chunks)]
    total_in = sum(len(b) for b in files.values())
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "codec": "gradient predictor + green-difference residuals by plane, xz (LZMA2 preset 9e, lc=4, pb=0)",
        "files": file_entries,
        "parts": parts,
        "stream": {"size": len(compressed), "sha256": _sha256(compressed)},
        "unpacked_bytes": total_in,
        "packed_bytes": len(compressed),
    }
    manifest_bytes = (json.dumps(manifest, indent=1) + "\n").encode()
    _replace_pack(out, dict(zip([p["name"] for p in parts], chunks)), manifest_bytes)
    packed = len(compressed) + len(manifest_bytes)
    fits = packed <= FIT_LIMIT_MIB * 2**20
    print(
        f"packed {total_in} bytes into {len(parts)} parts + manifest in {out}: {packed} bytes ({_mib(packed)}, "
        f"{len(compressed) / total_in:.3f} of input) in {time.perf_counter() - t0:.0f} s "
        f"(compress {t_compress:.0f} s); {'fits' if fits else 'does NOT fit'} in {FIT_LIMIT_MIB} MiB"
    )
    return manifest


def _replace_pack(out: Path, parts: dict[str, bytes], manifest_bytes: bytes) -> None:
    """Write the new parts beside the old pack, then swap them in, manifest last.

    A failure while writing leaves the old pack as it was; one during the swap leaves no manifest (so `verify`
    and `unpack` refuse the folder) rather than a manifest that names parts of another pack."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pack.tmp-", dir=out))
    try:
        for name, chunk in parts.items():
            _write_synced(tmp / name, chunk)
        _write_synced(tmp / MANIFEST, manifest_bytes)
        (out / MANIFEST).unlink(missing_ok=True)
        # Stale parts from an earlier, larger pack would be uploaded for nothing.
        for old in out.glob(PART_PREFIX + "*"):
            if old.name not in parts:
                old.unlink()
        for name in parts:
            os.replace(tmp / name, out / name)
        os.replace(tmp / MANIFEST, out / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(pack_dir: Path) -> None:
    manifest = read_manifest(pack_dir)
    read_parts(pack_dir, manifest)
    print(f"{pack_dir}: {len(manifest['parts'])} parts OK ({_mib(manifest['packed_bytes'])})")


def unpack(pack_dir: Path, dest: Path) -> None:
    t0 = time.perf_counter()
    manifest = read_manifest(pack_dir)
    target = dest / DATASET_DIR
    check_writable_folder(dest, "destination")
    present = _check_destination(target, manifest["files"])
    if len(present) == len(manifest["files"]):
        print(f"{target}: all {len(present)} files already present and identical; nothing to do")
        return
    files = decode_and_check(read_parts(pack_dir, manifest), manifest["files"])
    dest.mkdir(parents=True, exist_ok=True)
    # Write everything into a sibling temp folder first, then rename: a crash leaves no half-written dataset.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIR}.tmp-", dir=dest))
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        if target.exists():  # some files already there (and identical): move in only the missing ones
            for name in files:
                if name not in present:
                    os.replace(tmp / name, target / name)
        else:
            os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(len(b) for b in files.values())
    print(
        f"unpacked {len(files)} files ({total} bytes, sha256+md5 verified) into {target} "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def _check_destination(target: Path, manifest_files: list[dict]) -> set[str]:
    """Names already present with the right bytes; refuse if any present file differs."""
    present = set()
    if not target.exists():
        return present
    if not target.is_dir():
        raise PackError(f"{target} exists and is not a folder; move it away first")
    for f in manifest_files:
        path = target / f["name"]
        if not path.exists():
            continue
        if not path.is_file() or path.stat().st_size != f["size"] or _sha256(path.read_bytes()) != f["sha256"]:
            raise PackError(f"{path} exists with different contents; refusing to overwrite (move it away first)")
        present.add(f["name"])
    return present


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


########################################
#  CLI
########################################


def main(argv: list[str] | None = None) -> int:
    parser = ab.OneLineErrorParser(prog="pack_cifar", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="compress SRC_DIR's cifar-10-batches-py into parts + manifest.json in OUT_DIR")
    p.add_argument("src", type=Path, metavar="SRC_DIR", help="cifar-10-batches-py or its parent")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--part-mib", type=float, default=15.0, help="largest part size in MiB (default 15)")
    u = sub.add_parser("unpack", help="verify and restore DEST_DIR/cifar-10-batches-py from PACK_DIR")
    u.add_argument("pack_dir", type=Path, metavar="PACK_DIR")
    u.add_argument("dest", type=Path, metavar="DEST_DIR")
    v = sub.add_parser("verify", help="check every part's size and sha256 against the manifest")
    v.add_argument("pack_dir", type=Path, metavar="PACK_DIR")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            pack(args.src, args.out, args.part_mib)
        elif args.command == "unpack":
            unpack(args.pack_dir, args.dest)
        else:
            verify(args.pack_dir)
    except (PackError, OSError) as e:
        print(f"pack_cifar: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
