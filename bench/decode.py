"""Greedy decoding speed: tokens per second of npllama's KV-cache decoder (and, with --torch, of HF
transformers' greedy generate on the same weights and threads).

    python3 bench/decode.py                                  # stories15M shape, 256 new tokens, CPU
    python3 bench/decode.py --torch                          # and HF transformers for comparison
    python3 bench/decode.py --weights weights/7b.safetensors --new-tokens 128 --device cuda
    python3 bench/decode.py --preset smollm-135m --gguf q8_0 --torch   # read from a GGUF file of that type
    python3 bench/decode.py --preset smollm-135m --gguf q8_0 --fp32    # and its weights widened, beside

Random weights (std 0.02) of a preset's shape unless --weights names a file; the prompt is
--prompt-tokens ids drawn at random after BOS. EOS is ignored so every run makes --new-tokens tokens.
Prints prefill and decode tok/s, the median of --repeats runs. With --gguf the weights are first
written as a GGUF file (export-gguf) and read back from it, as a llama.cpp model would be: the load
time (reading the file, then making the weights the decoder computes with) is printed too, and torch
gets the same (dequantized) weights. q8_0, q4_0 and q4_1 tensors stay blocks (runtime/quantized.py);
--fp32 times the same model with every weight widened to float32 in the same run. With --gguf on
the CPU, the peak RSS of `cli.py generate` reading the GGUF file (and, with --fp32, an F32 one of the
same weights) in a process of its own is printed too.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import npllama
from npllama import backend, generation
from npllama.io import weights
from npllama.runtime import cpu
from npllama.runtime.quantized import Quantized

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli.py")


def npllama_speeds(params, config, prompt, new_tokens, dtype):
    tokens, stats = generation.stream(params, config, prompt, new_tokens, dtype=dtype)
    for _ in tokens:
        pass
    return stats.prompt_tokens / stats.prefill_seconds, (stats.new_tokens - 1) / stats.decode_seconds, stats.new_tokens


def torch_speeds(params, config, prompt, new_tokens, threads):
    """HF LlamaForCausalLM (eager, SDPA) greedy generate, with the same float32 weights."""
    import torch
    import transformers
    torch.set_num_threads(threads)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_dict().items() if k != "rope_scaling"},
                                         rope_scaling=config.rope_scaling)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    state = {name: torch.from_numpy(np.array(widened(backend.to_host(array) if backend.is_array(array) else array)))
             for name, array in params.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        started = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        total = time.perf_counter() - started
    made = out.shape[1] - len(prompt)
    return len(prompt) / prefill, (made - 1) / max(total - prefill, 1e-9)


def through_gguf(config, params, quant_type, directory):
    """(config, params) read back from a GGUF file of the weights, and the seconds reading took and
    making the decoder's weights took (dequantizing, widening to fp32)."""
    path = os.path.join(directory, f"model.{quant_type}.gguf")
    weights.export_gguf(path, config, params, None, quant_type)
    started = time.perf_counter()
    config, params, _ = npllama.load(path)
    read = time.perf_counter() - started
    started = time.perf_counter()
    generation.Decoder(params, config, 1)
    made = time.perf_counter() - started
    print(f"GGUF {quant_type}: {os.path.getsize(path) / 2**20:.1f} MiB; load {read:.2f} s, "
          f"weights made {made:.2f} s")
    return config, params, path


def peak_rss(path, prompt, new_tokens):
    """Peak resident bytes of `cli.py generate` on the weights file at path, in a process of its own (under
    /usr/bin/time: a child forked from this process would count this process's pages until its exec)."""
    result = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, CLI, "generate", "--weights", path,
                             "--device", "cpu", "--prompt-ids", " ".join(map(str, prompt)), "-n", str(new_tokens)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"cli.py generate on {path} failed: {result.stderr.strip()}")
    return int(result.stderr.split()[-1]) * 1024  # %M: KiB


def widened(value):
    """A weight as float32: blocks dequantized, arrays widened."""
    return value.dequantized() if isinstance(value, Quantized) else np.asarray(value, dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stories15M")
    parser.add_argument("--weights", help="a weights file or HF directory instead of random weights")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=backend.DEVICES)
    parser.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU)")
    parser.add_argument("--torch", action="store_true", help="also time HF transformers' generate")
    parser.add_argument("--gguf", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"],
                        help="read the weights from a GGUF file")
    parser.add_argument("--fp32", action="store_true", help="also time the weights widened to float32")
    args = parser.parse_args()

    backend.use(args.device)
    cpu.keep_freed_memory()  # as the CLI's commands do
    if args.weights:
        config, params, _ = npllama.load(args.weights)
    else:
        config = npllama.LlamaConfig.preset(args.preset)
        params = npllama.init_params(config, seed=0)
    scratch = tempfile.TemporaryDirectory()
    if args.gguf:
        config, params, gguf_path = through_gguf(config, params, args.gguf, scratch.name)
    prompt = [1] + [int(i) for i in np.random.default_rng(0).integers(3, config.vocab_size, args.prompt_tokens - 1)]
    threads = cpu.usable_cores()
    print(f"{args.weights or args.preset}: {npllama.config.human_count(config.num_parameters())} params, "
          f"{backend.describe()}, {threads} cores, prompt {len(prompt)}, {args.new_tokens} new tokens")

    if args.gguf and args.device == "cpu":
        sizes = {args.gguf: peak_rss(gguf_path, prompt, args.new_tokens)}
        if args.fp32:
            weights.export_gguf(os.path.join(scratch.name, "model.f32.gguf"), config, {
                name: widened(value) for name, value in params.items()}, None, "f32")
            sizes["f32"] = peak_rss(os.path.join(scratch.name, "model.f32.gguf"), prompt, args.new_tokens)
        print("peak RSS of cli.py generate on the GGUF file: " +
              ", ".join(f"{kind} {size / 2**20:.0f} MiB" for kind, size in sizes.items()))
    variants = [("npllama", params)]
    if args.fp32:
        variants.append(("fp32", {name: widened(value) for name, value in params.items()}))
    for label, variant in variants:
        runs = [npllama_speeds(variant, config, prompt, args.new_tokens, args.dtype) for _ in range(args.repeats)]
        print(f"{label:8} prefill {statistics.median(r[0] for r in runs):8.1f} tok/s   "
              f"decode {statistics.median(r[1] for r in runs):8.1f} tok/s   "
              f"(decode runs: {', '.join(f'{r[1]:.1f}' for r in runs)}; {runs[0][2]} new tokens, "
              f"the context is {config.max_position_embeddings})")
    if args.torch:
        runs = [torch_speeds(params, config, prompt, args.new_tokens, threads) for _ in range(args.repeats)]
        print(f"torch    prefill {statistics.median(r[0] for r in runs):8.1f} tok/s   "
              f"decode {statistics.median(r[1] for r in runs):8.1f} tok/s   "
              f"(decode runs: {', '.join(f'{r[1]:.1f}' for r in runs)})")


if __name__ == "__main__":
    main()
