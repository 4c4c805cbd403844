"""The one vocabulary of sites: capture, interventions, kernels and the CLI all use these names.

Shapes (B batch, T tokens, D d_model, F d_ff, H heads, L layers):

  embed       [B, T, D]      what layer 0 reads (= its resid_pre): the token embeddings (Gemma: times
                             sqrt(D); GPT-2: plus position embeddings; BLOOM: after its embedding LayerNorm)
  resid_pre   [L, B, T, D]   input of each block
  attn_out    [L, B, T, D]   what attention adds to the residual (after the post-attention norm of
                             Gemma 2/3 and OLMo 2)
  resid_mid   [L, B, T, D]   resid_pre + attn_out. Under parallel residual (GPT-NeoX / Pythia) the MLP
                             reads resid_pre, not this: resid_mid is then only a partial sum
  mlp_act     [L, B, T, F]   act(x W_gate) when gated, act(x W_in) otherwise: the "neurons"
  mlp_hidden  [L, B, T, F]   input of the down projection: act(x W_gate) * (x W_up) when gated
  mlp_out     [L, B, T, D]   what the MLP adds to the residual (after the post-MLP norm of Gemma 2/3 and OLMo 2)
  resid_post  [L, B, T, D]   output of each block (= resid_mid + mlp_out)
  attn_probs  [L, B, H, T, T] attention weights (optional: large)
  final_norm  [B, T, D]      the final norm (RMSNorm or LayerNorm) of the last resid_post
  logits      [B, T, V]      always returned (Gemma 2: after final soft-capping); naming it in
                             `capture` changes nothing
"""

from __future__ import annotations

LAYER_SITES = (
    "resid_pre",
    "attn_out",
    "resid_mid",
    "mlp_act",
    "mlp_hidden",
    "mlp_out",
    "resid_post",
    "attn_probs",
)
MODEL_SITES = ("embed", "final_norm", "logits")
SITES = ("embed",) + LAYER_SITES + ("final_norm", "logits")


def check_sites(names) -> tuple[str, ...]:
    """Validate capture site names; returns them as a sorted tuple (a hashable jit static)."""
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in SITES]
    if unknown:
        raise ValueError(f"unknown capture site(s) {unknown}; valid sites are: {', '.join(SITES)}")
    return tuple(sorted(set(names)))
