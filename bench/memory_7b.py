"""Peak memory and speed of generating with a Llama-2-7B-shaped float16 weights file on the CPU.

    python3 bench/memory_7b.py                      # writes weights/llama2-7b-random-fp16.safetensors once
    python3 bench/memory_7b.py --new-tokens 8
    python3 bench/memory_7b.py --dtype q8_0         # its q8_0 blocks (weights/llama2-7b-random-q8_0...), once,
                                                    # then the fp16 file beside it (--alone: not)

Makes (once) a 13.5 GB npllama weights file of the llama2-7b preset's shape with random float16
weights (std 0.02; windows of one random pool, so writing it takes a minute, not ten), with the Llama 2
tokenizer from ../shared/data embedded when it is there; then runs
    /usr/bin/time -v python3 cli.py generate --weights FILE --prompt ... -n N --device cpu
and prints its summary line, the peak resident set size and the wall time. With --dtype q8_0, q4_0 or
q4_1 the fp16 file is quantized into another (load-weights --dtype), which is then run, and the fp16
file after it in the same way: the decode speeds and their ratio are printed last. The files are
git-ignored: never commit them. Delete them when done (13.5 GB in fp16, 7.6 GB in q8_0, 4.2 GB in q4_0).
"""
import argparse
import os
import re
import subprocess
import sys

import numpy as np

from npllama import LlamaConfig
from npllama.config import parameter_shapes
from npllama.io import tokenizer as tokenizers, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model")


def random_weights(config, seed=0):
    """LazyTensors of random float16 weights: each tensor is a window of one 64M-value random pool."""
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(64 << 20, dtype=np.float32) * 0.02).astype(np.float16)
    params = weights.LazyTensors()
    for name, shape in parameter_shapes(config).items():
        size = int(np.prod(shape))
        if name.endswith("norm.weight"):
            params.add(name, np.float16, shape, lambda shape=shape: np.ones(shape, np.float16))
            continue
        start = int(rng.integers(0, pool.size - size)) if size < pool.size else 0
        params.add(name, np.float16, shape, lambda shape=shape, start=start, size=size:
                   np.resize(pool[start:start + size], size).reshape(shape))
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.path.join(ROOT, "weights", "llama2-7b-random-fp16.safetensors"))
    parser.add_argument("--dtype", choices=["fp16", "q8_0", "q4_0", "q4_1"], default="fp16",
                        help="run the fp16 file, or its blocks of this type")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--alone", action="store_true", help="with a block type: skip running the fp16 file beside it")
    args = parser.parse_args()

    config = LlamaConfig.preset("llama2-7b")
    if not os.path.exists(args.weights):
        tokenizer = tokenizers.load(TOKENIZER) if os.path.exists(TOKENIZER) else None
        print(f"writing {args.weights} ({config.num_parameters() * 2 / 1e9:.1f} GB) ...", flush=True)
        weights.save(args.weights, config, random_weights(config), tokenizer)
    run = args.weights
    if args.dtype != "fp16":
        stem, extension = os.path.splitext(os.path.basename(args.weights))
        run = os.path.join(os.path.dirname(args.weights), f"{stem.replace('-fp16', '')}-{args.dtype}{extension}")
        if not os.path.exists(run):
            print(f"writing {run} ...", flush=True)
            subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "load-weights", args.weights, "--out", run,
                            "--dtype", args.dtype], check=True)
    figures = {args.dtype: measure(run, args)}
    if args.dtype != "fp16" and not args.alone:
        figures["fp16"] = measure(args.weights, args)
        print(f"decode: {args.dtype} {figures[args.dtype]:.3f} tok/s, fp16 {figures['fp16']:.3f} tok/s: "
              f"{figures[args.dtype] / figures['fp16']:.1f}x")


def measure(path, args):
    """Run generate on path under /usr/bin/time; print its summary, peak RSS and wall time; its decode tok/s."""
    command = ["/usr/bin/time", "-v", sys.executable, os.path.join(ROOT, "cli.py"), "generate", "--weights", path,
               "--temperature", "0", "--prompt", args.prompt, "-n", str(args.new_tokens), "--device", "cpu"]
    print(" ".join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout.strip())
    report = result.stderr
    summary = [line for line in report.splitlines() if line.startswith("prompt ")]
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", report).group(1)
    print(summary[0] if summary else report)
    print(f"peak RSS {peak_kb / 2 ** 20:.2f} GiB, wall {wall}, exit status {result.returncode}", flush=True)
    return float(re.search(r"decode ([\d.]+) tok/s", summary[0]).group(1)) if summary else float("nan")


if __name__ == "__main__":
    main()
