"""`rewrite_header`: a file written again with a new header, every section byte for byte."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from kvc_format import ChecksumError, KvcReader, rewrite_header

GOLDEN = Path(__file__).resolve().parents[2] / "format" / "golden"


@pytest.mark.parametrize("name", ["pruned-bias.kvc", "quantized-rans.kvc", "dense-windows-zstd.kvc"])
def test_a_rewritten_file_has_the_new_header_and_the_same_layers(tmp_path, name):
    source = GOLDEN / name
    with KvcReader(source) as reader:
        header = {**reader.header, "estimate": {"top1": 0.9, "kld": 0.01}}
        before = [reader.read_layer(i) for i in range(reader.geometry.layers)]
    out = tmp_path / name
    rewrite_header(source, out, header)
    with KvcReader(out) as reader:
        reader.verify()
        assert reader.header == header
        for i, layer in enumerate(before):
            for old, new in zip(layer, reader.read_layer(i), strict=True):
                if old is None:
                    assert new is None
                else:
                    pairs = zip(old if isinstance(old, tuple) else (old,), new if isinstance(new, tuple) else (new,),
                                strict=True)
                    for a, b in pairs:
                        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_rewrite_may_replace_its_own_source(tmp_path):
    path = tmp_path / "f.kvc"
    shutil.copy(GOLDEN / "quantized-rans.kvc", path)
    with KvcReader(path) as reader:
        header = {**reader.header, "estimate": None}
    rewrite_header(path, path, header)
    with KvcReader(path) as reader:
        reader.verify()
        assert reader.header["estimate"] is None


def test_a_corrupted_section_is_not_carried_on_and_nothing_is_written(tmp_path):
    source = tmp_path / "f.kvc"
    data = bytearray((GOLDEN / "dense-zstd.kvc").read_bytes())
    with KvcReader(GOLDEN / "dense-zstd.kvc") as reader:
        header, first = reader.header, reader.sections[0]
    data[first.offset + first.length // 2] ^= 0xFF
    source.write_bytes(bytes(data))
    out = tmp_path / "out.kvc"
    with pytest.raises(ChecksumError):
        rewrite_header(source, out, header)
    assert list(tmp_path.iterdir()) == [source]
