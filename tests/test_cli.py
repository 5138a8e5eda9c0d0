"""CLI: bad input gives one clear line and exit code 2 (no traceback); good input works end to end."""

from __future__ import annotations

import json

import pytest

from haqmoe.cli.main import main
from haqmoe.models.tiny import tiny_model


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", *args])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_clean_error(code, err, pattern):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("haqmoe: error:"), err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run(["eval", str(tmp_path / "nope")], capsys)
    assert_clean_error(code, err, "not found")


def test_corrupt_checkpoint(capsys, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    code, _, err = run(["eval", str(tmp_path / "m")], capsys)
    assert_clean_error(code, err, "cannot load checkpoint")


def test_corrupt_gguf(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run(["eval", str(bad)], capsys)
    assert_clean_error(code, err, "cannot read GGUF file")


def test_unknown_architecture(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt_foo"}))
    code, _, err = run(["info", str(tmp_path / "m")], capsys)
    assert_clean_error(code, err, "unsupported architecture")


@pytest.mark.parametrize("content,pattern", [("", "is empty"), ("just a few words", "shorter than one window")])
def test_bad_eval_text(capsys, tmp_path, content, pattern):
    f = tmp_path / "t.txt"
    f.write_text(content)
    code, _, err = run(["eval", "smollm2-135m", "--data", str(f)], capsys)
    assert_clean_error(code, err, pattern)


def test_eval_json_end_to_end(capsys, tmp_path):
    """`haqmoe eval --json` on a short window equals the library computation."""
    from haqmoe.data.text import eval_windows, load_text, tokenize
    from haqmoe.eval.perplexity import perplexity
    from haqmoe.sources import load_model

    code, out, err = run(["eval", "smollm2-135m", "--data", "pydoc", "--seqlen", "128", "--windows", "2",
                          "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    lm = load_model("smollm2-135m", progress=False)
    ref = perplexity(lm.model, eval_windows(tokenize(lm.tokenizer, load_text("pydoc")), 128, 2), progress=False)
    assert row["windows"] == 2 and row["tokens"] == 256
    assert row["ppl"] == pytest.approx(ref.ppl, rel=1e-6)


def test_quantize_refuses_nonempty_output(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, _, err = run(["quantize", "smollm2-135m", "--method", "rtn", "--out", str(tmp_path / "out")], capsys)
    assert_clean_error(code, err, "not empty")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_out_of_range_option_is_a_usage_error(capsys):
    code, _, err = run(["eval", "--windows", "0"], capsys)
    assert code == 2 and "Traceback" not in err and "internal error" not in err
    assert "--windows" in err


def _greedy(model, tokenizer, prompt: str, new: int) -> list[int]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_generate_json_equals_transformers_greedy(capsys):
    from haqmoe.sources import load_model

    code, out, err = run(["generate", "smollm2-135m", "-p", "The capital of France is", "--max-tokens", "6",
                          "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    lm = load_model("smollm2-135m", progress=False)
    ref = _greedy(lm.model, lm.tokenizer, "The capital of France is", 6)
    assert row["tokens"] == len(ref) and row["text"] == lm.tokenizer.decode(ref, skip_special_tokens=True)
    assert row["exec"] == "float" and row["prompt_tokens"] == 5  # nothing is fake-quantized in a float model


def test_generate_runs_a_quantized_checkpoint_in_int8(capsys, tmp_path):
    """`--exec real` generates what the library's int8 conversion of the same checkpoint generates."""
    from haqmoe.sources import load_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.exec.precision import convert
    from haqmoe.quant.rtn import quantize_rtn
    from haqmoe.serve.fixtures import tiny_chat_moe

    lm = load_model(str(tiny_chat_moe(tmp_path / "m")), progress=False)
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(lm.model, lm.adapter, cfg, progress=False)
    save_quantized(lm.model, lm.tokenizer, tmp_path / "q", cfg, {"source": "tiny"})
    code, out, err = run(["generate", str(tmp_path / "q"), "-p", "Hello there", "--max-tokens", "5", "--exec",
                          "real", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    ref_lm = load_model(str(tmp_path / "q"), progress=False)
    convert(ref_lm.model, "int8")
    ref = _greedy(ref_lm.model, ref_lm.tokenizer, "Hello there", 5)
    assert row["exec"] == "real" and row["text"] == ref_lm.tokenizer.decode(ref, skip_special_tokens=True)


def test_generate_refuses_int8_execution_of_a_float_model(capsys):
    code, _, err = run(["generate", "smollm2-135m", "--exec", "real"], capsys)
    assert_clean_error(code, err, "needs a quantized model")


@pytest.mark.parametrize("command", ["run", "generate"])
def test_top_p_zero_is_refused_before_loading(capsys, command):
    code, _, err = run([command, "no-such-model", "--top-p", "0", "--temperature", "1"], capsys)
    assert code == 2 and "Traceback" not in err  # a usage error, as for every option out of range
    assert "Invalid value for '--top-p': 0.0 is not above 0" in err


def test_output_that_would_delete_its_input_is_refused(capsys, tmp_path):
    src = tmp_path / "parent" / "q"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    for out in (src, tmp_path / "parent", src / "inner"):  # the input itself, its parent, inside it
        code, _, err = run(["export", str(src), "--out", str(out), "--overwrite"], capsys)
        assert_clean_error(code, err, "is, holds or lies inside the input")
    assert (src / "config.json").read_text() == "{}"


def test_job_is_late_only_when_the_deadline_stopped_it():
    from haqmoe.serve.app import Job

    job = Job(None, None, deadline=0.0)  # long past
    assert not job.timed_out()  # a generation that ended by itself, however late, was not cut
    assert job.should_stop() and job.timed_out()
