"""`haqmoe quantize` / `compare` end to end on a tiny checkpoint: clear errors, nothing half-written."""

import json

import pytest
import torch

from haqmoe.cli.main import main
from haqmoe.models.tiny import char_tokenizer, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama")
    model.save_pretrained(root / "llama")
    char_tokenizer().save_pretrained(root / "llama")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (root / "short.txt").write_text("too short")
    return root


def _run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr()


def test_quantize_writes_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    main(["-q", "quantize", str(tiny_dir / "llama"), "-o", str(out), "--method", "haq", "--order", "rank1",
          "--calib", str(tiny_dir / "calib.txt"), "--calib-samples", "4", "--calib-len", "64", "--json"])
    meta = json.loads((out / "haqmoe_quant.json").read_text())
    assert meta["quant"]["method"] == "haq" and meta["options"]["order"] == "rank1"
    assert meta["linears"] and (out / "block-0000.safetensors").is_file() and (out / "rest.safetensors").is_file()


def test_int8_lm_head_checkpoint_evaluates_alike_in_fake_and_real(tiny_dir, tmp_path, capsys):
    """quantize --int8-lm-head stores the vocabulary as int8 rows; eval runs it in both modes."""
    base, out = tmp_path / "plain", tmp_path / "q"
    common = ["--method", "rtn", "--calib", str(tiny_dir / "calib.txt"), "--calib-samples", "4",
              "--calib-len", "64", "--json"]
    main(["-q", "quantize", str(tiny_dir / "llama"), "-o", str(base), *common])
    main(["-q", "quantize", str(tiny_dir / "llama"), "-o", str(out), "--int8-lm-head", *common])
    meta = json.loads((out / "haqmoe_quant.json").read_text())
    assert meta["vocab"] == {"head": "lm_head", "embedding": None}  # the tiny llama is untied
    v, h = 128, 64
    saved = (base / "rest.safetensors").stat().st_size - (out / "rest.safetensors").stat().st_size
    assert abs(saved - (4 * v * h - v * h - 4 * v)) < 4096
    capsys.readouterr()
    ppl = {}
    for mode in ("fake", "real"):
        main(["-q", "eval", str(out), "--data", str(tiny_dir / "calib.txt"), "--seqlen", "64", "--exec", mode,
              "--json"])
        ppl[mode] = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(ppl["real"] / ppl["fake"] - 1) < 0.01


def test_short_calibration_text_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code, cap = _run(["-q", "quantize", str(tiny_dir / "llama"), "-o", str(out), "--calib",
                      str(tiny_dir / "short.txt"), "--calib-len", "64"], capsys)
    assert code == 2 and "calibration text has" in cap.err
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_nan_weights_are_refused_by_name(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("nan")
    model.save_pretrained(bad)
    char_tokenizer().save_pretrained(bad)
    out = tmp_path / "q"
    code, cap = _run(["-q", "quantize", str(bad), "-o", str(out), "--calib", str(tiny_dir / "calib.txt"),
                      "--calib-samples", "4", "--calib-len", "64"], capsys)
    assert code == 2 and "layers.0.self_attn.k_proj" in cap.err
    assert not out.exists() and not list(tmp_path.glob(".q*"))


@pytest.mark.parametrize("bits", ["3", "9"])
def test_unsupported_bit_width_is_refused(tiny_dir, tmp_path, capsys, bits):
    out = tmp_path / "q"
    code, cap = _run(["-q", "quantize", str(tiny_dir / "llama"), "-o", str(out), "--w-bits", bits], capsys)
    assert code == 2 and "w-bits" in cap.err
    assert not out.exists()


def test_compare_writes_table(tiny_dir, tmp_path, capsys):
    (tmp_path / "eval.txt").write_text("Lazy dogs sleep while foxes run in circles. " * 30)
    out = tmp_path / "cmp.json"
    main(["-q", "compare", str(tiny_dir / "llama"), "--methods", "fp32,rtn,smoothquant-0.8,haq-rank2",
          "--data", str(tmp_path / "eval.txt"), "--seqlen", "128", "--calib", str(tiny_dir / "calib.txt"),
          "--calib-samples", "4", "--calib-len", "64", "-o", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp32", "rtn", "smoothquant-0.8", "haq-rank2"]
    assert all(r["ppl"] > 0 and "delta_pct" in r for r in rows)
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_compare_resume_reuses_only_rows_of_the_same_setup(tiny_dir, tmp_path, monkeypatch):
    import haqmoe.studies.compare as compare

    (tmp_path / "eval.txt").write_text("Lazy dogs sleep while foxes run in circles. " * 30)
    out = tmp_path / "cmp.json"
    base = ["-q", "compare", str(tiny_dir / "llama"), "--data", str(tmp_path / "eval.txt"), "--seqlen", "128",
            "--calib", str(tiny_dir / "calib.txt"), "--calib-samples", "4", "--calib-len", "64", "-o", str(out)]
    main(base + ["--methods", "fp32,rtn"])
    first = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    ran: list[str] = []
    real_run_row = compare.run_row
    monkeypatch.setattr(compare, "run_row", lambda spec, *a: ran.append(spec.label) or real_run_row(spec, *a))
    main(base + ["--methods", "fp32,rtn,smooth", "--resume"])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert ran == ["smooth"] and rows["fp32"] == first["fp32"] and rows["rtn"] == first["rtn"]
    ran.clear()  # another calibration set: nothing may be reused
    main(base[:-2] + ["--calib-samples", "3", "-o", str(out), "--methods", "fp32,rtn", "--resume"])
    assert ran == ["fp32", "rtn"]



def test_compare_resume_continues_an_interrupted_row(tiny_dir, tmp_path, monkeypatch):
    """Killed after one quantized block, then after one evaluated window: the resumed row equals an
    uninterrupted one, and its quantization time counts the killed runs' time too."""
    import haqmoe.eval.perplexity as perplexity
    from haqmoe.reliability.resume import BlockCheckpoint, partial_dir

    (tmp_path / "eval.txt").write_text("Lazy dogs sleep while foxes run in circles. " * 30)
    base = ["-q", "compare", str(tiny_dir / "llama"), "--data", str(tmp_path / "eval.txt"), "--seqlen", "128",
            "--calib", str(tiny_dir / "calib.txt"), "--calib-samples", "4", "--calib-len", "64", "--methods", "haq"]
    main(base + ["-o", str(tmp_path / "ref.json")])
    ref = json.loads((tmp_path / "ref.json").read_text())["rows"][0]
    out = tmp_path / "cmp.json"
    work = partial_dir(out) / "haq"

    def crash_after(calls: list, n: int, real):
        def wrapped(*a):
            calls.append(1)
            if len(calls) > n:
                raise RuntimeError("killed")
            return real(*a)
        return wrapped

    monkeypatch.setattr(BlockCheckpoint, "save", crash_after([], 1, BlockCheckpoint.save))
    with pytest.raises(SystemExit):
        main(base + ["-o", str(out)])
    monkeypatch.undo()
    killed = json.loads((work / "quant.partial" / "state.json").read_text())
    assert killed["done"] == 1 and killed["report"]["seconds"] > 0
    monkeypatch.setattr(perplexity, "window_nll", crash_after([], 1, perplexity.window_nll))
    with pytest.raises(SystemExit):
        main(base + ["-o", str(out), "--resume"])
    monkeypatch.undo()
    assert len(json.loads((work / "nll.json").read_text())["nll"]) == 1
    saves, windows = [], []
    monkeypatch.setattr(BlockCheckpoint, "save", crash_after(saves, 99, BlockCheckpoint.save))
    monkeypatch.setattr(perplexity, "window_nll", crash_after(windows, 99, perplexity.window_nll))
    main(base + ["-o", str(out), "--resume"])
    row = json.loads(out.read_text())["rows"][0]
    assert not saves and len(windows) == row["windows"] - 1  # nothing done twice
    assert row["ppl"] == ref["ppl"] and row["windows"] == ref["windows"] > 1
    assert row["quant_seconds"] >= round(killed["report"]["seconds"], 1)
    assert not partial_dir(out).exists()
