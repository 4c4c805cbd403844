"""GGUF reading: names, shapes, values and config must equal what transformers' own GGUF loader gives.

The reference is `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantizes and
un-permutes independently of converters/gguf_io.py. Real models: SmolLM2-135M (llama, Q4_1/Q8_0) and
Gemma-3-270M (gemma3, Q4_K/Q5_0/Q6_K/Q8_0). Tiny GGUFs written here with gguf.GGUFWriter check the
layout fix-ups against llama.cpp's forward transforms, and the error paths.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from jaxlens.converters.gguf_io import GGUFError, GGUFSource, GGUFTensorNotFound
from jaxlens.runtime.zoo import resolve_model

TOL = 1e-6
CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
)
GEMMA3_KEYS = ("sliding_window", "query_pre_attn_scalar", "layer_types", "hidden_activation")


MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


# ---------------- real models vs transformers ----------------


class Case:
    """One GGUF file, our reader on it, and transformers' view of the same file."""

    def __init__(self, path: Path):
        torch = pytest.importorskip("torch", reason="torch is needed for the transformers reference")
        transformers = pytest.importorskip("transformers", reason="transformers is needed as the reference")
        self.path = path
        self.src = GGUFSource(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        self.ref_config = model.config  # what AutoConfig.from_pretrained(dir, gguf_file=...) derives
        # Drop aliases (a tied lm_head shares the embedding's storage): transformers derives them.
        self.ref, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                self.ref[name] = t.detach().numpy()  # shares memory: no copy of the big embedding


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    return Case(Path(resolve_model(MODELS[request.param])))


@pytest.mark.slow
def test_names_match_transformers(case):
    ours = case.src.names()
    assert len(ours) == len(set(ours))
    assert sorted(set(case.ref) - set(ours)) == [], "tensors transformers has that GGUFSource lacks"
    assert sorted(set(ours) - set(case.ref)) == [], "GGUFSource names transformers does not have"


@pytest.mark.slow
def test_shapes_and_values_match_transformers(case):
    worst = {}
    for name, ref in case.ref.items():
        assert case.src.shape(name) == tuple(ref.shape), name
        ours = case.src.get(name)
        assert ours.dtype == np.float32 and ours.shape == ref.shape, name
        np.subtract(ours, ref, out=ours)  # in place: the Gemma embedding alone is 670 MB
        worst[name] = float(np.abs(ours, out=ours).max())
    name = max(worst, key=worst.get)
    print(f"\n{case.path.name}: {len(worst)} tensors, max |ours - transformers| = {worst[name]:.3g} ({name})")
    assert worst[name] <= TOL, f"{name} differs from transformers by {worst[name]}"


@pytest.mark.slow
def test_hf_config_matches_transformers(case):
    ours, ref = case.src.hf_config(), case.ref_config
    keys = CONFIG_KEYS + (GEMMA3_KEYS if ours["model_type"] == "gemma3_text" else ())
    assert {k: ours[k] for k in keys} == {k: getattr(ref, k) for k in keys}
    # transformers 5 keeps rope in `rope_parameters`; ours uses the v4 keys.
    rope = ref.rope_parameters
    if ours["model_type"] == "gemma3_text":
        assert ours["rope_theta"] == rope["full_attention"]["rope_theta"]
        assert ours["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    else:
        assert ours["rope_theta"] == rope["rope_theta"]
    assert (ours["rope_scaling"] is None) == (rope["rope_type"] == "default")


@pytest.mark.slow
def test_hf_config_loads_into_transformers(case):
    """transformers accepts our dict and reads it back to the same rope and layer layout."""
    from transformers import AutoConfig

    rebuilt = AutoConfig.for_model(**case.src.hf_config())
    assert type(rebuilt) is type(case.ref_config)
    assert rebuilt.rope_parameters == case.ref_config.rope_parameters
    assert getattr(rebuilt, "layer_types", None) == getattr(case.ref_config, "layer_types", None)


TOKENIZER_TEXTS = ["The cat sleeps.", "Le chat dort.", "猫在睡觉。", "  two  spaces", "Привет, мир!", "नमस्ते",
                   "สวัสดี", "<bos>hi</s>", "a\n\nb\tc", "emoji 🤗 ok", ""]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_tokenizer_matches_transformers(name):
    """Our torch-free build tokenizes as AutoTokenizer(..., gguf_file=) does (Gemma: ~50 s, its
    262k-token vocabulary is built twice)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch", reason="transformers' own GGUF reader (the reference) needs torch")
    path = Path(resolve_model(MODELS[name]))
    src = GGUFSource(path)
    ours = src._build_tokenizer()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for special in (True, False):
        for text in TOKENIZER_TEXTS:
            assert ours(text, add_special_tokens=special).input_ids == ref(text, add_special_tokens=special).input_ids, text
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    ids = ref(" ".join(TOKENIZER_TEXTS)).input_ids
    assert ours.decode(ids) == ref.decode(ids)
    assert len(ours) == len(ref) == src.hf_config()["vocab_size"]


# ---------------- broken files ----------------


def cut_copy(tmp_path: Path, n_bytes: int) -> Path:
    src = Path(resolve_model("smollm2-135m"))
    dst = tmp_path / f"cut_{n_bytes}.gguf"
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n_bytes))
    return dst


@pytest.mark.parametrize("fraction", [0.5, None], ids=["half", "100_bytes"])
def test_truncated_file(tmp_path, fraction):
    n = int(Path(resolve_model("smollm2-135m")).stat().st_size * fraction) if fraction else 100
    path = cut_copy(tmp_path, n)
    with pytest.raises(GGUFError, match="truncated") as err:
        GGUFSource(path)
    assert path.name in str(err.value)


def test_cut_inside_last_tensor(tmp_path):
    # A cut in the final tensor's bytes (the reader may not notice: our own size check must).
    path = cut_copy(tmp_path, Path(resolve_model("smollm2-135m")).stat().st_size - 1000)
    with pytest.raises(GGUFError, match="truncated"):
        GGUFSource(path)


def test_not_gguf_and_empty_and_missing(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"NOTAGGUF" * 64)
    (tmp_path / "empty.gguf").write_bytes(b"")
    for name in ("junk.gguf", "empty.gguf"):
        with pytest.raises(GGUFError, match=name):
            GGUFSource(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        GGUFSource(tmp_path / "nope.gguf")


def test_missing_tensor_names_it():
    src = GGUFSource(Path(resolve_model("smollm2-135m")))
    for call in (src.get, src.shape):
        with pytest.raises(GGUFTensorNotFound, match="model.layers.99.mlp.up_proj.weight") as err:
            call("model.layers.99.mlp.up_proj.weight")
        assert isinstance(err.value, KeyError) and isinstance(err.value, GGUFError)
    assert "lm_head.weight" not in src  # SmolLM2 ties its output layer to the embedding


# ---------------- tiny written GGUFs: layout fix-ups and mapping ----------------

HEADS, KV_HEADS, HEAD_DIM, D, FF, VOCAB = 4, 2, 8, 16, 24, 32


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward q/k row permutation (rotate_half halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], n_layers: int = 2, **meta) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(meta.pop("rope_theta", 10000.0))
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def exact(x: np.ndarray) -> np.ndarray:
    """float32 on a 2**-10 grid, so Gemma's stored 1 + w gives back w bit for bit."""
    return (np.round(x * 1024) / 1024).astype(np.float32)


def block_weights(rng, arch: str, layer: int) -> dict[str, np.ndarray]:
    """HF-layout weights of one block, keyed by GGUF name."""
    r = lambda *s: exact(rng.standard_normal(s))  # noqa: E731
    b = f"blk.{layer}."
    t = {
        b + "attn_q.weight": r(HEADS * HEAD_DIM, D), b + "attn_k.weight": r(KV_HEADS * HEAD_DIM, D),
        b + "attn_v.weight": r(KV_HEADS * HEAD_DIM, D), b + "attn_output.weight": r(D, HEADS * HEAD_DIM),
        b + "ffn_gate.weight": r(FF, D), b + "ffn_up.weight": r(FF, D), b + "ffn_down.weight": r(D, FF),
        b + "attn_norm.weight": r(D), b + "ffn_norm.weight": r(D),
    }
    if arch in ("gemma3", "qwen3"):
        t[b + "attn_q_norm.weight"] = r(HEAD_DIM)
        t[b + "attn_k_norm.weight"] = r(HEAD_DIM)
    if arch == "gemma3":
        t[b + "post_attention_norm.weight"] = r(D)
        t[b + "post_ffw_norm.weight"] = r(D)
    if arch in ("qwen2", "llama"):
        t[b + "attn_q.bias"] = r(HEADS * HEAD_DIM)
        t[b + "attn_k.bias"] = r(KV_HEADS * HEAD_DIM)
        t[b + "attn_v.bias"] = r(KV_HEADS * HEAD_DIM)
    return t


EXPECTED_BLOCK_NAMES = {
    "llama": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "qwen2": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
    "qwen3": {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gemma3": {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
}
PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}


def expected_hf_name(arch: str, gguf_name: str) -> str:
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    parts = gguf_name.split(".")
    if parts[0] != "blk":
        return f"{top[parts[0]]}.{parts[1]}"
    return f"model.layers.{parts[1]}.{({**PROJ, **EXPECTED_BLOCK_NAMES[arch]})[parts[2]]}.{parts[3]}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_written_gguf_round_trip(tmp_path, arch):
    """HF weights -> llama.cpp's transforms -> GGUF -> GGUFSource gives the HF weights back exactly."""
    rng = np.random.default_rng(0)
    hf = {"token_embd.weight": exact(rng.standard_normal((VOCAB, D))),
          "output_norm.weight": exact(rng.standard_normal(D)),
          "output.weight": exact(rng.standard_normal((VOCAB, D)))}
    for layer in range(2):
        hf.update(block_weights(rng, arch, layer))
    stored = {}
    for name, w in hf.items():
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = llama_cpp_permute(w, HEADS if ".attn_q." in name else KV_HEADS)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1
        stored[name] = w
    stored["rope_freqs.weight"] = np.ones(HEAD_DIM // 2, np.float32)  # skipped on purpose
    meta = {"sliding_window": 4} if arch == "gemma3" else {}
    src = GGUFSource(write_gguf(tmp_path / f"{arch}.gguf", arch, stored, **meta))

    assert sorted(src.names()) == sorted(expected_hf_name(arch, n) for n in hf)
    for name, w in hf.items():
        got = src.get(expected_hf_name(arch, name))
        np.testing.assert_array_equal(got, w, err_msg=name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all-ones rope factors mean no scaling: nothing to warn about
        cfg = src.hf_config()
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    if arch == "gemma3":
        assert cfg["layer_types"] == ["sliding_attention", "sliding_attention"]


def test_gemma3_layer_pattern_and_rope_scaling(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": rng.standard_normal((VOCAB, D)).astype(np.float32)}
    for layer in range(12):
        tensors.update(block_weights(rng, "gemma3", layer))
    path = write_gguf(tmp_path / "g.gguf", "gemma3", tensors, n_layers=12, sliding_window=4,
                      rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=8.0)
    cfg = GGUFSource(path).hf_config()
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11]
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert cfg["tie_word_embeddings"] is True


def test_unsupported_architecture_and_unknown_tensor(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, D), np.float32)}
    with pytest.raises(GGUFError, match="architecture 'falcon' is not supported"):
        GGUFSource(write_gguf(tmp_path / "f.gguf", "falcon", tensors))
    tensors["blk.0.ffn_gate_exps.weight"] = np.zeros((2, FF, D), np.float32)
    with pytest.raises(GGUFError, match="ffn_gate_exps"):
        GGUFSource(write_gguf(tmp_path / "moe.gguf", "llama", tensors))


def test_llama3_rope_factors_warn(tmp_path):
    tensors = {"token_embd.weight": np.zeros((VOCAB, D), np.float32),
               "rope_freqs.weight": np.linspace(1, 8, HEAD_DIM // 2, dtype=np.float32)}
    src = GGUFSource(write_gguf(tmp_path / "l3.gguf", "llama", tensors))
    assert "rope_freqs.weight" not in src.names()
    with pytest.warns(UserWarning, match="rope_freqs"):
        assert src.hf_config()["rope_scaling"] is None
