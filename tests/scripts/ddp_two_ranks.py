"""Two gloo ranks train a DDP model through CheckpointManager; only rank 0 writes.

python ddp_two_ranks.py RUN_DIR INIT_FILE
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ladle


def worker(rank: int, run_dir: str, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for leg in range(2):
        with ladle.CheckpointManager(run_dir, model=model, optimizer=optimizer, every_steps=2) as manager:
            point = manager.resume()
            start = point.step if point else 0
            # One write per line: both ranks share the pipe, and print() writes the text and the
            # newline separately, so lines of the two ranks could run together.
            os.write(1, f"rank {rank} leg {leg} resumed {start} writer {manager.is_writer}\n".encode())
            for step in range(start + 1, start + 5):
                torch.manual_seed(step)
                loss = model(torch.randn(3, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                manager.step(step)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, join=True)
