"""SPEC.md is complete: a reader written from it alone (tests/format/spec_reader.py) decodes every golden file exactly
like the reference reader, and its arrays hash as format/golden/expected.json records."""

import hashlib
import json

import numpy as np
import pytest

from kvc_format import KvcReader, load_file

import attacks
from attacks import GOLDEN
from spec_reader import SpecError, SpecLayer, keys_with_rope, read_file

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
NAMES = sorted(p.name for p in GOLDEN.glob("*.kvc"))
def narrow(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 → the stored dtype's bytes (exact for values that came from it); bfloat16 as its uint16 patterns."""
    if dtype == "bfloat16":
        return (array.view(np.uint32) >> 16).astype("<u2")
    return array.astype({"float32": "<f4", "float16": "<f2"}[dtype])


def widen(stored) -> np.ndarray:
    """A reference StoredArray as float32 (bfloat16 data is uint16 bit patterns)."""
    if stored.dtype == "bfloat16":
        return (stored.data.astype(np.uint32) << 16).view(np.float32)
    return stored.data.astype(np.float32)


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def test_every_golden_file_is_covered():
    assert sorted(EXPECTED) == NAMES
    codecs = {s["codec"] for name in NAMES for section in read_file(GOLDEN / name).sections
              for s in section["streams"]}
    assert codecs == {"raw", "zstd", "rans"}


@pytest.mark.parametrize("name", NAMES)
def test_spec_reader_matches_reference(name):
    ours = read_file(GOLDEN / name)
    with KvcReader(GOLDEN / name) as r:
        assert tuple(r.version) == ours.version
        reference = list(r.read_layers())
        biases = [r.read_bias(layer) for layer in range(len(reference))]
    assert len(ours.layers) == len(reference)
    for mine, ref, bias in zip(ours.layers, reference, biases, strict=True):
        assert (mine.bias is None) == (bias is None)
        if bias is not None:
            assert mine.bias.dtype == np.float32 and np.array_equal(mine.bias, bias)
        for a, b in ((mine.keys, ref.keys), (mine.values, ref.values)):
            assert a.dtype == np.float32 and a.shape == b.data.shape
            assert np.array_equal(a, widen(b))
        if ref.positions is None:
            assert mine.positions is None
        else:
            assert len(mine.positions) == len(ref.positions)
            for p, q in zip(mine.positions, ref.positions, strict=True):
                assert np.array_equal(p, q)


@pytest.mark.parametrize("name", NAMES)
def test_spec_reader_matches_expected_digests(name):
    ours = read_file(GOLDEN / name)
    expected = EXPECTED[name]
    assert list(ours.version) == expected["version"]
    quantized = ours.header["cache"]["layout"] == "quantized"
    layer_sections = [s for s in ours.sections if s["type"] != "kv_layer_bias"]
    for mine, section, want in zip(ours.layers, layer_sections, expected["layers"], strict=True):
        dtypes = {s["name"]: s["dtype"] for s in section["streams"]}
        # the reference hashes dequantized float32 for quantized layers, the stored dtype's bytes otherwise
        keys = mine.keys if quantized else narrow(mine.keys, dtypes["keys"])
        values = mine.values if quantized else narrow(mine.values, dtypes["values"])
        assert sha(keys) == want["keys"]
        assert sha(values) == want["values"]
        if mine.positions is not None:
            assert sha(np.concatenate(mine.positions).astype("<i8")) == want["positions"]
        assert (mine.bias is None) == ("bias" not in want)
        if mine.bias is not None:
            assert sha(mine.bias) == want["bias"]


def test_spec_reader_refuses_a_corrupt_section(tmp_path):
    data = bytearray((GOLDEN / "quantized-rans.kvc").read_bytes())
    first = read_file(GOLDEN / "quantized-rans.kvc").sections[0]
    data[first["offset"] + first["length"] // 2] ^= 1
    (tmp_path / "bad.kvc").write_bytes(bytes(data))
    with pytest.raises(SpecError, match="section CRC-32"):
        read_file(tmp_path / "bad.kvc")


@pytest.mark.parametrize("build", [attacks.windows_one_short, attacks.window_of_one, attacks.window_as_bool,
                                   attacks.window_as_float, attacks.dense_window_with_full_shapes,
                                   attacks.pruned_position_before_its_window, attacks.section_kept_beyond_its_window,
                                   attacks.header_kept_beyond_the_windows], ids=lambda build: build.__name__)
def test_spec_reader_refuses_bad_windows(tmp_path, build):
    """§3, §4.1 and §4.2 alone are enough to refuse the crafted sliding-window files the reference reader refuses."""
    (tmp_path / "bad.kvc").write_bytes(build())
    with pytest.raises(SpecError):
        read_file(tmp_path / "bad.kvc")


def test_spec_reader_restores_rope_like_the_reference():
    """Keys stored without RoPE, re-rotated from the recorded frequencies, as SPEC.md §4.3 defines it."""
    name = "quantized-rope-channel.kvc"
    ours = read_file(GOLDEN / name)
    exported = load_file(GOLDEN / name)
    for layer, mine in enumerate(ours.layers):
        keys = keys_with_rope(mine, ours.header["cache"])
        rows = np.cumsum([0] + [len(p) for p in mine.positions])
        for head in range(len(mine.positions)):
            reference = exported[f"layers.{layer}.heads.{head}.keys"]
            np.testing.assert_allclose(keys[rows[head] : rows[head + 1]], reference, rtol=1e-6, atol=1e-6)
            assert not np.allclose(reference, mine.keys[rows[head] : rows[head + 1]])  # RoPE did change them


def test_spec_worked_rope_example():
    layer = SpecLayer(np.array([[1.0, 0.0]], np.float32), None, [np.array([2])])
    key = keys_with_rope(layer, {"key_rope": "removed", "rope_inv_freq": [1.0]})
    np.testing.assert_allclose(key, [[-0.41615, 0.90930]], atol=1e-5)
