"""One rank of a 2-process job for tests/test_distributed.py: reads the test's inputs, runs the harness's
distributed pieces (gather_views + info_nce, Trainer.update, Trainer's batch split check) on this rank's share, and
saves what this rank got. The references live in the test; this file only calls the harness.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py INPUTS.pt OUTPUT_DIR
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import airbench_ssl as ab  # noqa: E402


def main(inputs_path, output_dir):
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # two processes on a small machine: more threads only spin
    inputs = torch.load(inputs_path, weights_only=False)
    cuda = inputs.get("device") == "cuda"
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # compared at fp32 precision
    # a broken collective must fail the test in seconds, not after the default half hour
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    out = dict(gather=[], trainer=[], split=[])
    for case in inputs.get("gather", []):
        z = case["local"][rank].clone().requires_grad_()
        gathered = ab.gather_views(z)
        loss = ab.info_nce(gathered, case["temperature"])
        loss.backward()
        out["gather"].append(dict(gathered=gathered.detach(), loss=loss.detach(), grad=z.grad))
    for case in inputs.get("trainer", []):
        cfg = ab.Config(**case["config"])
        torch.manual_seed(cfg.seed)  # the same initial weights on both ranks, as train_run seeds them
        trainer = ab.Trainer(cfg, device, case["n_train"])
        initial = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        loss = trainer.update([view.to(device) for view in case["views"][rank]])
        out["trainer"].append(dict(initial=initial, loss=loss.cpu(), sync_bn=any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules()), params={
            k: v.detach().cpu().clone() for k, v in trainer.model.named_parameters()}))
    for case in inputs.get("split", []):
        try:
            ab.Trainer(ab.Config(**case["config"]), device, case["n_train"])
            out["split"].append(None)
        except ab.HarnessError as error:
            out["split"].append(str(error))
    torch.save(out, os.path.join(output_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
