"""The weights file and the importers: one random model in every layout (tests/fixtures/import, made by
make_import_fixtures.py with torch and transformers) must import to HF's exact tensors and logits."""
import json
import os
import shutil
import struct
import zipfile

import numpy as np
import pytest

from npllama import dtypes, forward
from npllama.config import LM_HEAD, parameter_shapes
from npllama.io import meta, safetensors_file, weights
from npllama.io.tokenizer import CharTokenizer, SentencePieceTokenizer
from npllama.runtime.quantized import Quantized
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "import")
STORIES260K = os.path.join(ROOT, "..", "shared", "data", "stories260K.bin")
EXPECTED = np.load(os.path.join(FIXTURES, "expected.npz"))

# source -> prefix of its expected HF-named tensors in expected.npz, and of its logits
SOURCES = {"hf": "", "meta": "", "stories.bin": "", "stories_v1.bin": "", "stories_tied.bin": "tied/",
           "stories_v2.bin": "v2/", "hf_bf16": "bf16/"}


def expected_params(prefix):
    params = {name[len(prefix) + len("param/"):]: EXPECTED[name] for name in EXPECTED.files
              if name.startswith(prefix + "param/") and (prefix or "/" not in name[len("param/"):])}
    if prefix == "bf16/":
        params = {name: value.view(dtypes.BFLOAT16) for name, value in params.items()}
    return params


def as_arrays(params, dtype=None):
    """Every tensor as an array of dtype (quantized blocks widened)."""
    return {name: dtypes.compute_array(params[name].dequantized() if isinstance(params[name], Quantized)
                                       else np.asarray(params[name]), dtype) for name in params}


@pytest.mark.parametrize("source", SOURCES)
def test_every_layout_imports_the_same_tensors_and_logits(source):
    prefix = SOURCES[source]
    config, params, tokenizer = weights.load(os.path.join(FIXTURES, source))
    expected = expected_params(prefix)
    assert sorted(params) == sorted(expected)
    for name, value in expected.items():
        if isinstance(params[name], Quantized):  # llama2.c v2: its int8 values as q8_0, the scales as float16
            widened = params[name].dequantized()  # q · fp16(s) against the file's q · s: off by fp16's rounding
            assert np.all(np.abs(widened - value) <= np.abs(value) * 2.0 ** -11), name
            continue
        assert params[name].dtype == value.dtype, name
        np.testing.assert_array_equal(np.asarray(params[name]).view(np.uint8), value.view(np.uint8), err_msg=name)
    logits = forward(as_arrays(params, np.float64), config, EXPECTED["prompt"][None])
    reference = EXPECTED[prefix + "logits"].astype(np.float64)
    # v2's weights are each within 2⁻¹¹ of the file's (float16 scales): through 2 layers, a few times that
    tolerance = 4 * 2.0 ** -11 if source == "stories_v2.bin" else 1e-4
    assert np.abs(logits - reference).max() < tolerance * np.abs(reference).max()
    assert (tokenizer is None) == source.endswith(".bin")
    assert config.tie_word_embeddings == (source == "stories_tied.bin")


def test_meta_config_is_read_off_params_json_and_the_tensors():
    config, _, tokenizer = weights.load(os.path.join(FIXTURES, "meta"))
    hf = json.load(open(os.path.join(FIXTURES, "hf", "config.json")))
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps"):
        assert getattr(config, field) == hf[field], field
    assert config.max_position_embeddings == meta.DEFAULT_CONTEXT  # params.json does not say
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.vocab_size == config.vocab_size


def test_hf_directories_are_memory_mapped():
    _, params, _ = weights.load(os.path.join(FIXTURES, "hf"))
    array = params["model.embed_tokens.weight"]
    while not isinstance(array, np.memmap):
        array = array.base
        assert array is not None


# ---- the npllama weights file ---------------------------------------------------------------------------
@pytest.fixture
def hf_model():
    return weights.load(os.path.join(FIXTURES, "hf"))


@pytest.mark.parametrize("dtype", [None, "fp32", "fp16", "bf16"])
def test_save_then_load_round_trips(tmp_path, hf_model, dtype):
    config, params, tokenizer = hf_model
    path = tmp_path / "model.safetensors"
    weights.save(path, config, params, tokenizer, dtype=dtype)
    loaded_config, loaded, loaded_tokenizer = weights.load(str(path))
    assert loaded_config == config and loaded_config.to_dict() == config.to_dict()
    assert loaded_tokenizer.encode("Zounds, what say", bos=True) == tokenizer.encode("Zounds, what say", bos=True)
    for name in params:
        want = dtypes.convert(np.asarray(params[name]), dtype or np.float32)
        assert loaded[name].dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(loaded[name]).view(np.uint8), want.view(np.uint8))


def test_bf16_is_narrowed_by_rounding_and_widened_exactly(tmp_path, hf_model):
    config, params, tokenizer = hf_model
    weights.save(tmp_path / "bf16.safetensors", config, params, tokenizer, dtype="bf16")
    _, loaded, _ = weights.load(str(tmp_path / "bf16.safetensors"))
    for name in params:
        exact, rounded = np.asarray(params[name]), dtypes.widen_bfloat16(np.asarray(loaded[name]))
        assert np.all(np.abs(rounded - exact) <= np.abs(exact) * 2.0 ** -8), name  # half an ulp of 7 bits


def test_the_reference_safetensors_reader_reads_our_files(tmp_path, hf_model):
    from safetensors.numpy import load_file
    config, params, tokenizer = hf_model
    weights.save(tmp_path / "m.safetensors", config, params, tokenizer, dtype="fp16")
    theirs = load_file(str(tmp_path / "m.safetensors"))
    assert sorted(theirs) == sorted(parameter_shapes(config))
    for name, value in theirs.items():
        np.testing.assert_array_equal(value, np.asarray(params[name]).astype(np.float16))


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, hf_model):
    config, params, tokenizer = hf_model
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the user's old file")

    class Failing(weights.LazyTensors):
        def __getitem__(self, name):
            raise RuntimeError("disk full")
    failing = Failing()
    for name in params:
        failing.add(name, params[name].dtype, params[name].shape, None)
    with pytest.raises(RuntimeError, match="disk full"):
        weights.save(path, config, failing, tokenizer)
    assert path.read_bytes() == b"the user's old file"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_character_tokenizer_is_embedded(tmp_path):
    from npllama import LlamaConfig, init_params
    text = "to be or not to be\n"
    tokenizer = CharTokenizer.from_text(text)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2)
    weights.save(tmp_path / "c.safetensors", config, init_params(config), tokenizer)
    _, _, loaded = weights.load(str(tmp_path / "c.safetensors"))
    assert loaded.decode(loaded.encode(text)) == text and loaded.vocab_size == tokenizer.vocab_size


def test_export_hf_then_import_round_trips_exactly(tmp_path, hf_model):
    config, params, tokenizer = hf_model
    weights.export_hf(str(tmp_path / "hf"), config, params, tokenizer)
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["model_type"] == "llama"
    again, again_params, again_tokenizer = weights.load(str(tmp_path / "hf"))
    assert again == config
    assert again_tokenizer.model_bytes == tokenizer.model_bytes
    for name in params:
        np.testing.assert_array_equal(again_params[name], params[name])


def test_tied_export_has_no_head_tensor(tmp_path):
    config, params, _ = weights.load(os.path.join(FIXTURES, "stories_tied.bin"))
    weights.export_hf(str(tmp_path / "hf"), config, params)
    _, tensors = safetensors_file.read(str(tmp_path / "hf" / "model.safetensors"))
    assert LM_HEAD not in tensors and json.load(open(tmp_path / "hf" / "config.json"))["tie_word_embeddings"]


# ---- the real pretrained llama2.c model ---------------------------------------------------------------
def v2_tensor_sizes(config):
    """The values of each int8 tensor of a llama2.c v2 file, in the file's order (export.py's)."""
    d, f, layers, kv = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                        config.num_key_value_heads * config.head_dim)
    per_layer = [d * d, kv * d, kv * d, d * d, f * d, d * f, f * d]  # wq wk wv wo w1 w2 w3
    return [config.vocab_size * d] + [size for size in per_layer for _ in range(layers)] + \
        ([] if config.tie_word_embeddings else [config.vocab_size * d])


def test_llama2c_v2_groups_smaller_than_a_block_are_dequantized_and_said(tmp_path):
    """stories_v2.bin rewritten with groups of 16 (each group of 32 split in two, its scale repeated:
    the same values): 16 values cannot share a q8_0 block's scale, so the matrices are float32, exactly
    the file's q · scale, with one warning."""
    source = os.path.join(FIXTURES, "stories_v2.bin")
    config = weights.load(source)[0]
    data = open(source, "rb").read()
    norms = 4 * (2 * config.num_hidden_layers + 1) * config.hidden_size
    header = bytearray(data[:256])
    header[37:41] = struct.pack("<i", 16)
    parts, offset = [bytes(header), data[256:256 + norms]], 256 + norms
    for size in v2_tensor_sizes(config):
        scales = np.frombuffer(data, "<f4", size // 32, offset + size)
        parts += [data[offset:offset + size], np.repeat(scales, 2).tobytes()]
        offset += size + 4 * (size // 32)
    assert offset == len(data)
    path = tmp_path / "groups_of_16.bin"
    path.write_bytes(b"".join(parts))
    with pytest.warns(UserWarning, match="group size 16 is not a multiple of 32: its int8 matrices are dequantized"):
        _, params, _ = weights.load(str(path))
    for name, value in expected_params("v2/").items():
        np.testing.assert_array_equal(np.asarray(params[name]), value, err_msg=name)


def test_stories260k_loads():
    config, params, tokenizer = weights.load(STORIES260K)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (64, 172, 5, 8, 4, 512, 512)
    assert config.tie_word_embeddings and tokenizer is None
    assert sum(np.asarray(params[name]).size for name in params) == config.num_parameters()


# ---- bad input: one clear line naming the problem -------------------------------------------------------
def expect_error(path, pattern, **kwargs):
    with pytest.raises(weights.WeightsError, match=pattern) as caught:
        weights.load(str(path), **kwargs)
    assert "\n" not in str(caught.value)


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nothing.safetensors", "no such file")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are my notes, not weights\n" * 10)
    expect_error(tmp_path / "notes.safetensors", "not a safetensors file")


def test_cut_short_file(tmp_path, hf_model):
    weights.save(tmp_path / "m.safetensors", *hf_model)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    expect_error(tmp_path / "cut.safetensors", f"cut.safetensors is a safetensors file cut short: its header and tensors "
                                               f"need {len(data):,} bytes, the file has {len(data) // 2:,}")


def test_shape_not_matching_the_config(tmp_path, hf_model):
    config, params, tokenizer = hf_model
    shutil.copytree(os.path.join(FIXTURES, "hf"), tmp_path / "hf")
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    hf_config["intermediate_size"] = 96
    json.dump(hf_config, open(tmp_path / "hf" / "config.json", "w"))
    expect_error(tmp_path / "hf", r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(64, 32\), "
                                  r"the config says \(96, 32\)")


def test_missing_tensor(tmp_path, hf_model):
    config, params, tokenizer = hf_model
    kept = {name: np.asarray(params[name]) for name in params if name != "model.norm.weight"}
    safetensors_file.write(tmp_path / "m.safetensors", kept,
                           {weights.CONFIG_KEY: json.dumps(config.to_dict())})
    expect_error(tmp_path / "m.safetensors", r"missing tensor model\.norm\.weight")


def test_tokenizer_size_not_matching_the_vocabulary(tmp_path):
    other = os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model")
    expect_error(os.path.join(FIXTURES, "hf"), "the tokenizer has 32000 tokens but the model's vocab_size is 384",
                 tokenizer_path=other)


def test_unrecognised_layout(tmp_path):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "weights.npy").write_bytes(b"")
    expect_error(tmp_path / "somedir", "unrecognised checkpoint layout")


def test_pickle_naming_a_forbidden_global(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "meta"), tmp_path / "meta")
    sentinel = tmp_path / "pwned"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(f"touch {sentinel}")) +
               f"touch {sentinel}".encode() + b"\x85R.")
    with zipfile.ZipFile(tmp_path / "meta" / "consolidated.00.pth", "w") as archive:
        archive.writestr("consolidated.00/data.pkl", payload)
    expect_error(tmp_path / "meta", r"refusing to load: the pickle names the global (os|posix)\.system")
    assert not sentinel.exists()


def test_cut_short_llama2c_file(tmp_path):
    data = open(os.path.join(FIXTURES, "stories_v1.bin"), "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    expect_error(tmp_path / "cut.bin", f"cut.bin is a llama2.c checkpoint cut short: .* needs {len(data):,} bytes, "
                                       f"the file has {len(data) - 100:,}")


def test_safetensors_without_npllama_config_points_to_the_directory(tmp_path):
    shard = os.path.join(FIXTURES, "hf", "model-00001-of-00002.safetensors")
    expect_error(shard, "without an npllama config")


@pytest.mark.parametrize("stored", ["bf16", "fp16"])
def test_the_public_api_computes_with_loaded_half_precision_params(stored, tmp_path):
    """forward, loss and loss_and_grads take what load returns: bf16 and fp16 tensors are widened where
    they are computed, so logits, loss and gradients are float32 and equal those of float32 copies."""
    from npllama import loss, loss_and_grads, model
    config, params, tokenizer = weights.load(os.path.join(FIXTURES, "hf"))
    weights.save(tmp_path / "half.safetensors", config, params, tokenizer, dtype=stored)
    config, half, _ = weights.load(str(tmp_path / "half.safetensors"))
    assert {dtypes.name(np.asarray(value).dtype) for value in half.values()} == {stored}
    widened = model.trainable(half)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 7))
    logits = forward(half, config, tokens)
    assert logits.dtype == np.float32 and np.array_equal(logits, forward(widened, config, tokens))
    assert loss(half, config, tokens, tokens) == loss(widened, config, tokens, tokens)
    value, grads = loss_and_grads(half, config, tokens, tokens)
    expected_value, expected = loss_and_grads(widened, config, tokens, tokens)
    assert value == expected_value and sorted(grads) == sorted(expected)
    for name, grad in grads.items():
        assert grad.dtype == np.float32 and np.array_equal(grad, expected[name]), name


def test_asking_whether_a_lazy_tensor_is_there_does_not_make_it():
    made = []
    tensors = weights.LazyTensors()
    tensors.add("w", "fp32", (2,), lambda: made.append(1) or np.zeros(2, np.float32))
    assert "w" in tensors and "v" not in tensors and made == []
    tensors["w"]
    assert made == [1]
