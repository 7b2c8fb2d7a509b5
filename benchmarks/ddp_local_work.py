"""Where BayesAdam's extra time under DDP goes: its purely local phases timed on rank 0 of 2 gloo
processes, against the same code in 2 independent processes (both cores busy, no process group),
and in 2 processes that only keep in lockstep (a gloo barrier where the DDP run has one, no DDP: the
same phases run at the same time on both cores, without gradient communication).

Per iteration (a shared weight sample, so no extra communication): a Gaussian fill of parameter-
sized buffers (local work that touches none of the training state), entering ``sampled_params``
(zero_grad + the compiled sample kernel), forward + backward, BayesAdam's ``step``; then the same
for an Adam model beside it. Medians over iterations, split into fresh draws and antithetic mirrors.
MLP 784-256-256-10 (other widths with ``--hidden``), batch 128 per process, one thread per
process. ``--barrier-before-forward`` adds a barrier between entering ``sampled_params`` and the
forward pass, so that the DDP forward+backward no longer includes waiting for the rank that was
slower in the local phases before it (its all-reduce cannot finish before both ranks get there).

    python benchmarks/ddp_local_work.py --iters 300
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import effortless as ef
from effortless.models import MLP

MODES = {"independent": "2 independent processes", "lockstep": "2 processes in lockstep, no DDP",
         "ddp": "2 processes, DDP"}
PHASES = ("gaussian fill", "enter sampled_params", "forward+backward", "BayesAdam step", "Adam fwd+bwd",
          "Adam step")  # fmt: skip


def _worker(rank, mode, port, iters, out, barrier_before_forward=False, hidden=(256, 256)):
    torch.set_num_threads(1)
    ddp, synced = mode == "ddp", mode in ("ddp", "lockstep")
    if synced:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.rand(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    torch.manual_seed(0)
    model, adam_model = MLP(784, list(hidden), 10), MLP(784, list(hidden), 10)
    net, adam_net = (DDP(model), DDP(adam_model)) if ddp else (model, adam_model)
    opt = ef.BayesAdam(model.parameters(), n_data=60000, generator=torch.Generator().manual_seed(0),
                       distributed="shared")  # fmt: skip
    adam = torch.optim.Adam(adam_model.parameters())
    bufs = [torch.empty_like(p) for p in model.parameters()]
    times = {k: [] for k in PHASES}
    for i in range(iters + 20):
        if synced:
            dist.barrier()
        t = [time.perf_counter()]
        for b in bufs:
            b.normal_()
        t.append(time.perf_counter())
        opt.zero_grad()
        ctx = opt.sampled_params(train=True)
        ctx.__enter__()
        if synced and barrier_before_forward:
            dist.barrier()
        t.append(time.perf_counter())
        F.cross_entropy(net(x), y).backward()
        t.append(time.perf_counter())
        ctx.__exit__(None, None, None)
        opt.step()
        t.append(time.perf_counter())
        if synced:
            dist.barrier()
        t.append(time.perf_counter())
        adam.zero_grad()
        F.cross_entropy(adam_net(x), y).backward()
        t.append(time.perf_counter())
        adam.step()
        t.append(time.perf_counter())
        if i >= 20:
            spans = [t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[6] - t[5], t[7] - t[6]]
            for k, v in zip(PHASES, spans):
                times[k].append(1000 * v)
    if rank == 0:
        res = {k: (statistics.median(v[0::2]), statistics.median(v[1::2])) for k, v in times.items()}
        Path(out).write_text(json.dumps(res))
    if synced:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--hidden", default="256,256", help="hidden widths of the MLP 784-…-10")
    ap.add_argument("--barrier-before-forward", action="store_true",
                    help="a barrier between the sample and the forward pass (its wait counts in "
                    "'enter sampled_params')")  # fmt: skip
    args = ap.parse_args(argv)
    hidden = tuple(int(w) for w in args.hidden.split(","))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            path = os.path.join(tmp, f"{mode}.json")
            mp.spawn(_worker, args=(mode, port, args.iters, path, args.barrier_before_forward, hidden),
                     nprocs=2, join=True)  # fmt: skip
            res[mode] = json.loads(Path(path).read_text())
    print("ms on rank 0, median over iterations (fresh draw / antithetic mirror)\n")
    print("| phase | " + " | ".join(MODES.values()) + " |")
    print("|---" * (len(MODES) + 1) + "|")
    for k in PHASES:
        print(f"| {k} | " + " | ".join(f"{res[m][k][0]:.3f} / {res[m][k][1]:.3f}" for m in MODES) + " |")


if __name__ == "__main__":
    main()
