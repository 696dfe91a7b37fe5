"""m2-hf's M2-BERT against the official model (HazyResearch/m2): tiny released-layout checkpoints with trained-scale
weights and the official outputs for them (`official_fixtures.py`), for the masked-LM, classification and retrieval
heads, with and without `hyena_training_additions`, layer by layer."""

import pytest
import torch

from official_fixtures import (
    FLOAT32_RELATIVE_TOLERANCE,
    assert_matches,
    case_names,
    official_case,
    official_inputs,
    provenance,
    recording_mixers,
)

ALL_CASES = case_names()
LAYER_CASES = case_names("mlm")  # the masked-LM fixtures record every layer


def test_the_fixtures_cover_every_head_with_and_without_training_additions():
    for head in ("mlm", "classifier", "retrieval"):
        for additions in (True, False):
            assert case_names(head, hyena_training_additions=additions, residual_long_conv=True)
    assert case_names("mlm", residual_long_conv=False)
    # Each part of the mixer moves the official outputs far beyond the tolerance, so a model without it cannot pass.
    for name, case in provenance()["cases"].items():
        changes = case["relative_output_change_when_altered"]
        assert min(changes.values()) > 1e-2, (name, changes)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("name", ALL_CASES)
def test_head_outputs_match_the_official_model(name, grad):
    case = official_case(name)
    ids, _ = official_inputs()
    model = case.load(torch.float64)
    with torch.set_grad_enabled(grad):
        assert_matches(case.output_of(model(ids)), case.output, f"{name} {case.output_name}")


@pytest.mark.parametrize("name", ALL_CASES)
def test_float32_outputs_match_the_official_model_to_float32_rounding(name):
    case = official_case(name)
    ids, _ = official_inputs()
    model = case.load(torch.float32)
    with torch.no_grad():
        actual = case.output_of(model(ids))
    assert_matches(actual, case.output, f"{name} {case.output_name} (float32)", FLOAT32_RELATIVE_TOLERANCE)


@pytest.mark.parametrize("name", LAYER_CASES)
def test_every_layer_and_mixer_matches_the_official_one(name):
    case = official_case(name)
    ids, _ = official_inputs()
    model = case.load(torch.float64)
    hidden = model.config.hidden_size
    shape = torch.Size((*ids.shape, hidden))
    # With gradients enabled every path calls out_linear as a module (see official_fixtures).
    with torch.enable_grad(), recording_mixers(model) as recording:
        outputs = model(ids, output_hidden_states=True)
    assert_matches(torch.stack(outputs.hidden_states), case.expected["hidden_states"], "embedding and layer outputs")
    for i in range(model.config.num_hidden_layers):
        expected = {k.split(".", 2)[-1]: v for k, v in case.expected.items() if k.startswith(f"layer.{i}.")}
        assert_matches(recording.projected_signal(i, shape), expected["projected_signal"],
                       f"layer {i}: the signal out_linear projects (gated branch + residual long convolution)")
        assert_matches(recording.mixer_output(i, shape), expected["mixer_output"], f"layer {i}: mixer output")


@pytest.mark.parametrize("name", case_names("mlm", residual_long_conv=False))
def test_gated_branch_alone_matches_the_official_one(name):
    """Without the residual long convolution, out_linear projects the gated branch long_conv(v * x1) * x2 alone."""
    case = official_case(name)
    ids, _ = official_inputs()
    model = case.load(torch.float64)
    assert not hasattr(model.bert.encoder.layer[0].attention, "filter_fn2")
    shape = torch.Size((*ids.shape, model.config.hidden_size))
    with torch.enable_grad(), recording_mixers(model) as recording:
        model(ids)
    for i in range(model.config.num_hidden_layers):
        assert_matches(recording.projected_signal(i, shape), case.expected[f"layer.{i}.gated_branch"],
                       f"layer {i}: gated branch")


def test_gated_and_residual_branches_are_both_large_in_the_fixtures():
    """The fixtures' weights make the gated branch and the residual convolution comparable, as in trained models (at
    the initialisation the gated branch is about 1e-6 of the mixer's output), and the two add up to what out_linear
    projects."""
    for name in case_names("mlm", residual_long_conv=True):
        expected = official_case(name).expected
        for i in range(2):
            gated, residual = expected[f"layer.{i}.gated_branch"], expected[f"layer.{i}.residual_branch"]
            assert 0.1 < gated.abs().max() / residual.abs().max() < 10, (name, i)
            assert_matches(gated + residual, expected[f"layer.{i}.projected_signal"], f"{name} layer {i}")
