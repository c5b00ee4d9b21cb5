"""Perplexity and next-token accuracy, checked by hand."""
import math

import torch

from compress.metrics import IGNORE_INDEX, MetricAccumulator, primary_metric, token_cross_entropy


def test_uniform_logits_have_the_vocabulary_as_perplexity():
    acc = MetricAccumulator("lm")
    targets = torch.randint(0, 50, (3, 7))
    acc.update(torch.zeros(3, 7, 50), targets)
    m = acc.compute()
    assert math.isclose(m["perplexity"], 50.0, rel_tol=1e-6) and math.isclose(m["loss"], math.log(50), rel_tol=1e-6)
    assert primary_metric("lm") == ("perplexity", "min")


def test_mean_over_tokens_not_over_batches_and_padding_skipped():
    # batch 1: one token, p = 1/2; batch 2: three tokens, p = 1/4 (and one padding position, ignored)
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25, 1e-30]))
    acc = MetricAccumulator("lm")
    acc.update(logits.view(1, 1, 4), torch.tensor([[0]]))
    acc.update(logits.view(1, 1, 4).expand(1, 4, 4), torch.tensor([[1, 2, 1, IGNORE_INDEX]]))
    m = acc.compute()
    want = math.exp((math.log(2) + 3 * math.log(4)) / 4)  # not the mean of the two batches' perplexities (3.0)
    assert math.isclose(m["perplexity"], want, rel_tol=1e-6)
    assert math.isclose(m["accuracy"], 1 / 4)  # argmax is token 0: right once in four real tokens
    assert math.isclose(token_cross_entropy(logits.view(1, 1, 4), torch.tensor([[0]])).item(), math.log(2), rel_tol=1e-6)
