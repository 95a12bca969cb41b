"""Calibrated compression (--target-top1 / --target-kld): the search's logic on synthetic trials, then the whole
path on tiny random models: the target is met on the self-check, the file records it, the budget bounds the search."""

import json

import pytest
import torch
from typer.testing import CliRunner

from kvc_format import KvcReader
from kvzip_cli import KvcError, compress_text, load
from kvzip_cli.attention import kvc_attention_in
from kvzip_cli.cli import app
from kvzip_cli.compress import calibrate as calibrate_module
from kvzip_cli.compress.calibrate import BIT_LADDER, RATIOS, Candidate, Target, Trial, search
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.evaluation.self_check import QUESTION_PROBES, RECONSTRUCTION_PROBES, SelfCheck, SelfCheckResult

from fixtures import TEXT

BITS_PER_ENTRY = {8: 8.5, 4: 4.3, 3: 3.2, 2: 2.2}


def size(c: Candidate) -> int:
    return int(1e6 * c.ratio * (BITS_PER_ENTRY[c.key_bits] + BITS_PER_ENTRY[c.bits]))


def synthetic(needs: dict[tuple[int, int], float]):
    """A trial that passes when the ratio reaches `needs[(key_bits, bits)]`, sized in proportion to ratio × bits."""
    seen = []

    def trial(c: Candidate) -> Trial:
        seen.append(c)
        met = c.ratio >= needs.get((c.key_bits, c.bits), 2.0)
        return Trial(c, size(c), SelfCheckResult(1.0 if met else 0.5, 0.0, 8, 100), met, 0.01)

    return trial, seen


def test_search_finds_the_smallest_passing_file():
    needs = {(8, 8): 0.2, (4, 4): 0.3, (3, 3): 0.5, (3, 2): 0.8}  # 2-bit values never pass
    trial, seen = synthetic(needs)
    trials, exhausted = search(trial, lambda s: False)
    every = [Candidate(r, k, b) for k, b in BIT_LADDER for r in RATIOS]
    passing = [c for c in every if c.ratio >= needs.get((c.key_bits, c.bits), 2.0)]
    smallest = min(passing, key=size)
    best = min((t for t in trials if t.met), key=lambda t: t.file_bytes)
    assert best.candidate == smallest and not exhausted
    assert len(trials) <= 16 < len(every)  # bisection, not the whole grid
    assert len(set(seen)) == len(seen)


def test_search_tries_fewer_bits_before_8_bits():
    """8 bits only wins where 4 bits fail on the whole cache: a budget cut should fall on its trials, not on 3 or 2."""
    trial, _ = synthetic({(8, 8): 0.2, (4, 4): 0.3, (3, 3): 0.4, (3, 2): 0.5, (2, 2): 0.6})
    trials, _ = search(trial, lambda s: False)
    widths = [(t.candidate.key_bits, t.candidate.bits) for t in trials]
    assert (2, 2) in widths and (8, 8) in widths
    assert widths.index((8, 8)) > max(i for i, w in enumerate(widths) if w != (8, 8))


def test_search_stops_when_more_bits_already_failed():
    trial, seen = synthetic({})  # nothing passes anywhere
    trials, _ = search(trial, lambda s: False)
    assert {t.candidate.bits for t in trials} == {4, 8}  # once 4 and 8 bits failed at ratio 1, fewer are not tried
    assert [t.candidate.ratio for t in trials if t.candidate.ratio == 1.0] == [1.0, 1.0]


def test_search_respects_its_budget():
    trial, _ = synthetic({(8, 8): 0.05})
    calls = []

    def out_of_time(next_seconds: float) -> bool:
        calls.append(next_seconds)
        return len(calls) > 3

    trials, exhausted = search(trial, out_of_time)
    assert exhausted and len(trials) == 3
    assert calls[1:] == [pytest.approx(0.01)] * 3  # later checks expect a trial as long as the ones so far


@pytest.mark.parametrize("top1,kld,fragment", [(None, None, "give --target"), (1.5, None, "out of range"),
                                               (0.0, None, "out of range"), (None, -1.0, "out of range")])
def test_bad_targets(top1, kld, fragment):
    with pytest.raises(KvcError, match=fragment):
        Target(top1, kld).check()


@pytest.fixture(scope="module")
def tiny_lm(tiny_tokenizer):
    from fixtures import tiny_model

    return tiny_model("llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_lm):
    path = tmp_path_factory.mktemp("cal") / "cal.kvc"
    result = compress_text(TEXT, path, model=tiny_lm, target=Target(top1=0.9))
    return path, result


def test_self_check_of_the_full_cache_is_perfect_and_of_a_damaged_one_is_not(tiny_lm):
    pre = prefill_document(TEXT, tiny_lm)
    check = SelfCheck(pre)
    assert {p.kind for p in check.probes} == {"reconstruction", "question"}
    assert len(check.probes) == RECONSTRUCTION_PROBES + QUESTION_PROBES
    same = check.run(pre.cache)
    assert same.top1 == 1.0 and same.kld == pytest.approx(0.0, abs=1e-9)
    assert same.positions == sum(len(p.answer) for p in check.probes)
    with torch.inference_mode():
        for layer in pre.cache.layers:
            layer.values.mul_(0.5)  # a cache that no longer matches its document
    damaged = check.run(pre.cache)
    assert damaged.kld > 1e-5 and damaged.top1 < 0.9  # a random tiny model: flat distributions, small kld


def test_target_is_met_and_recorded(calibrated, tiny_lm):
    """The file records the target, the chosen settings and its self-check figures, and those figures are what a
    fresh self-check of the loaded file gives."""
    path, result = calibrated
    with KvcReader(path) as r:
        header = r.header
    cal = header["calibration"]
    assert cal == result.calibration and cal["target"] == {"top1": 0.9}
    assert cal["met"] and cal["self_check"]["top1"] >= 0.9 and cal["trials"] >= 1
    chosen = cal["chosen"]
    assert header["settings"]["bits"] == chosen["bits"]
    assert header["settings"]["kept_ratio"] == pytest.approx(chosen["ratio"], abs=0.01)
    check = SelfCheck(prefill_document(TEXT, tiny_lm))
    with kvc_attention_in(tiny_lm.model):
        again = check.run(load(path, tiny_lm).cache)
    assert again.top1 == pytest.approx(cal["self_check"]["top1"])
    assert again.kld == pytest.approx(cal["self_check"]["kld"], rel=1e-6, abs=1e-9)


def test_inspect_shows_the_calibration(calibrated):
    path, _ = calibrated
    runner = CliRunner()
    text = runner.invoke(app, ["inspect", str(path)]).stdout
    assert "calibrated   target top1 >= 0.9 met" in text
    data = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    assert data["calibration"]["target"] == {"top1": 0.9}


def test_an_unreachable_target_writes_the_lossless_file(tmp_path, tiny_lm, monkeypatch):
    """A budget spent before the first trial: the search stops at once; the whole cache at 8 bits misses the target,
    so the lossless file is written, its self-check recorded, and whether it met the target said."""
    monkeypatch.setattr(calibrate_module, "MIN_BUDGET_SECONDS", 0.0)
    path = tmp_path / "l.kvc"
    result = compress_text(TEXT, path, model=tiny_lm, target=Target(kld=1e-12), budget=1e-9)
    cal = result.calibration
    assert cal["budget_exhausted"] and cal["trials"] == 2
    assert cal["chosen"] == {"ratio": 1.0, "key_bits": 16, "bits": 16}
    assert result.bits == 16 and result.kept_ratio == 1.0
    assert cal["met"] == (cal["self_check"]["kld"] <= 1e-12)


@pytest.mark.parametrize("args,fragment", [
    (["--target-top1", "0.9", "--ratio", "0.3"], "drop --ratio"),
    (["--target-top1", "0.9", "--preset", "small"], "drop --preset"),
    (["--target-top1", "1.5"], "out of range"),
    (["--target-kld", "0"], "out of range"),
    (["--budget", "2"], "give a target too"),
    (["--target-top1", "0.9", "--budget", "0"], "--budget 0"),
])
def test_bad_calibration_options_give_one_line(tmp_path, tiny_folder, short_doc, args, fragment):
    out = tmp_path / "o.kvc"
    result = CliRunner().invoke(app, ["compress", str(short_doc), "-o", str(out), "--model", str(tiny_folder), *args])
    assert result.exit_code == 2, result.output  # every one is a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not out.exists()


def test_compress_with_a_target_from_the_command_line(tmp_path, tiny_folder, short_doc):
    out = tmp_path / "t.kvc"
    runner = CliRunner()
    args = ["compress", str(short_doc), "-o", str(out), "--model", str(tiny_folder), "--target-top1", "0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "calibrated   target top1 >= 0.5 met: self-check top1" in result.stdout
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["calibration"]["met"] and data["calibration"]["self_check"]["top1"] >= 0.5
    assert data["file_bytes"] == out.stat().st_size
