"""Cluster recipes, tested as far as a laptop can: the job-array wrapper and the environment
variables Lightning's SLURM/LSF environments read (docs/clusters.md)."""

import os
import socket
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_array.sh"


def _run(env, *args):
    full = {k: v for k, v in os.environ.items() if k not in ("SLURM_ARRAY_TASK_ID", "LSB_JOBINDEX")}
    full.update(env, EFFORTLESS="echo")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full)


def test_array_index_maps_to_the_shard():
    out = _run({"SLURM_ARRAY_TASK_ID": "2"}, "4", "runs/sweep", "--task", "fmnist-mlp")
    assert out.returncode == 0 and out.stdout.split() == [
        "bench", "--shard", "2/4", "--out", "runs/sweep/shard-2", "--task", "fmnist-mlp"]  # fmt: skip
    out = _run({"LSB_JOBINDEX": "1"}, "4", "runs/sweep")  # LSF arrays count from 1
    assert out.stdout.split()[:3] == ["bench", "--shard", "0/4"]


def test_array_wrapper_refuses_bad_indices():
    assert "neither" in _run({}, "4", "runs/x").stderr
    bad = _run({"LSB_JOBINDEX": "5"}, "4", "runs/x")
    assert bad.returncode == 2 and "outside" in bad.stderr


def test_lightning_reads_the_lsf_and_slurm_variables_the_recipes_rely_on(tmp_path, monkeypatch):
    envs = pytest.importorskip("lightning.pytorch.plugins.environments")
    for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOBAL_RANK"):
        # Lightning's environments write these into os.environ; have monkeypatch restore them so
        # later tests (a real 2-process run) do not try to reach the fake nodes
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    rankfile = tmp_path / "rankfile"
    here = socket.gethostname()  # Lightning finds this node's rank by its hostname in the rank file
    rankfile.write_text(f"batchhost\nnode-0\nnode-0\n{here}\n{here}\n")
    for k, v in dict(LSB_JOBID="123", LSB_DJOB_RANKFILE=str(rankfile), JSM_NAMESPACE_LOCAL_RANK="1",
                     JSM_NAMESPACE_SIZE="4", JSM_NAMESPACE_RANK="3").items():  # fmt: skip
        monkeypatch.setenv(k, v)
    assert envs.LSFEnvironment.detect()
    lsf = envs.LSFEnvironment()
    assert (lsf.world_size(), lsf.global_rank(), lsf.local_rank(), lsf.node_rank()) == (4, 3, 1, 1)
    assert lsf.main_address == "node-0"
    # (Lightning insists on --ntasks-per-node, not --ntasks: the recipe uses it)
    slurm_vars = dict(SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4", SLURM_PROCID="5", SLURM_LOCALID="1",
                      SLURM_NODEID="1", SLURM_JOB_NAME="train", SLURM_NODELIST="node-[1-2]")  # fmt: skip
    for k, v in slurm_vars.items():
        monkeypatch.setenv(k, v)
    assert envs.SLURMEnvironment.detect()
    slurm = envs.SLURMEnvironment()
    assert (slurm.world_size(), slurm.global_rank(), slurm.local_rank(), slurm.node_rank()) == (8, 5, 1, 1)
