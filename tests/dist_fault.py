"""torchrun entry point for tests/test_distributed.py: the harness, with rank 1 raising RuntimeError("boom") at the
start of its second epoch while rank 0 trains on. The moment of the raise goes to the file named by
DIST_FAULT_MARKER, so the test can tell how long the other rank took to end. With DIST_FAULT_PROMPT_EXIT=1 a process
ends the moment main() returns, as on a fast machine, instead of after the seconds a slow one takes to tear down
torch: the failing rank's peers then see its sockets close at once.

    DIST_FAULT_MARKER=FILE python -m torch.distributed.run --nproc_per_node 2 tests/dist_fault.py [harness flags ...]
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402

original_train_epoch = ab.Trainer.train_epoch


def train_epoch(self, epoch, *args):
    if self.rank == 1 and epoch == 1:
        with open(os.environ["DIST_FAULT_MARKER"], "w") as f:
            f.write(repr(time.time()))
        raise RuntimeError("boom")
    return original_train_epoch(self, epoch, *args)


if __name__ == "__main__":
    ab.Trainer.train_epoch = train_epoch
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the harness does when run as a script
    code = ab.main()
    if os.environ.get("DIST_FAULT_PROMPT_EXIT") == "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
