"""Wrong input to the public API raises InputError (a ValueError) naming the argument, before
anything is compiled (docs/errors.md lists the kinds)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlens
from jaxlens import interventions as iv
from jaxlens import reducers as rd
from jaxlens.core.forward import forward
from jaxlens.core.validate import InputError


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]  # 128-token vocabulary, tokenizer attached


def ok_tokens(model, length=4):
    return np.ones((2, length), np.int32)


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)


@pytest.mark.parametrize("bad", [128, 10**6, -1])
def test_token_id_outside_vocabulary(model, bad):
    tokens = ok_tokens(model)
    tokens[1, 2] = bad
    with pytest.raises(InputError, match=rf"tokens contains id {bad} outside the vocabulary \[0, 128\)"):
        model(tokens)
    with pytest.raises(InputError, match="tokens contains id"):
        forward(model.params, tokens, config=model.config)


def test_token_ids_from_a_list_are_checked(model):
    with pytest.raises(InputError, match="tokens contains id 500"):
        model([[1, 2, 500]])


def test_float_token_ids(model):
    with pytest.raises(InputError, match="tokens must be integer ids"):
        model(np.full((1, 3), 1.5))


def test_device_tokens_are_not_read_back(model):
    # A device array's values are not fetched (no sync); its dtype still is checked.
    with pytest.raises(InputError, match="tokens must be integer ids; got dtype float32"):
        forward(model.params, jnp.ones((1, 3), jnp.float32), config=model.config)


def test_mask_wrong_shape(model):
    with pytest.raises(InputError, match=r"attention_mask shape \(2, 3\) != tokens shape \(2, 4\)"):
        model(ok_tokens(model), np.ones((2, 3), np.int32))


def test_mask_wrong_dtype(model):
    with pytest.raises(InputError, match="attention_mask must be bool or integer 0/1; got dtype float32"):
        model(ok_tokens(model), np.ones((2, 4), np.float32))


def test_mask_values_not_zero_one(model):
    mask = np.ones((2, 4), np.int32)
    mask[0, 0] = 2
    with pytest.raises(InputError, match=r"attention_mask must hold only 0 and 1; got values \[2\]"):
        model(ok_tokens(model), mask)


def test_mask_all_zero_row_is_refused_where_asked():
    # forward and Model.__call__ accept all-zero rows (filler rows of fixed-size batches, KV-cache
    # continuations); validate.mask refuses them when the caller asks.
    from jaxlens.core import validate

    mask = np.ones((2, 4), np.int32)
    mask[1] = 0
    with pytest.raises(InputError, match=r"attention_mask row\(s\) \[1\] are all zero"):
        validate.mask(mask, (2, 4))
    validate.mask(mask, (2, 4), empty_rows=True)


def test_intervention_layer_outside_model(model):
    n = model.config.n_layers
    steer = iv.add("resid_post", np.zeros(model.config.d_model), alpha=1.0, layers=[99])
    with pytest.raises(InputError, match=rf"intervention 'add' at 'resid_post': layers \[99\] are outside the model's layers 0..{n - 1}"):
        model(ok_tokens(model), interventions=steer)


def test_intervention_negative_layer(model):
    steer = iv.add("resid_post", np.zeros(model.config.d_model), layers=[-1])
    with pytest.raises(InputError, match=r"layers \[-1\] are outside"):
        model(ok_tokens(model), interventions=steer)


def test_steering_vector_wrong_width(model):
    d = model.config.d_model
    steer = iv.add("resid_post", np.zeros(d + 3), layers=[0])
    with pytest.raises(InputError, match=rf"'resid_post': vector has width {d + 3} but site 'resid_post' has width {d}"):
        model(ok_tokens(model), interventions=steer)


def test_neuron_mask_wrong_width(model):
    cfg = model.config
    knock = iv.ablate("mlp_act", np.zeros((cfg.n_layers, cfg.d_ff - 1), bool))
    with pytest.raises(InputError, match=rf"'mlp_act'.*width {cfg.d_ff - 1} but site 'mlp_act' has width {cfg.d_ff}"):
        model(ok_tokens(model), interventions=knock)


def test_neuron_mask_wrong_layer_count(model):
    cfg = model.config
    knock = iv.ablate("mlp_act", np.zeros((cfg.n_layers + 1, cfg.d_ff), bool))
    with pytest.raises(InputError, match=rf"per_layer value has {cfg.n_layers + 1} layers, the model has {cfg.n_layers}"):
        model(ok_tokens(model), interventions=knock)


def test_projection_basis_wrong_width(model):
    d = model.config.d_model
    proj = iv.project_out("resid_post", np.eye(d + 1)[:2])
    with pytest.raises(InputError, match=rf"basis has width {d + 1} but site 'resid_post' has width {d}"):
        model(ok_tokens(model), interventions=proj)


def test_intervention_positions_wrong_length(model):
    steer = iv.add("resid_post", np.zeros(model.config.d_model), positions=np.ones((2, 7), bool))
    with pytest.raises(InputError, match=r"positions has shape \(2, 7\); tokens are \(2, 4\)"):
        model(ok_tokens(model), interventions=steer)


def test_patch_cache_of_another_batch(model):
    cfg = model.config
    patch = iv.patch("resid_post", np.zeros((cfg.n_layers, 3, 4, cfg.d_model), np.float32))
    with pytest.raises(InputError, match=r"patch's cache\) \[B, T, F\] has B, T = 3, 4; tokens have 2, 4"):
        model(ok_tokens(model), interventions=patch)


def test_reducer_positions_outside_prompt(model):
    take = rd.Take("resid_post", jnp.array([[3], [9]], jnp.int32))
    with pytest.raises(InputError, match=r"reducer 'last': index holds positions outside 0..3"):
        model(ok_tokens(model), reducers={"last": take})


def test_reducer_batch_mismatch(model):
    take = rd.Take("resid_post", jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(InputError, match=r"reducer 'last': index has batch 5, tokens have 2"):
        model(ok_tokens(model), reducers={"last": take})


def test_unknown_capture_name(model):
    with pytest.raises(ValueError, match=r"unknown capture site\(s\) \['mlp'\]"):
        model(ok_tokens(model), capture=("mlp",))


def test_encode_empty_list(model):
    with pytest.raises(InputError, match="texts is empty; give at least one string"):
        model.encode([])


def test_encode_non_string(model):
    with pytest.raises(InputError, match=r"texts\[1\] is int, not a string"):
        model.encode(["hello", 3])


def test_encode_bad_padding_side(model):
    with pytest.raises(InputError, match="padding_side must be 'left' or 'right'; got 'middle'"):
        model.encode(["hello"], padding_side="middle")


def test_tokenizer_larger_than_vocabulary(tiny_checkpoint):
    from transformers import AutoTokenizer  # noqa: F401  (the real loader's kind of object)

    class Big:
        def __len__(self):
            return 1000

    _, directory = tiny_checkpoint("llama")
    with pytest.raises(InputError, match=r"tokenizer has 1000 tokens but the model's vocabulary is 128; .*tokenizer="):
        jaxlens.load(directory, tokenizer=Big())


def test_good_input_still_runs(model):
    # The checks refuse only what is wrong: an intervention on the last layer and a left-padded mask pass.
    tokens, mask = model.encode(["hello world", "hi"])
    steer = iv.add("resid_post", np.zeros(model.config.d_model), layers=[model.config.n_layers - 1],
                   positions=iv.last_token(mask))
    logits, _ = model(tokens, mask, interventions=steer)
    assert logits.shape[:2] == tokens.shape
