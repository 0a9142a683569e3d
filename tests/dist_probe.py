"""torchrun entry point for tests/test_distributed.py: the harness, with knn_check printing on every rank the
accuracy it returned and whether this rank evaluated (received features) or only received the number.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_probe.py [harness flags ...]
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402

original_knn_check = ab.knn_check


def knn_check(model, data, cfg):
    pct, features = original_knn_check(model, data, cfg)
    print(f"KNN {ab.dist.get_rank()} {pct!r} {features is not None}", flush=True)
    return pct, features


if __name__ == "__main__":
    ab.knn_check = knn_check
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the harness does when run as a script
    sys.exit(ab.main())
