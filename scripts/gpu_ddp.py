"""The ``ddp_fit`` part of scripts/gpu_check.py: two processes, gloo, both on one GPU, bf16 autocast;
it checks that the multi-process path trains, that throughput is summed over the ranks, that
the ranks agree on the weights, and that the results file is written once."""

from __future__ import annotations

import time
from typing import Any

from gpu_speed import _settings


def _ddp_worker(rank: int, world: int, device: str, dry_run: bool, out: str, port: int) -> None:
    import json
    import os
    from pathlib import Path

    import timm
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import pyra_lightning

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = _settings(dry_run)
    torch.manual_seed(0)
    model = timm.create_model(
        s["model_name"], pretrained=False, img_size=s["img_size"], num_classes=4, **s["kwargs"]
    )
    pyra_lightning.apply_lora(model, lora_rank=8)
    pyra_lightning.apply_merging(model, 8 if dry_run else "high", pyra=True)
    pyra_lightning.mark_trainable(model)
    dev = torch.device(device)  # every rank on the same GPU (cuda:0)
    model = model.to(dev)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = 4 if dry_run else 64
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 3, s["img_size"], s["img_size"], generator=gen).to(dev)
    y = torch.randint(0, 4, (batch,), generator=gen).to(dev)
    losses, steps = [], 3 if dry_run else 20
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    tic = time.perf_counter()
    for _ in range(steps):
        with amp:
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - tic
    rate = torch.tensor([batch * steps / seconds])
    dist.all_reduce(rate)  # images/s summed over ranks
    same = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(
        same, sum(p.detach().float().sum().cpu() for p in model.parameters() if p.requires_grad).view(1)
    )
    if rank == 0:
        path = Path(out) / "ddp_results.json"
        if path.exists():
            raise RuntimeError(f"{path} exists: results.json would be written twice")
        path.write_text(
            json.dumps(
                {
                    "world_size": world,
                    "losses": losses,
                    "trained": losses[-1] < losses[0],
                    "images_per_s_all_ranks": rate.item(),
                    "ranks_agree": bool(torch.allclose(same[0], same[1])),
                }
            )
        )
    dist.destroy_process_group()


def part_ddp_fit(args: Any) -> dict[str, Any]:
    """2 processes, gloo, both on ``args.device``, bf16 autocast: trains, aggregates, writes once."""
    import json
    import socket
    from pathlib import Path

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = Path(args.out) / "ddp_results.json"
    path.unlink(missing_ok=True)
    mp.spawn(_ddp_worker, args=(2, args.device, args.dry_run, args.out, port), nprocs=2, join=True)
    result = json.loads(path.read_text())
    if not result["ranks_agree"]:
        raise RuntimeError(
            "the two ranks hold different weights after training: gradients were not synchronised"
        )
    return result
