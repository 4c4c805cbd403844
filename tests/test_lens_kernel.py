"""The fused logit lens against a float64 numpy reference of the plain formula, and on real models.

Reference: FinalNorm -> logits over the whole vocabulary -> softmax -> every output, in float64.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_8_devices

from jaxlens.core.config import ModelConfig
from jaxlens.kernels.lens import lens_from_tokens, logit_lens


@dataclasses.dataclass(frozen=True)
class CappedConfig(ModelConfig):
    """A config with Gemma 2's final soft-cap (a field of ModelConfig once families add it)."""

    final_softcap: float | None = None


def make_case(seed, *, L=3, B=2, P=4, D=16, V=300, tied=True, plus_one=False, softcap=None, translators=False):
    rng = np.random.default_rng(seed)
    config = CappedConfig(
        family="test", vocab_size=V, d_model=D, n_layers=L, n_heads=1, n_kv_heads=1, head_dim=D, d_ff=1,
        max_positions=8, norm_eps=1e-6, norm_plus_one=plus_one, tie_embeddings=tied, final_softcap=softcap,
    )
    scale = rng.normal(0, 0.3, D) + (0.0 if plus_one else 1.0)
    w = rng.normal(0, 0.5, (V, D) if tied else (D, V))
    params = {"final_norm": {"scale": scale.astype(np.float32)}, ("embedding" if tied else "unembed"): w.astype(np.float32)}
    resid = rng.normal(0, 2.0, (L, B, P, D)).astype(np.float32)
    tr = None
    if translators:
        tr = {"A": rng.normal(0, 0.2, (L, D, D)).astype(np.float32), "b": rng.normal(0, 0.5, (L, D)).astype(np.float32)}
    return config, params, resid, tr


def reference(config, params, resid, *, k, targets=None, sets=None, final_logits=None, translators=None):
    """The plain formula in float64: every output from the full [L, B, P, V] softmax."""
    h = resid.astype(np.float64)
    if translators is not None:
        h = h + np.einsum("lbpj,lij->lbpi", h, translators["A"]) + translators["b"][:, None, None]
    scale = params["final_norm"]["scale"].astype(np.float64)
    normed = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + config.norm_eps) * ((1 + scale) if config.norm_plus_one else scale)
    W = params["embedding"].T if config.tie_embeddings else params["unembed"]
    z = normed @ W.astype(np.float64)  # [L, B, P, V]
    if config.final_softcap is not None:
        z = config.final_softcap * np.tanh(z / config.final_softcap)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[..., None]
    p = np.exp(logp)
    ref = z[-1] if final_logits is None else final_logits.astype(np.float64)
    logp_f = ref - (np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1))[..., None]
    out = {
        "p": p,
        "top_probs": -np.sort(-p, -1)[..., :k],
        "logsumexp": lse,
        "entropy": -(p * logp).sum(-1),
        "kl": (np.exp(logp_f) * (logp_f - logp)).sum(-1),
    }
    if targets is not None:
        t = np.broadcast_to(targets, resid.shape[1:3] + targets.shape[-1:])
        t = np.broadcast_to(t, z.shape[:1] + t.shape)  # [L, B, P, n]
        zt = np.take_along_axis(z, t, -1)
        out["target_probs"] = np.exp(zt - lse[..., None])
        out["target_logits"] = zt
        out["target_index"] = t
        out["z"] = z
    if sets is not None:
        out["set_probs"] = p @ sets.T.astype(np.float64)
    return out


def check(out, ref, *, valid=None, atol=2e-5):
    keep = np.ones(out["logsumexp"].shape[1:], bool) if valid is None else np.asarray(valid, bool)
    got = {name: np.asarray(v) for name, v in out.items()}
    for name in ("logsumexp", "entropy", "kl"):
        np.testing.assert_allclose(got[name][:, keep], ref[name][:, keep], atol=atol * 10, rtol=1e-4, err_msg=name)
    np.testing.assert_allclose(got["top_probs"][:, keep], ref["top_probs"][:, keep], atol=atol, err_msg="top_probs")
    # top ids: the reference's probability of each returned id is the returned probability (robust to ties)
    p_of_ids = np.take_along_axis(ref["p"], np.maximum(got["top_ids"], 0), -1)
    np.testing.assert_allclose(p_of_ids[:, keep], ref["top_probs"][:, keep], atol=atol, err_msg="top_ids")
    assert all(len(set(row)) == len(row) for row in got["top_ids"][:, keep].reshape(-1, got["top_ids"].shape[-1]))
    if "target_probs" in ref:
        np.testing.assert_allclose(got["target_probs"][:, keep], ref["target_probs"][:, keep], atol=atol, err_msg="target_probs")
        # rank: how many other ids have a larger logit; allow only genuine float32 near-ties to differ
        z, zt, t = ref["z"], ref["target_logits"], ref["target_index"]
        ids = np.arange(z.shape[-1])
        other = ids[None, None, None, None, :] != t[..., None]  # [L, B, P, n, V]
        tol = 1e-4 * (1 + np.abs(zt[..., None]))
        lo = ((z[..., None, :] > zt[..., None] + tol) & other).sum(-1)
        hi = ((z[..., None, :] > zt[..., None] - tol) & other).sum(-1)
        rank = got["target_ranks"]
        assert ((lo <= rank) & (rank <= hi))[:, keep].all(), (rank[:, keep], lo[:, keep])
    if "set_probs" in ref:
        np.testing.assert_allclose(got["set_probs"][:, keep], ref["set_probs"][:, keep], atol=atol, err_msg="set_probs")
    if valid is not None:  # padding rows: zeros, ids and ranks -1, nothing infinite or nan
        pad = ~keep
        for name, v in got.items():
            assert np.isfinite(v).all(), name
            assert (v[:, pad] == (-1 if name in ("top_ids", "target_ranks") else 0)).all(), name


CASES = {
    # vocab not divisible by the chunk; untied [D, V] unembedding; Gemma's (1 + w) norm
    # several row tiles, the last one padded (tile_rows // L positions per tile)
    "ragged-vocab": dict(case=dict(V=300, tied=False), chunk=64, k=5, tile_rows=9),
    "tied-plus-one": dict(case=dict(V=257, plus_one=True), chunk=100, k=3),
    # k larger than the chunk: the running top-k merges several chunks' whole contents
    "k-over-chunk": dict(case=dict(V=200), chunk=16, k=40),
    # chunks a multiple of 128 take the block-maxima top-k
    "block-top-k": dict(case=dict(V=2100, P=3), chunk=1024, k=8, tile_rows=12),
    "one-position": dict(case=dict(L=2, B=1, P=1, V=130), chunk=32, k=4),
    "chunk-over-vocab": dict(case=dict(V=50), chunk=8192, k=5),
    "softcap": dict(case=dict(V=211, softcap=5.0), chunk=50, k=5),
    "translators": dict(case=dict(V=150, translators=True), chunk=40, k=5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_reference(name):
    spec = CASES[name]
    seed = sorted(CASES).index(name)
    config, params, resid, tr = make_case(seed, **spec["case"])
    L, B, P, _ = resid.shape
    V = config.vocab_size
    rng = np.random.default_rng(100 + seed)
    targets = rng.integers(0, V, (B, P, 3)).astype(np.int32)
    sets = rng.random((4, V)) < 0.1
    valid = rng.random((B, P)) < 0.75
    valid[0, 0] = True
    out = logit_lens(params, jnp.asarray(resid), config=config, valid=valid, k=spec["k"], targets=targets,
                     token_sets=sets, translators=tr, chunk=spec["chunk"], tile_rows=spec.get("tile_rows", 256))
    ref = reference(config, params, resid, k=spec["k"], targets=targets, sets=sets, translators=tr)
    check(out, ref, valid=valid)
    assert out["top_ids"].dtype == jnp.int32 and out["target_ranks"].dtype == jnp.int32


def test_given_final_logits_and_shared_targets():
    """KL against given reference logits [B, P, V]; targets [n] shared by every row; no mask."""
    config, params, resid, _ = make_case(7, V=333, tied=False)
    rng = np.random.default_rng(8)
    final = rng.normal(0, 3, resid.shape[1:3] + (333,)).astype(np.float32)
    targets = np.array([0, 5, 332], np.int32)
    out = logit_lens(params, resid, config=config, k=6, targets=targets, final_logits=final, chunk=70)
    ref = reference(config, params, resid, k=6, targets=targets, final_logits=final)
    check(out, ref)
    assert "set_probs" not in out


def test_last_layer_is_its_own_reference():
    config, params, resid, _ = make_case(9, V=120)
    out = logit_lens(params, resid, config=config, chunk=32)
    np.testing.assert_allclose(np.asarray(out["kl"][-1]), 0.0, atol=1e-6)
    assert (np.asarray(out["kl"][:-1]) > 1e-3).all()


def test_no_recompile_for_new_values():
    config, params, resid, _ = make_case(10, V=100)
    logit_lens(params, resid, config=config, chunk=32)
    from jaxlens.kernels import lens

    before = lens._logit_lens._cache_size()
    logit_lens(params, resid + 1, config=config, chunk=32)
    assert lens._logit_lens._cache_size() == before


def test_bad_inputs_are_refused():
    config, params, resid, _ = make_case(11, V=100)
    with pytest.raises(ValueError, match="k=0"):
        logit_lens(params, resid, config=config, k=0)
    with pytest.raises(ValueError, match="token_sets"):
        logit_lens(params, resid, config=config, token_sets=np.zeros((2, 99), bool))
    with pytest.raises(ValueError, match="resid must be"):
        logit_lens(params, resid[0], config=config)
    with pytest.raises(ValueError, match="positions"):
        lens_from_tokens(params, np.zeros((2, 3), np.int32), config=config, positions="first")


# ---- real (tiny) checkpoints: the lens at the last layer is the model itself --------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_real_model_matches_transformers_lens(tiny_checkpoint, model_type):
    """Every layer against transformers' hidden states -> its final norm -> lm_head; the last layer
    against the model's own logits (KL 0)."""
    import torch

    import jaxlens

    hf, directory = tiny_checkpoint(model_type)
    model = jaxlens.load(directory)
    tokens = np.random.default_rng(3).integers(0, 128, (2, 10)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    targets = np.array([3, 77], np.int32)
    out = lens_from_tokens(model.params, tokens, mask, config=model.config, positions="all", k=4, targets=targets, chunk=48)
    L = model.config.n_layers
    assert out["top_ids"].shape == (L, 2, 10, 4)
    with torch.no_grad():
        res = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_hidden_states=True)
        hs = res.hidden_states
        # HF's last hidden state is already final-normed: its lens is the logits themselves.
        logits = torch.stack([hf.lm_head(hf.model.norm(h)) for h in hs[1:-1]] + [res.logits]).double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    p = np.exp(logp)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out["top_probs"])[:, keep], -np.sort(-p, -1)[..., :4][:, keep], atol=2e-5)
    np.testing.assert_allclose(np.asarray(out["entropy"])[:, keep], -(p * logp).sum(-1)[:, keep], atol=2e-4)
    np.testing.assert_allclose(np.asarray(out["target_probs"])[:, keep], p[..., targets][:, keep], atol=2e-5)
    kl = (p[-1] * (logp[-1] - logp)).sum(-1)
    np.testing.assert_allclose(np.asarray(out["kl"])[:, keep], kl[:, keep], atol=2e-4)
    assert np.abs(np.asarray(out["kl"])[-1]).max() < 1e-5  # the last layer is the model itself
    assert (np.asarray(out["valid"]) == keep).all() and (np.asarray(out["top_ids"])[:, ~keep] == -1).all()

    # 'last' position (left padding: the final column) and chosen layers without the last one
    last = lens_from_tokens(model.params, tokens, mask, config=model.config, layers=(0,), positions="last", k=4, chunk=48)
    assert last["top_probs"].shape == (1, 2, 1, 4)
    np.testing.assert_allclose(np.asarray(last["kl"])[0, :, 0], kl[0, :, -1], atol=2e-4)
    np.testing.assert_allclose(np.asarray(last["top_probs"])[0, :, 0], -np.sort(-p[0, :, -1], -1)[:, :4], atol=2e-5)

    # packed (the lens grid's read): only the real tokens, in 1 group of both rows or 2 groups of one
    from jaxlens.runtime.batching import pack_positions

    for groups in (1, 2):
        rows, cols, start = pack_positions(mask, groups)
        packed = lens_from_tokens(model.params, tokens, mask, config=model.config, positions=(rows, cols), k=4,
                                  targets=targets, chunk=48)
        assert packed["top_probs"].shape == (L, groups, rows.shape[1], 4)
        for r in range(2):
            run, g = slice(start[r], start[r] + keep[r].sum()), r // (2 // groups)
            np.testing.assert_allclose(np.asarray(packed["top_probs"])[:, g, run], -np.sort(-p, -1)[..., :4][:, r, keep[r]], atol=2e-5)
            np.testing.assert_allclose(np.asarray(packed["kl"])[:, g, run], kl[:, r, keep[r]], atol=2e-4)
            np.testing.assert_allclose(np.asarray(packed["target_probs"])[:, g, run], p[..., targets][:, r, keep[r]], atol=2e-5)
        assert np.asarray(packed["valid"]).sum() == keep.sum() and (np.asarray(packed["top_ids"])[:, ~np.asarray(packed["valid"])] == -1).all()


# ---- sharded: 8 forced host devices give the numbers of one ----------------------------------------


@pytest.mark.slow
def test_eight_devices_match_one(tiny_checkpoint):
    _, directory = tiny_checkpoint("gemma3_text")
    run = run_on_8_devices("lens_mesh_check.py", directory, timeout=300)
    assert "lens max abs diff 1 vs 8 devices" in run, run
