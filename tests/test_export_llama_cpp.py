"""`kvc export --to llama.cpp`: the sequence-state bytes (parsed here from the layout alone), the model check
against a GGUF file, the refusals, and hostile GGUF metadata. The real runtime is in test_real_llama_cpp.py."""

import json
import struct
import subprocess
import sys
from dataclasses import replace

import gguf as gguf_writer
import numpy as np
import pytest
from typer.testing import CliRunner

from kvc_format import ExportError, KvcFormatError, KvcReader, KvcWriter, Stream
from kvc_format.gguf import read_metadata
from kvc_format.llama_cpp import MAGIC, STATE_VERSION, export_llama_cpp
from kvzip_cli.cli import app
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.prune.scoring import score_context

from fixtures import TEXT


def write_gguf(path, lm, **overrides):
    """A metadata-only GGUF file describing `lm` as llama.cpp's converter would; `overrides` replace fields."""
    cfg = lm.model.config
    fields = {"arch": "llama", "block_count": cfg.num_hidden_layers, "head_count": cfg.num_attention_heads,
              "head_count_kv": cfg.num_key_value_heads, "embedding_length": cfg.hidden_size,
              "rope_dimension_count": cfg.hidden_size // cfg.num_attention_heads, "context_length": 4096,
              "rope_freq_base": 10000.0,
              "tokens": lm.tokenizer.convert_ids_to_tokens(list(range(cfg.vocab_size)))}
    fields.update(overrides)
    w = gguf_writer.GGUFWriter(str(path), fields.pop("arch"))
    w.add_token_list(fields.pop("tokens"))
    for name, value in fields.items():
        getattr(w, f"add_{name}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def parse_state(data: bytes, layers: int, width: int) -> dict:
    """The llama.cpp sequence state laid out as SPEC.md's export section describes it (f16 K/V)."""
    magic, version, n_tokens = struct.unpack_from("<III", data, 0)
    at = 12
    tokens = np.frombuffer(data, "<i4", n_tokens, at)
    at += 4 * n_tokens
    n_stream, cells = struct.unpack_from("<II", data, at)
    at += 8
    meta = np.frombuffer(data, "<i4", 3 * cells, at).reshape(cells, 3)
    at += 12 * cells
    v_trans, n_layer = struct.unpack_from("<II", data, at)
    at += 8
    keys, values = [], []
    for _ in range(n_layer):
        kind, row = struct.unpack_from("<iQ", data, at)
        assert (kind, row) == (1, 2 * width)
        keys.append(np.frombuffer(data, "<f2", cells * width, at + 12).reshape(cells, width))
        at += 12 + cells * row
    for _ in range(n_layer):
        if v_trans:
            kind, element, dims = struct.unpack_from("<iII", data, at)
            assert (kind, element, dims) == (1, 2, width)
            values.append(np.frombuffer(data, "<f2", cells * width, at + 12).reshape(width, cells).T)
            at += 12 + cells * width * 2
        else:
            kind, row = struct.unpack_from("<iQ", data, at)
            assert (kind, row) == (1, 2 * width)
            values.append(np.frombuffer(data, "<f2", cells * width, at + 12).reshape(cells, width))
            at += 12 + cells * row
    assert at == len(data) and n_layer == layers
    return {"magic": magic, "version": version, "tokens": tokens, "n_stream": n_stream, "cells": meta,
            "v_trans": v_trans, "keys": keys, "values": values}


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model("llama", tiny_tokenizer), chunk_size=128)


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory, llama):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", llama.lm)


def _hf_rows(tensor, order):
    """(1, heads, n, head_dim) post-RoPE HF keys → (n, heads × head_dim) in llama.cpp's channel order."""
    t = tensor[0].float().numpy()
    return np.concatenate([t[h][:, order] for h in range(t.shape[0])], axis=1)


@pytest.mark.parametrize("v_trans", [False, True])
def test_dense_state_holds_the_prefill_cache_in_llama_cpp_order(tmp_path, llama, model_gguf, v_trans):
    path, out = tmp_path / "d.kvc", tmp_path / "d.state"
    write_kvc(llama, path, codec="zstd", bits=32)
    info = export_llama_cpp(path, out, model_gguf, v_trans=v_trans)
    cfg = llama.lm.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    state = parse_state(out.read_bytes(), cfg.num_hidden_layers, cfg.num_key_value_heads * head_dim)
    tokens = len(llama.layout.prefix_ids)
    assert (state["magic"], state["version"], state["n_stream"], state["v_trans"]) == (MAGIC, STATE_VERSION, 1,
                                                                                          v_trans)
    assert state["tokens"].tolist() == llama.layout.prefix_ids
    np.testing.assert_array_equal(state["cells"], np.stack([np.arange(tokens), np.ones(tokens), np.zeros(tokens)], 1))
    assert (info.cells, info.tokens, info.bytes) == (tokens, tokens, out.stat().st_size)
    half = head_dim // 2
    order = np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1)  # 2j ← j, 2j+1 ← j + d/2
    for layer in range(cfg.num_hidden_layers):
        k, v = llama.cache.layers[layer].keys, llama.cache.layers[layer].values
        np.testing.assert_allclose(state["keys"][layer], _hf_rows(k, order), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(state["values"][layer], _hf_rows(v, np.arange(head_dim)), rtol=1e-3, atol=1e-3)


def test_position_pruned_state_keeps_the_gaps(tmp_path, llama, model_gguf):
    path, out = tmp_path / "p.kvc", tmp_path / "p.state"
    write_kvc(llama, path, codec="zstd", bits=16,
              pruning=score_context(llama.lm, llama.cache, llama.layout, "knorm").keep(0.5, "position"))
    export_llama_cpp(path, out, model_gguf)
    with KvcReader(path) as reader:
        kept = reader.read_layer(0).positions[0]
    cfg = llama.lm.model.config
    state = parse_state(out.read_bytes(), cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
                        * cfg.num_key_value_heads)
    assert len(kept) < len(llama.layout.prefix_ids)
    np.testing.assert_array_equal(state["cells"][:, 0], kept)
    assert state["tokens"].tolist() == llama.layout.prefix_ids  # every token: llama.cpp continues after the last
    assert state["cells"][-1, 0] == len(llama.layout.prefix_ids) - 1


def test_q8_0_rows_dequantize_to_the_f16_state(tmp_path, llama, model_gguf):
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=32)
    export_llama_cpp(path, tmp_path / "f.state", model_gguf)
    export_llama_cpp(path, tmp_path / "q.state", model_gguf, cache_type="q8_0")
    cfg = llama.lm.model.config
    width = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    f16 = parse_state((tmp_path / "f.state").read_bytes(), cfg.num_hidden_layers, width)
    data, tokens = (tmp_path / "q.state").read_bytes(), len(llama.layout.prefix_ids)
    at = 12 + 4 * tokens + 8 + 12 * tokens + 8
    kind, row = struct.unpack_from("<iQ", data, at)
    assert (kind, row) == (8, width // 32 * 34)
    blocks = np.frombuffer(data, np.uint8, tokens * row, at + 12).reshape(tokens, width // 32, 34)
    scale = blocks[..., :2].copy().view("<f2").astype(np.float32)
    quants = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    dequantized = (scale * quants).reshape(tokens, width)
    # The tiny heads (16 wide) are not Hadamard-rotated: llama.cpp rotates only heads of a multiple of 64, which the
    # real runtime's test checks (test_real_llama_cpp.py).
    reference = f16["keys"][0].astype(np.float32)
    step = np.abs(reference).reshape(tokens, width // 32, 32).max(-1, keepdims=True) / 127
    assert np.all(np.abs(dequantized - reference).reshape(tokens, width // 32, 32) <= step * 0.5 + 2e-3)


def test_q8_0_with_transposed_values_is_refused(tmp_path, llama, model_gguf):
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=16)
    with pytest.raises(ExportError, match="flash attention"):
        export_llama_cpp(path, tmp_path / "x.state", model_gguf, cache_type="q8_0", v_trans=True)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("block_count", 5, "layers 5"),
    ("head_count_kv", 4, "KV heads 4"),
    ("embedding_length", 128, "hidden size 128"),
    ("rope_freq_base", 500000.0, "RoPE base"),
    ("context_length", 16, "context"),
    ("tokens", [f"t{i}" for i in range(512)], "vocabulary"),
    ("arch", "qwen2", "llama architecture"),
])
def test_a_gguf_of_another_model_is_refused_and_nothing_is_written(tmp_path, llama, field, value, message):
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=16)
    other = write_gguf(tmp_path / "other.gguf", llama.lm, **{field: value})
    with pytest.raises(ExportError, match=message):
        export_llama_cpp(path, tmp_path / "x.state", other)
    assert not (tmp_path / "x.state").exists()


def test_per_head_pruned_file_is_refused_naming_the_position_allocation(tmp_path, llama, model_gguf):
    path = tmp_path / "h.kvc"
    write_kvc(llama, path, codec="zstd", bits=16,
              pruning=score_context(llama.lm, llama.cache, llama.layout, "knorm").keep(0.5, "head"))
    with pytest.raises(ExportError, match="--allocation position"):
        export_llama_cpp(path, tmp_path / "x.state", model_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.kvc"]


def test_a_file_with_a_logit_bias_is_refused(tmp_path, llama, model_gguf):
    path = tmp_path / "b.kvc"
    pruning = score_context(llama.lm, llama.cache, llama.layout, "knorm").keep(0.5, "position")
    write_kvc(llama, path, codec="zstd", bits=16, pruning=replace(pruning, logit_bias=True))
    with pytest.raises(ExportError, match="logit bias.*--no-logit-bias"):
        export_llama_cpp(path, tmp_path / "x.state", model_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.kvc"]


def rewrite_with_windows(src, dst, windows: list) -> None:
    """`src` (a dense .kvc) as a 1.6 file with `cache.windows`: each layer keeps only the positions its window holds."""
    with KvcReader(src) as reader:
        header, g = reader.header, reader.geometry
        layers = reader.read_layers()
    header["cache"]["windows"] = windows
    g = replace(g, windows=tuple(windows))
    with KvcWriter(dst, header) as w:
        for layer, stored in enumerate(layers):
            streams = []
            for name, array in (("keys", stored.keys), ("values", stored.values)):
                held = np.ascontiguousarray(array.data[:, g.first_position(layer):])
                streams.append(Stream(name, array.dtype, held.shape, held.tobytes()))
            w.add_section("kv_layer", {"layer": layer}, streams, codec="zstd")


def test_a_sliding_window_cache_is_refused_unless_its_windows_hold_every_position(tmp_path, llama, model_gguf):
    """llama.cpp's cells hold a position for every layer: a layer holding only its window's last positions cannot be
    written; windows longer than the document change nothing."""
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=16)
    tokens, layers = len(llama.layout.prefix_ids), llama.lm.model.config.num_hidden_layers
    rewrite_with_windows(path, tmp_path / "w.kvc", [33] + [None] * (layers - 1))
    with pytest.raises(ExportError, match=f"layer 0 has a sliding window of 33 and holds only the last 32 of the "
                                          f"{tokens} positions: sliding-window caches cannot be exported to llama.cpp"):
        export_llama_cpp(tmp_path / "w.kvc", tmp_path / "x.state", model_gguf)
    assert not (tmp_path / "x.state").exists()
    rewrite_with_windows(path, tmp_path / "long.kvc", [tokens + 1] * layers)
    export_llama_cpp(path, tmp_path / "d.state", model_gguf)
    export_llama_cpp(tmp_path / "long.kvc", tmp_path / "long.state", model_gguf)
    assert (tmp_path / "long.state").read_bytes() == (tmp_path / "d.state").read_bytes()


def test_qwen2_file_is_refused(tmp_path, tiny_tokenizer, model_gguf):
    from fixtures import tiny_model

    pre = prefill_document(TEXT, tiny_model("qwen2", tiny_tokenizer), chunk_size=128)
    write_kvc(pre, tmp_path / "q.kvc", codec="zstd", bits=16)
    with pytest.raises(ExportError, match="llama architecture"):
        export_llama_cpp(tmp_path / "q.kvc", tmp_path / "x.state", model_gguf)


def test_corrupt_kvc_is_refused_like_verify(tmp_path, llama, model_gguf):
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=16)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(KvcFormatError):
        export_llama_cpp(path, tmp_path / "x.state", model_gguf)
    assert not (tmp_path / "x.state").exists()


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: b"GGUX" + d[4:], "no GGUF magic"),
    (lambda d: d[:40], "ends inside"),
    (lambda d: d[:4] + struct.pack("<I", 9) + d[8:], "version 9"),
    (lambda d: d[:16] + struct.pack("<Q", 1 << 40) + d[24:], "metadata keys"),
    (lambda d: d[:24] + struct.pack("<Q", 1 << 50) + d[32:], "metadata string"),
])
def test_hostile_gguf_metadata_is_refused(tmp_path, llama, model_gguf, mutate, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(model_gguf.read_bytes()))
    with pytest.raises(ExportError, match=message):
        read_metadata(bad)


def test_kvc_export_to_llama_cpp_command(tmp_path, llama, model_gguf):
    path = tmp_path / "d.kvc"
    write_kvc(llama, path, codec="zstd", bits=16)
    runner, out = CliRunner(), tmp_path / "d.state"
    done = runner.invoke(app, ["export", str(path), "--to", "llama.cpp", "--gguf", str(model_gguf), "-o", str(out),
                               "--no-flash-attn", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["bytes"] == out.stat().st_size and result["v_trans"] is True and result["state_version"] == 3
    assert result["question_suffix"] and "node-llama-cpp 3.21.1" in result["runtime"]
    done = runner.invoke(app, ["export", str(path), "--to", "llama.cpp", "-o", str(tmp_path / "y.state")])
    assert done.exit_code == 1 and done.stderr.startswith("error: ") and "--gguf" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "y.state").exists()


def test_torch_free_command_line_exports_to_llama_cpp(tmp_path, llama, model_gguf):
    path, out = tmp_path / "d.kvc", tmp_path / "d.state"
    write_kvc(llama, path, codec="zstd", bits=16)
    run = [sys.executable, "-m", "kvc_format", "export", str(path), str(out), "--to", "llama.cpp"]
    done = subprocess.run([*run, "--gguf", str(model_gguf)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr
    other = write_gguf(tmp_path / "o.gguf", llama.lm, block_count=7)
    done = subprocess.run([*run, "--gguf", str(other)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "layers 7" in done.stderr
