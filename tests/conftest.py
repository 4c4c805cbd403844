"""Shared fixtures: tiny random-init transformers checkpoints saved to disk (the real load path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXLENS_SHARED", ROOT.parent / "shared"))

# The repo root holds kernels/ and converters/ (installed as jaxlens.kernels, jaxlens.converters). On
# sys.path (`python -m pytest` puts the working directory there) its kernels/ shadows PyPI's `kernels`,
# which transformers >= 5.25 imports with torch: take the root off before any test imports transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

_COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
)

# Small windows and mixed layer types so sliding attention is exercised at test lengths (T=12).
TINY_CONFIGS = {
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "mistral": dict(sliding_window=5),
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
    "qwen3": dict(),
    "gemma3_text": dict(sliding_window=5, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # The families below use larger weights (initializer_range=0.2): with 0.02 the activations stay
    # so small that e.g. exact vs tanh GELU differ by < 1e-4, and parity could not tell them apart.
    "gemma": dict(initializer_range=0.2),
    # Caps near the scores' and logits' own scale, so tanh is far from linear.
    "gemma2": dict(sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                   final_logit_softcapping=1.0, initializer_range=0.2,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gpt2": dict(n_inner=96, initializer_range=0.2),
    "gpt_neox": dict(rotary_pct=0.5, num_key_value_heads=4, initializer_range=0.2),
    "bloom": dict(num_key_value_heads=4, initializer_range=0.2),
    "olmo2": dict(initializer_range=0.2),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=5, pad_token_id=0, initializer_range=0.2),
}


def build_hf_model(model_type: str, seed: int = 0, **overrides):
    """A random-init transformers model with non-trivial norm weights (zeros/ones hide bugs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})
    config._attn_implementation = "eager"  # so output_attentions returns the probabilities
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights and biases
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(model_type) -> (hf_model, directory) saved with save_pretrained."""
    cache = {}

    def make(model_type: str):
        if model_type not in cache:
            model = build_hf_model(model_type)
            directory = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(directory)
            cache[model_type] = (model, directory)
        return cache[model_type]

    return make


def random_tokens(seed: int, shape, vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32)


CORPUS = [
    "The man turned on the tap. Question: What was the cause? What happened as a result? Answer: A. B. C. D.",
    "The toilet filled with water. Water flowed from the spout. She lost her appetite. He poured milk.",
    "A B C D abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'\"-()\n",
]


def tiny_tokenizer():
    """A 128-token BPE (SentencePiece-style ▁ spaces, <bos> prepended) matching tiny_checkpoint's vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<bos>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint, tmp_path_factory):
    """(model, tokenizer, checkpoint dir with the tokenizer saved beside the weights)."""
    import jaxlens

    _, src = tiny_checkpoint("llama")
    directory = tmp_path_factory.mktemp("llama_tok")
    shutil.copytree(src, directory, dirs_exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    return jaxlens.load(str(directory)), tokenizer, directory




def parallel_items():
    """Two English multiple-choice items and their parallel "xx" items (same ids): what steering
    and transplant tests run on the tiny model."""
    from jaxlens.data.items import Item

    return [
        Item("1", "en", "The man.", ("Water.", "The toilet."), 1, "effect"),
        Item("2", "en", "She lost.", ("Milk.", "Tap."), 0, "cause"),
        Item("1", "xx", "A man.", ("Milk.", "The tap."), 1, "effect"),
        Item("2", "xx", "He poured.", ("Water.", "A toilet."), 0, "cause"),
    ]


def run_on_8_devices(script: str, *args, timeout: int = 300) -> str:
    """Run tests/SCRIPT in a fresh process on 8 simulated CPU devices (the device count is fixed at
    JAX's start, so it cannot be this process); asserts it exited 0 and returns its stdout."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    return run.stdout
