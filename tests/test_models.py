"""Resolving --model: aliases, folders, .gguf files and hub ids, with one-line errors when unusable; the folder a GGUF
converts to."""

import copy
import json
import time

import pytest

from kvzip_cli import KvcError
from kvzip_cli.devices import resolve_device, resolve_dtype
from kvzip_cli.models import load_model, resolve

from conftest import DOCS


def test_unknown_model(tmp_path):
    with pytest.raises(KvcError, match="unknown model 'nonsense'"):
        resolve("nonsense")


def test_missing_gguf(tmp_path):
    with pytest.raises(KvcError, match="does not exist"):
        resolve(str(tmp_path / "m.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(KvcError, match="without config.json"):
        resolve(str(tmp_path))


def test_local_folder(tiny_folder):
    lm = load_model(str(tiny_folder), device="cpu")
    assert lm.model.config.num_hidden_layers == 3
    assert lm.name == str(tiny_folder)


def test_hub_alias_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(KvcError, match="qwen2.*not in the local Hugging Face cache"):
        resolve("qwen2")
    assert time.perf_counter() - started < 5


def test_devices_and_dtypes():
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(KvcError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(KvcError, match="unknown device"):
        resolve_device("gpu7")
    if not torch.cuda.is_available():
        with pytest.raises(KvcError, match="no CUDA device"):
            resolve_device("cuda")


def test_a_converted_folder_is_rewritten_from_the_gguf_metadata(tmp_path, tiny_tokenizer):
    """The files as transformers' GGUF conversion wrote them for SmolLM2 (a CodeLlama tokenizer_config with EOS = BOS,
    a prefix space and infill tokens added past the model's vocabulary, BOS added to every encoding, RoPE's base only
    in rope_parameters) become what the GGUF says; the token ids of a text do not change."""
    from gguf import GGUFWriter
    from tokenizers import processors
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    from kvzip_cli.models import _clean_folder

    vocab = tiny_tokenizer.convert_ids_to_tokens(list(range(len(tiny_tokenizer))))
    gguf = tmp_path / "m.gguf"
    writer = GGUFWriter(gguf, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    for add, token_id in ((writer.add_unk_token_id, 0), (writer.add_bos_token_id, 1), (writer.add_eos_token_id, 2),
                          (writer.add_pad_token_id, 2)):
        add(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    folder = tmp_path / "folder"
    converted = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tiny_tokenizer.backend_tokenizer),
                                        bos_token="<|im_start|>", eos_token="<|im_start|>", unk_token="<|endoftext|>",
                                        extra_special_tokens=["▁<PRE>", "▁<MID>"])
    converted.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", 1)])
    converted.save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "CodeLlamaTokenizer",
                                                              "add_prefix_space": True}))
    config = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    (folder / "config.json").write_text(json.dumps(config))
    text = DOCS.joinpath("apache-2.0.txt").read_text()[:2000]
    before = AutoTokenizer.from_pretrained(folder)
    assert len(before) == len(vocab) + 2 and before("x").input_ids[0] == 1

    _clean_folder(folder, gguf)
    after = AutoTokenizer.from_pretrained(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(after) == len(vocab)
    assert (after.bos_token, after.eos_token, after.pad_token, after.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert after(text).input_ids == after(text, add_special_tokens=False).input_ids
    assert after(text, add_special_tokens=False).input_ids == before(text, add_special_tokens=False).input_ids
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0
    assert AutoConfig.from_pretrained(folder).rope_parameters == config["rope_parameters"]


def test_a_converted_folder_is_named_by_the_gguf_content(tmp_path, monkeypatch):
    """Two environments holding the same GGUF file (another path, another mtime) share one conversion; a different
    file gets its own; the digest is computed once per (path, size, mtime)."""
    import os

    from kvzip_cli import model_files

    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    one, two, other = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf", tmp_path / "c" / "m.gguf"
    for path, content in ((one, b"GGUF same"), (two, b"GGUF same"), (other, b"GGUF other")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(two, ns=(1, 1))
    assert model_files.converted_location(one) == model_files.converted_location(two)
    assert model_files.converted_location(one) != model_files.converted_location(other)
    assert model_files.converted_location(one).name.endswith(f"-c{model_files.CONVERSION_VERSION}")

    def no_hashing(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(model_files.hashlib, "sha256", no_hashing)
    model_files.converted_location(one)  # remembered
    one.write_bytes(b"GGUF changed")
    with pytest.raises(AssertionError, match="hashed again"):
        model_files.converted_location(one)


def test_load_model_checks_the_architecture_and_keeps_soft_capping(tmp_path, tiny_tokenizer):
    """A folder of an architecture kvc cannot cache is refused from its config.json, before any weights load; a
    soft-capping model (Gemma 2) loads with eager attention, which applies the cap (SDPA drops it)."""
    import transformers as t

    from family_models import family_model

    seq2seq = tmp_path / "t5"
    t.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2).save_pretrained(seq2seq)
    with pytest.raises(KvcError, match="encoder-decoder"):
        load_model(str(seq2seq), device="cpu")
    gemma = tmp_path / "gemma2"
    family_model("gemma2", tiny_tokenizer).model.save_pretrained(gemma)
    tiny_tokenizer.save_pretrained(gemma)
    lm = load_model(str(gemma), device="cpu")
    assert lm.model.config._attn_implementation == "eager" and lm.model.config.attn_logit_softcapping
