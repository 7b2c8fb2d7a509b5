#!/usr/bin/env bash
# One shard of an `effortless bench` sweep, as one task of a SLURM or LSF job array.
#
#   scripts/bench_array.sh N OUT_ROOT [bench options...]
#
# Runs `effortless bench --shard I/N --out OUT_ROOT/shard-I ...` where I is the array index
# (SLURM_ARRAY_TASK_ID with --array=0-(N-1); LSB_JOBINDEX - 1 for LSF's 1-based "name[1-N]").
# Combine the shards afterwards with: effortless bench --merge OUT_ROOT/shard-* --out OUT_ROOT
# (docs/clusters.md). EFFORTLESS overrides the command (default: effortless).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N OUT_ROOT [effortless bench options...]" >&2
  exit 2
fi
n=$1
root=$2
shift 2
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  i=$SLURM_ARRAY_TASK_ID
elif [ -n "${LSB_JOBINDEX:-}" ]; then
  i=$((LSB_JOBINDEX - 1))
else
  echo "bench_array.sh: neither SLURM_ARRAY_TASK_ID nor LSB_JOBINDEX is set (not in a job array)" >&2
  exit 2
fi
if [ "$i" -lt 0 ] || [ "$i" -ge "$n" ]; then
  echo "bench_array.sh: array index $i is outside 0..$((n - 1)); submit the array as 0-$((n - 1)) (SLURM) or [1-$n] (LSF)" >&2
  exit 2
fi
exec ${EFFORTLESS:-effortless} bench --shard "$i/$n" --out "$root/shard-$i" "$@"
