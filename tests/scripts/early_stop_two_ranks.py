"""Two ranks (FSDP2 or DDP) whose validation losses disagree, with EarlyStopping(restore_best=True).

python early_stop_two_ranks.py RUN_DIR OUT_DIR fsdp|ddp

Rank 0's loss improves for four epochs and then rises; rank 1's rises from the second
epoch, so on its own numbers rank 1 would stop three epochs early (and restore the best
checkpoint alone: under FSDP2 a collective read; under DDP it would leave rank 0 waiting in
the next epoch's all-reduce). Each rank writes OUT_DIR/rank-<r>.json: the epoch
it stopped at, its stopping state and whether its weights equal the best checkpoint's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ladle

LOSSES = {0: [1.0, 0.9, 0.8, 0.7, 0.75, 0.8, 0.85, 0.9], 1: [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]}


def worker(rank: int, run_dir: str, out_dir: str, init_file: str, ddp: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model: nn.Module = nn.Linear(4, 4)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    else:
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stopping = ladle.EarlyStopping(metric="val_loss", patience=1, restore_best=True)
    stopped_at = None
    with ladle.CheckpointManager(
        run_dir, model=model, optimizer=optimizer, early_stopping=stopping, every_epochs=1, sharded=not ddp
    ) as manager:
        for epoch, loss in enumerate(LOSSES[rank]):
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            manager.epoch_end(epoch, metrics={"val_loss": loss}, step=epoch + 1)
            if manager.should_stop:
                stopped_at = epoch
                break
        best = manager.best
        if ddp:
            weights = dict(model.module.state_dict())
        else:
            weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    dist.barrier()
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as out:
        json.dump(
            {
                "stopped_at": stopped_at,
                "state": stopping.state_dict(),
                "best_step": best.step if best is not None else None,
                "weights": {k: v.tolist() for k, v in weights.items()},
            },
            out,
        )
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    run_dir, out_dir, mode = argv
    ddp = {"fsdp": False, "ddp": True}[mode]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            worker, args=(run_dir, out_dir, os.path.join(tmp, "init"), ddp), nprocs=2, start_method="fork"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
