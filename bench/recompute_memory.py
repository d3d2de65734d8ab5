"""Memory and time of one training step (model.loss_and_grads) with stored activations and with
activation recomputation (recompute=True), side by side.

    python3 bench/recompute_memory.py                         # stories15M B=8 T=256; stories110M B=1 T=1024
    python3 bench/recompute_memory.py --case stories15M --steps 5

stories110M is the 124M-class shape (D=768, 12 layers, 12 heads, F=2048, V=32000, tied) at T=1024.
For each, in this one process:
    kept by the forward    the arrays hidden_states_for_training allocates and leaves alive: h and the
                           caches stack_backward needs (block caches, or only the block inputs)
    peak of a step         the largest total of arrays allocated during one loss_and_grads: the kept
                           activations, the LM head's logits/probabilities, the gradients and the
                           backward's temporaries (the parameters, allocated before, are not counted)
    time per step          median over --steps calls of loss_and_grads, timed without tracing, the
                           two modes' calls taken in turn
Memory is tracemalloc's count, which sees every NumPy array (a GPU's arrays are not seen: CPU only).
BLAS runs on one thread, as in each of the trainer's workers (one shard per core): the figures are one
worker's, and a busy machine's other processes do not make OpenBLAS's threads wait on each other.
"""
import argparse
import statistics
import time
import tracemalloc

import numpy as np

import npllama
from npllama import backend, model
from npllama.config import human_bytes, human_count
from npllama.runtime import cpu

CASES = {"stories15M": (8, 256), "stories110M": (1, 1024)}  # preset: (batch size, sequence length)
MODES = {"stored": False, "recompute": True}


def traced(call):
    """(what call() returns, the bytes it holds, call()'s peak bytes), counting only call()'s allocations."""
    tracemalloc.start()
    try:
        result = call()
        return (result, *tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()


def memory(params, config, tokens, targets, recompute):
    """{kept, peak}: the bytes the forward keeps, and the peak bytes of one step."""
    _, kept, _ = traced(lambda: model.hidden_states_for_training(params, config, tokens, recompute=recompute))
    _, _, peak = traced(lambda: npllama.loss_and_grads(params, config, tokens, targets, recompute=recompute))
    return {"kept": kept, "peak": peak}


def seconds(params, config, tokens, targets, steps):
    """The median seconds of a step in each mode, the modes' steps taken in turn (a drifting machine
    slows both alike)."""
    times = {mode: [] for mode in MODES}
    for _ in range(steps):
        for mode, recompute in MODES.items():
            start = time.perf_counter()
            npllama.loss_and_grads(params, config, tokens, targets, recompute=recompute)
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(spent) for mode, spent in times.items()}


def report(figures):
    stored, recomputed = figures["stored"], figures["recompute"]
    print(f"{'':<24}{'stored':>14}{'recompute':>14}{'ratio':>9}")
    for key, label, shown in (("kept", "kept by the forward", human_bytes), ("peak", "peak of a step", human_bytes),
                              ("seconds", "time per step", lambda s: f"{s:.2f} s")):
        print(f"{label:<24}{shown(stored[key]):>14}{shown(recomputed[key]):>14}{recomputed[key] / stored[key]:>9.2f}")


def bench(name, steps):
    batch, time_steps = CASES[name]
    config = npllama.LlamaConfig.preset(name)
    params = npllama.init_params(config, seed=0)
    tokens, targets = np.random.default_rng(0).integers(0, config.vocab_size, (2, batch, time_steps))
    print(f"\n{name}: {human_count(config.num_parameters())} params (D={config.hidden_size}, "
          f"L={config.num_hidden_layers}, H={config.num_attention_heads}, F={config.intermediate_size}, "
          f"V={config.vocab_size}), B={batch} T={time_steps}, {backend.describe()}, 1 BLAS thread")
    figures = {mode: memory(params, config, tokens, targets, recompute) for mode, recompute in MODES.items()}
    for mode, spent in seconds(params, config, tokens, targets, steps).items():
        figures[mode]["seconds"] = spent
    report(figures)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=CASES, action="append", help="a preset to measure (default: all)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (after the traced ones)")
    args = parser.parse_args()
    cpu.keep_freed_memory()  # as a training run does
    with cpu.single_threaded_blas():
        for name in args.case or CASES:
            bench(name, args.steps)


if __name__ == "__main__":
    main()
