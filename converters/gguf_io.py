"""Read GGUF checkpoints (llama.cpp's format) as Hugging Face-layout float32 numpy tensors.

`GGUFSource` opens a GGUF file memory-mapped (`gguf_format.read_gguf`), maps llama.cpp tensor names to
the names `AutoModelForCausalLM.state_dict()` uses, dequantizes one tensor at a time and undoes the
layout changes llama.cpp's `convert_hf_to_gguf.py` made, and rebuilds an HF-style `config.json`
dict from the GGUF metadata.

What llama.cpp changed, and what `get` undoes:
  * shapes: GGUF lists dims innermost-first (ggml `ne`); the reader's numpy arrays are already in
    row-major (HF) order, so the HF shape is the reversed `ne` list. Nothing to transpose.
  * llama: rows of q and k (weights and biases) were permuted per head so that rope acts on
    interleaved pairs (2i, 2i+1); HF's rotate_half pairs (i, i + head_dim/2). We invert it.
  * gemma3: every `*norm.weight` (attn/ffn/post norms, q/k norms, output norm) was stored as 1 + w,
    because Gemma's RMSNorm computes x * (1 + w); we subtract 1 to give HF's w.
  * qwen2/qwen3/gemma3 use NeoX-style rope in llama.cpp, so their q/k rows are not permuted.

Tensors skipped on purpose (they are not in HF's state_dict): `rope_freqs.weight` (per-frequency
rope factors llama.cpp precomputes for Llama-3.1-style rope scaling; see `hf_config`) and
`blk.N.attn_rot_embd.weight` (an old rotary inv_freq buffer). Any other unknown tensor is an error,
so no weight is ever dropped silently.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from jaxlens.converters.gguf_format import GGUFError, read_gguf

SUPPORTED_ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3")

# GGUF tensors that have no HF state_dict counterpart.
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_BLOCK_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LLAMA_BLOCK = {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"}
_BLOCK = {
    "llama": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    # Gemma 3 has four norms per block; GGUF's ffn_norm is the *pre*-feedforward norm.
    "gemma3": {
        **_BLOCK_COMMON,
        **_QK_NORM,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_MODEL_TYPE = {"llama": "llama", "gemma3": "gemma3_text", "qwen2": "qwen2", "qwen3": "qwen3"}
_ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


class GGUFTensorNotFound(GGUFError, KeyError):
    """A tensor name that the GGUF file does not provide (also catchable as KeyError)."""

    def __str__(self) -> str:  # KeyError would repr()-quote the message
        return str(self.args[0])


class GGUFSource:
    """Tensors of a GGUF file, dequantized to float32 numpy and renamed/reshaped to the HF
    transformers layout (the names and shapes `AutoModelForCausalLM.state_dict()` has, e.g.
    'model.layers.0.self_attn.q_proj.weight' [n_heads*head_dim, d_model])."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        self._file = read_gguf(self.path)  # raises GGUFError naming the problem
        self.arch = self._meta("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._tensors = {}  # HF name -> gguf ReaderTensor
        for t in self._file.tensors.values():
            if _IGNORED.match(t.name):
                continue
            self._tensors[self._hf_name(t.name)] = t

    # ---- tensors ----

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape  # `ne` reversed: row-major, as HF has it

    def get(self, name: str) -> np.ndarray:
        """Dequantize one tensor to a fresh, writable float32 array in HF layout."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._tensor(name)
        qtype = GGMLQuantizationType(t.qtype)
        data = self._file.raw(t)
        try:
            w = dequantize(data, qtype).reshape(t.shape)
        except NotImplementedError as e:
            raise GGUFError(
                f"{self.path}: tensor {t.name!r} ({name}) has type {qtype.name}, which "
                f"gguf {_gguf_version()} cannot dequantize ({e}); upgrade the gguf package"
            ) from e
        # F32 comes back as a read-only view of the memory map; everything else is already a copy.
        if w.dtype != np.float32 or np.shares_memory(w, data):
            w = np.array(w, dtype=np.float32)
        if w.shape != self.shape(name):
            raise GGUFError(f"{self.path}: tensor {t.name!r} dequantized to {w.shape}, expected {self.shape(name)}")
        if self.arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            w = self._unpermute_qk(w, t.name)
        if self.arch == "gemma3" and t.name.endswith("norm.weight"):
            w -= 1.0  # stored as 1 + w (Gemma RMSNorm scales by 1 + w)
        return w

    def _unpermute_qk(self, w: np.ndarray, gguf_name: str) -> np.ndarray:
        # llama.cpp regrouped each head's rows from [first half | second half] to interleaved pairs;
        # viewing rows as (head, half, pair) and swapping the last two restores the halves.
        heads = self._meta(f"{self.arch}.attention.head_count")
        if ".attn_k." in gguf_name:
            heads = self._meta(f"{self.arch}.attention.head_count_kv", heads)
        rows = w.shape[0]
        if rows % (2 * heads):
            raise GGUFError(f"{self.path}: tensor {gguf_name!r} has {rows} rows, not a multiple of 2 x {heads} heads")
        half = rows // heads // 2
        return np.ascontiguousarray(w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFTensorNotFound(
                f"{self.path}: no tensor {name!r} (HF name); names() lists the {len(self._tensors)} available"
            ) from None

    def _hf_name(self, gguf_name: str) -> str:
        if m := _BLOCK_NAME.match(gguf_name):
            layer, part, kind = m.groups()
            if part in _BLOCK[self.arch]:
                return f"model.layers.{layer}.{_BLOCK[self.arch][part]}.{kind}"
        elif (m := _TOP_NAME.match(gguf_name)) and m.group(1) in _TOP:
            return f"{_TOP[m.group(1)]}.{m.group(2)}"
        raise GGUFError(
            f"{self.path}: tensor {gguf_name!r} has no Hugging Face name for architecture {self.arch!r}; "
            "this reader does not support that model variant"
        )

    # ---- metadata ----

    def _meta(self, key: str, default=None):
        value = self._file.fields.get(key, default)
        return value.tolist() if isinstance(value, np.ndarray) else value

    def hf_config(self) -> dict:
        """An HF-style config.json dict rebuilt from the GGUF metadata (transformers-v4 rope keys)."""
        a = self.arch
        hidden = self._meta(f"{a}.embedding_length")
        heads = self._meta(f"{a}.attention.head_count")
        layers = self._meta(f"{a}.block_count")
        if None in (hidden, heads, layers):
            raise GGUFError(f"{self.path}: metadata lacks {a}.embedding_length, attention.head_count or block_count")
        # head_dim: llama.cpp writes key_length when it differs from hidden/heads; for llama the rope
        # dimension is the head size.
        head_dim = self._meta(f"{a}.attention.key_length") or (
            self._meta(f"{a}.rope.dimension_count") if a == "llama" else None
        ) or hidden // heads
        cfg = {
            "architectures": [_ARCH_CLASS[a]],
            "model_type": _MODEL_TYPE[a],
            "vocab_size": self._vocab_size(),
            "hidden_size": hidden,
            "intermediate_size": self._meta(f"{a}.feed_forward_length"),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta(f"{a}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._meta(f"{a}.attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": self._meta(f"{a}.context_length"),
            "tie_word_embeddings": "output.weight" not in self._file.tensors,
            "bos_token_id": self._meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._meta("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._meta("tokenizer.ggml.padding_token_id"),
            "rope_theta": float(self._meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "torch_dtype": "float32",
        }
        has_bias = any(n.endswith("attn_q.bias") for n in self._file.tensors)
        if a == "gemma3":
            cfg.update(self._gemma3_extras(cfg))
        else:
            cfg["hidden_act"] = "silu"
            cfg["attention_bias"] = has_bias
        if a == "llama":
            cfg["mlp_bias"] = False
        if a in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        if cfg["rope_scaling"] is None and self._has_rope_factors():
            warnings.warn(
                f"{self.path}: has a rope_freqs tensor (Llama-3.1-style rope scaling baked into per-frequency "
                "factors); the scaling parameters are not in the GGUF metadata, so hf_config() leaves "
                "rope_scaling=None. Set it from the original config.json for long-context use.",
                stacklevel=2,
            )
        return cfg

    def _has_rope_factors(self) -> bool:
        from gguf.quants import dequantize

        t = self._file.tensors.get("rope_freqs.weight")
        return t is not None and not np.all(dequantize(self._file.raw(t), t.qtype) == 1.0)

    def _vocab_size(self) -> int:
        # Same order transformers uses: explicit metadata, else the tokenizer's token count.
        n = self._meta(f"{self.arch}.vocab_size")
        if n is None and (tokens := self._file.fields.get("tokenizer.ggml.tokens")) is not None:
            n = len(tokens)
        if n is None:
            n = self.shape("model.embed_tokens.weight")[0]
        return int(n)

    def _rope_scaling(self) -> dict | None:
        a = self.arch
        kind = self._meta(f"{a}.rope.scaling.type")
        factor = self._meta(f"{a}.rope.scaling.factor") or self._meta(f"{a}.rope.scale_linear")
        if kind is None and factor:  # older files only wrote rope.scale_linear
            kind = "linear"
        if kind in (None, "none") or not factor or float(factor) == 1.0:
            return None
        scaling = {"rope_type": kind, "factor": float(factor)}
        if (orig := self._meta(f"{a}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (
            ("rope.scaling.attn_factor", "attention_factor"),
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if (v := self._meta(f"{a}.{gguf_key}")) is not None:
                scaling[hf_key] = float(v)
        return scaling

    def _gemma3_extras(self, cfg: dict) -> dict:
        n = cfg["num_hidden_layers"]
        window = self._meta("gemma3.attention.sliding_window")
        pattern = self._meta("gemma3.attention.sliding_window_pattern")
        if window is None:  # converter omits the window when no layer slides
            sliding = [False] * n
        elif isinstance(pattern, list):  # per-layer flags, True = sliding
            sliding = [bool(p) for p in pattern]
        else:  # llama.cpp's default for Gemma 3: every 6th layer is global
            period = int(pattern or 6)
            sliding = [i % period != period - 1 for i in range(n)]
        if len(sliding) != n:
            raise GGUFError(f"{self.path}: sliding_window_pattern has {len(sliding)} entries for {n} layers")
        # llama.cpp scales queries by 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(hidden/heads).
        scale = self._meta("gemma3.attention.scale")
        if scale:
            qpas = 1.0 / float(scale) ** 2
        elif n == 62:
            qpas = cfg["hidden_size"] // cfg["num_attention_heads"]
        else:
            qpas = cfg["head_dim"]
        return {
            "hidden_activation": "gelu_pytorch_tanh",
            # local layers' base is not written to GGUF; llama.cpp hardcodes 10000 as HF does.
            "rope_local_base_freq": float(self._meta("gemma3.rope.freq_base_swa", 10000.0)),
            # a number keeps the HF config valid; unused when no layer slides
            "sliding_window": int(window) if window is not None else cfg["max_position_embeddings"],
            "query_pre_attn_scalar": qpas,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "final_logit_softcapping": self._meta("gemma3.final_logit_softcapping"),
            "attn_logit_softcapping": self._meta("gemma3.attn_logit_softcapping"),
            "attention_bias": False,
        }

    def tokenizer(self):
        """A transformers tokenizer built from the GGUF's tokenizer metadata.

        transformers' own GGUF builders make it (the same class of tokenizer `AutoTokenizer(...,
        gguf_file=)` makes; tests/test_gguf_io.py checks they tokenize alike), fed from our reader:
        transformers' GGUF reader imports torch, which jaxlens does not need. Building it walks the
        whole vocabulary (~12 s for Gemma's 262k tokens), so the result is saved once under
        $JAXLENS_CACHE (default ~/.cache/jaxlens) keyed by the file's name, size and mtime, and
        later loads read those HF tokenizer files instead.
        """
        from transformers import AutoTokenizer

        stat = self.path.stat()
        root = Path(os.environ.get("JAXLENS_CACHE", Path.home() / ".cache" / "jaxlens"))
        cached = root / "tokenizers" / f"{self.path.name}-{stat.st_size}-{stat.st_mtime_ns}"
        if (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(cached))
        tokenizer = self._build_tokenizer()
        partial = cached.with_name(cached.name + f".partial-{os.getpid()}")
        try:
            tokenizer.save_pretrained(str(partial))
            partial.rename(cached)
        except OSError:  # a read-only home or a concurrent writer: the cache is only a speed-up
            shutil.rmtree(partial, ignore_errors=True)
        return tokenizer

    def _build_tokenizer(self):
        """What transformers' `get_gguf_tokenizer` + `convert_gguf_tokenizer` do, with our reader."""
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

        fields = self._file.fields
        if "tokenizer.ggml.tokens" not in fields:
            raise GGUFError(f"{self.path}: no tokenizer in its metadata (tokenizer.ggml.tokens); pass tokenizer=")
        tok, config = ({name: self._meta(f"tokenizer.{key}") for key, name in renames.items() if f"tokenizer.{key}" in fields}
                       for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"]))
        if tok.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
            config.setdefault("add_bos_token", True)
        for name, key in _SPECIAL_TOKENS.items():
            index = self._meta(f"tokenizer.ggml.{key}")
            config[name] = tok["tokens"][index] if index is not None else None
        backend, extra = convert_gguf_tokenizer(self.arch, tok)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.path)!r}, arch={self.arch!r}, tensors={len(self._tensors)})"


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"
