"""The quality reference: the same training recipe run with HF transformers' LlamaForCausalLM in torch
(for comparison only; torch is never an npllama dependency).

    python3 bench/train_torch_reference.py                       # tinyshakespeare, char, nanoGPT's CPU recipe
    python3 bench/train_torch_reference.py --seed 1 --init npllama

Same data, tokenizer, split, batches (npllama's data.random_batch with the same seed: the same windows
in the same order as `cli.py train`), schedule, AdamW settings (decay on matrices only) and clipping as

    python3 cli.py train --data ../shared/data/tinyshakespeare.txt --tokenizer char --dim 128 --n-layers 4 \\
        --n-heads 4 --hidden 384 --context 64 --batch-size 12 --max-iters 2000 --lr 1e-3 --min-lr 1e-4 \\
        --warmup 100 --beta1 0.9 --beta2 0.99 --weight-decay 0.1 --grad-clip 1.0 --eval-interval 2000

--init hf keeps transformers' own initialisation (N(0, 0.02) everywhere); --init npllama loads
npllama.init_params(seed, scheme=--scheme) (the same weights as `cli.py train --seed S`, whose default
scheme is "hf") so only the arithmetic differs. Prints the training time and the final
mean train/val loss over --eval-iters random batches (a generator seeded by the step, as npllama's).
"""
import argparse
import os
import time

import numpy as np

from npllama import LlamaConfig, adamw, data, model as npllama_model

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                    "tinyshakespeare.txt")


def train(data_path=DATA, seed=1337, max_iters=2000, eval_iters=200, init="hf", scheme=None):
    """Train the recipe in torch; returns {'seconds', 'train', 'val'} (bench/init_recipe.py calls it too)."""
    import torch
    import transformers
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count())

    text = data.read_text(data_path)
    tokenizer = data.make_tokenizer("char", text, None)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    train_ids, val_ids = data.split(ids, 0.1)
    config = LlamaConfig.from_dict({**LlamaConfig.preset("shakespeare-char").to_dict(), "vocab_size": tokenizer.vocab_size})
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_dict()))
    if init == "npllama":
        weights = npllama_model.init_params(config, seed=seed, scheme=scheme or npllama_model.INIT_SCHEMES[0])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99), foreach=False)
    rng = np.random.default_rng(seed)
    context = config.max_position_embeddings
    started = time.perf_counter()
    for step in range(max_iters):
        for group in optimizer.param_groups:
            group["lr"] = adamw.learning_rate(step, 1e-3, 1e-4, 100, max_iters)
        x, y = (torch.from_numpy(a) for a in data.random_batch(train_ids, 12, context, rng))
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    eval_rng = np.random.default_rng([seed, max_iters])
    means = {}
    with torch.no_grad():
        for split, split_ids in (("train", train_ids), ("val", val_ids)):
            losses = []
            for _ in range(eval_iters):
                x, y = (torch.from_numpy(a) for a in data.random_batch(split_ids, 12, context, eval_rng))
                logits = model(input_ids=x).logits
                losses.append(float(torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size),
                                                                      y.reshape(-1))))
            means[split] = float(np.mean(losses))
    return {"seconds": seconds, **means}


def main():
    import torch
    import transformers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--eval-iters", type=int, default=200)
    parser.add_argument("--init", choices=["hf", "npllama"], default="hf")
    parser.add_argument("--scheme", choices=npllama_model.INIT_SCHEMES, default=npllama_model.INIT_SCHEMES[0],
                        help="npllama's init scheme, with --init npllama")
    args = parser.parse_args()
    result = train(args.data, args.seed, args.max_iters, args.eval_iters, args.init, args.scheme)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, init {args.init}, seed {args.seed}: "
          f"{args.max_iters} steps in {result['seconds']:.1f} s; train loss {result['train']:.4f}, "
          f"val loss {result['val']:.4f}")


if __name__ == "__main__":
    main()
