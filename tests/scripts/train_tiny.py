"""A tiny training job run in a subprocess by the resume and crash tests.

python train_tiny.py RUN_DIR OUT --total N [--stop-at K] [--save-every S] [--loop]

Trains a small MLP with dropout on a fixed synthetic dataset through a shuffled
ResumableDataLoader, with AdamW and a LR schedule, resuming from RUN_DIR if it
holds a checkpoint. With --stop-at K it saves at step K and exits (as if
preempted). It writes the final parameters, optimizer state and per-step losses
to OUT. With --loop it saves every step forever (for the crash test).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

import ladle

BATCH = 8
SAMPLES = 52  # 7 batches per epoch, the last one partial


def build() -> tuple[nn.Module, torch.optim.Optimizer, object, ladle.ResumableDataLoader]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(SAMPLES, 6, generator=generator)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(SAMPLES, 1, generator=generator)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = ladle.ResumableDataLoader(dataset, batch_size=BATCH, shuffle=True, seed=7)
    return model, optimizer, scheduler, loader


def warm_up() -> None:
    """Import what a run imports lazily (torch._dynamo on an optimizer's creation, ladle's
    manager), so that processes forked after this call start training at once."""
    build()
    _ = (ladle.CheckpointManager, ladle.Keep)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--total", type=int, default=20)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--ballast", type=int, default=0, help="add an NxN module to make saves slower")
    parser.add_argument("--async-save", action="store_true", help="commit saves on a background thread")
    args = parser.parse_args(argv)

    model, optimizer, scheduler, loader = build()
    torch.manual_seed(1234)  # the dropout stream; restored from the checkpoint on resume
    losses: list[float] = []
    extra_state = {"ballast": nn.Linear(args.ballast, args.ballast)} if args.ballast else None
    with ladle.CheckpointManager(
        args.run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=loader,
        state=extra_state,
        every_steps=1 if args.loop else 10**9,
        keep=ladle.Keep(last=3) if args.loop else None,
        async_save=args.async_save,
    ) as manager:
        point = manager.resume()
        step = point.step if point else 0
        epoch = point.epoch if point else 0
        if point is not None:
            losses = list(manager.extras.get("losses", []))
        if args.loop:
            print(f"ready {step}", flush=True)
        while step < args.total or args.loop:
            for x, y in loader:
                model.train()
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(loss.item())
                manager.extras["losses"] = losses[-50:] if args.loop else losses
                manager.step(step, epoch=epoch, metrics={"loss": loss.item()})
                if args.stop_at is not None and step == args.stop_at:
                    manager.save()
                    return 0
                if step >= args.total and not args.loop:
                    break
            else:
                manager.epoch_end(epoch, step=step)
                epoch += 1
                continue
            break
    torch.save(
        {
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "losses": torch.tensor(losses, dtype=torch.float64),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
