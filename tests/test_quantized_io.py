"""Quantized weights through the file formats: GGUF's Q8_0/Q4_0/Q4_1 tensors kept as blocks and its other
types made Q8_0 (gguf_file.py), the npllama weights file storing blocks (weights.py), load-weights --dtype
q8_0|q4_0|q4_1, export-gguf of and to blocks, export-hf and info of a quantized model. The reference is
gguf-py, llama.cpp's own Python code: its quantize and dequantize of the same values. Torch-free and fast."""
import json
import os

import gguf
import numpy as np
import pytest

import npllama
from npllama import dtypes
from npllama.adapters import adapter_names
from npllama.errors import Notice
from npllama.generation import generate
from npllama.io import gguf_file, safetensors_file, weights
from npllama.runtime.quantized import LAYOUTS, Quantized
from tests.test_cli_weights import STORIES260K, assert_one_clear_line, cli, ok, snapshot, summary_fields
from tests.test_gguf import fixture, gguf_py_params, gguf_tensors

KINDS = ["q8_0", "q4_0", "q4_1"]
PROMPT = [1, 2, 3]


def ggml(kind):
    return gguf.GGMLQuantizationType[kind.upper()]


def reference_values(values, kind):
    """gguf-py's quantization of float32 values (rows of 32-value blocks), dequantized."""
    return gguf.quants.dequantize(gguf.quants.quantize(values, ggml(kind)), ggml(kind))


def reference_blocks(values, kind):
    return gguf.quants.quantize(np.ascontiguousarray(values, np.float32), ggml(kind)).tobytes()


def float_values(weight):
    if isinstance(weight, Quantized):
        return weight.dequantized()
    return dtypes.compute_array(np.asarray(weight), np.float32)


def is_memory_mapped(array):
    while array is not None and not isinstance(array, np.memmap):
        array = array.base
    return array is not None


@pytest.fixture(scope="module")
def stories():
    """llama2.c's stories260K: dim 64, hidden 172 (down_proj's rows of 172 are no multiple of 32), tied."""
    return weights.load(STORIES260K)


def test_the_block_types_are_named_alike_everywhere():
    assert dtypes.QUANTIZED == tuple(LAYOUTS) == tuple(KINDS)
    assert [dtypes.resolve(kind.upper()) for kind in KINDS] == KINDS and dtypes.name("q4_1") == "q4_1"


# ---- GGUF import ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_blocks_load_as_quantized_weights_equal_to_gguf_pys(tmp_path, kind):
    """A GGUF file written by export-gguf (gguf-py quantizes) loads with every matrix Quantized (its blocks
    laid out anew in memory, q and k in HF's row order), equal to gguf-py's dequantization, and the
    model's logits are those of the dequantized model."""
    path = str(tmp_path / f"{kind}.gguf")
    ok(cli("export-gguf", fixture("gqa-f32"), path, "--type", kind))
    config, params, _ = weights.load(path)
    exact = gguf_py_params(path, config.head_dim)
    for name, values in exact.items():
        weight = params[name]
        if values.ndim == 1:
            assert weight.dtype == np.float32 and np.array_equal(weight, values), name
            continue
        assert isinstance(weight, Quantized) and weight.kind == kind and weight.shape == values.shape, name
        assert np.array_equal(weight.dequantized(), values), name
    logits = npllama.forward(params, config, np.array([PROMPT]))
    reference = npllama.forward(exact, config, np.array([PROMPT]))
    assert np.abs(logits - reference).max() <= 1e-5 * np.abs(reference).max()


def test_a_gguf_files_blocks_are_laid_out_once(tmp_path):
    """A decoder that keeps nothing (a model larger than half the free memory) reads every weight at
    every token: a GGUF's blocks, laid out anew (or converted to q8_0) when read, are made only once."""
    path = str(tmp_path / "q4_0.gguf")
    ok(cli("export-gguf", fixture("gqa-f32"), path, "--type", "q4_0"))
    _, params, _ = weights.load(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert params[name] is params[name]
    _, converted, _ = weights.load(fixture("llama3-q4_k_m"))
    assert converted[name] is converted[name]


def test_other_gguf_types_are_made_q8_0_adding_half_a_percent():
    """The Q4_K_M fixture (llama.cpp's quantization of random weights: Q4_K and Q6_K matrices) reads as Q8_0
    blocks of gguf-py's values: each within Q8_0's bound of them (|ŵ − w| ≤ d/2 + 127·2⁻¹¹·d, d = max|w|/127
    per block), which adds 0.53% of the weights' RMS (as gguf_file.py says)."""
    config, params, _ = weights.load(fixture("llama3-q4_k_m"))
    exact = gguf_py_params(fixture("llama3-q4_k_m"), config.head_dim)
    types = {kind for kind, _, _ in gguf_tensors(fixture("llama3-q4_k_m")).values()}
    assert {"Q4_K", "Q6_K"} <= types
    for name, values in exact.items():
        if values.ndim == 1:
            continue
        weight = params[name]
        assert isinstance(weight, Quantized) and weight.kind == "q8_0", name
        assert weight.blocks.tobytes() == reference_blocks(values, "q8_0"), name
        error = weight.dequantized() - values
        blocks = values.reshape(-1, 32)
        bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2 ** -11)
        assert np.all(np.abs(error.reshape(-1, 32)) <= bound), name
        relative_rms = np.sqrt(np.mean(error ** 2) / np.mean(values ** 2))
        assert 0.004 < relative_rms < 0.006, (name, relative_rms)


# ---- the npllama weights file --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_quantizes_the_matrices_and_load_maps_the_same_blocks(tmp_path, stories, kind):
    """save(dtype=kind): every matrix whose rows are a multiple of 32 in gguf-py's blocks of its values,
    down_proj (rows of 172) in fp16 with one notice naming those tensors, norms float32 as they were;
    loading maps the blocks, and saving them again writes the same file."""
    config, params, _ = stories
    path, again = str(tmp_path / "q.safetensors"), str(tmp_path / "again.safetensors")
    with pytest.warns(Notice) as notices:
        weights.save(path, config, params, None, dtype=kind)
    down = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in range(config.num_hidden_layers)]
    assert len(notices) == 1 and all(name in str(notices[0].message) for name in down)
    _, loaded, _ = weights.load(path)
    for name in params:
        values = np.asarray(params[name])
        if values.ndim == 1:
            assert loaded[name].dtype == np.float32 and np.array_equal(loaded[name], values), name
        elif name in down:
            assert loaded[name].dtype == np.float16 and np.array_equal(loaded[name], values.astype(np.float16)), name
        else:
            assert isinstance(loaded[name], Quantized) and loaded[name].kind == kind, name
            assert loaded[name].blocks.tobytes() == reference_blocks(values, kind), name
            assert is_memory_mapped(loaded[name].data), name  # the weights file's layout: used as it is
    weights.save(again, config, loaded, None)
    assert open(again, "rb").read() == open(path, "rb").read()


def test_a_quantized_file_converted_to_floats_is_dequantized(tmp_path, stories):
    config, params, _ = stories
    path, floats = str(tmp_path / "q.safetensors"), str(tmp_path / "fp32.safetensors")
    with pytest.warns(Notice):
        weights.save(path, config, params, None, dtype="q4_1")
    weights.save(floats, config, weights.load(path)[1], None, dtype="fp32")
    _, loaded, _ = weights.load(floats)
    embedding = "model.embed_tokens.weight"
    assert loaded[embedding].dtype == np.float32
    assert np.array_equal(loaded[embedding], reference_values(np.asarray(params[embedding]), "q4_1"))


# ---- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_load_weights_to_blocks_then_generate_and_info(tmp_path, stories, kind):
    """load-weights --dtype KIND writes the blocks; generate from the file continues greedily as the model of
    gguf-py's dequantized values does; info counts the tensors of each type and gives the size on disk."""
    config, params, _ = stories
    out = str(tmp_path / f"{kind}.safetensors")
    result = ok(cli("load-weights", STORIES260K, "--out", out, "--dtype", kind))
    assert "down_proj" in result.stderr and "kept in fp16" in result.stderr
    expected = {name: reference_values(np.asarray(params[name]), kind)
                if np.ndim(params[name]) == 2 and params[name].shape[1] % 32 == 0
                else dtypes.convert(np.asarray(params[name]), np.float16 if np.ndim(params[name]) == 2 else np.float32)
                for name in params}
    continuation = generate({name: dtypes.compute_array(value, np.float32) for name, value in expected.items()},
                            config, PROMPT, 5)
    generated = ok(cli("generate", "-m", out, "--prompt-ids", " ".join(map(str, PROMPT)), "-n", 5, "--temperature", 0))
    assert generated.stdout.split() == [str(t) for t in PROMPT + continuation]
    fields = summary_fields(ok(cli("info", out)).stdout)
    layers = config.num_hidden_layers
    assert fields["dtype"] == (f"{kind} ({6 * layers + 1} tensors), fp32 ({2 * layers + 1} tensors), "
                               f"fp16 ({layers} tensors)")
    assert fields["on"] == f"disk     {os.path.getsize(out) / 1024:.4g} KiB ({out})"


def test_info_of_a_gguf_file_counts_its_types():
    fields = summary_fields(ok(cli("info", fixture("gqa-q4_0"))).stdout)
    assert fields["dtype"] == "q4_0 (15 tensors), fp32 (5 tensors), q8_0 (1 tensor)"


# ---- export --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def q8_file(tmp_path_factory, stories):
    path = str(tmp_path_factory.mktemp("q8") / "q8_0.safetensors")
    with pytest.warns(Notice):
        weights.save(path, *stories, dtype="q8_0")
    return path


@pytest.mark.parametrize("quant_type", ["q8_0", "q4_0", "q4_1", "f16"])
def test_export_gguf_of_blocks(tmp_path, q8_file, quant_type):
    """A Q8_0 model exported: to q8_0 its blocks as they are (in llama.cpp's q/k row order); to another type
    gguf-py's quantization of its dequantized values; read back, the same values."""
    config, params, _ = weights.load(q8_file)
    out = str(tmp_path / "out.gguf")
    ok(cli("export-gguf", q8_file, out, "--type", quant_type))
    written = gguf_tensors(out)
    assert written["blk.0.ffn_down.weight"][0] == "F16"  # rows of 172: no blocks
    qtype = gguf_file.EXPORT_TYPES[quant_type][0]
    _, again, _ = weights.load(out)
    exact = gguf_py_params(out, config.head_dim)
    embedding = params["model.embed_tokens.weight"]
    kind, _, data = written["token_embd.weight"]
    assert kind == qtype and data.tobytes() == (embedding.blocks.tobytes() if quant_type == "q8_0" else
                                                gguf.quants.quantize(embedding.dequantized(), ggml(qtype)).tobytes())
    for name, value in params.items():
        if isinstance(value, Quantized):
            want = value.dequantized() if quant_type == "q8_0" else \
                gguf.quants.dequantize(gguf.quants.quantize(value.dequantized(), ggml(qtype)), ggml(qtype))
            assert np.array_equal(exact[name], want) and np.array_equal(float_values(again[name]), want), name


def test_export_hf_of_blocks_writes_their_values_in_float32(tmp_path, q8_file):
    config, params, _ = weights.load(q8_file)
    out = str(tmp_path / "hf")
    ok(cli("export-hf", q8_file, out))
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "float32"
    _, tensors = safetensors_file.read(os.path.join(out, "model.safetensors"))
    for name, value in params.items():
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], float_values(value)), name


def test_merging_adapters_into_blocks_keeps_the_sum_in_float32(q8_file):
    """Ŵ + s·B A as it is (quantized again, an adapter's small change would round away); the weights
    without adapters stay blocks."""
    config, params, _ = weights.load(q8_file)
    name = "model.layers.0.self_attn.q_proj.weight"
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32) * 1e-3
    adapters = dict(zip(adapter_names(name), (a, b)))
    merged = weights.merge_adapters(params, adapters, 0.5)
    assert merged[name].dtype == np.float32
    assert np.array_equal(merged[name], params[name].dequantized() + (b @ a) * np.float32(0.5))
    other = "model.layers.0.self_attn.k_proj.weight"
    assert merged[other].kind == "q8_0" and merged[other].data.tobytes() == params[other].data.tobytes()


# ---- bad input ----------------------------------------------------------------------------------------------
def rewritten(tmp_path, source, change):
    """source (an npllama weights file) written again with its quantized record changed by change(record)."""
    metadata, tensors = safetensors_file.read(source)
    record = json.loads(metadata[weights.QUANTIZED_KEY])
    metadata[weights.QUANTIZED_KEY] = change(record)
    path = str(tmp_path / "bad.safetensors")
    safetensors_file.write(path, tensors, metadata)
    return path


@pytest.mark.parametrize("change,fragment", [
    (lambda record: json.dumps({**record, "lm_head.weight": record["model.embed_tokens.weight"]}),
     "tensor lm_head.weight is listed as q8_0 blocks"),
    (lambda record: json.dumps({**record, "model.embed_tokens.weight": {"type": "q8_0", "shape": [512, 96]}}),
     "model.embed_tokens.weight: 36,864 bytes are not q8_0 blocks of a 512 × 96 weight (55,296 bytes)"),
    (lambda record: json.dumps({**record, "model.embed_tokens.weight": {"type": "q3_0", "shape": [512, 64]}}),
     "model.embed_tokens.weight: 'q3_0' is not a block type"),
    (lambda record: "{not json", "its record of quantized tensors (npllama.quantized) is damaged"),
    (lambda record: json.dumps({**record, "model.embed_tokens.weight": {"type": "q8_0", "shape": [-512, -64]}}),
     "its record of quantized tensors (npllama.quantized) is damaged"),
    (lambda record: json.dumps({**record, "model.embed_tokens.weight": {"type": "q8_0", "shape": "64"}}),
     "its record of quantized tensors (npllama.quantized) is damaged"),
])
def test_a_damaged_block_tensor_is_refused_naming_it(tmp_path, q8_file, change, fragment):
    path = rewritten(tmp_path, q8_file, change)
    assert_one_clear_line(cli("info", path), fragment)


def test_load_weights_to_blocks_overwrites_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    before = snapshot(tmp_path)
    assert_one_clear_line(cli("load-weights", STORIES260K, "--out", out, "--dtype", "q4_0"), "exists")
    assert snapshot(tmp_path) == before


def test_a_file_with_blocks_says_so_to_older_readers(q8_file):
    """Its format version is 3 (npllama before blocks read 1, npllama 0.3 read 2 (blocks by row), and
    both refuse what is newer, in one line)."""
    metadata, _ = safetensors_file.read(q8_file)
    assert metadata[weights.VERSION_KEY] == weights.BLOCKS_FORMAT_VERSION == "3"


@pytest.mark.parametrize("kind", KINDS)
def test_a_format_2_file_with_blocks_by_row_is_still_read(tmp_path, stories, kind):
    """npllama 0.3 wrote a weight's blocks a row per row: each row's float16 d, (m), then q, field by
    field. Such a file loads to the same blocks (laid out anew)."""
    config, params, _ = stories
    path, old = str(tmp_path / "q.safetensors"), str(tmp_path / "old.safetensors")
    with pytest.warns(Notice):
        weights.save(path, config, params, None, dtype=kind)
    metadata, tensors = safetensors_file.read(path)
    _, current, _ = weights.load(path)
    by_rows = dict(tensors)
    for name, weight in current.items():
        if isinstance(weight, Quantized):
            blocks = weight.blocks
            by_rows[name] = np.concatenate([np.ascontiguousarray(blocks[field]).view(np.uint8).reshape(len(blocks), -1)
                                            for field in blocks.dtype.names], axis=1)
    safetensors_file.write(old, by_rows, {**metadata, weights.VERSION_KEY: "2"})
    _, loaded, _ = weights.load(old)
    for name, weight in current.items():
        if isinstance(weight, Quantized):
            assert loaded[name].kind == kind and loaded[name].blocks.tobytes() == weight.blocks.tobytes(), name
