"""Quantization on the embedded SmolLM2-135M-Instruct: fidelity per bit width, the entropy coder against zstd."""

import pytest

from kvzip_cli import load_model
from kvzip_cli.bench.runner import run_bench
from kvzip_cli.bench.sweep import Setting
from kvzip_cli.compress.presets import PRESETS

from fixtures import DOCS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows():
    smol = load_model("smollm2", device="cpu")
    text = DOCS.joinpath("gpl-2.txt").read_text()[:5000]
    sweep = [Setting(f"kvc {b}-bit {c}", "q", "kvc", 1.0, b, c) for b, c in ((4, "ans"), (4, "zstd"), (2, "ans"))]
    p = PRESETS["balanced"]
    sweep.append(Setting("balanced", "p", "kvc", p.ratio, p.bits, p.codec, scorer=p.scorer, key_bits=p.key_bits))
    return {r["setting"]: r for r in run_bench(text, "gpl-2 excerpt", smol, sweep, [], new_tokens=8).rows}


def test_four_bits_is_near_lossless_under_four_bits_per_element(rows):
    """On the corpus: kld 0.0053 at 3.62 bits per element (studies/bench-corpus/results/quantization/); this
    excerpt is shorter, so the bound leaves room."""
    row = rows["kvc 4-bit ans"]
    assert row["kld"] < 0.02 and row["top1"] > 0.9
    assert row["bits_per_element"] < 4.0


def test_entropy_coder_beats_zstd_on_the_same_symbols(rows):
    ans, zstd = rows["kvc 4-bit ans"], rows["kvc 4-bit zstd"]
    assert ans["kld"] == pytest.approx(zstd["kld"])
    assert ans["file_bytes"] < 0.95 * zstd["file_bytes"]


def test_fewer_bits_cost_fidelity_and_save_bytes(rows):
    assert rows["kvc 2-bit ans"]["kld"] > rows["kvc 4-bit ans"]["kld"]
    assert rows["kvc 2-bit ans"]["file_bytes"] < 0.7 * rows["kvc 4-bit ans"]["file_bytes"]


def test_balanced_preset_is_small_and_still_close(rows):
    row = rows["balanced"]
    assert row["compression"] > 14 and row["kld"] < 0.1 and row["error"] is None
