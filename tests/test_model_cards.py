"""The model-card renderer and templates."""

import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from model_cards import available_templates, render_model_card


def test_m2_bert_card_renders_with_metadata_and_fields(tmp_path):
    data = ModelCardData(
        model_name="m2-bert-tiny", license="apache-2.0", language="en", library_name="transformers",
        pipeline_tag="fill-mask", tags=["m2", "monarch", "custom_code"],
        eval_results=[EvalResult(task_type="fill-mask", dataset_type="wikitext", dataset_name="WikiText",
                                 metric_type="perplexity", metric_value=12.5)],
    )
    card = render_model_card(
        "m2-bert", data, model_name="m2-bert-tiny", repo_id="org/m2-bert-tiny", hidden_size=32, num_hidden_layers=2,
        mlp_description="GLU, BlockdiagLinear with 4 blocks", max_length=64, num_parameters="1.2M",
        source="HazyResearch release", measurements="Parity: max difference 0.0.",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.license == "apache-2.0" and "custom_code" in loaded.data.tags
    assert loaded.data.eval_results[0].metric_value == 12.5
    text = loaded.text
    assert "# m2-bert-tiny" in text and "org/m2-bert-tiny" in text and "trust_remote_code=True" in text
    assert "| maximum length (`long_conv_l_max`) | 64 tokens |" in text
    assert "HazyResearch release" in text and "Parity: max difference 0.0." in text
    assert "{{" not in text


def test_unknown_template_names_the_available_ones():
    assert "m2-bert" in available_templates()
    with pytest.raises(ValueError, match="available: .*m2-bert"):
        render_model_card("m2-vit-huge", ModelCardData())
