"""L2A layer and model behaviour on tiny Qwen2 / Qwen3 models (CPU, reference backend)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import l2a_kernels
import l2a_train  # noqa: F401  (registers the Auto classes)
from l2a_common import UserError, compose
from l2a_train.model import apply_trainable, build_base, build_model, convert_model, select_layers
from l2a_train.model.layer import dense_path_drawn

FAMILIES = ["tiny_qwen3", "tiny_qwen2"]
VOCAB = 4096


def cfgs(model="tiny_qwen3", *overrides):
    cfg = compose("convert", [f"model={model}", "output=unused", *overrides])
    return cfg.model, cfg.l2a


def base_and_l2a(model="tiny_qwen3", *overrides):
    model_cfg, l2a_cfg = cfgs(model, *overrides)
    base = build_base(model_cfg).eval()
    return base, convert_model(base, l2a_cfg, model_cfg).eval()


def tokens(batch=2, length=48, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model", FAMILIES)
def test_preserve_init_equals_base_and_paper_init_differs(model):
    ids = tokens()
    base, preserved = base_and_l2a(model, "l2a.init=preserve", "l2a.window=64")
    _, paper = base_and_l2a(model, "l2a.init=paper", "l2a.window=64")
    with torch.no_grad():
        ref = base(ids).logits
        torch.testing.assert_close(preserved(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert (paper(ids).logits - ref).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["full", "swa"])
def test_full_and_wide_swa_baselines_equal_base(mode):
    """Full attention is the unchanged model; SWA with window >= length is causal attention."""
    ids = tokens()
    base, model = base_and_l2a("tiny_qwen3", f"l2a={mode}", "l2a.window=64")
    assert set(model.config.l2a_layer_types) == {"global" if mode == "full" else "swa"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_router_off_global_path_contributes_nothing_and_gets_no_gradient():
    ids = tokens()
    _, on = base_and_l2a("tiny_qwen3", "l2a.p_dense=0", "l2a.window=8")
    _, swa = base_and_l2a("tiny_qwen3", "l2a=swa", "l2a.window=8")
    on.config.l2a_threshold = 0.999  # p = 0.5 at init: nobody is routed
    on.train()
    out = on.model(input_ids=ids)
    assert out.routed_fraction.sum() == 0
    # with every token skipped, the L2A model computes exactly the SWA-only model
    with torch.no_grad():
        torch.testing.assert_close(on.lm_head(out.last_hidden_state), swa(ids).logits, rtol=1e-5, atol=1e-5)
    out.last_hidden_state.square().mean().backward()
    for layer in on.model.layers:
        for name, param in layer.global_attn.named_parameters():
            assert param.grad is None or param.grad.abs().max() == 0, name


def test_router_on_sparse_path_equals_dense_path():
    ids = tokens()
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=64", "l2a.p_dense=0")
    model.train()  # zero router: p = 0.5, every token routed
    sparse = model.model(input_ids=ids).last_hidden_state
    sparse.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "global_attn" in n}
    model.zero_grad()
    model.config.l2a_backend = "dense"
    dense = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    dense.sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name, overrides", [("tiny_qwen3", []), ("tiny_qwen2", []),
                                                   ("tiny_qwen3", ["+model.config.attention_bias=true"])],
                         ids=["qwen3", "qwen2", "qwen3-attention-bias"])
def test_query_sparse_projections_equal_projecting_every_token(model_name, overrides, monkeypatch):
    """The routed global path projects queries and outputs of the routed tokens only. The layer's
    global half written out as its equations, projecting every token (a skipped token's
    attention is exactly zero; an output bias, where a config has one, reaches it all the same),
    gives the same output and the same gradient of every parameter, router included."""
    from l2a_train.model import attention as attn_ops
    from l2a_train.model.layer import L2ADecoderLayer, project_qkv, straight_through

    def every_token(self, h, cos, sin, layout, routing_step, backend, cache=None, keep_key=None):
        cfg, attn = self.config, self.global_attn
        u = self.global_layernorm(h)
        p = torch.sigmoid(self.router(u).float() / float(cfg.l2a_temperature))
        d = straight_through(p, float(cfg.l2a_threshold))
        route = d.detach() > 0.5
        q, k, v = project_qkv(attn, u, cos, sin, self.rotary, cfg)
        g = attn_ops.conditional(q, k, v, layout, route, attn.scaling, backend)
        h = h + attn.o_proj(g.flatten(2) * d.to(g.dtype)[..., None])
        return h, torch.stack([(p * p).sum(-1).mean(), route.float().mean(), p.mean()]).float()

    ids = tokens()
    _, model = base_and_l2a(model_name, "l2a.window=8", "l2a.p_dense=0", *overrides)
    model.train()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.router.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(layer.layer_idx))
            if layer.global_attn.o_proj.bias is not None:  # a bias reaches skipped tokens too
                layer.global_attn.o_proj.bias.normal_(std=0.05, generator=torch.Generator().manual_seed(layer.layer_idx))

    def forward_backward():
        model.zero_grad()
        out = model.model(input_ids=ids)
        (out.last_hidden_state.square().mean() + out.router_reg).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sparse, sparse_grads = forward_backward()
    assert (sparse.routed_fraction > 0).all() and (sparse.routed_fraction < 1).all()  # every layer partly routed
    monkeypatch.setattr(L2ADecoderLayer, "_routed_global", every_token)
    dense, dense_grads = forward_backward()
    torch.testing.assert_close(sparse.last_hidden_state, dense.last_hidden_state, rtol=1e-5, atol=1e-6)
    assert sparse_grads.keys() == dense_grads.keys() and any("router" in n for n in sparse_grads)
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_straight_through_estimator_gives_router_gradient():
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0")
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    for layer in model.model.layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_regularizer_gradient_lowers_router_probabilities():
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0")
    model.train()
    ids = tokens()
    routers = [layer.router.weight for layer in model.model.layers]
    before = model.model(input_ids=ids)
    before.router_reg.backward()
    with torch.no_grad():
        for w in routers:
            w -= 1e-2 * w.grad
    after = model.model(input_ids=ids)
    assert (after.mean_prob < before.mean_prob).all()
    assert after.router_reg < before.router_reg


def test_regularizer_value_matches_definition():
    """R = sum over layers (1/num_layers) * mean over rows of sum over tokens of p^2."""
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8")
    out = model.model(input_ids=tokens(batch=3, length=20))
    assert out.router_reg.item() == pytest.approx(20 * 0.25)  # p = 0.5 everywhere at init
    assert out.routed_fraction.tolist() == [1.0] * 4 and out.mean_prob.tolist() == [0.5] * 4


def packed_row(seed_b):
    """One row: document A (20 tokens, fixed) then document B (28 tokens, from seed_b)."""
    row = torch.cat([tokens(1, 20, seed=1), tokens(1, 28, seed=seed_b)], 1)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    return row, pos


@pytest.mark.parametrize("model_name", FAMILIES)
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_documents_are_isolated(model_name, backend):
    _, model = base_and_l2a(model_name, "l2a.window=6", f"l2a.backend={backend}")
    ids1, pos = packed_row(seed_b=2)
    ids2, _ = packed_row(seed_b=3)
    assert not torch.equal(ids1[:, 20:], ids2[:, 20:])
    with torch.no_grad():
        out1 = model(ids1, position_ids=pos).logits
        out2 = model(ids2, position_ids=pos).logits
        alone = model(ids1[:, :20]).logits
    torch.testing.assert_close(out1[:, :20], out2[:, :20], rtol=0, atol=0)
    torch.testing.assert_close(out1[:, :20], alone, rtol=1e-5, atol=1e-5)
    # and document B alone equals document B after A: it never sees A
    with torch.no_grad():
        b_alone = model(ids1[:, 20:]).logits
    torch.testing.assert_close(out1[:, 20:], b_alone, rtol=1e-5, atol=1e-5)


def test_save_and_from_pretrained_round_trip(tmp_path):
    _, model = base_and_l2a("tiny_qwen2", "l2a.window=8", "l2a.layers=[1,3]")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == "L2AQwen2ForCausalLM"
    assert loaded.config.l2a_layer_types == ["global", "l2a", "global", "l2a"]
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.router.weight.normal_()  # a trained router must survive the round trip too
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)


def test_convert_cli_end_to_end_from_saved_base(tmp_path):
    from l2a_train.convert_checkpoint import convert

    model_cfg, l2a_cfg = cfgs("tiny_qwen3")
    base = build_base(model_cfg).eval()
    base.save_pretrained(tmp_path / "base")
    cfg = compose(
        "convert",
        [f"model.path={tmp_path / 'base'}", f"output={tmp_path / 'out'}", "l2a.layers=every:2", "l2a.window=16"],
    )
    convert(cfg)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.l2a_layer_types == ["global", "l2a", "global", "l2a"]
    expected = convert_model(base, cfg.l2a, cfg.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, expected(tokens()).logits, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_build_model_from_l2a_checkpoint_applies_runtime_settings(tmp_path):
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8")
    model.save_pretrained(tmp_path)
    model_cfg, l2a_cfg = cfgs("tiny_qwen3", f"model.path={tmp_path}", "l2a.p_dense=0.5", "l2a.backend=dense")
    loaded = build_model(model_cfg, l2a_cfg)
    assert loaded.config.l2a_p_dense == 0.5 and loaded.config.l2a_backend == "dense"
    assert loaded.config.l2a_window == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["l2a.window=0"], "l2a.window"),
        (["l2a.threshold=1.0"], "l2a.threshold"),
        (["l2a.threshold=0"], "l2a.threshold"),
        (["l2a.layers=[0,7]"], "out of range"),
        (["l2a.layers=every:0"], "every:k"),
        (["l2a.layers=[]"], r"l2a.layers=\[\] selects none of the model's 4 layers"),
        (["l2a.window=4096"], "l2a.window=4096 is not smaller than the model's 4096 positions"),
        (["l2a.mode=bogus"], "l2a.mode"),
        (["l2a.init=bogus"], "l2a.init"),
    ],
)
def test_bad_settings_are_named_and_nothing_is_written(tmp_path, overrides, message):
    from l2a_train.convert_checkpoint import convert

    out = tmp_path / "out"
    cfg = compose("convert", [f"output={out}", *overrides])
    with pytest.raises(UserError, match=message):
        convert(cfg)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_non_qwen_and_mismatched_checkpoints_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from l2a_train.convert_checkpoint import convert

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="only Qwen2"):
        convert(compose("convert", [f"model.path={tmp_path / 'llama'}", f"output={tmp_path / 'o1'}"]))

    model_cfg, _ = cfgs("tiny_qwen3")
    build_base(model_cfg).save_pretrained(tmp_path / "base")
    config_file = tmp_path / "base" / "config.json"
    config = json.loads(config_file.read_text())
    config["hidden_size"] = 64
    config_file.write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match"):
        convert(compose("convert", [f"model.path={tmp_path / 'base'}", f"output={tmp_path / 'o2'}"]))
    with pytest.raises(UserError, match="does not exist"):
        convert(compose("convert", [f"model.path={tmp_path / 'nowhere'}", f"output={tmp_path / 'o3'}"]))
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_an_all_global_l2a_checkpoint_converts_like_its_base(tmp_path):
    """A base pretrained with l2a=full is exported as an L2A checkpoint with every layer global:
    l2a-convert reads it as the plain Qwen model it is; an L2A model with routed layers is refused."""
    import torch

    from l2a_train.convert_checkpoint import convert

    convert(compose("convert", ["l2a=full", f"output={tmp_path / 'full'}"]))
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"] == "l2a_qwen3"
    convert(compose("convert", [f"model.path={tmp_path / 'full'}", "l2a.window=16", f"output={tmp_path / 'l2a'}"]))
    direct = build_base(cfgs("tiny_qwen3")[0])
    from_full = build_base(compose("convert", [f"model.path={tmp_path / 'full'}", "output=x"]).model)
    assert from_full.config.model_type == "qwen3"
    for (name, a), (_, b) in zip(direct.state_dict().items(), from_full.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(UserError, match="is already an L2A model"):
        convert(compose("convert", [f"model.path={tmp_path / 'l2a'}", f"output={tmp_path / 'again'}"]))


def test_layer_selection_and_static_hybrid():
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("every:2", 4) == [1, 3]
    assert select_layers([3, 1], 4) == [1, 3]
    _, model = base_and_l2a("tiny_qwen3", "l2a=static", "l2a.static_every=2", "l2a.window=8")
    assert model.config.l2a_layer_types == ["swa", "global", "swa", "global"]
    assert not hasattr(model.model.layers[0], "router")


def test_random_routing_rate_and_determinism():
    _, model = base_and_l2a("tiny_qwen3", "l2a=random", "l2a.random_rate=0.3", "l2a.window=8")
    ids = tokens(batch=4, length=256)
    model.set_routing_step(5)
    first = model.model(input_ids=ids)
    assert first.routed_fraction.mean().item() == pytest.approx(0.3, abs=0.05)
    assert first.router_reg.item() == 0.0
    again = model.model(input_ids=ids)
    torch.testing.assert_close(first.last_hidden_state, again.last_hidden_state, rtol=0, atol=0)
    model.set_routing_step(6)
    assert not torch.equal(model.model(input_ids=ids).routed_fraction, first.routed_fraction)


def test_dense_path_draw_is_a_function_of_step_and_layer():
    draws = [dense_path_drawn(0.1, step, layer) for step in range(200) for layer in range(4)]
    assert draws == [dense_path_drawn(0.1, step, layer) for step in range(200) for layer in range(4)]
    assert 0.05 < sum(draws) / len(draws) < 0.15
    assert not any(dense_path_drawn(0.0, step, 0) for step in range(50))


def test_gradient_checkpointing_gives_identical_gradients():
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0.5")
    model.train()
    ids = tokens()

    def grads():
        model.zero_grad()
        model.set_routing_step(3)
        model(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    from l2a_train.model.checkpointing import enable_checkpointing

    enable_checkpointing(model)
    assert model.model.gradient_checkpointing
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trainable_presets():
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8")
    total = sum(p.numel() for p in model.parameters())
    assert apply_trainable(model, "all") == total
    apply_trainable(model, "paper")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("mlp" in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if "attn" in n or "router" in n or "norm" in n)
    assert apply_trainable(model, "router") == 4 * 128
    with pytest.raises(UserError, match="l2a.trainable"):
        apply_trainable(model, "bogus")


def test_context_extension_overrides():
    model_cfg, l2a_cfg = cfgs("tiny_qwen3", "model.rope_theta=5e6", "model.max_position_embeddings=8192")
    model = build_model(model_cfg, l2a_cfg)
    assert model.config.rope_parameters["rope_theta"] == 5e6
    assert model.config.max_position_embeddings == 8192
    assert OmegaConf.select(model_cfg, "config.max_position_embeddings") == 4096


@pytest.mark.parametrize("starts", [[0], [0, 37]], ids=["one-document", "two-documents"])
def test_kernels_causal_matches_reference(starts):
    """Full causal attention on the kernels backend (fused SDPA for rows of one document, the
    query-sparse kernel at density 1 otherwise) equals the reference, values and gradients."""
    from l2a_train.model import attention
    from l2a_train.model.documents import DocumentLayout

    torch.manual_seed(0)
    B, L, HQ, H, D = 2, 80, 4, 2, 16
    q, k, v = (torch.randn(B, L, h, D, requires_grad=True) for h in (HQ, H, H))
    pos = torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:] + [L])])
    outs = {}
    for backend in ("reference", "kernels"):
        layout = DocumentLayout.from_position_ids(pos[None], B, L, q.device, backend)
        assert layout.one_document_per_row == (len(starts) == 1)
        out = attention.causal(q, k, v, layout, 0.25, backend)
        grads = torch.autograd.grad((out * out).sum(), (q, k, v))
        outs[backend] = (out, *grads)
    for got, ref in zip(outs["kernels"], outs["reference"]):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_kernels_dense_path_matches_reference():
    """The dense path on the kernels backend (dense forward, query-sparse backward) gives the
    reference's values and gradients, the router's included, with a router routing ~half."""
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=1.0")
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.router.weight.normal_(std=0.05)
    ids, pos = packed_row(seed_b=4)
    results = {}
    for backend in ("reference", "kernels"):
        model.config.l2a_backend = backend
        model.zero_grad()
        out = model.model(input_ids=ids, position_ids=pos)
        out.last_hidden_state.square().mean().backward()
        results[backend] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, ref_grads), (got, grads) = results["reference"], results["kernels"]
    assert 0.1 < ref.routed_fraction.mean() < 0.9
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and any("router" in n for n in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_keep_attention_checkpointing_keeps_kernel_outputs_and_same_gradients(monkeypatch):
    """trainer.keep_attention_outputs on the kernels backend: the attention kernels run once per
    call, as without checkpointing (plain checkpointing runs them twice), same gradients, and
    without torch's selective checkpointing (its dispatch mode costs host time on every operator):
    the kernels keep their own outputs."""
    from l2a_kernels import _triton_attn
    from l2a_train.model import checkpointing
    from l2a_train.model.checkpointing import enable_checkpointing

    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0.5", "l2a.backend=kernels")
    model.train()
    calls, selective = [], []
    forward = _triton_attn.forward  # the forward kernel's launch, counted
    monkeypatch.setattr(_triton_attn, "forward", lambda *a: calls.append(1) or forward(*a))
    contexts = checkpointing.create_selective_checkpoint_contexts
    monkeypatch.setattr(checkpointing, "create_selective_checkpoint_contexts",
                        lambda *a: selective.append(1) or contexts(*a))
    ids = tokens(length=40)

    def grads():
        calls.clear()
        model.zero_grad()
        model.set_routing_step(3)
        model(ids, labels=ids).loss.backward()
        return len(calls), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    n_plain, plain = grads()
    assert n_plain == 2 * 4  # SWA + global attention in each of the 4 layers
    enable_checkpointing(model, keep_attention=False)
    assert grads()[0] == 2 * n_plain
    enable_checkpointing(model, keep_attention=True)
    n_kept, kept = grads()
    assert n_kept == n_plain
    for a, b in zip(plain, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    enable_checkpointing(model, keep_attention=1)  # the last layer keeps, the other three recompute
    n_one, one = grads()
    assert n_one == n_plain + 2 * 3
    for a, b in zip(plain, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    enable_checkpointing(model, keep_attention=False)  # an earlier call's choice does not linger
    assert grads()[0] == 2 * n_plain
    assert selective == []
    model.config.l2a_backend = "reference"  # SDPA: kept by torch's selective checkpointing, one context a layer
    plain_ref = grads()[1]
    enable_checkpointing(model, keep_attention=True)
    kept_ref = grads()[1]
    assert len(selective) == 4 and not any(layer.keep_attention_outputs for layer in model.model.layers)
    for a, b in zip(plain_ref, kept_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kept_attention_outputs_do_not_outlive_the_backward(monkeypatch):
    """Kernels keeping attention outputs through checkpointing: after the backward nothing is
    left kept, also where the first layer trains nothing and has frozen embeddings before it
    (checkpointing makes the layers' input require gradient, so that layer is recomputed too and
    takes its kept outputs back); and the gradients are those without checkpointing."""
    from l2a_train.model import attention
    from l2a_train.model.checkpointing import enable_checkpointing

    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.backend=kernels")
    model.train()
    for p in [*model.model.embed_tokens.parameters(), *model.model.layers[0].parameters()]:
        p.requires_grad_(False)
    ids = tokens(length=40)
    ref = model(ids, labels=ids).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    enable_checkpointing(model, keep_attention=True)
    kept = []
    helper = attention._kept
    monkeypatch.setattr(attention, "_kept", lambda layout, key: kept.append(layout.kept_attention) or helper(layout, key))
    model(ids, labels=ids).loss.backward()
    assert kept and all(d == {} for d in kept)
    for a, b in zip(ref_grads, [p.grad for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _HostReads:
    """Counts what reads device values on the host (a sync on CUDA), whatever the device:
    nonzero (its output size), .item() / bool() / int() (aten._local_scalar_dense), torch.equal,
    and Tensor.tolist (no aten op of its own: patched)."""

    OPS = {"nonzero": torch.ops.aten.nonzero.default, "item": torch.ops.aten._local_scalar_dense.default,
           "equal": torch.ops.aten.equal.default}

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.counts = {}
        names = {op: name for name, op in self.OPS.items()}
        counts = self.counts

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in names:
                    counts[names[func]] = counts.get(names[func], 0) + 1
                return func(*args, **(kwargs or {}))

        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            counts["tolist"] = counts.get("tolist", 0) + 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        self.mode = Mode()


@pytest.mark.skipif(not l2a_kernels.INTERPRETED, reason="CPU tensors reach the Triton kernels only when they run "
                    "interpreted (conftest sets TRITON_INTERPRET=1 on machines without CUDA)")
@pytest.mark.parametrize("checkpointing", ["none", "plain", "keep-attention"])
def test_kernels_training_step_reads_the_host_once_per_l2a_layer(monkeypatch, checkpointing):
    """A training forward + backward on the kernels backend (packed documents, dense path on in
    some layers) reads device values on the host only where unavoidable: once for the document
    layout (its number of documents), once to validate it for the kernels, and once per L2A
    layer (its routed count, which sizes the compact kernels' launch). Recomputation under
    activation checkpointing reuses them."""
    from l2a_train.model.checkpointing import enable_checkpointing

    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0.5", "l2a.backend=kernels")
    model.train()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "router"):
                layer.router.weight.normal_(std=0.05)
    if checkpointing != "none":
        enable_checkpointing(model, keep_attention=checkpointing == "keep-attention")
    n_l2a = model.config.num_l2a_layers
    assert n_l2a >= 2
    ids, pos = packed_row(seed_b=4)  # two documents in the row
    reads = _HostReads(monkeypatch)
    model.set_routing_step(3)
    with reads.mode:
        out = model.model(input_ids=ids, position_ids=pos)
        (out.last_hidden_state.square().mean() + out.router_reg).backward()
    assert reads.counts == {"nonzero": 1 + n_l2a, "tolist": 1}, reads.counts
    assert 0.0 < float(out.routed_fraction.min()) and float(out.routed_fraction.max()) < 1.0


def test_keep_attention_checkpointing_on_a_transformers_model():
    """The full-attention baseline (transformers' Qwen3) takes the same option: same gradients."""
    from l2a_train.model.checkpointing import enable_checkpointing, keep_attention_context

    base, _ = base_and_l2a("tiny_qwen3")
    base.train()
    ids = tokens(length=40)

    def grads():
        base.zero_grad()
        base(ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in base.parameters() if p.grad is not None]

    plain = grads()
    for keep in (True, 1):  # every layer; the last layer only
        enable_checkpointing(base, keep_attention=keep)
        for a, b in zip(plain, grads(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    policies = [layer._gradient_checkpointing_func.keywords.get("context_fn") for layer in base.model.layers]
    assert policies == [None] * (len(policies) - 1) + [keep_attention_context]  # transformers calls each layer's own


def test_fused_ops_route_every_norm_mlp_and_rope_through_liger(monkeypatch):
    """The wiring of l2a.fused_ops=liger, checked on CPU: liger's functions (CUDA-only) are
    replaced by PyTorch equivalents that count their calls, and `_liger` is forced on. Every
    RMSNorm (Qwen3's q/k norms included), MLP and RoPE of the model goes through them, and the
    model computes what transformers' modules compute. tests/test_model_gpu.py runs liger itself."""
    import liger_kernel.ops.rms_norm as liger_norm
    import liger_kernel.ops.swiglu as liger_swiglu
    import liger_kernel.transformers.rope as liger_rope
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    from l2a_train.model import fused_ops

    calls = {"norm": 0, "mlp": 0, "rope": 0}

    class Norm:
        @staticmethod
        def apply(x, w, eps, offset, casting_mode, in_place):
            assert (offset, casting_mode, in_place) == (0.0, "llama", False)
            calls["norm"] += 1
            xf = x.float()
            return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    class SiLUMul:
        @staticmethod
        def apply(a, b):
            calls["mlp"] += 1
            return torch.nn.functional.silu(a) * b

    def rope(q, k, cos, sin):  # liger's layout: [B, heads, L, D]
        calls["rope"] += 1
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)

    monkeypatch.setattr(liger_norm, "LigerRMSNormFunction", Norm)
    monkeypatch.setattr(liger_swiglu, "LigerSiLUMulFunction", SiLUMul)
    monkeypatch.setattr(liger_rope, "liger_rotary_pos_emb", rope)
    monkeypatch.setattr(fused_ops, "_liger", lambda config, x: config.l2a_fused_ops == "liger")
    _, model = base_and_l2a("tiny_qwen3", "l2a.window=8", "l2a.p_dense=0")
    ids = tokens()
    with torch.no_grad():
        model.config.l2a_fused_ops = "none"
        plain = model(ids).logits
        assert calls == {"norm": 0, "mlp": 0, "rope": 0}
        model.config.l2a_fused_ops = "liger"
        fused = model(ids).logits
    layers = model.config.num_hidden_layers
    # per L2A layer: 3 norms + 2 x (q, k) norms, 1 MLP, 2 RoPEs; plus the final norm
    assert calls == {"norm": 7 * layers + 1, "mlp": layers, "rope": 2 * layers}
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", FAMILIES)
def test_model_pickles(model_name):
    """torch.save(model) / torch.load round trip (the fused norm and MLP classes are importable)."""
    import io

    _, model = base_and_l2a(model_name, "l2a.window=8")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
