"""BayesAdam's per-step overhead over Adam under DDP, against one process (issue #8 goal: on 2
processes the overhead is no larger than on one, the curvature all-reduce being the only extra
communication). Three DDP variants: the default per-rank samples by Flipout (no extra
communication), independent per-rank samples (one extra all-reduce of Σ_r ε_r) and one shared
sample.

Two more baselines separate communication from core contention. The single-process protocol run
in two independent processes at once (no process group), so that both cores are busy as under DDP
(without it the 1-process run has the second core to itself); and the same in lockstep: a gloo
barrier before every timed step, as in the DDP runs, but plain models and no gradient
communication, so that both processes run the same phase at the same time
(``benchmarks/ddp_local_work.py`` shows that this alone slows the memory-bound sample and update
kernels by about as much as DDP does).

Protocol: MLP 784-256-256-10, batch 128 per process, one thread per process, gloo. In each
process two models (one DistributedDataParallel-wrapped model per optimizer, or plain models for
the single-process run) take steps in turn, interleaved; the reported number is the median over
repetitions of the paired ratio t(BayesAdam step) / t(Adam step), on rank 0: each DDP variant is
its own run beside its own Adam model. ``--cycle`` runs Adam and all three variants in one cycle
instead (four models per process, what this script did before): their extra state and DDP buckets
then compete for the caches, which made the variants look slower under DDP than beside Adam
alone. The 2-process run needs 2 free cores to mean anything.

    python benchmarks/ddp_overhead.py --reps 200 --out runs/ddp_overhead
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

VARIANTS = ("bayesadam", "bayesadam-per-rank", "bayesadam-shared")


def _steps(world, reps, warmup, names=VARIANTS, ddp=True):
    """Interleaved steps of Adam and the BayesAdam variants ``names``, each on its own model; with
    ``world`` > 1 every timed step starts at a barrier, and the models are DDP-wrapped if ``ddp``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(dist.get_rank() if world > 1 else 0)
    x, y = torch.rand(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    runners = {}
    for name in ("adam", *names):
        torch.manual_seed(0)
        model = MLP(784, [256, 256], 10)
        net = DDP(model) if world > 1 and ddp else model
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def it(net=net, opt=opt):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        else:
            mode = {"bayesadam": "auto", "bayesadam-per-rank": "per-rank", "bayesadam-shared": "shared"}[name]
            mode = mode if ddp else "off"
            opt = ef.BayesAdam(model.parameters(), n_data=60000, generator=torch.Generator().manual_seed(0),
                               distributed=mode)  # fmt: skip

            def it(net=net, opt=opt):
                opt.zero_grad()
                with opt.sampled_params(train=True):
                    F.cross_entropy(net(x), y).backward()
                opt.step()

        runners[name] = it
    for _ in range(warmup):
        for it in runners.values():
            it()
    times = {k: [] for k in runners}
    for _ in range(reps):
        for k, it in runners.items():
            if world > 1:
                dist.barrier()  # both ranks start each timed step together
            t0 = time.perf_counter()
            it()
            times[k].append(time.perf_counter() - t0)
    out = {"adam_ms": 1000 * statistics.median(times["adam"])}
    for k in names:
        out[f"{k}_ms"] = 1000 * statistics.median(times[k])
        out[f"{k}_ratio"] = statistics.median(b / a for a, b in zip(times["adam"], times[k]))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(results):
    """One row from the runs of several variant groups (Adam's time from the first, the default's)."""
    out = {}
    for res in reversed(results):
        out.update(res)
    out["ratio"] = out["bayesadam_ratio"]
    return out


def _independent_worker(rank, reps, warmup, out, names):
    torch.set_num_threads(1)
    res = _steps(1, reps, warmup, names)
    if rank == 0:
        Path(out).write_text(json.dumps(res))


def _worker(rank, world, port, reps, warmup, out, names, ddp=True):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = _steps(world, reps, warmup, names, ddp)  # its DDP models are freed when it returns
        if rank == 0:
            Path(out).write_text(json.dumps(res))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2, help="alternate 1- and 2-process runs this many times")
    ap.add_argument("--cycle", action="store_true",
                    help="interleave all variants in one cycle (four models per process) instead of "
                    "each variant with its own Adam run")  # fmt: skip
    ap.add_argument("--out", default="runs/ddp_overhead")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    # pairs (default): each BayesAdam variant interleaved with its own Adam run, two models per
    # process; --cycle: all in one cycle, four models per process (what this script did before)
    groups = [list(VARIANTS)] if args.cycle else [[v] for v in VARIANTS]
    for r in range(args.rounds):
        one = _merge([_steps(1, args.reps, args.warmup, ["bayesadam"])])  # the modes agree on 1 process
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r0.json")
            results = []
            for names in groups:
                mp.spawn(_worker, args=(2, _free_port(), args.reps, args.warmup, path, names), nprocs=2,
                         join=True)  # fmt: skip
                results.append(json.loads(Path(path).read_text()))
            two = _merge(results)
            mp.spawn(_independent_worker, args=(args.reps, args.warmup, path, ["bayesadam"]), nprocs=2,
                     join=True)  # fmt: skip
            busy = _merge([json.loads(Path(path).read_text())])
            mp.spawn(_worker, args=(2, _free_port(), args.reps, args.warmup, path, ["bayesadam"], False),
                     nprocs=2, join=True)  # fmt: skip
            lockstep = _merge([json.loads(Path(path).read_text())])
        rows.append({"round": r, "one_process": one, "two_independent_processes": busy,
                     "two_processes_lockstep": lockstep, "two_processes_ddp": two})  # fmt: skip
        print(f"round {r}: BayesAdam/Adam per step: 1 process {one['ratio']:.3f}, 2 independent processes "
              f"{busy['ratio']:.3f}, in lockstep {lockstep['ratio']:.3f}, 2 processes (DDP): "
              f"flipout (default) {two['ratio']:.3f}, independent per-rank "
              f"{two['bayesadam-per-rank_ratio']:.3f}, shared sample {two['bayesadam-shared_ratio']:.3f}",
              flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"reps": args.reps, "cycle": args.cycle}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    protocol = ("all variants in one cycle" if args.cycle
                else "each BayesAdam variant interleaved with its own Adam run")  # fmt: skip
    lines = ["MLP 784-256-256-10, batch 128 per process, 1 thread per process, gloo; median paired ratio "
             f"over {args.reps} interleaved steps; {protocol}.", "",
             "| round | 1 process: Adam ms | BayesAdam ms | ratio | 2 independent processes: ratio | "
             "2 processes in lockstep, no DDP: ratio | "
             "2 processes DDP: Adam ms | BayesAdam flipout (default) ms | ratio | independent per-rank ms "
             "| ratio | shared ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        o, t, c = row["one_process"], row["two_processes_ddp"], row["two_independent_processes"]
        lk = row["two_processes_lockstep"]
        lines.append(f"| {row['round']} | {o['adam_ms']:.2f} | {o['bayesadam_ms']:.2f} | {o['ratio']:.3f} | "
                     f"{c['ratio']:.3f} | {lk['ratio']:.3f} | "
                     f"{t['adam_ms']:.2f} | {t['bayesadam_ms']:.2f} | {t['ratio']:.3f} | "
                     f"{t['bayesadam-per-rank_ms']:.2f} | {t['bayesadam-per-rank_ratio']:.3f} | "
                     f"{t['bayesadam-shared_ms']:.2f} | {t['bayesadam-shared_ratio']:.3f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
