"""What quantizing costs a real model: perplexity with every matrix in q8_0, q4_0 and q4_1 blocks beside
the float32 weights, on the same tokens, and how far each one's next-token distributions are from the
float32 model's (llama.cpp's `perplexity --kl-divergence` figures: the mean KL(p_fp32 ‖ p_blocks) over
the positions, and how often both put the same token first).

    python3 bench/quantized_quality.py                                   # ../shared/data/stories260K.bin
    python3 bench/quantized_quality.py --weights runs/shakespeare-sample --data ../shared/data/tinyshakespeare.txt

stories260K has no tokenizer: its tokens are --tokens ids sampled from the float32 model itself
(temperature 1, seed 0), the text it would write: any change of the weights raises perplexity on it,
so the KL divergence is the fairer measure there. A model with a tokenizer is evaluated on the last
--tokens tokens of --data. Matrices whose rows are not a multiple of 32 stay float32 (as load-weights
keeps them, in fp16).
"""
import argparse
import math
import os

import numpy as np

import npllama
from npllama import data, generation, model, train
from npllama.runtime.quantized import BLOCK, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_blocks(params, kind):
    return {name: quantize(value, kind) if value.ndim == 2 and value.shape[1] % BLOCK == 0 else value
            for name, value in params.items()}


def log_probabilities(params, config, ids):
    """log p(next token) at every predicted position of ids (train.evaluate_ids' windows): (positions, vocab)."""
    rows = []
    for tokens, targets in data.sequential_windows(ids, config.max_position_embeddings, 8):
        logits = np.asarray(model.forward(params, config, tokens), dtype=np.float64)[targets != -100]
        top = logits.max(axis=-1, keepdims=True)
        rows.append(logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
    return np.concatenate(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=os.path.join(ROOT, "..", "shared", "data", "stories260K.bin"))
    parser.add_argument("--data", help="a text file (for a model with a tokenizer)")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    config, params, tokenizer = npllama.load(args.weights)
    params = model.trainable(params)
    if args.data:
        ids = tokenizer.encode(open(args.data, encoding="utf-8").read(), special=False)[-args.tokens:]
        source = f"the last {len(ids):,} tokens of {args.data}"
    else:
        ids = []
        while len(ids) < args.tokens:  # windows of the context, each from BOS
            ids += [1] + generation.generate(params, config, [1], config.max_position_embeddings - 1,
                                             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=len(ids))
        ids = ids[:args.tokens]
        source = f"{len(ids):,} tokens sampled from the float32 model"
    print(f"{args.weights}: {config.num_parameters():,} parameters; perplexity over {source}")
    reference, exact = None, log_probabilities(params, config, ids)
    for kind in ("fp32", "q8_0", "q4_0", "q4_1"):
        held = params if kind == "fp32" else in_blocks(params, kind)
        loss, count = train.evaluate_ids(held, config, ids)
        perplexity = math.exp(loss)
        reference = reference or perplexity
        blocks = log_probabilities(held, config, ids)
        divergence = (np.exp(exact) * (exact - blocks)).sum(axis=-1)
        same_top = (exact.argmax(axis=-1) == blocks.argmax(axis=-1)).mean()
        print(f"{kind:5} perplexity {perplexity:9.4f}   ({100 * (perplexity / reference - 1):+.2f}% of fp32's)   "
              f"KL from fp32 {divergence.mean():.5f} (99th percentile {np.percentile(divergence, 99):.4f})   "
              f"same top token {100 * same_top:.1f}%")


if __name__ == "__main__":
    main()
