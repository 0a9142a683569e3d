"""Benchmark airbench_ssl.knn_predict against sklearn's KNeighborsClassifier(metric="cosine"), side by side.

    python tools/bench_knn.py                          # 50,000 x 512 train vs 10,000 test, k=10, random features
    python tools/bench_knn.py --clustered              # class means + noise: realistic near-ties between classes
    python tools/bench_knn.py --features feats.npz     # arrays train_feats, train_labels, test_feats

All run on the same float32 features in one process, interleaved over --repeats rounds (best and median
reported; the machine may be shared). Predictions are compared one by one; a disagreement is a "near-tie" when,
in a float64 recomputation, the k-th and (k+1)-th cosine distances of that test point differ by at most
--tie-tol (float32 rounding may then pick either neighbour set), and "real" otherwise. A real disagreement is a
bug in one of the two.

`variant` is an experimental knn_predict, kept here only to measure a proposed change before it goes into the
harness: it computes the same similarities and picks the same neighbour sets (up to exactly equal similarities),
with a cheaper top-k (see grouped_topk_indices).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl  # noqa: E402  (the repo root is not on sys.path when run as tools/bench_knn.py)


def grouped_topk_indices(sims: torch.Tensor, k: int, group: int = 64) -> torch.Tensor:
    """The column indices of each row's k largest values, as sims.topk(k).indices up to the order among exactly
    equal values. Columns are cut into groups of `group`; an entry among its row's k largest lies in a group
    whose maximum is among the k largest group maxima (at most k - 1 entries exceed it, so at most k - 1 groups
    can have a larger maximum). So one topk over n / group maxima, then one over k * group candidates (plus the
    < group leftover columns), replaces a topk over all n columns: a streaming max is cheaper than a selection."""
    rows, n = sims.shape
    groups = n // group
    if groups <= k:
        return sims.topk(k, dim=1).indices
    top_groups = sims[:, :groups * group].view(rows, groups, group).amax(2).topk(k, dim=1).indices
    offsets = torch.arange(group, device=sims.device)
    candidates = torch.cat([(top_groups[:, :, None] * group + offsets).view(rows, k * group),
                            torch.arange(groups * group, n, device=sims.device).expand(rows, -1)], dim=1)
    return candidates.gather(1, sims.gather(1, candidates).topk(k, dim=1).indices)


@torch.no_grad()
def variant(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, k: int = 10,
            num_classes: int = 10, block_size: int = 1024) -> torch.Tensor:
    """knn_predict with the same similarities (bit for bit) but the k nearest found by grouped_topk_indices, and
    the normalised training matrix transposed into contiguous memory once rather than viewed per block."""
    train_unit_t = F.normalize(train_feats, dim=1).T.contiguous()
    predictions = []
    for start in range(0, len(test_feats), block_size):
        sims = F.normalize(test_feats[start:start + block_size], dim=1) @ train_unit_t
        votes = F.one_hot(train_labels[grouped_topk_indices(sims, k)], num_classes).sum(1)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


def make_features(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> float32 train features, int64 train labels, float32 test features."""
    if args.features:
        with np.load(args.features) as f:
            return (f["train_feats"].astype(np.float32), f["train_labels"].astype(np.int64),
                    f["test_feats"].astype(np.float32))
    rng = np.random.default_rng(args.seed)
    if not args.clustered:
        return (rng.standard_normal((args.train, args.dim), dtype=np.float32), rng.integers(0, 10, args.train),
                rng.standard_normal((args.test, args.dim), dtype=np.float32))
    # ReLU-like non-negative features around 10 class means, as a trained backbone gives: many training points of
    # different classes at nearly the same distance from a test point.
    means = np.abs(rng.standard_normal((10, args.dim))) * args.separation
    train_labels, test_labels = rng.integers(0, 10, args.train), rng.integers(0, 10, args.test)

    def sample(labels: np.ndarray) -> np.ndarray:
        noise = rng.standard_normal((len(labels), args.dim))
        return np.maximum(means[labels] + noise, 0).astype(np.float32)

    return sample(train_labels), train_labels, sample(test_labels)


def time_interleaved(methods: dict[str, Callable[[], np.ndarray]], repeats: int
                     ) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Run the methods in turn, `repeats` rounds: a burst of load from other processes on a shared machine then
    slows one round of every method rather than all rounds of one."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def near_tie(train_unit64: np.ndarray, test_row64: np.ndarray, k: int, tol: float) -> bool:
    """Whether the k-th and (k+1)-th cosine distances of one test point lie within tol, in float64."""
    distances = 1 - train_unit64 @ (test_row64 / np.linalg.norm(test_row64))
    kth = np.partition(distances, [k - 1, k])[k - 1:k + 1]
    return bool(kth[1] - kth[0] <= tol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train", type=int, default=50_000, help="training points")
    parser.add_argument("--test", type=int, default=10_000, help="test points")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (ResNet18: 512)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="device for knn_predict (sklearn always runs on the CPU)")
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and sklearn's BLAS (0 = default)")
    parser.add_argument("--features", default="", help=".npz with train_feats, train_labels, test_feats")
    parser.add_argument("--clustered", action="store_true", help="class means + noise instead of pure noise")
    parser.add_argument("--separation", type=float, default=0.5, help="--clustered: scale of the class means")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of every method")
    parser.add_argument("--tie-tol", type=float, default=1e-5, help="near-tie threshold on cosine distance")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    train, train_labels, test = make_features(args)
    print(f"train {train.shape}, test {test.shape}, k={args.k}, features: "
          f"{args.features or ('clustered' if args.clustered else 'random gaussian')}, torch threads "
          f"{torch.get_num_threads()}, device {device}")
    train_t, labels_t = torch.from_numpy(train).to(device), torch.from_numpy(train_labels).to(device)
    test_t = torch.from_numpy(test).to(device)

    def run_torch(fn: Callable[..., torch.Tensor]) -> Callable[[], np.ndarray]:
        def go() -> np.ndarray:
            predictions = fn(train_t, labels_t, test_t, args.k)
            airbench_ssl.synchronize(device)
            return predictions.cpu().numpy()
        return go

    def run_sklearn() -> np.ndarray:
        with threadpool_limits(limits=args.threads or None):
            return KNeighborsClassifier(n_neighbors=args.k, metric="cosine").fit(train, train_labels).predict(test)

    times, results = time_interleaved({"knn_predict": run_torch(airbench_ssl.knn_predict),
                                       "variant": run_torch(variant), "sklearn": run_sklearn}, args.repeats)
    best = {name: min(t) for name, t in times.items()}
    reference = results["sklearn"]

    train_unit64 = train.astype(np.float64)
    train_unit64 /= np.linalg.norm(train_unit64, axis=1, keepdims=True)
    for name in ("knn_predict", "variant", "sklearn"):
        line = f"{name:>12}: best {best[name]:6.2f} s, median {np.median(times[name]):6.2f} s of {args.repeats}"
        if name != "sklearn":
            differ = np.flatnonzero(results[name] != reference)
            ties = sum(near_tie(train_unit64, test[i].astype(np.float64), args.k, args.tie_tol) for i in differ)
            line += (f"; {best['sklearn'] / best[name]:5.2f}x faster than sklearn (best vs best); identical "
                     f"predictions {len(test) - len(differ)}/{len(test)}; disagreements {len(differ)} (near-ties "
                     f"{ties}, real {len(differ) - ties})")
        print(line)
    print(f"variant vs knn_predict: {best['knn_predict'] / best['variant']:.2f}x faster; identical predictions "
          f"{int((results['knn_predict'] == results['variant']).sum())}/{len(test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
