"""CLI tests for load-weights, info, export-hf and generate, on the tiny random model of
tests/fixtures/import (HF, Meta and llama2.c forms, with HF's greedy continuation in expected.npz) and
on llama2.c's pretrained stories260K.bin (no tokenizer, context 512). Torch-free and fast."""
import csv
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from npllama.cli import main
from npllama import LlamaConfig, backend, dtypes
from npllama.io import run_files, safetensors_file, weights
from npllama.generation import generate
from npllama.io.tokenizer import SentencePieceTokenizer
from npllama.runtime.quantized import Quantized
from tests.conftest import ROOT

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "import")
STORIES260K = os.path.join(ROOT, "..", "shared", "data", "stories260K.bin")
TOKENIZER = os.path.join(FIXTURES, "tokenizer.model")
EXPECTED = np.load(os.path.join(FIXTURES, "expected.npz"))
PROMPT_IDS = [int(t) for t in EXPECTED["prompt"]]
HF_GREEDY = [int(t) for t in EXPECTED["generated"]]  # transformers' greedy 20 tokens after PROMPT_IDS
PROMPT_TEXT = str(EXPECTED["prompt_text"])
DEVICE = os.environ.get("NPLLAMA_DEVICE", "cpu")

# The fixture model: 2 layers, hidden 32, 4 query heads, 2 key/value heads, vocabulary 384.
UNTIED_PARAMETERS, TIED_PARAMETERS = 43_168, 43_168 - 384 * 32
SOURCES = {  # fixture -> (parameter count, stored dtype, has a tokenizer)
    "hf": (UNTIED_PARAMETERS, "fp32", True),
    "hf_bf16": (UNTIED_PARAMETERS, "bf16", True),
    "meta": (UNTIED_PARAMETERS, "fp32", True),
    "stories.bin": (UNTIED_PARAMETERS, "fp32", False),
    "stories_v1.bin": (UNTIED_PARAMETERS, "fp32", False),
    "stories_v2.bin": (UNTIED_PARAMETERS, "q8_0 (16 tensors), fp32 (5 tensors)", False),  # int8 kept as blocks
    "stories_tied.bin": (TIED_PARAMETERS, "fp32", False),
}
SUMMARY = re.compile(r"^prompt (\d+) tokens, (\d+) new \((length|eos|context)\); "
                     r"prefill (\S+) tok/s, decode (\S+) tok/s; ", re.MULTILINE)


def cli(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_one_clear_line(result, fragment):
    """Bad input: non-zero exit, exactly one non-empty stderr line 'Error: ...' naming the problem,
    nothing on stdout, and no traceback (nor an exception that escaped Click)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error:"), lines[0]
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""
    assert "Traceback" not in result.stdout + result.stderr


def stored(value):
    """(dtype or block type, shape, bytes) of a tensor as stored: an array, or quantized blocks."""
    if isinstance(value, Quantized):
        return value.kind, value.shape, value.data.tobytes()
    array = np.asarray(value)
    return array.dtype, array.shape, array.tobytes()


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert stored(got[name]) == stored(want[name]), name


def summary_fields(text):
    """The describe() lines ('parameters  ...') as {first word: rest}."""
    return {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines() if line.strip()}


def snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() if os.path.isfile(os.path.join(directory, name))
            else None for name in os.listdir(directory)}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The HF fixture saved as an npllama weights file (fp32, tokenizer embedded)."""
    path = str(tmp_path_factory.mktemp("model") / "fixture.safetensors")
    weights.save(path, *weights.load(os.path.join(FIXTURES, "hf")))
    return path


@pytest.fixture(scope="module")
def ids_only_file(tmp_path_factory):
    """The same model from stories.bin: no tokenizer, so generate prints token ids."""
    path = str(tmp_path_factory.mktemp("model") / "ids.safetensors")
    weights.save(path, *weights.load(os.path.join(FIXTURES, "stories.bin")))
    return path


# ---- load-weights and info --------------------------------------------------------------------------------
@pytest.mark.parametrize("source", list(SOURCES) + ["npllama"])
def test_load_weights_writes_the_same_tensors_and_a_summary(tmp_path, source, model_file):
    parameters, dtype, has_tokenizer = SOURCES.get(source, (UNTIED_PARAMETERS, "fp32", True))
    path = model_file if source == "npllama" else os.path.join(FIXTURES, source)
    out = str(tmp_path / "sub" / "out.safetensors")
    result = ok(cli("load-weights", path, "--out", out))
    config, params, tokenizer = weights.load(path)
    out_config, out_params, out_tokenizer = weights.load(out)
    assert out_config == config
    assert_same_tensors(out_params, params)
    assert sum(int(np.prod(stored(out_params[name])[1])) for name in out_params) == parameters
    if has_tokenizer:
        assert out_tokenizer.model_bytes == tokenizer.model_bytes == open(TOKENIZER, "rb").read()
    else:
        assert out_tokenizer is None
    assert result.stdout.splitlines()[0] == f"wrote {out}"
    fields = summary_fields(result.stdout.split("\n", 1)[1])
    assert fields["parameters"].startswith(f"{parameters:,} (")
    assert fields["layers"].startswith("2, hidden 32, intermediate 64")
    assert fields["heads"].startswith("4 query, 2 key/value")
    assert fields["dtype"] == dtype
    assert fields["tokenizer"] == ("SentencePiece, 384 pieces; BOS first; stops at '</s>'; no chat template"
                                   if has_tokenizer else "none (generate takes token ids)")
    assert fields["on"] == f"disk     {os.path.getsize(out) / 1024:.4g} KiB ({out})"
    assert result.stderr == ""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_load_weights_converts_to_the_asked_dtype(tmp_path, dtype):
    out = str(tmp_path / f"{dtype}.safetensors")
    result = ok(cli("load-weights", os.path.join(FIXTURES, "hf"), "--out", out, "--dtype", dtype))
    _, params, _ = weights.load(os.path.join(FIXTURES, "hf"))
    _, stored, _ = weights.load(out)
    for name in params:
        want = dtypes.convert(np.asarray(params[name]), dtype)
        assert stored[name].dtype == (np.float16 if dtype == "fp16" else dtypes.BFLOAT16), name
        assert np.asarray(stored[name]).tobytes() == want.tobytes(), name
    assert summary_fields(result.stdout.split("\n", 1)[1])["dtype"] == dtype
    assert os.path.getsize(out) < os.path.getsize(os.path.join(FIXTURES, "stories.bin")) * 0.6


def test_load_weights_embeds_a_tokenizer_into_a_llama2c_import(tmp_path):
    out = str(tmp_path / "stories.safetensors")
    result = ok(cli("load-weights", os.path.join(FIXTURES, "stories.bin"), "--tokenizer", TOKENIZER, "--out", out))
    _, _, tokenizer = weights.load(out)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.model_bytes == open(TOKENIZER, "rb").read()
    assert summary_fields(result.stdout.split("\n", 1)[1])["tokenizer"].startswith("SentencePiece, 384 pieces; ")


def test_load_weights_force_overwrites(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    ok(cli("load-weights", os.path.join(FIXTURES, "stories_tied.bin"), "--out", out, "--force"))
    config, _, _ = weights.load(str(out))
    assert config.tie_word_embeddings


def test_info_on_a_file_and_on_an_hf_directory(model_file):
    on_file = ok(cli("info", model_file)).stdout
    written = ok(cli("load-weights", model_file, "--out", model_file + ".copy")).stdout
    assert on_file.replace(model_file, "X") == written.split("\n", 1)[1].replace(model_file + ".copy", "X")
    on_dir = ok(cli("info", os.path.join(FIXTURES, "hf"))).stdout
    assert "on disk" not in on_dir
    assert on_dir.splitlines() == [line for line in on_file.splitlines() if not line.startswith("on disk")]
    assert summary_fields(on_dir)["parameters"].startswith("43,168 (")


# ---- info on what a training run leaves ------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step run from scratch (base) and a 6-step LoRA run on its model (lora), both through the CLI."""
    from tests.test_train import RUN_FLAGS, TEXT, TINY_FLAGS
    root = tmp_path_factory.mktemp("runs")
    (root / "input.txt").write_text(TEXT)
    ok(cli("train", "--data", root / "input.txt", "--out", root / "base", "--max-iters", 6, *TINY_FLAGS))
    ok(cli("train", "--data", root / "input.txt", "--out", root / "lora", "--max-iters", 6, "--init",
           root / "base" / run_files.MODEL_FILE, "--lora-rank", 2, "--lora-alpha", 4, *RUN_FLAGS))
    return root


def logged_losses(directory, step):
    """What info should say of log.csv up to step, read here with the csv module."""
    rows = [row for row in csv.DictReader(open(directory / run_files.LOG_FILE)) if int(row["step"]) <= step]
    last_eval = [row for row in rows if row["val_loss"]][-1]
    return (f"batch {float(rows[-1]['loss']):.4f} at step {rows[-1]['step']}; evaluated at step {last_eval['step']}: "
            f"train {float(last_eval['train_loss']):.4f}, validation {float(last_eval['val_loss']):.4f}")


def test_info_on_a_run_shows_its_step_losses_and_settings(runs):
    base = runs / "base"
    with open(base / run_files.LOG_FILE, "a") as log:  # rows past the checkpoint (an interrupted run's) are not its
        log.write("7,0.0001,9.5,1.0,100,1.0,9.25,9.75\n")
    on_directory = summary_fields(ok(cli("info", base)).stdout)
    assert on_directory["parameters"].startswith("3,664 (")
    assert on_directory["training"].startswith("step 6 after ")
    assert on_directory["settings"] == "lr 0.001 (min 0.0001, warmup 2), batch 4 × grad_accum 1, context the model's, " \
                                       "max_iters 6"
    assert on_directory["data"] == str(runs / "input.txt")
    assert on_directory["loss"] == logged_losses(base, 6) and "9.5" not in on_directory["loss"]
    assert summary_fields(ok(cli("info", base / run_files.MODEL_FILE)).stdout) == on_directory


def test_info_on_a_runs_optimizer_state(runs):
    fields = summary_fields(ok(cli("info", runs / "base" / run_files.OPTIMIZER_FILE)).stdout)
    assert fields["optimizer"] == "AdamW state of a training run: moments of 3,664 (3.66K) parameters in 12 tensors, fp32"
    assert fields["training"].startswith("step 6 after ")
    assert fields["settings"].endswith("max_iters 6") and fields["loss"] == logged_losses(runs / "base", 6)


def test_info_on_a_lora_run_and_its_adapters(runs):
    base_model = str(runs / "base" / run_files.MODEL_FILE)
    on_directory = summary_fields(ok(cli("info", runs / "lora")).stdout)
    assert on_directory["adapters"] == "LoRA rank 2, alpha 4 (scale 2) on q_proj, v_proj in 1 layer"
    assert on_directory["parameters"] == f"{2 * (2 * 16 + 16 * 2)} (128) in 4 tensors"  # A (2, 16) and B (16, 2), twice
    assert on_directory["base"].startswith(f"model  {base_model}; ")
    assert on_directory["training"].startswith("step 6 after ")
    assert on_directory["lora"] == f"rank 2, alpha 4 on q_proj, v_proj; base {base_model}"
    assert on_directory["loss"] == logged_losses(runs / "lora", 6)
    assert summary_fields(ok(cli("info", runs / "lora" / run_files.ADAPTERS_FILE)).stdout) == on_directory


def test_info_on_adapters_says_whether_their_base_can_be_checked(tmp_path):
    from npllama import adapters, init_params
    config = LlamaConfig.preset("tiny")
    params = init_params(config)
    lora = adapters.init_adapters(params, config, ("o_proj",), rank=4, alpha=8.0, seed=0)
    weights.save_adapters(tmp_path / "checked.safetensors", lora, 4, 8.0, ["o_proj"], base_params=params,
                          base_name="tiny-base")
    weights.save_adapters(tmp_path / "unchecked.safetensors", lora, 4, 8.0, ["o_proj"])
    checked = summary_fields(ok(cli("info", tmp_path / "checked.safetensors")).stdout)
    assert checked["adapters"] == f"LoRA rank 4, alpha 8 (scale 2) on o_proj in {config.num_hidden_layers} layers"
    assert checked["base"] == "model  tiny-base; its weights are checked where the adapters are loaded"
    assert "training" not in checked  # not saved by a run
    unchecked = summary_fields(ok(cli("info", tmp_path / "unchecked.safetensors")).stdout)
    assert unchecked["base"] == "model  not named; not checked where the adapters are loaded (no fingerprint)"


# ---- export-hf --------------------------------------------------------------------------------------------
def test_export_hf_round_trips(tmp_path, model_file):
    outdir = str(tmp_path / "hf")
    result = ok(cli("export-hf", model_file, outdir))
    assert "wrote" in result.stdout and outdir in result.stdout
    assert sorted(os.listdir(outdir)) == ["config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.model", "tokenizer_config.json"]
    hf_config = json.load(open(os.path.join(outdir, "config.json")))
    assert hf_config["model_type"] == "llama" and hf_config["vocab_size"] == 384
    config, params, tokenizer = weights.load(model_file)
    again_config, again, again_tokenizer = weights.load(outdir)
    assert again_config == config
    assert_same_tensors(again, params)
    assert again_tokenizer.model_bytes == tokenizer.model_bytes
    assert again_tokenizer.conventions() == tokenizer.conventions()
    # and through the CLI: importing the exported directory gives the same file's tensors
    reimported = str(tmp_path / "again.safetensors")
    ok(cli("load-weights", outdir, "--out", reimported))
    assert_same_tensors(weights.load(reimported)[1], params)


def test_export_hf_refuses_a_non_empty_directory_without_force(tmp_path, model_file):
    outdir = tmp_path / "hf"
    outdir.mkdir()
    (outdir / "config.json").write_text("mine")
    assert_one_clear_line(cli("export-hf", model_file, outdir), "is not empty; pass --force")
    assert snapshot(outdir) == {"config.json": b"mine"}
    ok(cli("export-hf", model_file, outdir, "--force"))
    assert weights.load(str(outdir))[0].vocab_size == 384


# ---- generate ---------------------------------------------------------------------------------------------
def generate_cli(weights_path, *args):
    return cli("generate", "--weights", weights_path, "--device", DEVICE, *args)


def test_greedy_prompt_ids_match_transformers(xp, ids_only_file):
    result = ok(generate_cli(ids_only_file, "--prompt-ids", " ".join(map(str, PROMPT_IDS)), "-n", 20,
                             "--temperature", 0))
    assert result.stdout == " ".join(map(str, PROMPT_IDS + HF_GREEDY)) + "\n"
    prompt, new, reason, prefill, decode = SUMMARY.search(result.stderr).groups()
    assert (int(prompt), int(new), reason) == (len(PROMPT_IDS), 20, "length")
    assert float(prefill.replace(",", "")) > 0 and float(decode.replace(",", "")) > 0


def test_greedy_prompt_ids_print_ids_on_weights_with_a_tokenizer(xp, model_file):
    result = ok(generate_cli(model_file, "--prompt-ids", " ".join(map(str, PROMPT_IDS)), "-n", 20, "--temperature", 0))
    assert result.stdout == " ".join(map(str, PROMPT_IDS + HF_GREEDY)) + "\n"


def test_prompt_text_prints_the_decoded_continuation(xp, model_file):
    result = ok(generate_cli(model_file, "--prompt", PROMPT_TEXT, "-n", 20, "--temperature", 0))
    config, params, tokenizer = weights.load(model_file)
    ids = tokenizer.encode(PROMPT_TEXT, bos=True)
    assert ids[0] == tokenizer.bos_id and ids == PROMPT_IDS
    new = generate(params, config, ids, 20, eos_ids=tokenizer.eos_ids)
    assert result.stdout == tokenizer.decode(ids + new) + "\n"
    line = result.stderr.strip()
    assert "\n" not in line
    prompt, count, reason, prefill, decode = SUMMARY.search(line).groups()
    assert (int(prompt), int(count), reason) == (len(ids), 20, "length")
    assert "prefill" in line and "decode" in line and "tok/s" in line


def test_generate_reads_an_hf_directory_directly(xp):
    result = ok(generate_cli(os.path.join(FIXTURES, "hf"), "--prompt", PROMPT_TEXT, "-n", 20, "--temperature", 0))
    tokenizer = weights.load(os.path.join(FIXTURES, "hf"))[2]
    assert result.stdout == tokenizer.decode(PROMPT_IDS + HF_GREEDY) + "\n"
    assert SUMMARY.search(result.stderr).groups()[:3] == (str(len(PROMPT_IDS)), "20", "length")


def test_seeded_sampling_repeats_and_depends_on_the_seed(xp, model_file):
    args = ("--prompt", PROMPT_TEXT, "-n", 20, "--temperature", 0.8)
    first = ok(generate_cli(model_file, *args, "--seed", 3)).stdout
    second = ok(generate_cli(model_file, *args, "--seed", 3)).stdout
    other = ok(generate_cli(model_file, *args, "--seed", 4)).stdout
    greedy = ok(generate_cli(model_file, "--prompt", PROMPT_TEXT, "-n", 20, "--temperature", 0)).stdout
    assert first == second
    assert first != other and first != greedy
    config, params, tokenizer = weights.load(model_file)
    new = generate(params, config, PROMPT_IDS, 20, temperature=0.8, seed=3, eos_ids=tokenizer.eos_ids)
    assert first == tokenizer.decode(PROMPT_IDS + new) + "\n"


def test_generation_stops_at_eos(xp, model_file):
    config, params, tokenizer = weights.load(model_file)
    ids = tokenizer.encode("l", bos=True)
    assert ids == [tokenizer.bos_id, 296]
    free_running = generate(params, config, ids, 20)  # no eos_id: does not stop
    assert tokenizer.eos_id in free_running[:-1]  # the premise: greedy emits EOS before the 20th token
    stop = free_running.index(tokenizer.eos_id) + 1
    result = ok(generate_cli(model_file, "--prompt", "l", "-n", 20, "--temperature", 0))
    assert SUMMARY.search(result.stderr).groups()[:3] == (str(len(ids)), str(stop), "eos")
    assert result.stdout == tokenizer.decode(ids + free_running[:stop]) + "\n"


def test_generate_dtype_fp32_is_accepted(xp, ids_only_file):
    result = ok(generate_cli(ids_only_file, "--prompt-ids", " ".join(map(str, PROMPT_IDS)), "-n", 20,
                             "--dtype", "fp32", "--temperature", 0))
    assert result.stdout == " ".join(map(str, PROMPT_IDS + HF_GREEDY)) + "\n"


# ---- bad input: one clear line, non-zero exit, no traceback, nothing written -------------------------------
def load_weights_fails(tmp_path, source, fragment, *extra):
    """load-weights SOURCE --out tmp_path/out.safetensors fails with one clear line and writes nothing."""
    before = snapshot(tmp_path)
    assert_one_clear_line(cli("load-weights", source, "--out", tmp_path / "out.safetensors", *extra), fragment)
    assert snapshot(tmp_path) == before  # no output file, no temporary left behind


def test_missing_file(tmp_path):
    load_weights_fails(tmp_path, tmp_path / "nothing.safetensors", "nothing.safetensors: no such file")
    assert_one_clear_line(cli("info", tmp_path / "nothing.safetensors"), "no such file")


def test_not_a_safetensors_file(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are my notes, not weights\n" * 10)
    load_weights_fails(tmp_path, tmp_path / "notes.safetensors", "not a safetensors file")


def test_cut_short_file(tmp_path, model_file):
    data = open(model_file, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    load_weights_fails(tmp_path, tmp_path / "cut.safetensors", "cut.safetensors is a safetensors file cut short")


def test_cut_short_llama2c_file(tmp_path):
    data = open(os.path.join(FIXTURES, "stories_v1.bin"), "rb").read()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    load_weights_fails(tmp_path, tmp_path / "cut.bin", "cut.bin is a llama2.c checkpoint cut short")


def test_tensor_shape_not_matching_the_config(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "hf"), tmp_path / "hf")
    hf_config = json.load(open(tmp_path / "hf" / "config.json"))
    hf_config["intermediate_size"] = 96
    json.dump(hf_config, open(tmp_path / "hf" / "config.json", "w"))
    load_weights_fails(tmp_path, tmp_path / "hf",
                       "tensor model.layers.0.mlp.gate_proj.weight has shape (64, 32), the config says (96, 32)")


def test_missing_tensor(tmp_path, model_file):
    config, params, _ = weights.load(model_file)
    kept = {name: np.asarray(params[name]) for name in params if name != "model.norm.weight"}
    safetensors_file.write(tmp_path / "m.safetensors", kept, {weights.CONFIG_KEY: json.dumps(config.to_dict())})
    load_weights_fails(tmp_path, tmp_path / "m.safetensors", "missing tensor model.norm.weight")


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    load_weights_fails(tmp_path, STORIES260K, "the tokenizer has 32000 tokens but the model's vocab_size is 512",
                       "--tokenizer", os.path.join(ROOT, "..", "shared", "data", "llama2-tokenizer.model"))


def test_tokenizer_smaller_than_the_vocabulary_is_said_and_its_ids_only_are_sampled(tmp_path):
    """Padded embeddings (or the wrong tokenizer): one warning line; generation picks only ids with text."""
    out = tmp_path / "padded.safetensors"
    result = ok(cli("load-weights", STORIES260K, "--tokenizer", TOKENIZER, "--out", out))
    assert result.stderr.strip().splitlines() == [
        f"Warning: {STORIES260K}: the tokenizer has 384 tokens, the model 512 rows: ids from 384 on have no "
        "text (padding, or the wrong tokenizer)"]
    config, params, tokenizer = weights.load(str(out))
    free = generate(params, config, [1], 30)
    assert max(free) >= 384  # the premise: unconstrained, the model picks ids past the tokenizer's
    limited = generate(params, config, [1], 30, vocab_limit=384)
    assert max(limited) < 384
    generated = ok(cli("generate", "--weights", out, "--prompt", "Once", "-n", "30"))
    assert generated.stdout.startswith("Once")


def test_unrecognised_layout(tmp_path):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "somedir" / "weights.npy").write_bytes(b"")
    load_weights_fails(tmp_path, tmp_path / "somedir", "unrecognised checkpoint layout")


def test_meta_pickle_naming_a_forbidden_global(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "meta"), tmp_path / "meta")
    sentinel = tmp_path / "pwned"
    command = f"touch {sentinel}".encode()
    payload = b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(command)) + command + b"\x85R."
    with zipfile.ZipFile(tmp_path / "meta" / "consolidated.00.pth", "w") as archive:
        archive.writestr("consolidated.00/data.pkl", payload)
    load_weights_fails(tmp_path, tmp_path / "meta", "refusing to load: the pickle names the global")
    assert not sentinel.exists()


def test_out_exists_without_force(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the user's precious file")
    assert_one_clear_line(cli("load-weights", os.path.join(FIXTURES, "hf"), "--out", out),
                          "exists; pass --force")
    assert out.read_bytes() == b"the user's precious file"
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_prompt_longer_than_the_context(xp):
    assert weights.load(STORIES260K)[0].max_position_embeddings == 512
    result = generate_cli(STORIES260K, "--prompt-ids", " ".join(["1"] * 513), "-n", 1)
    assert_one_clear_line(result, "the prompt has 513 tokens, more than the model's context of 512")


def test_device_cuda_without_a_gpu():
    try:
        backend.use("cuda")
    except backend.BackendError:
        pass
    else:
        pytest.skip("a GPU is present (npllama.backend.use('cuda') succeeded): --device cuda cannot fail here")
    result = cli("generate", "--weights", STORIES260K, "--prompt-ids", "1", "-n", 1, "--device", "cuda")
    assert_one_clear_line(result, "--device cuda was asked for, but")


def test_prompt_text_on_weights_without_a_tokenizer(xp):
    assert_one_clear_line(generate_cli(STORIES260K, "--prompt", "Once upon a time", "-n", 1),
                          "has no tokenizer: pass --tokenizer")


@pytest.mark.parametrize("prompts", [(), ("--prompt", "Once", "--prompt-ids", "1")], ids=["neither", "both"])
def test_exactly_one_of_prompt_and_prompt_ids(prompts):
    assert_one_clear_line(generate_cli(STORIES260K, *prompts, "-n", 1), "give exactly one of --prompt and --prompt-ids")


def test_bad_prompt_ids(xp):
    assert_one_clear_line(generate_cli(STORIES260K, "--prompt-ids", "1 two", "-n", 1), "must be integers")
    assert_one_clear_line(generate_cli(STORIES260K, "--prompt-ids", "1 512", "-n", 1), "must lie in [0, 512)")


def test_a_real_script_run_prints_one_line_and_no_traceback(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are my notes, not weights\n" * 10)
    out = tmp_path / "out.safetensors"
    result = subprocess.run([sys.executable, "cli.py", "load-weights", str(tmp_path / "notes.safetensors"),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "not a safetensors file" in lines[0], result.stderr
    assert result.stdout == "" and not out.exists()
