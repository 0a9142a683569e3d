"""torchrun entry point for tests/test_distributed.py: the harness, with every rank printing what it did:
- each kNN check: the accuracy it returned and whether this rank evaluated (received features) or only received the
  number: `KNN rank pct evaluated`;
- each training step: the images it trained on, named by their first two pixels (p0 * 256 + p1; the test's images
  carry their index there), and a fingerprint of the augmentation generator's state before the step's draws:
  `STEP rank fingerprint id id ...`.
With DIST_PROBE_LATE_SECONDS=s, rank 1 ends each epoch s seconds late (it sleeps after its last step), as a slower
GPU would: rank 0's epoch clock must still include that time.

    DIST_PROBE_LATE_SECONDS=s python -m torch.distributed.run --nproc_per_node 2 tests/dist_probe.py [flags ...]
"""

import hashlib
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402

original_knn_check, original_views, original_update = ab.knn_check, ab.Trainer.views, ab.Trainer.update
LATE_SECONDS = float(os.environ.get("DIST_PROBE_LATE_SECONDS", "0"))


def knn_check(model, data, cfg):
    pct, features = original_knn_check(model, data, cfg)
    print(f"KNN {ab.dist.get_rank()} {pct!r} {features is not None}", flush=True)
    return pct, features


def views(self, images_uint8, generator, *args, **kwargs):
    ids = (images_uint8[:, 0, 0, 0].long() * 256 + images_uint8[:, 0, 0, 1].long()).tolist()
    fingerprint = hashlib.sha256(generator.get_state().cpu().numpy().tobytes()).hexdigest()[:16]
    print(f"STEP {self.rank} {fingerprint} {' '.join(map(str, ids))}", flush=True)
    return original_views(self, images_uint8, generator, *args, **kwargs)


def update(self, step_views):
    loss = original_update(self, step_views)
    self.probe_steps = getattr(self, "probe_steps", 0) + 1
    if self.rank == 1 and self.probe_steps % len(self.batch_sizes) == 0:
        time.sleep(LATE_SECONDS)
    return loss


if __name__ == "__main__":
    ab.knn_check, ab.Trainer.views, ab.Trainer.update = knn_check, views, update
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the harness does when run as a script
    sys.exit(ab.main())
