"""kvc bench: metrics on cases with known answers, probes and needles, the harness end to end on a tiny model."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from kvzip_cli.bench import runner as bench_runner
from kvzip_cli.bench.sweep import REFITS, build_sweep
from kvzip_cli.cli import app
from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.compress.presets import PRESETS
from kvzip_cli.errors import KvcError
from kvzip_cli.evaluation.evaluator import CacheUnderTest, Evaluator
from kvzip_cli.evaluation.metrics import FidelityTotals, agreement, needle_found
from kvzip_cli.evaluation.probes import NEEDLE_DEPTHS, builtin_probes, plant_needles, read_probes

from fixtures import DOCS, tiny_model

TEXT = DOCS.joinpath("apache-2.0.txt").read_text()[:2500]
runner = CliRunner()


def logprobs(rows):
    return torch.log_softmax(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_identical_distributions_are_perfect():
    ref = logprobs([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5]])
    totals = FidelityTotals()
    totals.add_positions(ref, ref.clone(), [0, 1])
    totals.add_agreement([0, 1], [0, 1])
    assert totals.summary() == {"kld": 0.0, "top1": 1.0, "delta_nll": 0.0, "agreement": 1.0, "ends": None,
                                "repetition": 0.0}


def test_known_kl_top1_and_nll():
    p = [0.75, 0.25]
    q = [0.25, 0.75]
    ref, got = torch.tensor([p]).log(), torch.tensor([q]).log()
    totals = FidelityTotals()
    totals.add_positions(ref, got, [0])
    summary = totals.summary()
    assert summary["kld"] == pytest.approx(0.75 * math.log(3) + 0.25 * math.log(1 / 3))
    assert summary["top1"] == 0.0
    assert summary["delta_nll"] == pytest.approx(-math.log(0.25) + math.log(0.75))


def test_agreement_is_common_prefix_over_reference_length():
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert agreement([1, 2], [1, 2, 3]) == 1.0
    assert agreement([5, 6], [7]) == 0.0


def test_needle_match_ignores_grouping():
    assert needle_found("The code is 48,213.", "48213")
    assert not needle_found("The code is 48214.", "48213")


def test_needles_are_planted_deterministically():
    planted, needles = plant_needles(TEXT)
    again, _ = plant_needles(TEXT)
    assert planted == again and len(needles) == len(NEEDLE_DEPTHS)
    for probe in needles:
        assert probe.expect in planted and probe.expect not in TEXT
    restored = planted
    for probe in needles:
        name = probe.question.split("for the ")[1].split(" folder")[0]
        restored = restored.replace(f"The secret code for the {name} folder is {probe.expect}.\n\n", "")
    assert restored == TEXT


def test_builtin_probes_quote_the_document():
    probes = builtin_probes(TEXT)
    recon = [p for p in probes if p.kind == "reconstruction"]
    assert len(recon) == 4 and {p.kind for p in probes} >= {"summary", "topic"}
    for probe in recon:
        snippet = probe.question.split("«")[1].rstrip("»")
        assert " ".join(snippet.split()) in " ".join(TEXT.split())


def test_user_probes(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\n\nWho wins?\n  What else?  \n")
    assert [p.question for p in read_probes(path)] == ["Who wins?", "What else?"]
    path.write_text("# nothing\n")
    with pytest.raises(KvcError, match="no questions"):
        read_probes(path)
    with pytest.raises(KvcError, match="does not exist"):
        read_probes(tmp_path / "missing.txt")


@pytest.fixture(params=["qwen2", "llama"])
def evaluated(request, tiny_tokenizer):
    # Larger initial weights give peaked attention, so damage to the cache shows; at the default 0.02 a random
    # model attends almost uniformly and barely notices.
    tiny = tiny_model(request.param, tiny_tokenizer, initializer_range=0.2)
    planted, needles = plant_needles(TEXT)
    pre = prefill_document(planted, tiny)
    evaluator = Evaluator(tiny, pre.layout, builtin_probes(TEXT)[:3], needles[:1], new_tokens=8)
    reference = evaluator.reference(CacheUnderTest(pre.cache, pre.tokens))
    return pre, evaluator, reference


def test_full_cache_against_itself_is_perfect(evaluated):
    pre, evaluator, reference = evaluated
    metrics = evaluator.evaluate(CacheUnderTest(pre.cache, pre.tokens), reference)
    assert metrics["kld"] == pytest.approx(0.0, abs=1e-9)
    assert metrics["top1"] == 1.0 and metrics["agreement"] == 1.0
    assert metrics["delta_nll"] == pytest.approx(0.0, abs=1e-9)
    habits = evaluator.habits(reference)  # the same answers: they end and repeat exactly as the reference's
    assert metrics["repetition"] == habits["repetition_full"]
    assert metrics["ends"] == (1.0 if habits["ends_full"] > 0 else None)
    assert pre.cache.get_seq_length() == pre.tokens  # evaluation leaves the cache as it found it


@pytest.mark.parametrize("damage", ["shuffle", "zero"])
def test_damaged_cache_scores_clearly_worse(evaluated, damage):
    """Attention is invariant to reordering whole (key, value) pairs, so shuffling pairs each value with a
    different key; zeroing wipes the values."""
    pre, evaluator, reference = evaluated
    for layer in pre.cache.layers:
        if damage == "shuffle":
            order = torch.randperm(pre.tokens, generator=torch.Generator().manual_seed(0))
            layer.values = layer.values[:, :, order]
        else:
            layer.values = torch.zeros_like(layer.values)
    metrics = evaluator.evaluate(CacheUnderTest(pre.cache, pre.tokens), reference)
    assert metrics["kld"] > 1e-3 and metrics["delta_nll"] > 0
    assert metrics["top1"] < 1.0


def bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_bench_end_to_end_on_tiny_model(tmp_path, tiny_folder, short_doc):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "out.png"
    result = bench(short_doc, "--model", tiny_folder, "--bits", "16,32", "--new-tokens", "6", "--plot", plot,
                   "--scorers", "", "--presets", "", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["setting"]: row for row in data["rows"]}
    assert set(rows) == {"kvc 16-bit raw", "kvc 16-bit zstd", "kvc 32-bit raw", "kvc 32-bit zstd", "fp16 safetensors",
                         "fp16 safetensors + zstd"}
    exact = rows["kvc 32-bit zstd"]
    assert exact["kld"] == 0.0 and exact["top1"] == 1.0 and exact["agreement"] == 1.0
    assert rows["kvc 16-bit raw"]["kld"] < 1e-3
    assert rows["kvc 16-bit zstd"]["file_bytes"] < rows["kvc 16-bit raw"]["file_bytes"]
    assert rows["fp16 safetensors"]["compression"] == pytest.approx(1.0, rel=0.01)
    assert rows["kvc 32-bit raw"]["bits_per_element"] == pytest.approx(32, rel=0.01)
    for key in ("kld", "top1", "delta_nll", "agreement", "needle", "needle_full", "file_bytes", "compression",
                "bits_per_element", "compress_seconds", "prefill_seconds", "load_seconds"):
        assert key in exact
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["kind"] for p in data["probes"]].count("reconstruction") == 4


def test_bench_quantized_rows_and_presets(tiny_folder, short_doc):
    """Quantized bit widths: the full cache with the entropy coder and with zstd on the same symbols, pruned rows
    at each width, and every preset."""
    result = bench(short_doc, "--model", tiny_folder, "--bits", "4,2", "--ratios", "0.5", "--new-tokens", "4",
                   "--json")
    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.stdout)["rows"]}
    for bits in (4, 2):
        ans, zstd = rows[f"kvc {bits}-bit ans"], rows[f"kvc {bits}-bit zstd"]
        assert ans["kld"] == pytest.approx(zstd["kld"])  # same symbols, another coder
        assert ans["error"] is None and ans["bits_per_element"] < 16
        assert rows[f"kvc kvzip 0.5 {bits}-bit"]["codec"] == "ans"
    assert rows["kvc 2-bit ans"]["file_bytes"] < rows["kvc 4-bit ans"]["file_bytes"]
    assert rows["kvc 4-bit ans"]["kld"] <= rows["kvc 2-bit ans"]["kld"]
    presets = {name: rows[f"preset {name}"] for name in ("lossless", "balanced", "small")}
    assert presets["lossless"]["kld"] < 1e-3 and presets["lossless"]["bits_per_element"] == pytest.approx(16, rel=0.3)
    assert presets["small"]["file_bytes"] < presets["balanced"]["file_bytes"] < presets["lossless"]["file_bytes"]
    assert presets["balanced"]["kept_ratio"] == pytest.approx(PRESETS["balanced"].ratio, abs=0.01)


def test_bench_pruned_rows(tiny_folder, short_doc):
    # Not refit: on this random-weight model the refit with its logit bias gives back the full cache's outputs almost
    # exactly (kld about 1e-8), which would hide what the scorers change.
    result = bench(short_doc, "--model", tiny_folder, "--scorers", "kvzip,random", "--allocations", "global,head",
                   "--ratios", "0.5,0.25", "--new-tokens", "4", "--refit", "off", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["setting"]: row for row in json.loads(result.stdout)["rows"]}
    for scorer in ("kvzip", "random"):
        for allocation in ("global", "head"):
            for ratio in (0.5, 0.25):
                row = rows[f"kvc {scorer} {allocation} no-refit {ratio:g}"]
                assert row["error"] is None and row["kind"] == "kvc"
                assert row["kept_ratio"] == pytest.approx(ratio, abs=1e-3)
                assert row["memory_ratio"] == pytest.approx(ratio, abs=0.01)  # a loaded pruned cache holds only kept
                assert row["kld"] > 0 and row["score_seconds"] >= 0
                assert row["compression"] > 1 / ratio  # fewer entries, and zstd on top
    assert rows["kvc kvzip global no-refit 0.5"]["kld"] != rows["kvc random global no-refit 0.5"]["kld"]


def test_bench_table_output(tiny_folder, short_doc):
    result = bench(short_doc, "--model", tiny_folder, "--new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "kvc 16-bit zstd" in result.stdout and "agree@32" in result.stdout


@pytest.fixture(scope="module")
def clustered_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny model whose queries share a direction, as a trained model's do. KVzipPress masks keys with a fake key
    that needs all queries in one half-space, which random-weight queries are not."""
    folder = tmp_path_factory.mktemp("clustered")
    lm = tiny_model("qwen2", tiny_tokenizer)
    with torch.no_grad():
        for layer in lm.model.model.layers:
            layer.self_attn.q_proj.bias.fill_(1.0)
    lm.model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_bench_with_kvpress_peers(clustered_folder, short_doc):
    pytest.importorskip("kvpress")
    result = bench(short_doc, "--model", clustered_folder, "--peers", "--ratios", "0.5", "--new-tokens", "4",
                   "--json")
    assert result.exit_code == 0, result.output
    peers = [row for row in json.loads(result.stdout)["rows"] if row["kind"] == "peer"]
    assert {row["setting"] for row in peers} == {"kvpress KVzipPress 0.5", "kvpress CompactorPress 0.5",
                                                 "kvpress SnapKVPress 0.5", "kvpress KnormPress 0.5"}
    for row in peers:
        assert row["error"] is None, row["error"]
        assert row["kept_ratio"] == pytest.approx(0.5, abs=0.02)
        assert row["kld"] > 0 and row["compression"] == pytest.approx(1 / row["kept_ratio"])


def test_peers_without_kvpress_is_one_line(monkeypatch, short_doc):
    import kvzip_cli.bench.peers as peers

    monkeypatch.setattr(peers, "kvpress_available", lambda: False)
    result = bench(short_doc, "--peers")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: --peers needs NVIDIA kvpress: pip install 'kvc[bench]' (or pip install kvpress)"
    ]


@pytest.mark.parametrize(
    "args,fragment",
    [(["--ratios", "a,b"], "comma-separated"), (["--ratios", "0"], "out of range"), (["--bits", "5"], "not available"),
     (["--presets", "tiny"], "not one of"),
     (["--scorers", "kvzap"], "not available"), (["--allocations", "even"], "not one of"),
     (["--probes", "/no/such/file"], "does not exist")],
)
def test_bench_bad_options(tiny_folder, short_doc, args, fragment):
    result = bench(short_doc, "--model", tiny_folder, *args)
    assert result.exit_code == (1 if args[0] == "--probes" else 2)  # a missing file, or a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_peer_answers_match_kvpress_own_pipeline(clustered_folder):
    """The harness applies a press exactly as kvpress's pipeline does: same greedy answers."""
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache

    from kvzip_cli.bench.peers import clear_masks, run_press
    from kvzip_cli.models.loading import load_model

    lm = load_model(str(clustered_folder), device="cpu")
    planted, needles = plant_needles(TEXT)
    probes = builtin_probes(TEXT)[:2]
    pre = prefill_document(planted, lm)
    evaluator = Evaluator(lm, pre.layout, probes, needles, new_tokens=8)
    pipeline = kvpress.KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    for name in ("KVzipPress", "SnapKVPress"):
        with torch.inference_mode():
            cache, _, _ = run_press(name, 0.5, lm, pre.layout.prefix_ids)
            ours = [lm.tokenizer.decode(evaluator.greedy(CacheUnderTest(cache, pre.tokens), evaluator.questions[p], 8),
                                        skip_special_tokens=True) for p in probes]
            clear_masks(lm)
            inputs = {"context_ids": torch.tensor([pre.layout.prefix_ids]),
                      "questions_ids": [torch.tensor([evaluator.questions[p]]) for p in probes]}
            theirs = pipeline._forward(inputs, max_new_tokens=8, press=getattr(kvpress, name)(compression_ratio=0.5),
                                       cache=DynamicCache())
            clear_masks(lm)
        assert ours == theirs, name


def test_bench_lengths_on_tiny_model(tmp_path, tiny_folder, short_doc):
    """--lengths: one row per length with both clocks, the first tokens of both paths, a plot; lengths past the
    model's context are skipped with a note, a short document is repeated with a note."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "ttft.png"
    result = bench(short_doc, "--model", tiny_folder, "--lengths", "64,200,100000", "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["preset"] == "balanced" and len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["prefill_ttft"] > 0 and row["kvc_ttft"] == pytest.approx(row["load_seconds"]
                                                                            + row["question_seconds"], rel=0.5)
        assert row["speedup"] == pytest.approx(row["prefill_ttft"] / row["kvc_ttft"])
        assert row["file_bytes"] > 0 and row["load_fp16_mb_per_s"] > 0
    assert data["rows"][0]["tokens"] < data["rows"][1]["tokens"]
    assert any("100000 tokens skipped" in n for n in data["notes"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_lengths_first_token_matches_prefill(tiny_folder, short_doc):
    """With every entry kept in float32 the .kvc path is exact: both paths pick the same first token."""
    result = bench(short_doc, "--model", tiny_folder, "--lengths", "120", "--presets", "lossless", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["same_first_token"] is True


@pytest.mark.parametrize(("lengths", "fragment"), [("abc", "not a token count"), ("4", "too short"),
                                                   ("100000", "no length fits")])
def test_bench_lengths_bad_options(tiny_folder, short_doc, lengths, fragment):
    result = bench(short_doc, "--model", tiny_folder, "--lengths", lengths)
    assert result.exit_code == (1 if fragment == "no length fits" else 2)  # the model's limit, or a usage error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def synthetic_result(peers=False) -> dict:
    def row(setting, family, kind, ratio, bits, codec, compression, kld, top1, scorer=None):
        return {"setting": setting, "family": family, "kind": kind, "ratio": ratio, "bits": bits, "codec": codec,
                "scorer": scorer, "compression": compression, "kld": kld, "top1": top1}

    rows = [row("kvc 16-bit raw", "kvc lossless", "kvc", 1.0, 16, "raw", 1.0, 1e-8, 1.0),
            row("kvc 16-bit zstd", "kvc lossless", "kvc", 1.0, 16, "zstd", 1.1, 1e-8, 1.0),
            row("kvc 3-bit ans", "kvc quantized", "kvc", 1.0, 3, "ans", 5.0, 0.02, 0.95),
            row("kvc 3-bit zstd", "kvc quantized", "kvc", 1.0, 3, "zstd", 4.6, 0.02, 0.95),
            row("kvc 2-bit zstd", "kvc quantized", "kvc", 1.0, 2, "zstd", 6.0, 0.1, 0.9),
            *(row(f"kvc kvzip {r:g}", "kvc kvzip", "kvc", r, 16, "zstd", 1.1 / r, 0.05 / r, 1 - r / 2, "kvzip")
              for r in (0.5, 0.3, 0.1)),
            row("preset lossless", "kvc presets", "kvc", 1.0, 16, "zstd", 1.1, 1e-8, 1.0, "kvzip"),
            row("preset balanced", "kvc presets", "kvc", 0.3, 3, "ans", 18.0, 0.3, 0.85, "kvzip"),
            row("preset small", "kvc presets", "kvc", 0.12, 2, "ans", 60.0, 0.9, 0.7, "kvzip"),
            row("fp16 safetensors", "size baselines", "size", 1.0, None, "safetensors", 1.0, None, None)]
    if peers:
        rows += [row(f"kvpress SnapKVPress {r:g}", "kvpress SnapKVPress", "peer", r, None, None, 1 / r, 0.2 / r,
                     1 - r) for r in (0.5, 0.3)]
        rows.append(row("kvpress KVzipPress 0.5", "kvpress KVzipPress", "peer", 0.5, None, None, 2.0, None, None))
    return {"document": "doc.txt", "model": "tiny", "rows": rows}


def test_plot_series_join_only_one_setting_varied():
    from kvzip_cli.bench.report import plot_series

    series = {s.name: s for s in plot_series([synthetic_result()])}
    assert set(series) == {"kvc full cache, raw", "kvc full cache, zstd", "kvc full cache, ans", "kvc kvzip",
                           "kvc presets"}  # no size baselines (no fidelity), no kvpress
    kvzip = series["kvc kvzip"]
    assert kvzip.joined and [p.label for p in kvzip.points] == ["0.5", "0.3", "0.1"]  # by compression
    presets = series["kvc presets"]
    assert not presets.joined and [p.label for p in presets.points] == ["lossless", "balanced", "small"]
    assert [p.label for p in series["kvc full cache, zstd"].points] == ["16-bit", "3-bit", "2-bit"]
    assert series["kvc full cache, zstd"].joined and not series["kvc full cache, raw"].joined  # a lone point
    assert not any(s.peer for s in series.values())

    two = plot_series([synthetic_result(), synthetic_result()])  # over documents: the same points, averaged
    assert [len(s.points) for s in two] == [len(s.points) for s in series.values()]


def test_presets_without_refit_are_points_too():
    from kvzip_cli.bench.report import plot_series

    result = synthetic_result()
    result["rows"] += [{**r, "setting": r["setting"] + " no-refit", "family": "kvc presets no-refit"}
                       for r in result["rows"] if r["family"] == "kvc presets"]
    plain = {s.name: s for s in plot_series([result])}["kvc presets no-refit"]
    assert not plain.joined and [p.label for p in plain.points] == ["lossless", "balanced", "small"]


def test_plot_labels_points_and_names_kvpress_only_when_it_ran(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.lines import Line2D

    from kvzip_cli.bench.report import figure, plot, save_figure

    plt, fig = figure([synthetic_result()])
    ax_kld, ax_top1 = fig.axes
    texts = {t.get_text() for t in ax_kld.texts}
    assert {"0.5", "0.3", "0.1", "balanced", "small", "lossless", "16-bit", "3-bit"} <= texts
    assert "kvpress" not in ax_kld.get_xlabel() and "kvpress" not in fig.texts[0].get_text()
    legend = [t.get_text() for t in ax_top1.get_legend().get_texts()]
    assert not any("kvpress" in t for t in legend) and "kvc presets" in legend
    lines = {line.get_label(): line for line in ax_top1.get_lines() if isinstance(line, Line2D)}
    assert lines["kvc presets"].get_linestyle() == "None"  # presets are points, not a curve
    assert lines["kvc kvzip"].get_linestyle() == "-" and len(lines["kvc kvzip"].get_xdata()) == 3
    save_figure(plt, fig, tmp_path / "no-peers.png")

    plt, fig = figure([synthetic_result(peers=True)])
    ax_kld, ax_top1 = fig.axes
    assert "kvpress" in ax_kld.get_xlabel()
    lines = {line.get_label(): line for line in ax_top1.get_lines()}
    assert lines["kvpress SnapKVPress"].get_linestyle() == "--"
    assert "kvpress KVzipPress" not in lines  # its only row failed: nothing to draw
    plt.close(fig)

    out = tmp_path / "bench.png"
    plot([synthetic_result(peers=True)], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeated_ngrams_count_only_earlier_occurrences():
    from kvzip_cli.evaluation.metrics import repeated_ngrams

    assert repeated_ngrams([1, 2, 3, 4, 5, 6]) == (0, 3)
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == (5, 9)  # the loop repeats after 4 tokens
    assert repeated_ngrams([7, 7, 7]) == (0, 0)  # shorter than one 4-gram
    assert repeated_ngrams([7, 7, 7, 7, 7]) == (1, 2)


def test_answers_end_where_the_reference_ends():
    """`ends` counts only probes whose reference ended; a setting that runs on to the limit lowers it, and its loop
    raises `repetition`."""
    stop = {0}
    totals = FidelityTotals()
    totals.add_answer([5, 6, 0], [5, 6, 0], stop)  # ends like the reference
    totals.add_answer([5, 6, 0], [5, 6, 5, 6, 5, 6, 5, 6], stop)  # runs on, repeating itself
    totals.add_answer([8, 9, 8, 9], [8, 9, 8, 9], stop)  # the reference did not end: not counted in `ends`
    summary = totals.summary()
    assert summary["ends"] == 0.5
    assert summary["repetition"] == pytest.approx(3 / 6)  # the runaway's 5 4-grams hold 3 repeats, the others none
    from kvzip_cli.evaluation.metrics import answer_habits

    assert answer_habits([[5, 6, 0], [8, 9, 8, 9]], stop) == {"ends_full": 0.5, "repetition_full": 0.0}


def test_sweep_measures_every_refit_side_by_side():
    sweep = build_sweep(ratios=(0.3,), presets=("balanced",), refits=REFITS["all"])
    pruned = {s.label: s.refit for s in sweep if s.kind == "kvc" and s.ratio < 1}
    assert pruned == {"kvc kvzip 0.3": "bias", "kvc kvzip values-refit 0.3": "values", "kvc kvzip no-refit 0.3": "off",
                      "preset balanced": "bias", "preset balanced values-refit": "values",
                      "preset balanced no-refit": "off"}
    assert all(s.refit == "bias" for s in build_sweep(ratios=(0.3,)) if s.kind == "kvc")


def test_a_preset_without_the_bias_is_measured_as_compress_makes_it():
    sweep = build_sweep(ratios=(0.3,), presets=("small",), refits=REFITS["all"])
    measured = {s.label: s.refit for s in sweep if s.label.startswith("preset")}
    assert measured == {"preset small": "values", "preset small no-refit": "off"}


def test_scorers_refit_only_where_a_setting_refits():
    both = build_sweep(ratios=(0.3,), scorers=("kvzip", "compactor"), refits=REFITS["both"])
    assert bench_runner.refitting_scorers(both) == {"kvzip", "compactor"}
    values = build_sweep(ratios=(0.3,), scorers=("compactor",), refits=REFITS["values"])
    assert bench_runner.refitting_scorers(values) == {"compactor"}
    assert bench_runner.refitting_scorers(build_sweep(ratios=(0.3,), scorers=("compactor",), refits=("off",))) == set()


def test_bench_without_refit_records_no_reference_queries(monkeypatch, tiny_folder, short_doc):
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs.get("refit"))
        return score_context(*args, **kwargs)

    score_context = bench_runner.score_context
    monkeypatch.setattr(bench_runner, "score_context", recording)
    result = bench(short_doc, "--model", tiny_folder, "--scorers", "compactor", "--ratios", "0.5", "--presets", "",
                   "--refit", "off", "--new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    assert asked == [False]
