"""Converted (`monarch_*`) models loaded from checkpoints that lack some structured layers: those layers are
initialised as the layer's constructor does, reported as missing, and every loaded tensor is kept as it was."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import m2_hf
from m2_hf import BlockdiagLinear, MonarchLinear
from m2_hf.modeling_monarch_converted import CONVERTED_CLASSES, converted_family

# Per family: a tiny config and its structured layers. The checkpoint will lack all tensors of the first layer and the
# factors (not the bias) of the second, as a dense checkpoint loaded into a converted config does. For GPT-2 the first
# is `c_proj`, which GPT-2's own init reaches into (its scaled residual init).
FAMILIES = {
    m2_hf.MonarchBertConfig: (
        dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=32),
        {"encoder.layer.0.intermediate.dense": 4, "encoder.layer.1.attention.self.query": 2},
    ),
    m2_hf.MonarchRobertaConfig: (
        dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=40, pad_token_id=0),
        {"encoder.layer.0.intermediate.dense": 4, "encoder.layer.1.output.dense": 4},
    ),
    m2_hf.MonarchDistilBertConfig: (
        dict(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=32),
        {"transformer.layer.0.ffn.lin1": 4, "transformer.layer.1.ffn.lin2": 4},
    ),
    m2_hf.MonarchGPT2Config: (
        dict(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=32, pad_token_id=0, bos_token_id=0,
             eos_token_id=0),
        {"h.0.mlp.c_proj": 4, "h.0.mlp.c_fc": 4, "h.1.attn.c_attn": 2},
    ),
}
# Every head that an Auto class maps each family to.
CASES = [
    pytest.param(config_class, converted.original_class.__name__, structure,
                 id=f"{converted.original_class.__name__}-{structure}")
    for config_class in FAMILIES
    for converted in dict.fromkeys(converted_family(config_class.original_config_class).values())
    for structure in ("monarch", "blockdiag")
]


def test_every_head_of_the_families_is_covered():
    assert len(CASES) >= 2 * (9 + 7 + 6 + 5)  # BERT, RoBERTa, DistilBERT and GPT-2 heads of the Auto classes


def delete_from_checkpoint(folder, layers: dict[str, tuple[str, ...]]) -> set[str]:
    """Delete, from the safetensors file in ``folder``, the named tensors of each layer (named relative to the base
    model, so under any head prefix); returns the deleted keys."""
    path = folder / "model.safetensors"
    state = load_file(path)
    deleted = {
        key
        for key in state
        for layer, tensors in layers.items()
        for tensor in tensors
        if key == f"{layer}.{tensor}" or key.endswith(f".{layer}.{tensor}")
    }
    save_file({key: value for key, value in state.items() if key not in deleted}, path, metadata={"format": "pt"})
    return deleted


@pytest.mark.parametrize("config_class,original,structure", CASES)
def test_missing_structured_layer_is_initialised_and_reported(config_class, original, structure, tmp_path):
    overrides, layers = FAMILIES[config_class]
    config = config_class(**overrides, monarch_layers=layers, monarch_structure=structure)
    cls = CONVERTED_CLASSES[original]
    torch.manual_seed(0)
    saved = cls(config)
    saved.save_pretrained(tmp_path)
    whole, factors_only = list(layers)[:2]
    factors = ("blkdiag1", "blkdiag2") if structure == "monarch" else ("weight",)
    deleted = delete_from_checkpoint(tmp_path, {whole: (*factors, "bias"), factors_only: factors})
    assert len(deleted) == 2 * len(factors) + 1

    torch.manual_seed(1)
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == deleted

    kept = loaded.state_dict()
    for key, value in saved.state_dict().items():
        if key not in deleted:
            assert torch.equal(kept[key], value), key  # loaded tensors are not re-initialised
    for layer_name, names in ((whole, (*factors, "bias")), (factors_only, factors)):
        layer = loaded.base_model.get_submodule(layer_name)
        assert isinstance(layer, MonarchLinear if structure == "monarch" else BlockdiagLinear)
        bounds = layer.uniform_init_bounds()
        for name in names:
            values = getattr(layer, name).detach()
            # U(-b, b) has standard deviation b / sqrt(3); samples of 64 values or more lie well within 25% of it.
            assert torch.isfinite(values).all() and values.abs().max() <= bounds[name], (layer_name, name)
            assert values.std().item() == pytest.approx(bounds[name] / math.sqrt(3), rel=0.25), (layer_name, name)
