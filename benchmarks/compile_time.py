"""First-step time of BayesAdam's fused kernels (torch.compile), cold and warm, against depth.

Each measurement runs in a fresh process (the compilation is paid once per process): an MLP with
``depth`` Linear layers (784-256-...-256-10, 2·depth parameter tensors), batch 128, and the time of
its first and of a later step. "cold" uses an empty ``TORCHINDUCTOR_CACHE_DIR``; "warm" the same
directory again, as a user's second run would find it. ``--resnet18`` adds a ResNet-18 (62
tensors of many sizes: convolutions, 64- to 512-wide BatchNorm vectors, the classifier) on
2 × 3 × 32 × 32 inputs.

    python benchmarks/compile_time.py --depths 3,10,30 --resnet18
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


class Block(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o)
        self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
        self.down = (nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))
                     if stride != 1 or i != o else nn.Identity())

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.down(x))


if depth == 0:  # ResNet-18
    stages, widths = [], [64, 64, 128, 256, 512]
    for i in range(4):
        o = widths[i + 1]
        stages += [Block(widths[i], o, 1 if i == 0 else 2), Block(o, o, 1)]
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *stages,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 1000, (2,))
else:
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
    ap.add_argument("--resnet18", action="store_true", help="add a ResNet-18 row")
    args = ap.parse_args(argv)
    print("| model | parameter tensors | first step, cold cache (s) | first step, warm cache (s) "
          "| a later step (ms) |")
    print("|---|---|---|---|---|")
    depths = [int(d) for d in args.depths.split(",") if d] + ([0] if args.resnet18 else [])
    for depth in depths:
        with tempfile.TemporaryDirectory() as cache:
            cold = run(depth, args.threads, cache)
            warm = run(depth, args.threads, cache)
        assert cold["fused"] and warm["fused"], "the fused path did not run"
        name = "ResNet-18" if depth == 0 else f"MLP, {depth} Linear layers"
        print(f"| {name} | {cold['tensors']} | {cold['first_s']:.1f} | {warm['first_s']:.1f} | "
              f"{warm['later_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
