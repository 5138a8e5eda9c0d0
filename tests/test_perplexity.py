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


def test_calibration_refuses_the_evaluation_text_under_any_of_its_names(tmp_path):
    from haqmoe.data.text import WIKITEXT_FILES, source_key
    from haqmoe.paths import shared_data_dir

    test_names = ["wikitext2", "wikitext2:test", "WikiText2:TEST", "wikitext2-tokens:test"]
    root = shared_data_dir()
    if root is not None:
        test_names += [str(root / WIKITEXT_FILES["test"]), str(root / "wikitext-2-raw" / "wiki.test.raw")]
    copy = tmp_path / "wikitext-2-raw" / "wiki.test.raw"  # a user's own copy of the file
    copy.parent.mkdir()
    copy.write_text("x")
    test_names.append(str(copy))
    assert {source_key(n) for n in test_names} == {"wikitext2:test"}
    assert source_key("wikitext2:valid") == source_key("wikitext2-tokens:valid") != source_key("wikitext2")
    other = tmp_path / "notes.txt"
    other.write_text("x")
    assert source_key(str(other)) == str(other.resolve()) and source_key("pydoc") == "pydoc"


def test_no_tokenizer_and_windows_beyond_the_context_are_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from haqmoe.cli.main import app

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")  # weights only: no tokenizer files
    runner = CliRunner()
    for args in (["eval", str(tmp_path / "m"), "--data", "pydoc", "--seqlen", "64"], ["generate", str(tmp_path / "m")]):
        r = runner.invoke(app, args)
        assert r.exit_code != 0 and "has no tokenizer" in str(r.exception), r.output
    r = runner.invoke(app, ["info", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    context = model.config.max_position_embeddings
    r = runner.invoke(app, ["eval", str(tmp_path / "m"), "--seqlen", str(context + 1)])
    assert r.exit_code != 0 and f"context of {context}" in str(r.exception)


def test_quantizing_a_quantized_model_is_refused(tmp_path):
    from typer.testing import CliRunner

    from haqmoe.cli.main import app
    from haqmoe.models.adapters import adapter_for
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.rtn import quantize_rtn

    model = tiny_model("llama")
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    save_quantized(model, None, tmp_path / "q", QuantConfig.w8a8("rtn"))
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "q"), "--quantize", "rtn", "--seqlen", "64"])
    assert r.exit_code != 0 and "already quantized (rtn)" in str(r.exception)


def test_a_local_checkpoint_wins_over_the_embedded_name(tmp_path, monkeypatch):
    from haqmoe.sources import resolve_source

    assert resolve_source("smollm2-moe") == ("embedded", None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-moe").mkdir()  # an unrelated folder of that name: still the embedded model
    assert resolve_source("smollm2-moe") == ("embedded", None)
    tiny_model("llama").save_pretrained(tmp_path / "smollm2-moe")
    kind, path = resolve_source("smollm2-moe")
    assert kind == "dir" and path.resolve() == (tmp_path / "smollm2-moe").resolve()
