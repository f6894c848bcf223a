"""Structured (Minitron) pruning: importance against a plain-forward reference, pruning equal to
masking, shapes and config, the save/from_pretrained round trip, constructed rankings and the
parameter arithmetic; embedding channels (hidden size) alone and with every other axis."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from frugalflow.config import StructuredPrune
from frugalflow.models import load_model
from frugalflow.prune.importance import structured_importance
from frugalflow.prune.structured import head_counts, hidden_keep_count, mlp_keep_count, prune_structured

V, H, FF, NH, NKV, HD = 384, 64, 128, 4, 2, 16


def build(layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=layers,
                         num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def build_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=FF, num_hidden_layers=3, num_attention_heads=NH,
                       max_position_embeddings=512, word_embed_proj_dim=H)
    return OPTForCausalLM(config).eval()


def windows(n=5, length=32, seed=1):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def reference_importance(model, ids):
    """Naive: one plain forward; MLP activations recomputed from the MLP input."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(
            lambda _m, a, kw, out, i=i: seen.__setitem__(("block", i), (a[0] if a else kw["hidden_states"],
                                                                         out[0] if isinstance(out, tuple) else out)),
            with_kwargs=True))
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, _o, i=i: seen.__setitem__(("mlp", i), m.act_fn(m.gate_proj(a[0])) * m.up_proj(a[0]))))
        handles.append(layer.self_attn.o_proj.register_forward_hook(
            lambda _m, a, _o, i=i: seen.__setitem__(("heads", i), a[0])))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            handles.append(getattr(layer, norm).register_forward_hook(
                lambda _m, _a, out, i=i, norm=norm: seen.__setitem__((norm, i), out)))
    logits(model, ids)
    for h in handles:
        h.remove()
    n = len(model.model.layers)

    def agg(a):  # per window: mean |a| over tokens; then L2 over windows
        return torch.stack([a[b].abs().mean(0) for b in range(a.shape[0])]).pow(2).sum(0).sqrt()

    return {
        "mlp": [agg(seen["mlp", i]) for i in range(n)],
        "heads": [agg(seen["heads", i]).reshape(NH, HD).norm(dim=1) for i in range(n)],
        "block": [1 - F.cosine_similarity(*seen["block", i], dim=-1).mean().item() for i in range(n)],
        "hidden": sum(agg(seen[norm, i]) for i in range(n) for norm in ("input_layernorm", "post_attention_layernorm")),
    }


def masked_copy(model, stats):
    """The unpruned model with every pruned channel/head silenced and dropped layers made identities."""
    m = copy.deepcopy(model)
    kept = stats["kept"]
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            if "mlp" in kept:
                drop = sorted(set(range(FF)) - set(kept["mlp"][i]))
                layer.mlp.down_proj.weight[:, drop] = 0
            if "heads" in kept:
                for h in sorted(set(range(NH)) - set(kept["heads"][i])):
                    layer.self_attn.o_proj.weight[:, h * HD:(h + 1) * HD] = 0
        for i in stats["dropped_layers"]:
            m.model.layers[i].self_attn.o_proj.weight.zero_()
            m.model.layers[i].mlp.down_proj.weight.zero_()
    return m


def n_params_formula(layers, inter, heads, kv, h=H):
    attn = h * heads * HD + 2 * h * kv * HD + heads * HD * h
    return V * h + layers * (attn + 3 * h * inter + 2 * h) + h  # tied embeddings, final norm


def dead_hidden_channels(model, n=16, seed=7):
    """Silence n embedding channels of the residual stream: embedding columns and every o/down row
    that writes them are zeroed, so they stay 0 and every norm outputs 0 there. RMSNorm eps is made
    negligible so that removing zero channels changes each norm by exactly sqrt(H / H_kept)."""
    dead = sorted(torch.randperm(H, generator=torch.Generator().manual_seed(seed))[:n].tolist())
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-12
    return dead


# --------------------------------------------------------------------------- importance
def test_importance_matches_plain_forward_reference():
    model, ids = build(), windows()
    progress = []
    imp = structured_importance(model, ids, batch_size=2, on_progress=lambda i, n: progress.append((i, n)))
    ref = reference_importance(model, ids)
    assert progress == [(0, 3), (1, 3), (2, 3)]
    assert (imp["n_layers"], imp["intermediate_size"], imp["num_attention_heads"], imp["head_dim"]) == (3, FF, NH, HD)
    assert imp["hidden_size"] == H and len(imp["hidden"]) == H
    torch.testing.assert_close(torch.tensor(imp["hidden"]), ref["hidden"], rtol=1e-5, atol=1e-6)
    assert imp["n_tokens"] == ids.numel() and imp["n_windows"] == 5
    for i in range(3):
        torch.testing.assert_close(torch.tensor(imp["mlp"][i]), ref["mlp"][i], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(imp["heads"][i]), ref["heads"][i], rtol=1e-5, atol=1e-7)
        assert imp["block"][i] == pytest.approx(ref["block"][i], rel=1e-4, abs=1e-7)
    assert all(b > 1e-4 for b in imp["block"])
    # serialisable, and the JSON copy prunes the same way
    loaded = json.loads(json.dumps(imp))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert (prune_structured(a, imp, 0.25, 0.5, 1, hidden_ratio=0.25)["kept"]
            == prune_structured(b, loaded, 0.25, 0.5, 1, hidden_ratio=0.25)["kept"])


def test_zeroed_mlp_channels_rank_lowest_and_go_first():
    # Activation importance reads the input of down_proj, so a channel is made dead on that side
    # (zero up_proj row -> act(gate) * 0 = 0); zeroing a down_proj column would not change its score.
    model, ids = build(), windows()
    dead = [sorted(torch.randperm(FF, generator=torch.Generator().manual_seed(10 + i))[:32].tolist()) for i in range(3)]
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.up_proj.weight[dead[i]] = 0
    before = logits(model, ids)
    imp = structured_importance(model, ids)
    for i in range(3):
        scores = torch.tensor(imp["mlp"][i])
        assert torch.all(scores[dead[i]] == 0) and scores.min() == 0
        assert torch.sort(scores).indices[:32].sort().values.tolist() == dead[i]
    stats = prune_structured(model, imp, mlp_ratio=0.25)
    for i in range(3):
        assert stats["kept"]["mlp"][i] == sorted(set(range(FF)) - set(dead[i]))
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)


def test_identity_layer_is_dropped_and_logits_do_not_change():
    model, ids = build(), windows()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    before = logits(model, ids)
    imp = structured_importance(model, ids)
    assert abs(imp["block"][1]) < 1e-6 and min(imp["block"][0], imp["block"][2]) > 1e-4
    stats = prune_structured(model, imp, mlp_ratio=0.0, drop_layers=1)
    assert stats["dropped_layers"] == [1] and stats["kept"]["layers"] == [0, 2]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-6)


def test_silent_kv_group_is_the_one_dropped():
    model, ids = build(), windows()
    with torch.no_grad():
        for layer in model.model.layers:  # KV head 1 carries zero values -> query heads 2, 3 output zero
            layer.self_attn.v_proj.weight[HD:2 * HD] = 0
    before = logits(model, ids)
    imp = structured_importance(model, ids)
    assert all(h[2] == 0 and h[3] == 0 and min(h[:2]) > 0 for h in imp["heads"])
    stats = prune_structured(model, imp, mlp_ratio=0.0, heads_ratio=0.5)
    assert stats["kept"]["heads"] == [[0, 1]] * 3 and stats["kept"]["kv_heads"] == [[0]] * 3
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("heads_mode", ["groups", "query"])
def test_pruning_equals_masking_and_shapes(heads_mode):
    model, ids = build(), windows()
    imp = structured_importance(model, ids)
    original = copy.deepcopy(model)
    stats = prune_structured(model, imp, mlp_ratio=0.25, heads_ratio=0.5, drop_layers=1, heads_mode=heads_mode)
    heads, kv = (2, 1) if heads_mode == "groups" else (2, 2)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.num_hidden_layers) == (96, heads, kv, HD, 2)
    assert stats["after"] == {"n_params": n_params_formula(2, 96, heads, kv), "hidden_size": H, "num_hidden_layers": 2,
                              "intermediate_size": 96, "num_attention_heads": heads, "num_key_value_heads": kv,
                              "head_dim": HD}
    for j, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (heads * HD, H) and a.o_proj.weight.shape == (H, heads * HD)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (kv * HD, H)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (96, H) and m.down_proj.weight.shape == (H, 96)
        assert a.num_key_value_groups == heads // kv and a.layer_idx == j
        assert (a.q_proj.out_features, m.down_proj.in_features) == (heads * HD, 96)
    if heads_mode == "query":  # one query head kept inside each group
        assert all([h // 2 for h in hs] == [0, 1] for hs in stats["kept"]["heads"])
    expected = logits(masked_copy(original, stats), ids)
    got = logits(model, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    # KV-cache decoding after the layer drop (layer_idx renumbered) matches the full forward
    with torch.no_grad():
        past = model(ids[:, :20], use_cache=True).past_key_values
        step = model(ids[:, 20:21], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, got[:, 20], rtol=0, atol=2e-5)


@pytest.mark.parametrize("heads_mode", ["groups", "query"])
def test_save_and_plain_from_pretrained_round_trip(tmp_path, heads_mode):
    model, ids = build(), windows()
    prune_structured(model, structured_importance(model, ids), 0.25, 0.5, 1, heads_mode=heads_mode)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                  "num_hidden_layers")} == {
        "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1 if heads_mode == "groups" else 2,
        "head_dim": HD, "num_hidden_layers": 2}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (H, 96)
    torch.testing.assert_close(logits(loaded.eval(), ids), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(load_model(tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_parameter_count_matches_arithmetic():
    model, ids = build(), windows()
    imp = structured_importance(model, ids)
    before = n_params_formula(3, FF, NH, NKV)
    assert sum(p.numel() for p in model.parameters()) == before
    stats = prune_structured(model, imp, mlp_ratio=0.25, heads_ratio=0.5, drop_layers=1)
    after = n_params_formula(2, 96, 2, 1)
    assert stats["before"]["n_params"] == before and stats["after"]["n_params"] == after
    assert sum(p.numel() for p in model.parameters()) == after
    assert stats["param_reduction"] == pytest.approx(1 - after / before)
    # per layer: MLP 3*64*32 fewer, attention q/o 2*64*32 + k/v 2*64*16 fewer; plus one whole layer
    assert before - after == 2 * (3 * H * 32 + 2 * H * 32 + 2 * H * 16) + (3 * H * FF + 2 * H * NH * HD
                                                                      + 2 * H * NKV * HD + 2 * H)


def test_keep_counts_and_validation():
    assert mlp_keep_count(1536, 0.25) == 1152 and mlp_keep_count(128, 0.25) == 96
    assert mlp_keep_count(1536, 0.3) == 1072 and mlp_keep_count(100, 0.5) == 48
    assert mlp_keep_count(128, 0.99) == 16 and mlp_keep_count(8, 0.5) == 4 and mlp_keep_count(1536, 0.3, 1) == 1075
    assert head_counts(9, 3, 1 / 3) == (6, 2) and head_counts(9, 3, 1 / 3, "query") == (6, 3)
    assert head_counts(4, 2, 0.5, "query") == (2, 2)
    with pytest.raises(ValueError, match="KV groups"):
        head_counts(4, 2, 0.2)
    with pytest.raises(ValueError, match="heads_mode"):
        head_counts(4, 2, 0.5, "rows")
    model, ids = build(), windows()
    imp = structured_importance(model, ids)
    with pytest.raises(ValueError, match="keeps all"):
        prune_structured(copy.deepcopy(model), imp, mlp_ratio=0.05)
    with pytest.raises(ValueError, match="drop_layers"):
        prune_structured(copy.deepcopy(model), imp, drop_layers=3)
    prune_structured(model, imp, mlp_ratio=0.25)
    with pytest.raises(ValueError, match="another shape"):  # importance of the unpruned model
        prune_structured(model, imp, mlp_ratio=0.25)


def test_opt_mlp_and_depth_round_trip(tmp_path):
    model, ids = build_opt(), windows()
    imp = structured_importance(model, ids)
    assert imp["heads"] is None and len(imp["mlp"]) == 3 and len(imp["mlp"][0]) == FF
    with pytest.raises(ValueError, match="head pruning"):
        prune_structured(copy.deepcopy(model), imp, heads_ratio=0.5)
    original = copy.deepcopy(model)
    stats = prune_structured(model, imp, mlp_ratio=0.25, drop_layers=1)
    masked = copy.deepcopy(original)
    with torch.no_grad():
        for i, layer in enumerate(masked.model.decoder.layers):
            layer.fc2.weight[:, sorted(set(range(FF)) - set(stats["kept"]["mlp"][i]))] = 0
        for i in stats["dropped_layers"]:
            gone = masked.model.decoder.layers[i]
            for lin in (gone.self_attn.out_proj, gone.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    expected = logits(model, ids)
    torch.testing.assert_close(expected, logits(masked, ids), rtol=0, atol=2e-5)
    assert model.config.ffn_dim == 96 and model.config.num_hidden_layers == 2
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- hidden size
def test_silent_hidden_channels_rank_lowest_and_go_first():
    model, ids = build(), windows()
    dead = dead_hidden_channels(model)
    before = logits(model, ids)
    imp = structured_importance(model, ids)
    scores = torch.tensor(imp["hidden"])
    assert torch.all(scores[dead] == 0) and scores[sorted(set(range(H)) - set(dead))].min() > 0
    stats = prune_structured(model, imp, mlp_ratio=0.0, hidden_ratio=0.25)
    keep = sorted(set(range(H)) - set(dead))
    assert stats["kept"]["hidden"] == keep and stats["hidden_ratio_effective"] == 0.25
    assert model.config.hidden_size == 48 and model.config.head_dim == HD
    # only zeros went and every RMSNorm was rescaled by sqrt(64 / 48): the pruned model is the original
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    assert stats["norm_rescale"]["min"] == pytest.approx((H / 48) ** 0.5)
    assert stats["norm_rescale"]["max"] == pytest.approx((H / 48) ** 0.5)
    # past the silent ones, the next to go are the lowest scores
    other = build()
    imp = structured_importance(other, ids)
    prune_structured(other, imp, mlp_ratio=0.0, hidden_ratio=0.5)
    top = torch.argsort(torch.tensor(imp["hidden"]), descending=True)[:32].sort().values
    torch.testing.assert_close(other.model.embed_tokens.weight, build().model.embed_tokens.weight[:, top])


@pytest.mark.parametrize("heads_mode", ["groups", "query"])
def test_hidden_with_every_axis_equals_masking(heads_mode):
    model, ids = build(), windows()
    dead_hidden_channels(model)
    original = copy.deepcopy(model)
    stats = prune_structured(model, structured_importance(model, ids), mlp_ratio=0.25, heads_ratio=0.5,
                             drop_layers=1, heads_mode=heads_mode, hidden_ratio=0.25)
    heads, kv = (2, 1) if heads_mode == "groups" else (2, 2)
    assert stats["after"] == {"n_params": n_params_formula(2, 96, heads, kv, h=48), "hidden_size": 48,
                              "num_hidden_layers": 2, "intermediate_size": 96, "num_attention_heads": heads,
                              "num_key_value_heads": kv, "head_dim": HD}
    assert sum(p.numel() for p in model.parameters()) == stats["after"]["n_params"]
    expected = logits(masked_copy(original, stats), ids)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=2e-5)


def test_rmsnorm_rescale_is_the_mean_square_ratio_of_its_input():
    """Layer 0's input norm reads the embeddings: its scale is computed here from them directly."""
    model, ids = build(), windows()
    original = copy.deepcopy(model)
    imp = structured_importance(model, ids)
    stats = prune_structured(model, imp, mlp_ratio=0.0, hidden_ratio=0.25)
    keep = torch.tensor(stats["kept"]["hidden"])
    energy = original.model.embed_tokens.weight[ids].double().pow(2).reshape(-1, H).sum(0)
    scale = ((H * energy[keep].sum()) / (len(keep) * energy.sum())).sqrt().item()
    assert scale > 1.0  # the kept channels are the energetic ones
    torch.testing.assert_close(model.model.layers[0].input_layernorm.weight,
                               original.model.layers[0].input_layernorm.weight[keep] * scale, rtol=1e-5, atol=0)
    # importance from before the rescale existed (no norm_energy): plain slices
    plain = copy.deepcopy(original)
    stats = prune_structured(plain, {**imp, "norm_energy": None}, mlp_ratio=0.0, hidden_ratio=0.25)
    assert "norm_rescale" not in stats
    torch.testing.assert_close(plain.model.layers[0].input_layernorm.weight,
                               original.model.layers[0].input_layernorm.weight[keep], rtol=0, atol=0)


@pytest.mark.parametrize("heads_mode", ["groups", "query"])
def test_hidden_pruned_model_round_trip(tmp_path, heads_mode):
    model, ids = build(), windows()
    stats = prune_structured(model, structured_importance(model, ids), mlp_ratio=0.25, heads_ratio=0.5,
                             drop_layers=1, heads_mode=heads_mode, hidden_ratio=0.25)
    heads, kv = (2, 1) if heads_mode == "groups" else (2, 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    expected = logits(model, ids)
    assert torch.isfinite(expected).all()
    with torch.no_grad():  # KV-cache decoding matches the full forward
        past = model(ids[:, :20], use_cache=True).past_key_values
        step = model(ids[:, 20:21], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, expected[:, 20], rtol=0, atol=2e-5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ("hidden_size", "head_dim", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "num_hidden_layers", "tie_word_embeddings")} == {
        "hidden_size": 48, "head_dim": HD, "intermediate_size": 96, "num_attention_heads": heads,
        "num_key_value_heads": kv, "num_hidden_layers": 2, "tie_word_embeddings": True}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    loaded.eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.shape == (V, 48) and loaded.model.norm.weight.shape == (48,)
    for layer in loaded.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert a.head_dim == HD
        assert a.q_proj.weight.shape == (heads * HD, 48) and a.o_proj.weight.shape == (48, heads * HD)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (kv * HD, 48)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (96, 48) and m.down_proj.weight.shape == (48, 96)
        assert layer.input_layernorm.weight.shape == layer.post_attention_layernorm.weight.shape == (48,)
    assert sum(p.numel() for p in loaded.parameters()) == stats["after"]["n_params"]
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(load_model(tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_hidden_counts_and_validation():
    assert hidden_keep_count(576, 0.25) == 432 and hidden_keep_count(64, 0.25) == 48
    assert hidden_keep_count(64, 0.99) == 16 and hidden_keep_count(576, 0.3) == 400
    with pytest.raises(ValueError, match="hidden_ratio"):
        hidden_keep_count(64, 1.0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValidationError, match="hidden_ratio"):
            StructuredPrune(method="structured", hidden_ratio=bad)
    assert StructuredPrune(method="structured").hidden_ratio == 0.0
    model, ids = build(), windows()
    imp = structured_importance(model, ids)
    with pytest.raises(ValueError, match="keeps all"):
        prune_structured(copy.deepcopy(model), imp, mlp_ratio=0.0, hidden_ratio=0.05)
    with pytest.raises(ValueError, match="KV groups"):  # refused before any weight is sliced
        prune_structured(model, imp, mlp_ratio=0.25, heads_ratio=0.2, hidden_ratio=0.25)
    assert model.config.hidden_size == H and model.model.layers[0].mlp.down_proj.weight.shape == (H, FF)
    prune_structured(model, imp, mlp_ratio=0.0, hidden_ratio=0.25)
    with pytest.raises(ValueError, match="another shape"):
        prune_structured(model, imp, mlp_ratio=0.0, hidden_ratio=0.25)
    opt = build_opt()
    imp = structured_importance(opt, ids)
    assert imp["hidden"] is None
    with pytest.raises(ValueError, match="hidden"):
        prune_structured(opt, imp, hidden_ratio=0.25)


def test_hidden_untied_lm_head_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
                                         num_attention_heads=NH, num_key_value_heads=NKV, tie_word_embeddings=False,
                                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0)).eval()
    ids = windows()
    full = model.lm_head.weight.detach().clone()
    stats = prune_structured(model, structured_importance(model, ids), mlp_ratio=0.0, hidden_ratio=0.5)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, full[:, stats["kept"]["hidden"]])
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.shape == (V, 32) and not loaded.config.tie_word_embeddings
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-6)
