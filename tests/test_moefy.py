"""MoEfication: experts are disjoint slices of the FFN, all of them together compute the dense model,
the checkpoint is a stock transformers one, and the build is deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from haqmoe.cli.main import main
from haqmoe.errors import HaqmoeError
from haqmoe.models import moefy as M
from haqmoe.models.adapters import FusedExperts
from haqmoe.models.tiny import char_tokenizer, tiny_model
from haqmoe.sources import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [M.MoefyConfig(experts=4, top_k=2), M.MoefyConfig(experts=3, top_k=1, shared=1),
          M.MoefyConfig(experts=6, top_k=2, shared=2)]


def _calib() -> torch.Tensor:
    return torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("shared", [0, 2])
def test_all_experts_active_equals_dense(shared):
    """top-k = experts: the near-uniform router weights times the k-scaled down projections (and the
    doubled shared expert behind sigmoid(0)) sum the slices back into the dense FFN."""
    dense = tiny_model("llama")
    moe, _ = M.moefy(dense, _calib(), M.MoefyConfig(experts=4, top_k=4, shared=shared), progress=False)
    assert moe.config.model_type == ("mixtral" if shared == 0 else "qwen2_moe")
    with torch.no_grad():
        torch.testing.assert_close(moe(_ids()).logits, dense(_ids()).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cfg", SHAPES, ids=lambda c: f"E{c.experts}k{c.top_k}s{c.shared}")
def test_experts_are_disjoint_slices_covering_the_ffn(cfg):
    dense = tiny_model("llama")
    n = dense.config.intermediate_size
    moe, carving = M.moefy(dense, _calib(), cfg, progress=False)
    m = n // cfg.slices
    for layer, dblock, mblock in zip(carving, dense.model.layers, moe.model.layers):
        parts = [layer.shared, *layer.groups]
        assert [len(p) for p in parts] == [cfg.shared * m] + [m] * cfg.experts
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))  # disjoint and covering
        for e, g in enumerate(layer.groups):  # expert e holds exactly those neurons of the dense FFN
            w = FusedExperts.get(mblock.mlp.experts, e)
            assert torch.equal(w.gate, dblock.mlp.gate_proj.weight[g])
            assert torch.equal(w.up, dblock.mlp.up_proj.weight[g])
            assert torch.equal(w.down, dblock.mlp.down_proj.weight[:, g] * cfg.top_k)
    assert len({tuple(g.tolist()) for g in carving[0].groups}) == cfg.experts


def test_routing_selects_input_dependent_experts_with_uniform_weights():
    """The scaled router keeps the regression's order (top-k) and gives each selected expert 1/k."""
    dense = tiny_model("llama")
    cfg = M.MoefyConfig(experts=4, top_k=2)
    moe, carving = M.moefy(dense, _calib(), cfg, progress=False)
    x = torch.randn(64, dense.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, weights, idx = moe.model.layers[0].mlp.gate(x)
    assert len(torch.unique(idx[:, 0])) >= 2
    torch.testing.assert_close(weights, torch.full_like(weights, 0.5), rtol=0, atol=1e-4)
    order = (x.double() @ carving[0].router.double().T).topk(2, dim=1).indices
    assert (order.sort(dim=1).values == idx.sort(dim=1).values).all(dim=1).float().mean() > 0.95


def test_fitted_router_beats_random_on_the_ffn_output():
    """On held-out tokens the fitted router's experts reproduce the dense FFN better than random ones."""
    dense = tiny_model("llama")
    x = torch.randn(512, dense.config.hidden_size, generator=torch.Generator().manual_seed(3))
    mlp = dense.model.layers[0].mlp
    errs = {}
    for router in ("fitted", "random"):
        cfg = M.MoefyConfig(experts=4, top_k=2, router=router)
        carving = M.carve_from_inputs(dense, [x[:384]] * 2, cfg, progress=False)
        moe = M.assemble(dense, carving, cfg)
        with torch.no_grad():
            errs[router] = float((moe.model.layers[0].mlp(x[None, 384:]) - mlp(x[None, 384:])).norm())
    assert errs["fitted"] < errs["random"]


def test_balanced_assignment_and_clustering():
    scores = torch.tensor([[3.0, 1.0], [2.9, 0.0], [2.0, 1.9], [0.0, 1.0]])
    assert M.balanced_assign(scores, 2).tolist() == [0, 0, 1, 1]  # row 2 has the weakest claim on 0
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 40, generator=g)
    rows = torch.cat([c + 0.05 * torch.randn(10, 40, generator=g) for c in centers])
    labels = M.balanced_kmeans(rows, 3, iters=20, seed=0)
    assert sorted(torch.bincount(labels).tolist()) == [10, 10, 10]
    assert all(len(torch.unique(labels[i * 10:(i + 1) * 10])) == 1 for i in range(3))


def test_refuses_shapes_that_do_not_split():
    with pytest.raises(HaqmoeError, match="equal experts"):
        M.check_config(M.MoefyConfig(experts=5, top_k=2), 96)
    with pytest.raises(HaqmoeError, match="top-k"):
        M.check_config(M.MoefyConfig(experts=4, top_k=5), 96)
    with pytest.raises(HaqmoeError, match="Llama-family"):
        M.moefy(tiny_model("opt"), _calib(), M.MoefyConfig(experts=4, top_k=2), progress=False)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("moefy")
    tiny_model("llama").save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return root


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("shared", [0, 1])
def test_cli_checkpoint_loads_in_plain_transformers_and_is_deterministic(tiny_dense, tmp_path, capsys, shared):
    args = ["-q", "moefy", str(tiny_dense / "dense"), "--experts", "3", "--top-k", "2", "--shared", str(shared),
            "--calib", str(tiny_dense / "calib.txt"), "--samples", "4", "--seqlen", "64", "--json"]
    main([*args, "--out", str(tmp_path / "a")])
    row = json.loads(capsys.readouterr().out)
    assert row["architecture"] == ("mixtral" if shared == 0 else "qwen2_moe")
    main([*args, "--out", str(tmp_path / "b")])
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same bytes, every file
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert moe.config.num_experts_per_tok == 2
    record = json.loads((tmp_path / "a" / M.META_FILE).read_text())
    assert record["calib_source"] == str(tiny_dense / "calib.txt") and record["neurons_per_expert"] == 96 // (3 + shared)


def test_calibration_never_uses_the_test_split(tiny_dense, tmp_path):
    with pytest.raises(HaqmoeError, match="evaluation text"):
        M.moefy_to_dir(load_model(str(tiny_dense / "dense")), tmp_path / "x",
                       M.MoefyConfig(experts=3, top_k=2, calib_source="wikitext2:test"), progress=False)


@pytest.mark.parametrize("shared", [0, 2])
def test_quantize_eval_profile_run_on_a_moefied_checkpoint(tiny_dense, tmp_path, capsys, shared):
    """Every haqmoe path reads the carved model as the stock MoE it is: HAQ quantization (per-expert
    calibration of experts that now differ), evaluation close to the float model, routing profile,
    the collaborative runtime with the GPU tier emulated."""
    moe_dir, q = tmp_path / "moe", tmp_path / "q"
    calib = ["--calib", str(tiny_dense / "calib.txt")]
    main(["-q", "moefy", str(tiny_dense / "dense"), "--experts", "4", "--top-k", "2", "--shared", str(shared),
          "--out", str(moe_dir), *calib, "--samples", "4", "--seqlen", "64"])
    main(["-q", "quantize", str(moe_dir), "-o", str(q), "--method", "haq", *calib, "--calib-samples", "4",
          "--calib-len", "64"])
    assert json.loads((q / "haqmoe_quant.json").read_text())["quant"]["method"] == "haq"
    capsys.readouterr()
    rows = {}
    for name, src in (("fp", moe_dir), ("haq", q)):
        main(["-q", "eval", str(src), "--data", str(tiny_dense / "calib.txt"), "--seqlen", "64", "--json"])
        rows[name] = json.loads(capsys.readouterr().out)["ppl"]
    assert rows["haq"] == pytest.approx(rows["fp"], rel=0.05)
    main(["-q", "profile", str(moe_dir), "--out", str(tmp_path / "trace"), "--data", str(tiny_dense / "calib.txt"),
          "--seqlen", "64"])
    assert any((tmp_path / "trace").iterdir())
    capsys.readouterr()
    main(["-q", "run", str(q), "-p", "The quick", "--max-tokens", "4", "--emulate-gpu", "--slots", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 4


@pytest.mark.slow
def test_embedded_moefied_smollm2_all_active_equals_dense(smollm2):
    """On the real SmolLM2-135M (30 layers) the all-experts model reproduces the dense logits."""
    calib = torch.randint(0, smollm2.model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    moe, _ = M.moefy(smollm2.model, calib, M.MoefyConfig(experts=8, top_k=8), progress=False)
    ids = torch.randint(0, smollm2.model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = smollm2.model(ids).logits
        torch.testing.assert_close(moe(ids).logits, ref, rtol=0, atol=5e-4 * float(ref.abs().max()))


def test_embedded_cache_is_rebuilt_when_the_default_shape_changes(tiny_dense, tmp_path, monkeypatch):
    """The embedded MoEfied model is built once and reused, unless the default shape moved on."""
    from haqmoe.models import embedded

    dense = embedded.embedded_dir(embedded.DENSE, tmp_path)
    dense.parent.mkdir(parents=True)
    dense.symlink_to(tiny_dense / "dense", target_is_directory=True)
    calib = str(tiny_dense / "calib.txt")
    stamps = []
    for shape in [(3, 2), (3, 2), (3, 1)]:
        cfg = M.MoefyConfig(experts=shape[0], top_k=shape[1], calib_source=calib, calib_samples=2, calib_len=64)
        monkeypatch.setattr(embedded, "MOEFIED_CONFIG", cfg)
        target = embedded.ensure_embedded(embedded.MOEFIED, tmp_path, progress=False)
        assert M.built_with(target, cfg)
        assert json.loads((target / "config.json").read_text())["num_experts_per_tok"] == shape[1]
        stamps.append((target / M.META_FILE).stat().st_mtime_ns)
    assert stamps[0] == stamps[1] != stamps[2]  # reused, then rebuilt
