"""Run under `mpiexec -n R` by tests/test_mpi.py (not a test module): optimizer steps of a small GQA
model, rank r computing rows r·b … (r + 1)·b − 1 of each global batch of R·b windows, once per case of
CASES (ZeRO stage, clipping). Rank 0 saves every case's losses, norms, final parameters and each
rank's bytes of AdamW moments to OUT.npz.

    mpiexec -n 2 python3 tests/mpi_steps.py OUT.npz ROWS_PER_RANK STEPS
"""
import sys

import numpy as np

import npllama
from npllama import adamw, train, zero
from npllama.runtime import distributed, parallel

CASES = {"zero0": (0, 1.0), "zero1": (1, 1.0), "zero0-noclip": (0, 0.0), "zero1-noclip": (1, 0.0)}


def config():
    return npllama.LlamaConfig.from_dict({**npllama.LlamaConfig.preset("tiny").to_dict(), "num_key_value_heads": 2})


def global_batches(steps, rows, context=8, seed=3):
    """The same (tokens, targets) of `rows` windows for each step, on every rank."""
    rng = np.random.default_rng(seed)
    vocab = config().vocab_size
    return [(rng.integers(0, vocab, (rows, context)), rng.integers(0, vocab, (rows, context))) for _ in range(steps)]


def run_case(world, stage, clip, rows_per_rank, steps):
    params = npllama.init_params(config(), seed=0)
    optimizer = adamw.AdamW(1e-2, (0.9, 0.99), weight_decay=0.1)
    update = zero.make(stage, world, optimizer, params)
    mine = slice(world.rank * rows_per_rank, (world.rank + 1) * rows_per_rank)
    losses, norms = [], []
    for tokens, targets in global_batches(steps, world.size * rows_per_rank):
        loss, norm = train.optimizer_step(params, config(), optimizer, [(tokens[mine], targets[mine])], 1e-2, clip,
                                          workers=parallel.OneProcess(), update=update)
        losses.append(loss)
        norms.append(norm)
    moment_bytes = world.gather(sum(moment.nbytes for moments in (optimizer.m, optimizer.v) for moment in moments.values()))
    return losses, norms, params, moment_bytes


def main(out, rows_per_rank, steps):
    world = distributed.world()
    results = {}
    for case, (stage, clip) in CASES.items():
        losses, norms, params, moment_bytes = run_case(world, stage, clip, rows_per_rank, steps)
        results.update({f"{case}/losses": losses, f"{case}/norms": norms, f"{case}/moment_bytes": moment_bytes,
                        **{f"{case}/{name}": value for name, value in params.items()}})
    if world.is_root:
        np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
