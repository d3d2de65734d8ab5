"""Quantized blocks (runtime/quantized.py): bit-exact with llama.cpp's reference formulas (gguf-py's
NumPy port of ggml-quants.c is the independent reference), their round-trip error bound, and the
model computing with them: products, the embedding's rows, decoding, and LoRA adapters trained over a
quantized base (the gradient through the widened product)."""
import gguf
import numpy as np
import pytest

from npllama import LlamaConfig, adapters, forward, generation, init_params, loss_and_grads
from npllama.runtime import parallel
from npllama.runtime.quantized import LAYOUTS, QuantizeError, Quantized, as_arrays, from_arrays, quantize
from npllama import train

GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1}
KINDS = list(GGML)


def awkward_matrix(rng, rows=24, width=160):
    """Rows of very different scales, a zero block, a constant block, a block with one outlier and
    values that land on .5 after scaling (where rounding rules differ)."""
    x = (rng.standard_normal((rows, width)) * rng.uniform(1e-3, 5, (rows, 1))).astype(np.float32)
    x[1, :32] = 0
    x[2, 32:64] = -0.75
    x[3, 64:96] = 0.01
    x[3, 70] = 40.0
    x[4, :32] = np.arange(32, dtype=np.float32) - 15.5
    return x


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_llama_cpps_bit_for_bit(kind, rng, monkeypatch):
    """Quantized, dequantized and read from GGUF's bytes (laid out 7 rows at a time: 7, 7, 7 and 3)."""
    from npllama.runtime import quantized
    monkeypatch.setattr(quantized, "LAID_OUT_ROWS", 7)
    x = awkward_matrix(rng)
    ours = quantize(x, kind)
    reference = gguf.quants.quantize(x, GGML[kind])
    assert np.array_equal(ours.blocks.view(np.uint8).reshape(reference.shape), reference)
    assert np.array_equal(ours.dequantized(), gguf.quants.dequantize(reference, GGML[kind]))
    from_file = Quantized.from_bytes(kind, reference, x.shape)  # the bytes as a GGUF file holds them
    assert np.array_equal(from_file.dequantized(), ours.dequantized())


@pytest.mark.parametrize("kind", KINDS)
def test_the_round_trip_error_is_within_the_formats_bound(kind, rng):
    """|x − x̂| ≤ step/2 per block, the step being d (q8_0) or (max − min)/15 (q4_1), and a whole step
    d for q4_0 (its 16 levels are −8d … 7d), plus what storing d (and m) in float16 adds: relative 2⁻¹¹
    of each term."""
    x = awkward_matrix(rng).reshape(-1, 32).astype(np.float64)
    error = np.abs(x - quantize(x.reshape(24, 160), kind).dequantized().reshape(-1, 32))
    magnitude = np.abs(x).max(axis=1, keepdims=True)
    if kind == "q8_0":
        d = magnitude / 127
        bound = d / 2 + 127 * d * 2 ** -11
    elif kind == "q4_0":  # the extreme maps to −8·d; its opposite side stops at 7·d: up to one step off
        d = magnitude / 8
        bound = d + 8 * d * 2 ** -11
    else:
        d = (x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True)) / 15
        bound = d / 2 + 15 * d * 2 ** -11 + np.abs(x.min(axis=1, keepdims=True)) * 2 ** -11
    assert np.all(error <= bound * (1 + 1e-6) + 1e-12)
    assert np.all(error[1 * 5] == 0)  # the zero block (row 1's first block) is exact


def test_what_cannot_be_blocks_is_refused(rng):
    with pytest.raises(QuantizeError, match="rows are a multiple of 32 values, not shape"):
        quantize(rng.standard_normal((4, 40)), "q8_0")
    with pytest.raises(QuantizeError, match="unknown block type 'q3_k'"):
        Quantized("q3_k", np.zeros((2, 1), LAYOUTS["q8_0"]))
    with pytest.raises(QuantizeError, match="are not q4_0 blocks of a 4 × 64 weight"):
        Quantized.from_bytes("q4_0", np.zeros(4 * 2 * 18 - 1, np.uint8), (4, 64))


@pytest.mark.parametrize("cores", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_products_gathers_and_dx_equal_the_widened_weights(kind, cores, rng, monkeypatch):
    """The q of 3 block columns of all 96 rows widened at a time (7 columns: runs of 3, 3 and 1, for dx
    and one core's decoding); with 3 cores, decoding's columns are shared 2, 2 and 3 (a run each) and the
    wider products' output rows 32 each."""
    from npllama.runtime import cpu, quantized
    monkeypatch.setattr(cpu, "usable_cores", lambda: cores)
    monkeypatch.setattr(quantized, "SHARED_FROM", 0)
    monkeypatch.setattr(quantized, "WIDENED_VALUES", 3 * 32 * 96)
    weight = quantize(awkward_matrix(rng, rows=96, width=7 * 32), kind)
    dense = weight.dequantized()
    for rows in (1, 8, 9):  # decoding's partial sums (up to PARTIAL_SUMS_UP_TO rows), then widened blocks
        few = rng.standard_normal((rows, 7 * 32)).astype(np.float32)
        np.testing.assert_allclose(weight.forward(few)[0], few @ dense.T, rtol=1e-5, atol=1e-4)
    x = rng.standard_normal((2, 3, 7 * 32)).astype(np.float32)
    y, cache = weight.forward(x)
    np.testing.assert_allclose(y, x @ dense.T, rtol=1e-5, atol=1e-4)
    dy = rng.standard_normal((2, 3, 96)).astype(np.float32)
    dx, grad = weight.backward(dy, cache)
    assert grad is None
    np.testing.assert_allclose(dx, dy @ dense, rtol=1e-5, atol=1e-4)
    ids = np.array([[5, 0], [95, 5]])
    assert np.array_equal(weight[ids], dense[ids])


@pytest.mark.parametrize("kind", KINDS)
def test_weights_with_fewer_rows_than_cores_multiply(kind, rng, monkeypatch):
    """2 output rows on 4 cores: decoding's columns and the wider products' rows are shared only among
    as many cores as there are of them."""
    from npllama.runtime import cpu, quantized
    monkeypatch.setattr(cpu, "usable_cores", lambda: 4)
    monkeypatch.setattr(quantized, "SHARED_FROM", 0)
    weight = quantize(rng.standard_normal((2, 64)), kind)
    for rows in (1, 9):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(weight.forward(x)[0], x @ weight.dequantized().T, rtol=1e-5, atol=1e-4)


def test_work_shared_out_from_a_shared_out_task_runs_there():
    """in_threads called inside one of its own threads runs the inner tasks in that thread (waiting for
    the pool from inside it would wait for ever)."""
    import threading
    from npllama.runtime.streamed import in_threads

    def inner():
        return in_threads([threading.current_thread, threading.current_thread])

    results = []
    outer = threading.Thread(target=lambda: results.extend(in_threads([inner, inner])), daemon=True)
    outer.start()
    outer.join(timeout=30)
    assert not outer.is_alive(), "in_threads waited for its own pool"
    from_the_pool = results[1]
    assert len({*from_the_pool}) == 1 and from_the_pool[0].name.startswith("npllama-streamed")


def quantized_model(kind, seed=0):
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True)
    params = init_params(config, seed=seed)
    held = {name: quantize(value, kind) if value.ndim == 2 else value for name, value in params.items()}
    dense = {name: value.dequantized() if isinstance(value, Quantized) else value for name, value in held.items()}
    return config, held, dense


@pytest.mark.parametrize("kind", KINDS)
def test_a_model_on_blocks_computes_what_its_widened_weights_do(kind, rng, monkeypatch):
    """Logits (the embedding gathered from blocks, the tied head multiplied by them), then greedy
    decoding over the KV cache, resident and streamed (too little memory to keep prepared weights)."""
    from npllama import backend
    config, held, dense = quantized_model(kind)
    tokens = rng.integers(0, 96, (2, 12))
    np.testing.assert_allclose(forward(held, config, tokens), forward(dense, config, tokens), rtol=1e-4, atol=1e-4)
    prompt = [1, 5, 9]
    expected = generation.generate(dense, config, prompt, 10)
    assert generation.generate(held, config, prompt, 10) == expected
    monkeypatch.setattr(backend, "free_memory", lambda: 0)
    assert not generation.Decoder(held, config, 16).resident
    assert generation.generate(held, config, prompt, 10) == expected


def test_lora_adapters_learn_over_a_quantized_base(rng):
    """The loss and the adapters' gradients over a q8_0 base equal those over its widened weights, in
    one process and summed across the shard pool's processes (the base shared as its blocks' bytes)."""
    config, held, dense = quantized_model("q8_0")
    lora = adapters.init_adapters(dense, config, ("q_proj", "v_proj"), 4, 8.0, seed=1)
    for value in lora.values():
        value += rng.standard_normal(value.shape).astype(np.float32) * 0.1  # B ≠ 0: both paths matter
    tokens, targets = rng.integers(0, 96, (4, 12)), rng.integers(0, 96, (4, 12))
    expected_loss, expected = loss_and_grads(adapters.attach(dense, lora, 2.0), config, tokens, targets)
    loss, grads = loss_and_grads(adapters.attach(held, lora, 2.0), config, tokens, targets)
    assert abs(loss - expected_loss) < 1e-5
    for name in lora:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    arrays = as_arrays({**held, **lora})
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    assert {name: type(value) for name, value in from_arrays(arrays).items()} == \
        {name: type(value) for name, value in {**held, **lora}.items()}
    pooled_loss, pooled = train.sharded_loss_and_grads(arrays, config, tokens, targets, shards=2,
                                                      workers=parallel.workers(2), lora_scale=2.0)
    assert abs(pooled_loss - expected_loss) < 1e-5
    for name in lora:
        np.testing.assert_allclose(pooled[name], expected[name], rtol=1e-4, atol=1e-6)


# ---- through the command line: a model made q8_0, then evaluated, tuned with LoRA, refused full training ----
def test_a_quantized_model_evaluates_and_trains_lora_adapters_but_not_every_weight(tmp_path):
    from click.testing import CliRunner

    from npllama.cli import main
    from tests.test_train import RUN_FLAGS, TEXT, assert_one_clear_line

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])
    (tmp_path / "input.txt").write_text(TEXT)
    data = ["--data", tmp_path / "input.txt"]
    shape = ["--dim", 64, "--n-layers", 1, "--n-heads", 2, "--hidden", 128, "--context", 16]  # rows of 32s
    assert cli("train", *data, "--out", tmp_path / "base", "--max-iters", 2, *shape, *RUN_FLAGS).exit_code == 0
    made = cli("load-weights", tmp_path / "base", "--out", tmp_path / "q8.safetensors", "--dtype", "q8_0")
    assert made.exit_code == 0, made.output
    evaluated = cli("eval", "-m", tmp_path / "q8.safetensors", "--data", tmp_path / "input.txt")
    reference = cli("eval", "-m", tmp_path / "base", "--data", tmp_path / "input.txt")
    q8_loss, loss = (float(result.stdout.split()[1]) for result in (evaluated, reference))
    assert abs(q8_loss - loss) < 0.01 * loss  # q8_0 within 1% of fp32
    tuned = cli("train", *data, "--out", tmp_path / "lora", "--init", tmp_path / "q8.safetensors", "--lora-rank", 2,
                "--max-iters", 4, *RUN_FLAGS)
    assert tuned.exit_code == 0, tuned.output
    assert cli("generate", "-m", tmp_path / "q8.safetensors", "--lora", tmp_path / "lora" / "adapters.safetensors",
               "-p", "First", "-n", 4, "--temperature", 0).exit_code == 0
    assert_one_clear_line(cli("train", *data, "--out", tmp_path / "full", "--init", tmp_path / "q8.safetensors",
                              "--max-iters", 2, *RUN_FLAGS),
                          f"{tmp_path / 'q8.safetensors'} holds quantized weights (q8_0): training every weight needs "
                          "float ones; train LoRA adapters on them (--lora-rank)")
    assert not (tmp_path / "full").exists()


def test_a_lora_runs_memory_counts_a_quantized_base_as_its_blocks(monkeypatch):
    """check_memory with the weights a run starts from: q8_0 blocks count their bytes in memory (36
    per 32 values: the scale held as float32), not float32's (128), so a run that fits with them is not refused."""
    from npllama import backend
    config, held, _ = quantized_model("q8_0")
    settings = train.TrainSettings(init="base", lora_rank=2, batch_size=1, context=8, workers=1)
    as_floats, as_blocks = (sum(train.memory_needed(config, settings, weight_bytes).values()) for weight_bytes in
                            (None, sum(train._training_bytes(held, name, settings) for name in held)))
    matrices = sum(value.shape[0] * value.shape[1] for value in held.values() if isinstance(value, Quantized))
    assert as_floats - as_blocks == matrices * (4 - 36 / 32)
    monkeypatch.setattr(backend, "free_memory", lambda: (as_floats + as_blocks) // 2)
    train.check_memory(config, settings, params=held)  # fits as blocks
    with pytest.raises(train.TrainError, match="this run needs about"):
        train.check_memory(config, settings)
