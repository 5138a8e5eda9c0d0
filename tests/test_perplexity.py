"""Perplexity equals a brute-force next-token NLL computed one prefix at a time."""

from __future__ import annotations

import math

import pytest
import torch

from haqmoe.data.text import eval_windows, sample_windows, wikitext_rows
from haqmoe.errors import HaqmoeError
from haqmoe.eval.perplexity import perplexity
from haqmoe.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_perplexity_equals_brute_force(family):
    model = tiny_model(family)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, 3 * 12 + 5))
    wins = eval_windows(ids, 12)
    assert wins.shape == (3, 12)  # the 5-token tail is dropped
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            for t in range(1, 12):
                logits = model(w[None, :t]).logits[0, -1]
                total -= float(torch.log_softmax(logits.double(), -1)[w[t]])
                count += 1
    res = perplexity(model, wins, batch_size=2, progress=False)
    assert res.windows == 3 and res.tokens == 36 and res.predicted == count
    assert res.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_and_sampler_errors():
    with pytest.raises(HaqmoeError, match="shorter than one window"):
        eval_windows(torch.arange(10)[None], 2048)
    with pytest.raises(HaqmoeError, match="calibration text has"):
        sample_windows(torch.arange(100)[None], 4, 512, seed=0)
    a = sample_windows(torch.arange(5000)[None], 4, 64, seed=3)
    assert torch.equal(a, sample_windows(torch.arange(5000)[None], 4, 64, seed=3))
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())  # contiguous windows


def test_out_of_vocabulary_tokens_are_refused():
    model = tiny_model("llama")
    with pytest.raises(HaqmoeError, match="out of the model's vocabulary"):
        perplexity(model, torch.full((1, 8), 500), progress=False)


def test_wikitext_rows_match_hf_layout():
    raw = " \n = Title = \n \n Body text .\n"
    assert wikitext_rows(raw) == ["", " = Title = \n", "", " Body text .\n"]
    assert wikitext_rows(raw.replace("\n", "\r\n")) == wikitext_rows(raw)
