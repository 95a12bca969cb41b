"""`allocation="position"`: one set of kept positions shared by every layer and KV head (the layout llama.cpp's
one-cell-per-position cache can hold), on synthetic scores and through a file on a tiny random model."""

import pytest
import torch

from kvc_format import KvcReader
from kvzip_cli import compress_text
from kvzip_cli.bench.sweep import build_sweep
from kvzip_cli.errors import KvcError
from kvzip_cli.prune.budget import allocate

from fixtures import TEXT

LAYERS, HEADS, TOKENS = 3, 2, 100


@pytest.fixture
def protected() -> torch.Tensor:
    """(TOKENS,) bool: 4 sinks and a 6-token template tail, 10% of the positions."""
    mask = torch.zeros(TOKENS, dtype=torch.bool)
    mask[:4] = mask[-6:] = True
    return mask


@pytest.fixture
def scores(protected) -> torch.Tensor:
    """(LAYERS, KV_HEADS, TOKENS) random scores on very different per-layer scales; protected positions lowest."""
    s = torch.rand(LAYERS, HEADS, TOKENS, generator=torch.Generator().manual_seed(0))
    s *= torch.tensor([1.0, 100.0, 0.01])[:, None, None]
    s[..., protected] = -1.0
    return s


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.33, 0.15, 0.1])
def test_one_set_of_positions_exactly_counted_with_the_protected(scores, protected, ratio):
    keep = allocate(scores, ratio, "position", protected)
    assert keep.shape == (LAYERS, HEADS, TOKENS) and keep.dtype == torch.bool
    assert (keep == keep[0, 0]).all()  # every (layer, head) row is the same
    assert keep[0, 0].sum() == round(ratio * TOKENS)
    assert keep.sum() == round(ratio * TOKENS) * LAYERS * HEADS
    assert keep[..., protected].all()  # kept although they score lowest


def test_the_floor_is_counted_in_positions(scores, protected):
    only_protected = allocate(scores, 0.1, "position", protected)[0, 0]
    assert only_protected.tolist() == protected.tolist()
    with pytest.raises(KvcError, match=r"use a ratio of at least 0\.1$"):
        allocate(scores, 0.09, "position", protected)


def test_positions_every_head_rates_high_win_over_one_heads_outlier(scores, protected):
    scores[..., 40:50] = 200.0  # first in every (layer, head)
    scores[..., 60] = -0.5  # last among the document's entries in every (layer, head) but one,
    scores[0, 0, 60] = 1e6  # where it is first by far (a mean of raw scores would keep it)
    keep = allocate(scores, 0.2, "position", protected)[0, 0]
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 2, 3, *range(40, 50), *range(94, 100)]


def test_pooling_depends_on_the_order_of_the_scores_only(scores, protected):
    for ratio in (0.5, 0.3):
        keep = allocate(scores, ratio, "position", protected)
        assert torch.equal(allocate(1024 * scores.pow(3), ratio, "position", protected), keep)  # exact in float32


def test_file_stores_the_same_positions_in_every_head(tmp_path, tiny):
    """The kept count and ratio recorded in the result and the header are the positions kept × layers × heads."""
    made = compress_text(TEXT, tmp_path / "p.kvc", preset="lossless", model=tiny, scorer="knorm", ratio=0.3,
                         allocation="position")
    with KvcReader(made.output) as reader:
        g, header = reader.geometry, reader.header
        positions = [p for i in range(g.layers) for p in reader.read_layer(i).positions]
    assert len(positions) == g.layers * g.kv_heads
    assert all((p == positions[0]).all() for p in positions)
    kept = round(0.3 * g.tokens)
    assert len(positions[0]) == kept
    assert header["cache"]["kept"] == kept * g.layers * g.kv_heads
    assert header["settings"]["allocation"] == "position" and made.allocation == "position"
    assert made.kept_ratio == header["settings"]["kept_ratio"] == kept / g.tokens


def test_the_bench_sweeps_it():
    sweep = build_sweep(ratios=(0.5, 0.3), allocations=("global", "position"))
    assert [(s.label, s.allocation) for s in sweep if s.allocation] == [
        ("kvc kvzip global 0.5", "global"), ("kvc kvzip global 0.3", "global"),
        ("kvc kvzip position 0.5", "position"), ("kvc kvzip position 0.3", "position")]
