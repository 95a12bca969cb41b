"""The torch-free export: `kvc_format.load_file` / `export_file`, `python -m kvc_format`, `kvc export`; keys with
RoPE restored from the recorded frequencies match what `kvc load` puts in the model's cache."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_safetensors
from typer.testing import CliRunner

from kvc_format import KvcReader, UnsupportedVersionError, export_file, load_file
from kvzip_cli import KvcError, load
from kvzip_cli.cli import app
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.settings import QuantOptions
from kvzip_cli.compress.write import write_kvc
from kvzip_cli.load.pruned_cache import PrunedCache
from kvzip_cli.prune.scoring import score_context
from kvzip_cli.rope import inverse_frequencies, rope_tables

from attacks import assemble, rans_bad_tables, split
from fixtures import TEXT

GOLDEN = Path(__file__).parent.parent / "format" / "golden"
NAMES = sorted(p.name for p in GOLDEN.glob("*.kvc"))


@pytest.mark.parametrize("name", NAMES)
def test_export_holds_every_head_as_the_reader_decodes_it(tmp_path, name):
    out = tmp_path / "x.safetensors"
    written = export_file(GOLDEN / name, out)
    assert written == out.stat().st_size
    tensors, in_memory = load_safetensors(out), load_file(GOLDEN / name)
    assert tensors.keys() == in_memory.keys()
    for key, array in tensors.items():
        np.testing.assert_array_equal(array, in_memory[key])
    with KvcReader(GOLDEN / name) as reader:
        g = reader.geometry
        assert len(tensors) == (3 * g.layers + len(reader.bias_layers)) * g.kv_heads
        for layer, stored in enumerate(reader.read_layers()):
            bias = reader.read_bias(layer)
            if bias is not None:  # one per row, heads in order
                np.testing.assert_array_equal(np.concatenate([tensors[f"layers.{layer}.heads.{h}.bias"]
                                                              for h in range(g.kv_heads)]), bias)
            for head in range(g.kv_heads):
                positions = tensors[f"layers.{layer}.heads.{head}.positions"]
                values = tensors[f"layers.{layer}.heads.{head}.values"]
                assert positions.dtype == np.int32 and values.dtype == np.float32
                if stored.positions is None:  # dense: the positions the layer holds, all of them without a window
                    np.testing.assert_array_equal(positions, np.arange(g.first_position(layer), g.tokens))
                else:
                    np.testing.assert_array_equal(positions, stored.positions[head])
                assert values.shape == (len(positions), g.head_dim)
        with safe_open(out, "np") as f:
            meta = f.metadata()
        assert json.loads(meta["kvc.header"]) == reader.header
        assert meta["kvc.format"] == "{}.{}".format(*reader.version) and meta["tokens"] == str(g.tokens)
        if g.windows is None:
            assert "kvc.windows" not in meta
        else:
            assert json.loads(meta["kvc.windows"]) == list(g.windows) == reader.header["cache"]["windows"]


def test_windowed_layers_export_the_positions_they_hold():
    dense, quantized = load_file(GOLDEN / "dense-windows-zstd.kvc"), load_file(GOLDEN / "quantized-windows-rans.kvc")
    full = load_file(GOLDEN / "dense-zstd.kvc")  # the same cache, every layer holding every position
    for head in range(2):
        np.testing.assert_array_equal(dense[f"layers.0.heads.{head}.positions"], np.arange(500))
        np.testing.assert_array_equal(dense[f"layers.1.heads.{head}.positions"], np.arange(373, 500))
        np.testing.assert_array_equal(dense[f"layers.1.heads.{head}.keys"], full[f"layers.1.heads.{head}.keys"][373:])
        np.testing.assert_array_equal(quantized[f"layers.0.heads.{head}.positions"], np.arange(301, 500))


def test_float16_export(tmp_path):
    name = GOLDEN / "quantized-rope-channel.kvc"
    export_file(name, tmp_path / "h.safetensors", dtype="float16")
    half, full = load_safetensors(tmp_path / "h.safetensors"), load_file(name)
    for key, array in half.items():
        assert array.dtype == (np.int32 if key.endswith("positions") else np.float16)
        np.testing.assert_array_equal(array, full[key].astype(array.dtype))


def test_keys_without_rope_frequencies_are_refused_and_nothing_is_written(tmp_path):
    header, sections, _ = split((GOLDEN / "quantized-rope-channel.kvc").read_bytes())
    del header["cache"]["rope_inv_freq"]
    path = tmp_path / "old.kvc"
    path.write_bytes(assemble(header, sections, minor=2))  # as a 1.2 writer made it
    with KvcReader(path) as reader:
        reader.verify()  # a valid 1.2 file ...
    with pytest.raises(UnsupportedVersionError, match="RoPE frequencies"):
        export_file(path, tmp_path / "x.safetensors")  # ... whose keys cannot be restored without the model
    path.write_bytes(assemble(header, sections, minor=3))
    with pytest.raises(Exception, match="rope_inv_freq"):
        KvcReader(path)  # from 1.3 the frequencies are required
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.kvc"]


def test_export_failing_midway_leaves_no_file(tmp_path):
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(rans_bad_tables())  # valid checksums; layer 0's rANS tables fail only when decoded
    with pytest.raises(Exception, match="sums to"):
        export_file(bad, tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.kvc"]


def test_edge_command_line(tmp_path):
    out = tmp_path / "x.safetensors"
    run = [sys.executable, "-m", "kvc_format"]
    done = subprocess.run([*run, "export", str(GOLDEN / "pruned-zstd.kvc"), str(out), "--dtype", "float16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr
    info = subprocess.run([*run, "info", str(GOLDEN / "pruned-zstd.kvc")], capture_output=True, text=True, timeout=120)
    assert json.loads(info.stdout)["cache"]["layout"] == "pruned"
    info = subprocess.run([*run, "info", str(GOLDEN / "dense-windows-zstd.kvc")], capture_output=True, text=True,
                          timeout=120)
    cache = json.loads(info.stdout)["cache"]
    assert cache["windows"] == [None, 128] and cache["held"] == [500, 127]
    bad = subprocess.run([*run, "verify", str(tmp_path / "missing.kvc")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_kvc_export_command(tmp_path):
    runner = CliRunner()
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["export", str(GOLDEN / "quantized-rans.kvc"), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["bytes"] == out.stat().st_size
    result = runner.invoke(app, ["export", str(GOLDEN / "quantized-rans.kvc"), "-o", str(tmp_path / "no" / "x")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "does not exist" in result.stderr


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def prefilled(request, tiny_tokenizer):
    from fixtures import tiny_model

    return prefill_document(TEXT, tiny_model(request.param, tiny_tokenizer), chunk_size=128)


def test_exported_keys_are_the_keys_kvc_load_uses(tmp_path, prefilled):
    """A pruned, quantized cache with keys stored without RoPE: the export re-rotates them from the frequencies in
    the file alone, and matches what `kvc load` gives the model (rotated with the model's own rotary tables)."""
    path = tmp_path / "q.kvc"
    pruning = score_context(prefilled.lm, prefilled.cache, prefilled.layout, "knorm").keep(0.5)
    write_kvc(prefilled, path, codec="ans", bits=4, pruning=pruning)
    with KvcReader(path) as reader:
        assert reader.geometry.key_rope == "removed" and len(reader.geometry.rope_inv_freq) > 0
    kv = load(path, prefilled.lm)
    assert isinstance(kv.cache, PrunedCache)
    exported = load_file(path)
    for layer_index, layer in enumerate(kv.cache.layers):
        for head, (keys, values) in enumerate(zip(layer.context_keys, layer.context_values, strict=True)):
            prefix = f"layers.{layer_index}.heads.{head}."
            torch.testing.assert_close(torch.from_numpy(exported[prefix + "keys"]), keys[0].float(), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(torch.from_numpy(exported[prefix + "values"]), values[0].float())


def test_rotary_tables_not_of_the_recordable_form_keep_rope_in_the_keys(tmp_path, prefilled, monkeypatch):
    """When the model's rotary tables are not cos/sin(p·f) for its own frequencies f (here f is tampered with), kvc
    cannot record what a reader would need: by default it stores keys with RoPE applied; --pre-rope is refused."""
    model = prefilled.lm.model
    tables = rope_tables(model, torch.arange(50))
    assert inverse_frequencies(model, *tables) is not None
    inv_freq = model.model.rotary_emb.inv_freq
    original = inv_freq.clone()
    try:
        inv_freq.mul_(1.5)
        assert inverse_frequencies(model, *tables) is None
    finally:
        inv_freq.copy_(original)
    monkeypatch.setattr(sys.modules["kvzip_cli.compress.quantize"], "inverse_frequencies", lambda *a: None)
    path = tmp_path / "q.kvc"
    write_kvc(prefilled, path, codec="ans", bits=4)
    with KvcReader(path) as reader:
        assert reader.geometry.key_rope == "applied" and reader.geometry.rope_inv_freq is None
    with pytest.raises(KvcError, match="standard form"):
        write_kvc(prefilled, tmp_path / "r.kvc", codec="ans", bits=4, quant=QuantOptions(pre_rope=True))
