"""GGUF import and export (npllama/io/gguf_file.py) on the files of tests/fixtures/gguf, which
make_gguf_fixtures.py writes as llama.cpp does: its converter's keys, names and q/k order (checked there
against convert_hf_to_gguf.py itself), and llama.cpp's own quantizer for Q4_0 and Q4_K_M. The references
come from elsewhere: the HF model the files were converted from (its tensors and logits), transformers'
own GGUF loader (its tensors, as hashes, and logits) and llama.cpp (its logits). Torch-free and fast."""
import dataclasses
import hashlib
import json
import os
import struct

import gguf
import numpy as np
import pytest

import npllama
from npllama import backend, dtypes
from npllama.config import LlamaConfig
from npllama.generation import generate
from npllama.io import gguf_file, weights
from npllama.io.tokenizer import CharTokenizer
from npllama.ops import rope
from npllama.runtime.quantized import Quantized
from tests.conftest import ROOT
from tests.test_cli_weights import assert_one_clear_line, cli, ok, snapshot

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "gguf")
EXPECTED = np.load(os.path.join(FIXTURES, "expected.npz"))
PROMPT = [int(t) for t in EXPECTED["prompt"]]
FILES = {"gqa-f32": "gqa", "gqa-f16": "gqa", "gqa-q8_0": "gqa", "gqa-q4_0": "gqa", "llama3-q4_k_m": "llama3"}
# Logits (about ±4 here): npllama's fp32 forward beside the same model in transformers (same float32 weights;
# only the order of float32 sums differs: seen 4e-6) and beside llama.cpp, which multiplies F16 weights by
# activations rounded to F16 (seen 3e-3) and quantized ones by activations quantized to 8 bits (Q8_0, Q8_K),
# which alone moves these logits by 0.07-0.09 (seen 0.08-0.11 from llama.cpp; its KV cache was F32).
# The Q4_K_M file's K-quants are made Q8_0 when read (gguf_file.py), which moves its logits by up to 0.083
# (seen): beside transformers they are held to that, and the file's exact values to TRANSFORMERS_ATOL.
TRANSFORMERS_ATOL = 1e-4
CONVERTED_ATOL = 0.12
LLAMACPP_ATOL = {"gqa-f32": 1e-4, "gqa-f16": 0.01, "gqa-q8_0": 0.25, "gqa-q4_0": 0.25, "llama3-q4_k_m": 0.25}


def fixture(name):
    return os.path.join(FIXTURES, f"{name}.gguf")


def hf_config(model):
    return LlamaConfig.from_dict(json.loads(str(EXPECTED[f"{model}/config_json"])))


def forward(params, config):
    return backend.to_host(npllama.forward(params, config, np.array([PROMPT])))


def logits(path):
    config, params, _ = weights.load(path)
    return forward(params, config)


def values(weight):
    """A weight's float32 values (a Quantized one's dequantized)."""
    return weight.dequantized() if isinstance(weight, Quantized) else dtypes.compute_array(np.asarray(weight), np.float32)


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(values(array)).tobytes()).hexdigest()


def gguf_fields(path):
    """key -> (GGUF value type(s), value) as gguf's own reader gives them."""
    reader = gguf.GGUFReader(path)
    return {key: ([t.name for t in field.types], field.contents()) for key, field in reader.fields.items()
            if not key.startswith("GGUF.")}


def gguf_tensors(path):
    return {t.name: (t.tensor_type.name, t.shape.tolist(), t.data) for t in gguf.GGUFReader(path).tensors}


# ---- the q/k permutation ------------------------------------------------------------------------------------
def test_the_converters_permutation_is_rope_to_pairs():
    """LlamaModel.permute of convert_hf_to_gguf.py (q: n_head heads; k: n_head_kv) is rope.to_pairs, and
    rope.from_pairs undoes it (the tests below show the same against the converter and transformers)."""
    def permute(weights, n_head, n_head_kv):  # convert_hf_to_gguf.py, LlamaModel.permute, in NumPy
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim = 4, 2, 16
    q, k = rng.standard_normal((heads * head_dim, 64)), rng.standard_normal((kv_heads * head_dim, 64))
    assert np.array_equal(permute(q, heads, heads), rope.to_pairs(q, head_dim))
    assert np.array_equal(permute(k, heads, kv_heads), rope.to_pairs(k, head_dim))
    assert np.array_equal(rope.from_pairs(permute(k, heads, kv_heads), head_dim), k)


# ---- import ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_each_file_imports_to_its_hf_config(name):
    config, _, _ = weights.load(fixture(name))
    assert weights.detect(fixture(name)) == "gguf"
    assert config == hf_config(FILES[name])


def gguf_py_params(path, head_dim):
    """A GGUF file's tensors as gguf-py dequantizes them, under HF's names and in HF's q/k row order (the
    model transformers' GGUF loader makes of it: test_tensors_equal_transformers_reading_of_the_file)."""
    params = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name != gguf_file.ROPE_FREQS:
            hf_name = gguf_file._hf_name(path, tensor.name)
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            params[hf_name] = rope.from_pairs(values, head_dim) if hf_name.endswith(
                ("q_proj.weight", "k_proj.weight")) else values
    return params


def test_llama3_rope_scaling_comes_back_from_rope_freqs():
    """The four numbers come back exactly from the converter's divisors, and they matter here: with the
    file's exact values, the logits match the reference (an HF model with llama3 scaling and those
    weights) within TRANSFORMERS_ATOL, and miss it by 100 times that without them."""
    config, _, _ = weights.load(fixture("llama3-q4_k_m"))
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    params = gguf_py_params(fixture("llama3-q4_k_m"), config.head_dim)
    reference = EXPECTED["llama3-q4_k_m/transformers_logits"]
    np.testing.assert_allclose(forward(params, config), reference, rtol=0, atol=TRANSFORMERS_ATOL)
    missed = forward(params, dataclasses.replace(config, rope_scaling=None)) - reference
    assert np.abs(missed).max() > 100 * TRANSFORMERS_ATOL


def test_f32_imports_to_the_hf_tensors_memory_mapped():
    _, params, _ = weights.load(fixture("gqa-f32"))
    names = [key[len("gqa/param/"):] for key in EXPECTED.files if key.startswith("gqa/param/")]
    assert sorted(params) == sorted(names)
    for name in names:
        array = params[name]
        assert array.dtype == np.float32 and np.array_equal(array, EXPECTED[f"gqa/param/{name}"]), name
        if not name.endswith(("q_proj.weight", "k_proj.weight")):  # q/k rows are reordered: a copy
            assert isinstance(array.base, np.memmap) or isinstance(array, np.memmap), name


def test_f32_logits_match_the_hf_model():
    np.testing.assert_allclose(logits(fixture("gqa-f32")), EXPECTED["gqa/logits"], rtol=0, atol=TRANSFORMERS_ATOL)


@pytest.mark.parametrize("name", FILES)
def test_tensors_equal_transformers_reading_of_the_file(name):
    """Each tensor, dequantized and in HF's row order, is bit for bit the tensor transformers' GGUF loader
    makes of the file: F32 and F16 kept as stored (norms are F32 in every file), Q8_0 and Q4_0 as blocks.
    The Q4_K_M file's K-quants are made Q8_0 (tests/test_quantized_io.py): there gguf-py's values are."""
    _, params, _ = weights.load(fixture(name))
    exact = gguf_py_params(fixture(name), hf_config(FILES[name]).head_dim)
    hashes = {key.split("/sha256/")[1]: str(EXPECTED[key]) for key in EXPECTED.files if key.startswith(f"{name}/sha256/")}
    assert sorted(params) == sorted(hashes) == sorted(exact)
    types = {gguf_file._hf_name(fixture(name), key): kind for key, (kind, _, _) in gguf_tensors(fixture(name)).items()
             if key != gguf_file.ROPE_FREQS}
    for param, expected in hashes.items():
        stored, _ = weights.safetensors_file.dtype_and_shape(params, param)
        kind = types[param]
        assert dtypes.name(stored) == {"F32": "fp32", "F16": "fp16", "Q8_0": "q8_0", "Q4_0": "q4_0"}.get(kind, "q8_0")
        assert sha256(exact[param]) == expected, param
        if kind in ("F32", "F16", "Q8_0", "Q4_0"):
            assert sha256(params[param]) == expected, param


@pytest.mark.parametrize("name", FILES)
def test_logits_match_transformers_and_llama_cpp(name):
    got = logits(fixture(name))
    atol = CONVERTED_ATOL if name == "llama3-q4_k_m" else TRANSFORMERS_ATOL
    np.testing.assert_allclose(got, EXPECTED[f"{name}/transformers_logits"], rtol=0, atol=atol)
    np.testing.assert_allclose(got, EXPECTED[f"{name}/llamacpp_logits"], rtol=0, atol=LLAMACPP_ATOL[name])


def test_the_k_quant_file_holds_llama_cpps_mix():
    types = {kind for kind, _, _ in gguf_tensors(fixture("llama3-q4_k_m")).values()}
    assert {"Q4_K", "Q6_K", "F32"} <= types


def test_the_tokenizer_comes_from_the_metadata():
    _, _, tokenizer = weights.load(fixture("gqa-q8_0"))
    assert tokenizer.vocab_size == 384
    assert tokenizer.encode("ROMEO: what say you", bos=True) == PROMPT


def test_generate_runs_a_gguf_file_directly(xp):
    result = ok(cli("generate", "--weights", fixture("gqa-f32"), "--prompt-ids", " ".join(map(str, PROMPT)),
                    "-n", 8, "--device", os.environ.get("NPLLAMA_DEVICE", "cpu"), "--temperature", 0))
    config = hf_config("gqa")
    params = {key[len("gqa/param/"):]: EXPECTED[key] for key in EXPECTED.files if key.startswith("gqa/param/")}
    assert result.stdout.split() == [str(t) for t in PROMPT + generate(params, config, PROMPT, 8)]


def test_load_weights_keeps_the_blocks(tmp_path):
    out = str(tmp_path / "q4.safetensors")
    ok(cli("load-weights", fixture("gqa-q4_0"), "--out", out))
    config, params, _ = weights.load(fixture("gqa-q4_0"))
    again_config, again, _ = weights.load(out)
    assert again_config == config
    for name in params:
        if isinstance(params[name], Quantized):  # Q4_0, and the file's Q8_0 output
            assert again[name].kind == params[name].kind and again[name].blocks.tobytes() == params[name].blocks.tobytes()
        else:
            assert np.array_equal(again[name], params[name]), name


# ---- export ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa():
    return weights.load(fixture("gqa-f32"))


@pytest.mark.parametrize("quant_type", ["f32", "f16", "q8_0"])
def test_export_writes_what_llama_cpps_converter_writes(tmp_path, gqa, quant_type):
    """From the same tensors, export and convert_hf_to_gguf.py (the fixtures) write the same llama.* keys,
    file type and tensors, byte for byte."""
    config, params, _ = gqa
    out = str(tmp_path / "out.gguf")
    weights.export_gguf(out, config, params, None, quant_type)
    ours, theirs = gguf_fields(out), gguf_fields(fixture(f"gqa-{quant_type}"))
    model_keys = [key for key in theirs if key.startswith(("llama.", "general.architecture", "general.file_type",
                                                           "general.quantization_version"))]
    assert {key: ours.get(key) for key in model_keys} == {key: theirs[key] for key in model_keys}
    ours, theirs = gguf_tensors(out), gguf_tensors(fixture(f"gqa-{quant_type}"))
    assert sorted(ours) == sorted(theirs)
    for name, (kind, shape, data) in theirs.items():
        assert ours[name][:2] == (kind, shape), name
        assert ours[name][2].tobytes() == data.tobytes(), name


def test_export_round_trips(tmp_path, gqa):
    """f32 exactly; f16 and bf16 the values rounded once to 16 bits; q8_0 within Q8_0's bound: a block of 32
    is stored as q·d with d = max|w|/127 rounded to fp16 and q = round(w/d), so |w − q·d| ≤ d/2 plus 127
    times d's fp16 rounding (2⁻¹¹·d), under 0.57·max|w|/127. Norms stay F32 in every type."""
    config, params, _ = gqa
    for quant_type in ("f32", "f16", "bf16", "q8_0"):
        out = str(tmp_path / f"{quant_type}.gguf")
        weights.export_gguf(out, config, params, None, quant_type)
        again_config, again, _ = weights.load(out)
        assert again_config == config, quant_type
        assert sorted(again) == sorted(params)
        for name in params:
            want, got = np.asarray(params[name]), again[name]
            if want.ndim == 1 or quant_type == "f32":
                assert got.dtype == np.float32 and np.array_equal(got, want), (quant_type, name)
            elif quant_type in ("f16", "bf16"):
                stored = {"f16": "fp16", "bf16": "bf16"}[quant_type]
                assert got.dtype == dtypes.resolve(stored) and got.tobytes() == dtypes.convert(want, stored).tobytes()
            else:
                blocks_want, blocks_got = want.reshape(-1, 32), values(got).reshape(-1, 32)
                bound = 0.57 * np.abs(blocks_want).max(axis=1, keepdims=True) / 127
                assert got.kind == "q8_0" and np.all(np.abs(blocks_got - blocks_want) <= bound), name


def test_gguf_reader_reads_what_export_writes(tmp_path, gqa):
    config, params, _ = gqa
    out = str(tmp_path / "model.gguf")
    weights.export_gguf(out, config, params, None, "q8_0")
    fields = gguf_fields(out)
    assert fields["general.architecture"] == (["STRING"], "llama")
    assert fields["general.name"] == (["STRING"], "model")
    assert fields["general.file_type"] == (["UINT32"], gguf.LlamaFileType.MOSTLY_Q8_0)
    expected_ints = {"context_length": 128, "embedding_length": 64, "block_count": 2, "feed_forward_length": 128,
                     "attention.head_count": 4, "attention.head_count_kv": 2, "vocab_size": 384,
                     "rope.dimension_count": 16}
    for key, value in expected_ints.items():
        assert fields[f"llama.{key}"] == (["UINT32"], value), key
    assert fields["llama.rope.freq_base"] == (["FLOAT32"], 10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"][0] == ["FLOAT32"]
    assert np.float32(fields["llama.attention.layer_norm_rms_epsilon"][1]) == np.float32(1e-5)
    assert not any(key.startswith("tokenizer.") for key in fields)
    tensors = gguf_tensors(out)
    assert tensors["token_embd.weight"][:2] == ("Q8_0", [64, 384])  # ggml's ne: fastest-varying first
    assert tensors["blk.1.attn_k.weight"][:2] == ("Q8_0", [64, 32])
    assert tensors["blk.0.ffn_down.weight"][:2] == ("Q8_0", [128, 64])
    assert tensors["blk.0.attn_norm.weight"][:2] == ("F32", [64])
    assert tensors["output.weight"][:2] == ("Q8_0", [64, 384])
    assert "rope_freqs.weight" not in tensors


def test_llama3_scaling_exports_as_the_converters_rope_freqs(tmp_path):
    config, params, _ = weights.load(fixture("llama3-q4_k_m"))
    out = str(tmp_path / "llama3.gguf")
    weights.export_gguf(out, config, params, None, "f32")
    freqs = gguf_tensors(out)["rope_freqs.weight"]
    assert freqs[:2] == ("F32", [32])
    np.testing.assert_allclose(freqs[2], EXPECTED["llama3/rope_freqs"], rtol=1e-6)  # npllama's float64 vs torch's float32
    np.testing.assert_allclose(freqs[2], gguf_tensors(fixture("llama3-q4_k_m"))["rope_freqs.weight"][2], rtol=1e-6)
    assert weights.load(out)[0] == config
    assert "output.weight" not in gguf_tensors(out)  # tied


def test_linear_rope_scaling_round_trips(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})
    out = str(tmp_path / "linear.gguf")
    weights.export_gguf(out, config, npllama.init_params(config), None, "f32")
    fields = gguf_fields(out)
    assert fields["llama.rope.scaling.type"] == (["STRING"], "linear")
    assert fields["llama.rope.scaling.factor"] == (["FLOAT32"], 4.0)
    assert weights.load(out)[0].rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_rows_the_blocks_do_not_divide_fall_back_to_f16(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    out = str(tmp_path / "odd.gguf")
    weights.export_gguf(out, config, npllama.init_params(config), None, "q8_0")
    kinds = {name: kind for name, (kind, _, _) in gguf_tensors(out).items()}
    assert kinds["blk.0.ffn_down.weight"] == "F16"  # rows of 48
    assert kinds["blk.0.ffn_up.weight"] == kinds["blk.0.attn_q.weight"] == "Q8_0"


def test_export_writes_the_converters_vocabulary(tmp_path):
    """The vocabulary keys convert_hf_to_gguf.py wrote for the fixture come back the same (tokenizer_gguf
    may add keys llama.cpp reads, such as add_bos_token); the exported tokenizer encodes as the original."""
    config, params, tokenizer = weights.load(fixture("gqa-f32"))
    out = str(tmp_path / "tok.gguf")
    weights.export_gguf(out, config, params, tokenizer, "f32")
    ours, theirs = gguf_fields(out), gguf_fields(fixture("gqa-f32"))
    for key in ("model", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert weights.load(out)[2].encode("ROMEO: what say you", bos=True) == PROMPT


def test_export_gguf_command(tmp_path):
    out = tmp_path / "sub" / "model.gguf"
    result = ok(cli("export-gguf", fixture("gqa-f32"), out))
    assert (result.stdout, result.stderr) == (f"wrote {out} (f16)\n", "")
    assert {kind for name, (kind, _, _) in gguf_tensors(str(out)).items() if not name.endswith("norm.weight")} == {"F16"}
    assert_one_clear_line(cli("export-gguf", fixture("gqa-f32"), out), "exists; pass --force")
    ok(cli("export-gguf", fixture("gqa-f32"), out, "--type", "q8_0", "--force"))
    assert gguf_tensors(str(out))["output.weight"][0] == "Q8_0"


def test_export_gguf_says_when_llama_cpp_will_lack_a_tokenizer(tmp_path, gqa):
    config, params, _ = gqa
    weights.export_gguf(str(tmp_path / "bare.gguf"), config, params, None, "f32")
    result = ok(cli("export-gguf", tmp_path / "bare.gguf", tmp_path / "again.gguf"))
    assert result.stderr == (f"note: {tmp_path / 'bare.gguf'} has no tokenizer, so neither has "
                             f"{tmp_path / 'again.gguf'}; llama.cpp needs one to load it\n")


def test_export_gguf_refuses_a_character_vocabulary(tmp_path):
    """tokenizer_gguf.fields refuses it before anything is written."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4)
    weights.save(str(tmp_path / "char.safetensors"), config, npllama.init_params(config),
                 CharTokenizer([chr(32 + i) for i in range(64)]))
    before = snapshot(tmp_path)
    assert_one_clear_line(cli("export-gguf", tmp_path / "char.safetensors", tmp_path / "char.gguf"), "GGUF")
    assert snapshot(tmp_path) == before


def test_an_interrupted_export_leaves_no_file(tmp_path, gqa):
    config, params, _ = gqa

    class Failing(dict):
        def __getitem__(self, name):
            if name == "model.norm.weight":
                raise KeyboardInterrupt
            return super().__getitem__(name)
    (tmp_path / "old.gguf").write_bytes(b"the old file")
    with pytest.raises(KeyboardInterrupt):
        weights.export_gguf(str(tmp_path / "old.gguf"), config, Failing(params), None, "f16")
    assert snapshot(tmp_path) == {"old.gguf": b"the old file"}


# ---- bad input: one clear line, non-zero exit, nothing written ------------------------------------------
def load_weights_fails(tmp_path, source, fragment):
    before = snapshot(tmp_path)
    assert_one_clear_line(cli("load-weights", source, "--out", tmp_path / "out.safetensors"), fragment)
    assert snapshot(tmp_path) == before


def rewrite(path, architecture="llama", keys=(), tensors=()):
    """gqa-q4_0 copied through gguf's writer with some keys (key -> an int, str or list of ints; None drops
    it) and tensors (name -> (array, ggml type); None drops it) replaced or added."""
    reader, types = gguf.GGUFReader(fixture("gqa-q4_0")), gguf.GGUFValueType
    entries = {key: (field.contents(), field.types[0])  # gguf-py types an array's elements by their Python type
               for key, field in reader.fields.items() if key.startswith(("llama.", "tokenizer."))}
    for key, value in dict(keys).items():
        kind = types.ARRAY if isinstance(value, list) else types.STRING if isinstance(value, str) else types.UINT32
        entries[key] = None if value is None else (value, kind)
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, entry in entries.items():
        if entry is not None:
            writer.add_key_value(key.replace("llama.", f"{architecture}.", 1), *entry)
    for name, entry in {**{t.name: (t.data, t.tensor_type) for t in reader.tensors}, **dict(tensors)}.items():
        if entry is not None:
            writer.add_tensor(name, entry[0], raw_dtype=entry[1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_rewritten_fixture_loads_and_per_layer_values_may_repeat(tmp_path):
    """rewrite itself changes nothing; llama.cpp's per-layer arrays are read when all layers agree."""
    path = rewrite(tmp_path / "same.gguf", keys={"llama.attention.head_count_kv": [2, 2]})
    assert weights.load(str(path))[0] == weights.load(fixture("gqa-q4_0"))[0]


def test_another_architecture(tmp_path):
    load_weights_fails(tmp_path, rewrite(tmp_path / "qwen.gguf", architecture="qwen2"),
                       "qwen.gguf: architecture 'qwen2' is not supported (npllama runs 'llama')")


def test_an_unsupported_tensor_type(tmp_path):
    q4_0 = gguf_tensors(fixture("gqa-q4_0"))["blk.0.attn_q.weight"][2]  # IQ4_NL blocks are as long as Q4_0's
    bad = rewrite(tmp_path / "iq.gguf", tensors={"blk.0.attn_q.weight": (q4_0, gguf.GGMLQuantizationType.IQ4_NL)})
    load_weights_fails(tmp_path, bad, "iq.gguf: tensor blk.0.attn_q.weight has type IQ4_NL, which npllama cannot read")


def test_a_tensor_npllama_does_not_run(tmp_path):
    bias = (np.zeros(64, np.float32), gguf.GGMLQuantizationType.F32)
    load_weights_fails(tmp_path, rewrite(tmp_path / "bias.gguf", tensors={"blk.0.attn_q.bias": bias}),
                       "bias.gguf: tensor blk.0.attn_q.bias is not part of the Llama npllama runs")


@pytest.mark.parametrize("keys, fragment", [
    ({"llama.block_count": None}, "missing metadata llama.block_count"),
    ({"llama.attention.key_length": 32}, "llama.attention.key_length is 32, not embedding_length / head_count = 16"),
    ({"llama.attention.head_count_kv": [2, 1]}, "llama.attention.head_count_kv differs between layers ([2, 1])"),
    ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported"),
    ({"tokenizer.ggml.model": "bert"}, "'bert'"),
])
def test_metadata_npllama_cannot_run(tmp_path, keys, fragment):
    path = rewrite(tmp_path / "m.gguf", keys=keys)
    load_weights_fails(tmp_path, path, fragment)
    assert_one_clear_line(cli("info", path), f"Error: {path}: ")


def test_rope_freqs_off_llama3s_rule(tmp_path):
    divisors = (np.array([1, 1, 3, 2, 8, 8, 8, 8], np.float32), gguf.GGMLQuantizationType.F32)
    load_weights_fails(tmp_path, rewrite(tmp_path / "r.gguf", tensors={"rope_freqs.weight": divisors}),
                       "r.gguf: rope_freqs does not follow llama3's RoPE scaling")


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_file(tmp_path, keep):
    data = open(fixture("gqa-q8_0"), "rb").read()
    (tmp_path / "cut.gguf").write_bytes(data[:int(len(data) * keep)])
    load_weights_fails(tmp_path, tmp_path / "cut.gguf", "cut.gguf: not a readable GGUF file, truncated or corrupt")


# ---- the header reader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FILES)
def test_the_reader_reads_each_file_as_ggufs_own_reader(name):
    """gguf_file parses the header itself (gguf-py's GGUFReader is slow on big vocabularies): every key,
    value, tensor type, shape and byte must be what GGUFReader reads."""
    metadata, tensors = gguf_file.read_file(fixture(name))
    reference = gguf_fields(fixture(name))
    assert metadata == {key: value for key, (_, value) in reference.items()}
    assert {key: type(value) for key, value in metadata.items()} == \
        {key: type(value) for key, (_, value) in reference.items()}
    theirs = gguf_tensors(fixture(name))
    assert list(tensors) == list(theirs)
    for tensor_name, (kind, dims, data) in theirs.items():
        ours = tensors[tensor_name]
        assert (ours.type.name, ours.shape) == (kind, tuple(reversed(dims)))
        assert ours.data.tobytes() == data.tobytes()


def test_a_corrupt_array_length_fails_at_once(tmp_path):
    """A count no file could hold (a flipped bit) is refused, not looped over."""
    data = bytearray(open(fixture("gqa-q8_0"), "rb").read())
    key = b"tokenizer.ggml.tokens"
    count_at = data.index(key) + len(key) + 8  # after the key: value type ARRAY, element type STRING, count
    data[count_at:count_at + 8] = (2 ** 60).to_bytes(8, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    load_weights_fails(tmp_path, tmp_path / "bad.gguf", "bad.gguf: not a readable GGUF file, truncated or corrupt")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(16))
    with pytest.raises(weights.WeightsError, match="GGUF version 7; npllama reads versions 2 and 3"):
        gguf_file.read_file(str(tmp_path / "x.gguf"))


@pytest.mark.parametrize("alignment", [0, 3])
def test_an_alignment_that_is_not_a_power_of_two(tmp_path, alignment):
    key = b"general.alignment"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, alignment)
    (tmp_path / "a.gguf").write_bytes(header)
    with pytest.raises(weights.WeightsError, match=f"general.alignment is {alignment}, not a power of two"):
        gguf_file.read_file(str(tmp_path / "a.gguf"))


@pytest.mark.parametrize("name", ["gqa-f32", "llama3-q4_k_m"])
def test_export_of_an_imported_gguf_keeps_its_tokenizer_and_chat_template(tmp_path, name):
    config, params, tokenizer = weights.load(fixture(name))
    tokenizer.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    weights.export_gguf(str(tmp_path / "once.gguf"), config, params, tokenizer, "f16")
    _, again_params, again = weights.load(str(tmp_path / "once.gguf"))
    weights.export_gguf(str(tmp_path / "twice.gguf"), config, again_params, again, "f16")
    first, second = gguf_file.read_file(fixture(name))[0], gguf_file.read_file(str(tmp_path / "twice.gguf"))[0]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert second[key] == first[key], key
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.merges"):
        assert second.get(key) == first.get(key), key
    assert second["tokenizer.chat_template"] == tokenizer.chat_template
    text = "Hello <s> world, 1234 🦙"
    assert again.encode(text, bos=again.add_bos) == tokenizer.encode(text, bos=tokenizer.add_bos)


def resident_file_bytes():
    """This process's resident pages of mapped files (Linux's /proc/self/status RssFile)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from Linux's /proc")
def test_blocks_copied_out_of_a_mapped_file_give_its_pages_back(tmp_path):
    """A GGUF tensor kept as blocks is copied into npllama's layout; its pages of the mapped file then
    leave the process's resident memory (a 7B Q8_0 file peaked at twice its size without it)."""
    path = tmp_path / "bytes"
    path.write_bytes(np.random.default_rng(0).integers(0, 255, 16 << 20, dtype=np.uint8).tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensor = mapped[12345:12345 + (12 << 20)]  # not page-aligned, as GGUF's 32-byte alignment leaves it
    int(tensor.sum())
    touched = resident_file_bytes()
    gguf_file._release(tensor)
    assert touched - resident_file_bytes() >= (12 << 20) - 2 * 4096 - (1 << 20)  # all but the edge pages (and noise)
    assert int(tensor[:4096].sum()) == int(np.fromfile(path, np.uint8, 4096, offset=12345).sum())  # read again
