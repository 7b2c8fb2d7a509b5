"""First-step time of BayesAdam's fused kernels (torch.compile), cold and warm, against depth.

Each measurement runs in a fresh process (the compilation is paid once per process): an MLP with
``depth`` Linear layers (784-256-...-256-10, 2·depth parameter tensors), batch 128, and the time of
its first and of a later step. "cold" uses an empty ``TORCHINDUCTOR_CACHE_DIR``; "warm" the same
directory again, as a user's second run would find it.

    python benchmarks/compile_time.py --depths 3,10,30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
import torch.nn.functional as F
from torch import nn
import effortless as ef
torch.set_num_threads(int(sys.argv[2]))
depth = int(sys.argv[1])
layers = [nn.Linear(784, 256), nn.ReLU()]
for _ in range(depth - 2):
    layers += [nn.Linear(256, 256), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(256, 10))
x, y = torch.rand(128, 784), torch.randint(0, 10, (128,))
opt = ef.BayesAdam(model.parameters(), n_data=60000)
times = []
for _ in range(4):
    t0 = time.perf_counter()
    opt.zero_grad()
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"tensors": len(list(model.parameters())), "fused": opt.fused, "first_s": times[0],
                  "later_ms": 1000 * min(times[1:])}))
"""


def run(depth: int, threads: int, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", CHILD, str(depth), str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="3,10,30", help="comma list of Linear-layer counts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print("| Linear layers | parameter tensors | first step, cold cache (s) | first step, warm cache (s) "
          "| a later step (ms) |")
    print("|---|---|---|---|---|")
    for depth in (int(d) for d in args.depths.split(",")):
        with tempfile.TemporaryDirectory() as cache:
            cold = run(depth, args.threads, cache)
            warm = run(depth, args.threads, cache)
        assert cold["fused"] and warm["fused"], "the fused path did not run"
        print(f"| {depth} | {cold['tensors']} | {cold['first_s']:.1f} | {warm['first_s']:.1f} | "
              f"{warm['later_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
