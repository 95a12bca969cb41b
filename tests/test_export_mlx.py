"""`kvc_format.export_mlx`: the MLX-LM prompt-cache file (mlx-lm 0.32.2's `save_prompt_cache` layout) holds the
reader's dequantized post-RoPE keys and values, and nothing is written for a pruned, damaged or unrepresentable
file. MLX-LM itself reads these files in tests/test_real_mlx.py."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_safetensors

from kvc_format import ExportError, KvcFormatError, KvcReader, LayoutError, export_mlx, load_file
from kvc_format.__main__ import main as kvc_format_main
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.prune.scoring import score_context

from attacks import ATTACKS, split
from fixtures import TEXT
from kvc_bytes import assemble, header_dict, raw_streams

GOLDEN = Path(__file__).parent.parent / "format" / "golden"
DENSE = sorted(p.name for p in GOLDEN.glob("dense-*.kvc") if "windows" not in p.name)


def expected_metadata(layers: int, model: str, tokenizer_config: str) -> dict[str, str]:
    """What save_prompt_cache writes: mlx.utils.tree_flatten([metadata, classes, scalars]), spelled out."""
    meta = {"0.model": model, "0.tokenizer_config": tokenizer_config, "2.0": ""}
    for layer in range(layers):
        meta |= {f"1.{layer}": "KVCache", f"2.{layer + 1}.0": f"{layer}.2", f"2.{layer + 1}.1": "scalar"}
    return meta


def check_layout(kvc: Path, out: Path, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The tensors and metadata of `out` are those of save_prompt_cache for `kvc`; returns the tensors."""
    tensors = load_safetensors(out)
    heads = load_file(kvc)
    with KvcReader(kvc) as reader:
        g, name = reader.geometry, reader.header["model"]["name"]
    assert sorted(tensors) == sorted(f"{layer}.{i}" for layer in range(g.layers) for i in range(3))
    for layer in range(g.layers):
        for i, part in ((0, "keys"), (1, "values")):
            array = tensors[f"{layer}.{i}"]
            assert array.dtype == dtype and array.shape == (1, g.kv_heads, g.tokens, g.head_dim)
            for head in range(g.kv_heads):
                expected = heads[f"layers.{layer}.heads.{head}.{part}"].astype(dtype)
                np.testing.assert_array_equal(array[0, head], expected)
        offset = tensors[f"{layer}.2"]
        assert offset.dtype == np.int32 and offset.shape == () and int(offset) == g.tokens
    with safe_open(out, "np") as f:
        assert f.metadata() == expected_metadata(g.layers, name, '{"trust_remote_code": false}')
    raw = out.read_bytes()
    length = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8 : 8 + length])
    assert list(header) == sorted(header)  # keys in the order MLX's writer puts them
    assert max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__") == len(raw) - 8 - length
    return tensors


@pytest.mark.parametrize("name", DENSE)
def test_dense_golden_files(tmp_path, name):
    out = tmp_path / "c.safetensors"
    written = export_mlx(GOLDEN / name, out)
    assert written == out.stat().st_size
    check_layout(GOLDEN / name, out, np.dtype(np.float16))


def test_float32_and_the_recorded_model(tmp_path):
    out = tmp_path / "c.safetensors"
    export_mlx(GOLDEN / "dense-bfloat16-zstd.kvc", out, dtype="float32", model="mlx-community/x",
               tokenizer_config={"trust_remote_code": True, "eos_token": "<|im_end|>"})
    with safe_open(out, "np") as f:
        meta = f.metadata()
    assert meta["0.model"] == "mlx-community/x"
    assert json.loads(meta["0.tokenizer_config"]) == {"trust_remote_code": True, "eos_token": "<|im_end|>"}
    heads = load_file(GOLDEN / "dense-bfloat16-zstd.kvc")
    np.testing.assert_array_equal(load_safetensors(out)["1.1"][0, 1], heads["layers.1.heads.1.values"])
    with pytest.raises(ValueError, match="dtype"):
        export_mlx(GOLDEN / "dense-raw.kvc", tmp_path / "d.safetensors", dtype="bfloat16")


@pytest.fixture(scope="module")
def prefilled(tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model("llama", tiny_tokenizer), chunk_size=128)


def test_keys_are_the_models_own_cache_after_rope(tmp_path, prefilled):
    """A lossless file exports the model's own cache (RoPE applied, Hugging Face channel order) in float16; a 4-bit
    dense file (keys stored before RoPE) exports the reader's dequantized keys, rotated again."""
    lossless, quantized = tmp_path / "l.kvc", tmp_path / "q.kvc"
    write_kvc(prefilled, lossless, codec="zstd", bits=16)
    write_kvc(prefilled, quantized, codec="ans", bits=4)
    with KvcReader(quantized) as reader:
        assert reader.geometry.layout == "quantized" and reader.geometry.key_rope == "removed"
    export_mlx(lossless, tmp_path / "l.safetensors")
    tensors = check_layout(lossless, tmp_path / "l.safetensors", np.dtype(np.float16))
    for layer, cache in enumerate(prefilled.cache.layers):
        torch.testing.assert_close(torch.from_numpy(tensors[f"{layer}.0"]), cache.keys.half(), rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(tensors[f"{layer}.1"]), cache.values.half(), rtol=0, atol=0)
    export_mlx(quantized, tmp_path / "q.safetensors")
    check_layout(quantized, tmp_path / "q.safetensors", np.dtype(np.float16))


@pytest.mark.parametrize("name", ["pruned-zstd.kvc", "quantized-rans.kvc"])
def test_pruned_files_are_refused(tmp_path, name):
    with pytest.raises(ExportError, match="pruned and MLX-LM's cache has no gaps.*--ratio 1.*--allocation position"):
        export_mlx(GOLDEN / name, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["dense-windows-zstd.kvc", "quantized-windows-rans.kvc"])
def test_sliding_window_files_are_refused_in_one_line(tmp_path, capsys, name):
    """Layer 1 (dense) or 0 (quantized) holds only its window's last positions, which MLX-LM's KVCache cannot."""
    layer, window, held = (1, 128, 127) if name.startswith("dense") else (0, 200, 199)
    message = (f"layer {layer} has a sliding window of {window} and holds only the last {held} of the 500 positions: "
               "sliding-window caches cannot be exported to MLX-LM yet")
    with pytest.raises(ExportError, match=message):
        export_mlx(GOLDEN / name, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []
    assert kvc_format_main(["export", str(GOLDEN / name), str(tmp_path / "c.safetensors"), "--to", "mlx"]) == 1
    assert capsys.readouterr().err == f"error: {message}\n" and list(tmp_path.iterdir()) == []


def test_windows_holding_every_position_export_as_before(tmp_path):
    """A document shorter than its windows: every layer holds every position, and the export is unchanged."""
    header, sections, _ = split((GOLDEN / "dense-zstd.kvc").read_bytes())
    header["cache"]["windows"] = [501, None]
    (tmp_path / "w.kvc").write_bytes(assemble(header, sections, minor=6))
    export_mlx(GOLDEN / "dense-zstd.kvc", tmp_path / "plain.safetensors")
    export_mlx(tmp_path / "w.kvc", tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_a_file_with_a_logit_bias_is_refused(tmp_path, prefilled):
    """Every entry kept but refit: the file stores a (near-zero) bias per entry, which MLX-LM cannot add."""
    pruning = score_context(prefilled.lm, prefilled.cache, prefilled.layout, "kvzip").keep(1.0)
    write_kvc(prefilled, tmp_path / "b.kvc", codec="ans", bits=4, pruning=pruning)
    assert KvcReader(tmp_path / "b.kvc").bias_layers
    with pytest.raises(ExportError, match="logit bias"):
        export_mlx(tmp_path / "b.kvc", tmp_path / "c.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.kvc"]


IDS = [f"{a.number:02d}-{a.name}" for a in ATTACKS]


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_hostile_files_are_refused_as_verify_refuses_them(tmp_path, attack):
    """The reader's typed error, as `kvc verify` gives it; a crafted pruned file that opens is refused as pruned
    before anything is decoded."""
    path = tmp_path / "a.kvc"
    path.write_bytes(attack.build())
    with pytest.raises((KvcFormatError, ExportError)) as caught:
        export_mlx(path, tmp_path / "c.safetensors")
    if isinstance(caught.value, ExportError):
        with KvcReader(path) as reader:
            g = reader.geometry
            assert attack.stage == "verify" and min(reader.kept_per_layer()) < g.kv_heads * g.tokens
    else:
        assert type(caught.value).__name__ == attack.error
    assert [p.name for p in tmp_path.iterdir()] == ["a.kvc"]


def test_a_damaged_last_layer_leaves_nothing(tmp_path):
    """Layer 0 is written before layer 1's checksum fails: the partial file is discarded."""
    data = bytearray((GOLDEN / "dense-zstd.kvc").read_bytes())
    _, sections, _ = split(bytes(data))
    data[sections[1][0]["offset"] + 10] ^= 0xFF
    path = tmp_path / "bad.kvc"
    path.write_bytes(bytes(data))
    with pytest.raises(KvcFormatError, match="checksum mismatch in the kv_layer section"):
        export_mlx(path, tmp_path / "c.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.kvc"]


def test_nonzero_padding_is_refused_as_verify_refuses_it(tmp_path):
    data = bytearray((GOLDEN / "dense-raw.kvc").read_bytes())
    _, sections, _ = split(bytes(data))
    ends = [24 + struct.unpack_from("<I", data, 16)[0]] + [entry["offset"] + entry["length"] for entry, _ in sections]
    starts = [entry["offset"] for entry, _ in sections] + [struct.unpack_from("<Q", data, len(data) - 24)[0]]
    padding = next(end for end, start in zip(ends, starts, strict=True) if end < start)
    data[padding] = 1
    path = tmp_path / "pad.kvc"
    path.write_bytes(bytes(data))
    with KvcReader(path) as reader, pytest.raises(LayoutError, match="padding"):
        reader.verify()
    with pytest.raises(LayoutError, match="padding"):
        export_mlx(path, tmp_path / "c.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["pad.kvc"]


def test_values_beyond_float16_need_float32(tmp_path):
    keys = np.full((2, 5, 4), 1e5, dtype="<f4")
    streams, payload = raw_streams([("keys", "float32", keys), ("values", "float32", np.ones_like(keys))])
    layer = {"type": "kv_layer", "required": True, "layer": 0, "streams": streams}
    path = tmp_path / "big.kvc"
    path.write_bytes(assemble(header_dict(layers=1), [(layer, payload)]))
    with pytest.raises(ExportError, match="beyond float16's range.*float32"):
        export_mlx(path, tmp_path / "c.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["big.kvc"]
    export_mlx(path, tmp_path / "c.safetensors", dtype="float32")
    assert (load_safetensors(tmp_path / "c.safetensors")["0.0"] == 1e5).all()
