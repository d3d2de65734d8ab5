"""Which initialisation trains better: npllama's init schemes (model.INIT_SCHEMES: "gpt2", o_proj and
down_proj scaled by 1/sqrt(2·layers); "hf", N(0, 0.02) everywhere) on the nanoGPT Shakespeare-char
recipe, over several seeds; with --torch, HF transformers' own init in torch beside them.

    python3 bench/init_recipe.py                              # both schemes, seeds 1337 1 2
    python3 bench/init_recipe.py --torch                      # and torch with transformers' init
    python3 bench/init_recipe.py --schemes hf --seeds 1337 --max-iters 200

Each run is the README's

    python3 cli.py train --data ../shared/data/tinyshakespeare.txt --tokenizer char --dim 128 --n-layers 4 \\
        --n-heads 4 --hidden 384 --context 64 --batch-size 12 --max-iters 2000 --lr 1e-3 --min-lr 1e-4 \\
        --warmup 100 --beta1 0.9 --beta2 0.99 --weight-decay 0.1 --grad-clip 1.0 --eval-interval 2000 --seed S

(the same batches, from a generator seeded by S, and the same final evaluation: the mean loss of 200
random batches of each split) with the weights from model.init_params(config, S, scheme=...); so the
default scheme's row is `cli.py train --seed S`'s run. Losses are exact for a given worker count (the shards' gradients
are summed in a fixed order); --workers 2 is what `cli.py train` records on a 2-core machine.
Prints one row per run (seconds: the 2000 training steps, evaluation left out), then each scheme's
mean and range.
"""
import argparse
import os
import tempfile

import numpy as np

from npllama import LlamaConfig, data, model, train

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                    "tinyshakespeare.txt")
RECIPE = dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup=100, beta1=0.9, beta2=0.99,
              weight_decay=0.1, grad_clip=1.0, eval_iters=200, val_fraction=0.1, sample_tokens=0)


def train_recipe(text, data_path, scheme, seed, max_iters, workers):
    """One run in a temporary directory; returns {'seconds', 'train', 'val'}."""
    settings = train.TrainSettings(**{**RECIPE, "max_iters": max_iters}, eval_interval=max_iters, seed=seed,
                                   workers=workers)
    tokenizer = data.make_tokenizer("char", text, None)
    config = LlamaConfig.from_dict({**LlamaConfig.preset("shakespeare-char").to_dict(),  # dim 128, 4 layers,
                                    "vocab_size": tokenizer.vocab_size})              # 4 heads, hidden 384, ctx 64
    params = model.trainable(model.init_params(config, seed=seed, scheme=scheme), settings.dtype)
    with tempfile.TemporaryDirectory() as directory:
        ids = data.token_ids(text, tokenizer, directory)
        run = train.TrainingRun(directory, config, params, tokenizer, settings, ids, {"path": data_path})
        reports, evaluations = [], []
        train.run(run, on_step=reports.append, on_eval=lambda step, means, sample: evaluations.append(means))
    return {"seconds": reports[-1].elapsed_seconds, **evaluations[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--schemes", nargs="+", choices=model.INIT_SCHEMES, default=list(model.INIT_SCHEMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337, 1, 2])
    parser.add_argument("--max-iters", type=int, default=RECIPE["max_iters"])
    parser.add_argument("--workers", type=int, default=2, help="shards per batch (default 2: cli.py train's "
                        "choice on 2 cores)")
    parser.add_argument("--torch", action="store_true", help="also train HF transformers' LlamaForCausalLM "
                        "with its own init (bench/train_torch_reference.py)")
    args = parser.parse_args()
    text = data.read_text(args.data)
    runs = [(f"npllama {scheme}", scheme, seed) for scheme in args.schemes for seed in args.seeds]
    runs += [("torch hf", None, seed) for seed in args.seeds] if args.torch else []
    results = {}
    print(f"{'init':<12} {'seed':>5} {'val loss':>9} {'train loss':>11} {'seconds':>8}", flush=True)
    for name, scheme, seed in runs:
        if scheme is None:
            from train_torch_reference import train as train_torch  # bench/ is the script's directory
            result = train_torch(args.data, seed, args.max_iters, RECIPE["eval_iters"], init="hf")
        else:
            result = train_recipe(text, args.data, scheme, seed, args.max_iters, args.workers)
        results.setdefault(name, []).append(result["val"])
        print(f"{name:<12} {seed:>5} {result['val']:>9.4f} {result['train']:>11.4f} {result['seconds']:>8.1f}",
              flush=True)
    print(f"\nval loss over seeds {', '.join(map(str, args.seeds))}:")
    for name, losses in results.items():
        print(f"{name:<12} mean {np.mean(losses):.4f}, range {min(losses):.4f}–{max(losses):.4f}")


if __name__ == "__main__":
    main()
