"""Train a tiny model with the manager, stop mid-run as if preempted, and resume exactly.

Run twice in one go (what `make demo` does until `ladle demo` lands): the first
process stops at step 25, the second resumes from the checkpoint and finishes;
the final weights equal an uninterrupted run's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import ladle


def train(run_dir: str, stop_at: int | None, total: int = 60) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :4].sum(dim=1) > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    loader = ladle.ResumableDataLoader(data, batch_size=32, shuffle=True, seed=0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    with ladle.CheckpointManager(
        run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        data=loader,
        monitor="loss",
        every_steps=10,
        keep=ladle.Keep(last=2, best=1),
    ) as manager:
        point = manager.resume()
        step, epoch = (point.step, point.epoch) if point else (0, 0)
        print(f"  {'resumed at step ' + str(step) if point else 'fresh run'}")
        while step < total:
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                manager.step(step, epoch=epoch, metrics={"loss": loss.item()})
                if step == stop_at:
                    manager.save()
                    print(f"  stopping at step {step} (epoch {epoch}, mid-epoch) as if preempted")
                    return torch.cat([p.detach().flatten() for p in model.parameters()])
                if step == total:
                    break
            else:
                manager.epoch_end(epoch)
                epoch += 1
        manager.save()
        kept = ", ".join(c.name for c in manager.run.checkpoints())
        print(f"  finished at step {step}; kept checkpoints: {kept}")
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> int:
    if len(sys.argv) == 3:  # child process: train one leg
        stop = None if sys.argv[2] == "none" else int(sys.argv[2])
        weights = train(sys.argv[1], stop)
        torch.save(weights, Path(sys.argv[1]) / "final.pt")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="ladle-demo-"))
    try:
        print("1) interrupted run, first process:")
        subprocess.run([sys.executable, __file__, str(workdir / "a"), "25"], check=True)
        print("2) a new process resumes it:")
        subprocess.run([sys.executable, __file__, str(workdir / "a"), "none"], check=True)
        print("3) an uninterrupted run, for comparison:")
        subprocess.run([sys.executable, __file__, str(workdir / "b"), "none"], check=True)
        same = torch.equal(torch.load(workdir / "a" / "final.pt"), torch.load(workdir / "b" / "final.pt"))
        print(f"resumed run == uninterrupted run, bit for bit: {same}")
        return 0 if same else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
