"""Time one training step (forward + backward, and the full step with clipping and AdamW) of npllama
and, with --torch, of HF transformers.

    python3 bench/train_step.py                                   # nanoGPT's CPU recipe as a Llama
    python3 bench/train_step.py --preset stories15M --batch-size 8 --seq-len 256
    python3 bench/train_step.py --torch                           # also HF LlamaForCausalLM (torch eager)

Prints the median ms per step and tokens/s over --steps timed steps (after --warmup), and the spread
(fastest and slowest). npllama's step is the trainer's own (train.py): the batch cut into --threads
shards whose gradients are summed across that many workers (runtime/parallel.py: processes on the
CPU's cores), as `cli.py train --workers N` runs it. torch (only for the comparison; never an npllama
dependency) runs with the same thread count and is timed for forward + backward, and for the full step
with torch.optim.AdamW. npllama's full step also clips the gradient norm (as `cli.py train` does);
torch's does not.
"""
import argparse
import statistics
import time

import numpy as np

import npllama
from npllama import backend, train
from npllama.config import human_count
from npllama.runtime import cpu, parallel


def timed_ms(step, steps, warmup, sync=lambda: None):
    """The milliseconds of each of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return times


def report(label, times, tokens):
    median = statistics.median(times)
    print(f"{label:<44} {median:9.2f} ms/step {tokens / median * 1000:10.0f} tok/s   "
          f"(spread {min(times):.2f}-{max(times):.2f} ms)")


def bench_npllama(config, tokens_in, targets, args):
    cpu.keep_freed_memory()  # as a training run does
    params = npllama.init_params(config, seed=0)
    optimizer = npllama.AdamW(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    shards = args.threads if backend.device() == "cpu" else 1  # a GPU computes the batch whole
    workers = parallel.workers(shards)
    sync = (lambda: backend.xp().cuda.Device().synchronize()) if backend.device() == "cuda" else (lambda: None)

    def forward_backward():
        train.sharded_loss_and_grads(params, config, tokens_in, targets, shards, workers)

    def full_step():
        train.optimizer_step(params, config, optimizer, [(tokens_in, targets)], 1e-3, 1.0, shards, workers)

    where = f"{backend.device()}, {shards} worker(s)"
    report(f"npllama forward+backward ({where})", timed_ms(forward_backward, args.steps, args.warmup, sync),
           tokens_in.size)
    report(f"npllama forward+backward+clip+AdamW ({where})", timed_ms(full_step, args.steps, args.warmup, sync),
           tokens_in.size)


def bench_torch(config, tokens_in, targets, args):
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items()},
                                         attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(hf_config).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    inputs, labels = torch.from_numpy(tokens_in), torch.from_numpy(targets)

    def forward_backward():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1))
        loss.backward()

    def full_step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"attention {model.config._attn_implementation}, {torch.get_num_threads()} threads")
    report("torch eager forward+backward", timed_ms(forward_backward, args.steps, args.warmup), inputs.numel())
    report("torch eager forward+backward+AdamW", timed_ms(full_step, args.steps, args.warmup), inputs.numel())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shakespeare-char")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=cpu.usable_cores(),
                        help="npllama's workers (shards per batch) and torch's threads")
    parser.add_argument("--torch", action="store_true", help="also time HF transformers (torch eager)")
    args = parser.parse_args()

    config = npllama.LlamaConfig.preset(args.preset)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    tokens_in, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    print(f"{args.preset}: {human_count(config.num_parameters())} params, "
          f"B={args.batch_size} T={args.seq_len}, device {backend.describe()}")
    bench_npllama(config, tokens_in, targets, args)
    if args.torch:
        bench_torch(config, tokens_in, targets, args)


if __name__ == "__main__":
    main()
