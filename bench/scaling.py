"""Training throughput of one machine's ways to use its cores, side by side in one run: one process,
the shard pool (one process, helpers on the other cores: runtime/parallel.py), and MPI ranks
(`mpiexec -n R`, each rank one shard: runtime/distributed.py), for the same global batch.

    python3 bench/scaling.py                                   # stories15M, global batch 8 × 256 tokens
    python3 bench/scaling.py --preset shakespeare-char --batch-size 12 --seq-len 64 --steps 20

Each layout runs full optimizer steps (train.optimizer_step: forward, backward, the sum across
workers and ranks, clipping, AdamW) on random tokens, and prints the median ms per step, tokens/s and
the spread. For MPI it also times the step's communication: an all-reduce of one buffer the size of
the gradients (what zero.Replicated sends), and its share of the step. Needs mpiexec for the MPI rows
(pip install -r requirements.txt installs Open MPI's); they are left out, with the reason, otherwise.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import npllama  # noqa: E402
from npllama import adamw, train, zero  # noqa: E402
from npllama.runtime import cpu, distributed, parallel  # noqa: E402


def measure(args):
    """This process's part of a layout (run under mpiexec for the MPI ones); rank 0 prints one JSON line."""
    world = distributed.world()
    cpu.keep_freed_memory()
    config = npllama.LlamaConfig.preset(args.preset)
    rows = args.batch_size // world.size
    rng = np.random.default_rng(world.rank)
    tokens = rng.integers(0, config.vocab_size, (rows, args.seq_len + 1))
    params = npllama.init_params(config, seed=0)
    optimizer = adamw.AdamW(1e-3, (0.9, 0.99), weight_decay=0.1)
    update = zero.make(0, world, optimizer, params)
    workers = parallel.workers(args.workers)

    def step():
        train.optimizer_step(params, config, optimizer, [(tokens[:, :-1], tokens[:, 1:])], 1e-3, 1.0, args.workers,
                             workers, update=update)
    times = timed(step, args.steps, args.warmup, world)
    result = {"ms": times}
    if world.size > 1:
        buffer = np.zeros(config.num_parameters(), np.float32)
        result["allreduce_ms"] = timed(lambda: world.sum(buffer), args.steps, 2, world)
    if world.is_root:
        print(json.dumps(result), flush=True)


def timed(call, steps, warmup, world):
    """ms of each of `steps` calls after `warmup`, the ranks starting each together."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        world.total(0)  # a barrier: a rank's time is the slowest rank's
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return times


LAYOUTS = [("1 process, 1 worker", 1, 1), ("1 process, shard pool of {cores} workers", 1, "cores"),
           ("{cores} MPI ranks × 1 worker", "cores", 1)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stories15M")
    parser.add_argument("--batch-size", type=int, default=8, help="global windows per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    cores = cpu.usable_cores()
    tokens = args.batch_size * args.seq_len
    print(f"{args.preset}: global batch {args.batch_size} × {args.seq_len} tokens, {cores} cores, "
          f"median of {args.steps} steps (spread: fastest-slowest)")
    mpiexec = shutil.which("mpiexec")
    for label, ranks, workers in LAYOUTS:
        ranks, workers = (cores if value == "cores" else value for value in (ranks, workers))
        label = label.format(cores=cores)
        if ranks > 1 and not mpiexec:
            print(f"{label:<40} left out: mpiexec is not on PATH (pip install -r requirements.txt)")
            continue
        launcher = [mpiexec, "--oversubscribe", "-n", str(ranks)] if ranks > 1 else []
        command = [*launcher, sys.executable, os.path.abspath(__file__), "--measure", "--workers", str(workers),
                   *(f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                     if name not in ("measure", "workers"))]
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        ms = result["ms"]
        line = (f"{label:<40} {statistics.median(ms):8.1f} ms/step {tokens / statistics.median(ms) * 1000:8.0f} "
                f"tok/s  ({min(ms):.1f}-{max(ms):.1f} ms)")
        if "allreduce_ms" in result:
            reduce_ms = statistics.median(result["allreduce_ms"])
            line += f"; all-reduce of the gradients {reduce_ms:.1f} ms ({reduce_ms / statistics.median(ms):.0%} of a step)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
