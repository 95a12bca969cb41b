"""Golden files (format/golden/): files written by earlier format versions keep decoding to the same arrays."""

import hashlib
import json

import numpy as np
import pytest

from kvc_format import KvcReader

from attacks import GOLDEN

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


def test_every_golden_file_is_recorded():
    assert sorted(EXPECTED) == sorted(p.name for p in GOLDEN.glob("*.kvc"))
    codecs, windowed = set(), set()
    for name in EXPECTED:
        with KvcReader(GOLDEN / name) as r:
            codecs |= {s.codec for section in r.sections for s in section.streams}
            g = r.geometry
            if any(g.held(layer) < g.tokens for layer in range(g.layers)):
                windowed.add(g.layout)
    assert codecs == {"raw", "zstd", "rans"}  # every codec has a golden file
    assert windowed == {"dense", "quantized"}  # 1.6: sliding-window layers holding only their last positions


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_golden_file_decodes_as_recorded(name):
    expected = EXPECTED[name]
    with KvcReader(GOLDEN / name) as r:
        r.verify()
        assert list(r.version) == expected["version"]
        for layer, (stored, want) in enumerate(zip(r.read_layers(), expected["layers"], strict=True)):
            bias = r.read_bias(layer)
            assert (bias is None) == ("bias" not in want)
            if bias is not None:
                assert hashlib.sha256(bias.tobytes()).hexdigest() == want["bias"]
            assert hashlib.sha256(stored.keys.data.tobytes()).hexdigest() == want["keys"]
            assert hashlib.sha256(stored.values.data.tobytes()).hexdigest() == want["values"]
            if stored.positions is not None:
                positions = np.concatenate(stored.positions).astype("<i8").tobytes()
                assert hashlib.sha256(positions).hexdigest() == want["positions"]
