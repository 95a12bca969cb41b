"""KVzip+ (kvzip_cli.prune.scorers.kvzip_plus): the weighted maximum, the output-projection Grams, and the scorer on the
tiny models of every tested family."""

import pytest
import torch

from kvzip_cli.compress.prefilled import prefill_document
from kvzip_cli.prune.scorers import ScoringInputs
from kvzip_cli.prune.scorers.kvzip_plus import KVzipPlusScorer, attention_modules, value_gram
from kvzip_cli.prune.scoring import score_context

from family_models import FAMILIES, family_model
from fixtures import FAMILY_TEXT


def test_max_received_weights_each_weight_before_the_maximum():
    from kvzip_cli.prune.scorers.kvzip import max_received

    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 50, 8)
    column, row = torch.rand(4, 50) + 0.1, torch.rand(20) + 0.1
    best = max_received(q, k, 0.3, block=7, dtype=torch.float32, column=column, row=row)
    allowed = torch.ones(20, 50, dtype=torch.bool).tril(30)
    weights = torch.softmax((q.view(2, 2, 20, 8) @ k[0, :, None].transpose(-1, -2)) * 0.3
                            + torch.where(allowed, 0.0, float("-inf")), dim=-1)
    weighted = weights * row.view(1, 1, 20, 1) * column.view(2, 2, 1, 50)
    assert torch.allclose(best, weighted.amax(dim=(1, 2)), atol=1e-6)
    assert not torch.allclose(best, max_received(q, k, 0.3, block=7, dtype=torch.float32), atol=1e-3)


def test_value_gram_gives_the_norm_of_what_each_head_writes():
    torch.manual_seed(2)
    projection = torch.nn.Linear(4 * 8, 24, bias=False)
    v = torch.randn(8)
    gram = value_gram(projection, heads=4)
    for head in range(4):
        written = projection.weight[:, head * 8 : (head + 1) * 8] @ v
        assert torch.allclose(v @ gram[head] @ v, written.pow(2).sum(), rtol=1e-5)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_tokenizer):
    return prefill_document(FAMILY_TEXT, family_model(request.param, tiny_tokenizer), chunk_size=100)


def test_every_family_has_its_output_projections_found(family):
    config = family.lm.model.config.get_text_config()
    assert sorted(attention_modules(family.lm.model)) == list(range(config.num_hidden_layers))
    scored = score_context(family.lm, family.cache, family.layout, "kvzip-plus", refit=False)
    held = scored.visible[:, None, :].expand(scored.scores.shape)  # a sliding-window layer holds its window only
    assert torch.isfinite(scored.scores[held]).all() and scored.scores[held].std() > 0
    assert (scored.scores[~held] == -torch.inf).all()


def test_scaling_a_layers_output_projection_scales_its_scores(tiny_tokenizer):
    """The last layer's W_O feeds nothing the scoring passes read (the cache and every layer's input are the same), so
    doubling it doubles that layer's KVzip+ scores and leaves the others; plain KVzip ignores W_O."""
    pre = prefill_document(FAMILY_TEXT, family_model("llama3", tiny_tokenizer), chunk_size=100)
    inputs = ScoringInputs(pre.lm.model, pre.lm.tokenizer, pre.cache, pre.layout)
    before = KVzipPlusScorer().score(inputs)
    _, projection = attention_modules(pre.lm.model)[len(pre.cache.layers) - 1]
    with torch.no_grad():
        projection.weight.mul_(2)
    try:
        after = KVzipPlusScorer().score(inputs)
    finally:
        with torch.no_grad():
            projection.weight.div_(2)
    torch.testing.assert_close(after[:-1], before[:-1])
    torch.testing.assert_close(after[-1], 2 * before[-1], rtol=1e-2, atol=1e-6)
    plain = score_context(pre.lm, pre.cache, pre.layout, "kvzip", refit=False).scores
    assert not torch.allclose(plain, before, rtol=0.1)
