"""An FSDP2 training run on CPU ranks (gloo) checkpointed by CheckpointManager through DCP.

python fsdp_train.py RUN_DIR OUT_DIR WORLD STEPS [--kill-rank R --kill-step S] [--plain] [--async-save] [--ema]

Each rank appends `step loss` lines to OUT_DIR/losses-<rank>.txt. At the end rank 0
writes OUT_DIR/final.pt: the full (gathered) parameters and optimizer state.
`--kill-rank R --kill-step S`: rank R SIGKILLs itself inside the save at step S
(R = -1: every rank kills itself right after step S, outside any save).
`--async-save`: saves commit in the background (DCP shards staged in host memory).
`--ema`: a `ladle.EMA` of the (sharded) model, updated after every step; final.pt then
holds its full weights under "ema", under "ema_reference" the same average taken of the
gathered full weights at every step of this process (absent after a resume), and the
model's full weights inside and after `ema.applied(model)`.
`--plain`: WORLD must be 1; no process group, the model is not sharded (sharded=True
still writes a DCP checkpoint).
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import ladle


def build(world: int, plain: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    if not plain:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def worker(rank: int, args: argparse.Namespace, init_file: str) -> None:
    if not args.plain:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world)
    model, optimizer = build(args.world, args.plain)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    data = TensorDataset(torch.randn(48, 8, generator=torch.Generator().manual_seed(1)))
    loader = ladle.ResumableDataLoader(
        data, batch_size=4, shuffle=True, seed=3, num_replicas=args.world, rank=rank
    )
    ema = ladle.EMA(model, decay=0.8) if args.ema else None
    reference = _full(model.state_dict()) if args.ema else None
    manager = ladle.CheckpointManager(
        args.run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=loader,
        ema=ema,
        every_steps=2,
        sharded=True,
        async_save=args.async_save,
    )
    if args.kill_rank == rank and args.kill_step:
        _kill_inside_save_at(args.kill_step)
    point = manager.resume()
    step = point.step if point else 0
    epoch = point.epoch if point else 0
    with open(os.path.join(args.out_dir, f"losses-{rank}.txt"), "a") as losses:
        while step < args.steps:
            loader.set_epoch(epoch)
            for (x,) in loader:
                loss = model(x).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update()
                    for key, value in _full(model.state_dict()).items():
                        reference[key].lerp_(value, 1 - 0.8)  # type: ignore[index]
                step += 1
                losses.write(f"{step} {loss.item()!r}\n")
                losses.flush()
                manager.step(step, epoch=epoch)
                if args.kill_rank == -1 and step == args.kill_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= args.steps:
                    break
            else:
                epoch += 1
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=not args.plain)
    weights, optim = get_state_dict(model, optimizer, options=full)
    final = {"model": weights, "optimizer": optim}
    if ema is not None:  # gathered on every rank (a collective), kept by rank 0
        final["ema"] = _full(ema.weights())
        with ema.applied(model):  # the average swapped into the sharded model, then the raw weights back
            final["ema_applied"] = _full(model.state_dict())
        final["raw_after_applied"] = _full(model.state_dict())
        if point is None:
            final["ema_reference"] = reference
    if rank == 0:
        torch.save(final, os.path.join(args.out_dir, "final.pt"))
    manager.close()
    if not args.plain:
        dist.barrier()
        dist.destroy_process_group()


def _full(tensors: dict) -> dict:
    """Full copies of (possibly sharded) tensors: DTensors are gathered (a collective call)."""
    return {k: getattr(v, "full_tensor", v.clone)().detach().clone() for k, v in tensors.items()}


def _kill_inside_save_at(step: int) -> None:
    """SIGKILL this rank once its DCP shards are written, before the commit (mid-save)."""
    import ladle.saving.sharded as sharded

    original = sharded.write_dcp

    def write_then_die(state, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(state, path, *args, **kwargs)
        if f"step-{step:09d}" in path:
            os.kill(os.getpid(), signal.SIGKILL)

    sharded.write_dcp = write_then_die


def warm_up() -> None:
    """What a run imports lazily, imported once by the fork server (starts no threads)."""
    import torch.distributed.checkpoint
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.device_mesh
    import torch.distributed.fsdp  # noqa: F401

    import ladle.saving.sharded  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("world", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-step", type=int, default=0)
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--ema", action="store_true")
    args = parser.parse_args(argv)
    init_file = tempfile.mktemp(prefix="ladle-fsdp-init-")
    if args.plain:
        worker(0, args, init_file)
        return 0
    # Forked workers share the parent's imports (spawning re-imports torch per rank).
    try:
        mp.start_processes(worker, args=(args, init_file), nprocs=args.world, start_method="fork")
    except mp.ProcessExitedException as exc:  # a rank died (SIGKILL in the crash tests)
        print(f"ranks stopped: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
