"""M2-ViT: shapes, pooling, problem types, Transformers integration (Auto classes, image processor, pipeline, remote
code, Trainer)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from m2_hf import BlockdiagLinear, M2ViTConfig, M2ViTForImageClassification, M2ViTModel, MonarchLinear
from m2_hf.m2_mixer import M2SequenceMixer
from remote_code import run_without_m2_hf

HEADS = {AutoModel: M2ViTModel, AutoModelForImageClassification: M2ViTForImageClassification}


def tiny_config(**overrides) -> M2ViTConfig:
    values = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, hyena_filter_order=16, hyena_emb_dim=5, num_labels=3)
    values.update(overrides)
    return M2ViTConfig(**values)


def tiny_model(cls=M2ViTForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def images(batch=2, size=32, channels=3, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_forward_shapes_and_pooling(pooling):
    model = tiny_model(M2ViTModel, pooling=pooling)
    with torch.no_grad():
        out = model(images(), output_hidden_states=True)
    patches = 16 + (pooling == "cls")
    assert out.last_hidden_state.shape == (2, patches, 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, patches, 32)
    expected = out.last_hidden_state[:, 0] if pooling == "cls" else out.last_hidden_state.mean(1)
    torch.testing.assert_close(out.pooler_output, expected)
    classifier = tiny_model(pooling=pooling)
    with torch.no_grad():
        logits = classifier(images()).logits
        as_tuple = classifier(images(), return_dict=False)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(as_tuple[0], logits)


def test_architecture_shares_the_m2_mixer_and_structured_mlp():
    model = tiny_model()
    layer = model.m2_vit.layers[0]
    assert type(layer.mixer) is M2SequenceMixer and layer.mixer.filter_fn.bidirectional
    assert isinstance(layer.mlp.gated_layers, BlockdiagLinear) and isinstance(layer.mlp.wo, BlockdiagLinear)
    monarch = tiny_model(monarch_mlp_type="monarch").m2_vit.layers[0].mlp
    assert isinstance(monarch.gated_layers, MonarchLinear)
    dense = tiny_model(use_monarch_mlp=False).m2_vit.layers[0].mlp
    assert isinstance(dense.gated_layers, torch.nn.Linear)


def patch_influence(model, position: int = 0) -> torch.Tensor:
    """``[4, 4]``: how much each 8x8 patch of a 32x32 image moves output ``position`` (the sum of |gradient| of a fixed
    random projection of that output over the patch's pixels), in float64.

    A projection, because the output is a LayerNorm's, whose sum has no gradient; float64, because at the
    initialisation the far patches' influence is only about 1e-9 of the patch's own, far above float64 rounding
    (about 1e-23 here: the FFT convolutions leak it to positions they cannot reach) but not above float32's."""
    model = model.double()
    pixels = images(batch=1).double().requires_grad_()
    output = model(pixels).last_hidden_state[0, position]
    projection = torch.randn(output.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (output * projection).sum().backward()
    return pixels.grad[0].abs().sum(0).unfold(0, 8, 8).unfold(1, 8, 8).sum((-1, -2))


@pytest.mark.parametrize("seed", range(6))
def test_every_patch_reaches_every_output(seed):
    influence = patch_influence(tiny_model(M2ViTModel, seed=seed))
    assert (influence > 1e-13 * influence.max()).all(), influence  # bidirectional: the first patch sees the last one


def test_patch_influence_detects_patches_an_output_cannot_see():
    """The control: without the reverse filters the mixer is causal, so the first output sees the first patch only
    (the short convolution, the MLP and the norms are causal or token-wise), and the check above would fail."""
    model = tiny_model(M2ViTModel)
    with torch.no_grad():
        for layer in model.layers:
            for filters in (layer.mixer.filter_fn, getattr(layer.mixer, "filter_fn2", None)):
                if filters is not None:
                    filters.implicit_filter_rev[-1].weight.zero_()
    influence = patch_influence(model).flatten()
    assert (influence[1:] < 1e-13 * influence[0]).all(), influence


def test_default_size_is_about_half_of_vit_base():
    config = M2ViTConfig(num_labels=1000)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (768, 12, 224, 16)
    m2 = sum(p.numel() for p in M2ViTForImageClassification(config).parameters())
    vit = sum(p.numel() for p in ViTForImageClassification(ViTConfig(num_labels=1000)).parameters())
    assert round(m2 / 1e6, 1) == 47.4
    assert 0.5 < m2 / vit < 0.6


def test_bad_images_and_configs_are_refused_with_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"32x32 images \(`config.image_size`\), got 48x48.*image_size"):
        model(images(size=48))
    with pytest.raises(ValueError, match="num_channels"):
        model(images(channels=1))
    with pytest.raises(ValueError, match="patch_size"):
        M2ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="pooling"):
        M2ViTConfig(pooling="max")
    rectangular = tiny_model(image_size=(16, 32))
    assert rectangular(images(size=32)[..., :16, :]).logits.shape == (2, 3)


@pytest.mark.parametrize(
    "problem_type,labels",
    [
        ("single_label_classification", torch.tensor([0, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        ("regression", torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])),
    ],
)
def test_problem_types_compute_transformers_losses(problem_type, labels):
    model = tiny_model(problem_type=problem_type)
    out = model(images(), labels=labels)
    if problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(out.logits, labels)
    elif problem_type == "multi_label_classification":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels)
    else:
        expected = torch.nn.functional.mse_loss(out.logits, labels)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("auto_class,model_class", list(HEADS.items()))
def test_auto_classes(auto_class, model_class):
    values = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("m2_vit", **values)
    assert type(config) is M2ViTConfig
    assert type(auto_class.from_config(config)) is model_class


def image_processor():
    return ViTImageProcessorPil(size={"height": 32, "width": 32})


def test_save_load_image_processor_and_pipeline(tmp_path):
    model = tiny_model(id2label={0: "zero", 1: "one", 2: "two"}, label2id={"zero": 0, "one": 1, "two": 2})
    model.save_pretrained(tmp_path)
    image_processor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", *(auto.__name__ for auto in HEADS)}
    assert {"modeling_m2_vit.py", "configuration_m2_vit.py", "m2_mixer.py", "monarch.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    pixels = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    classify = pipeline("image-classification", model=str(tmp_path), image_processor=processor)
    predictions = classify(picture, top_k=3)
    with torch.no_grad():
        logits = model(processor(picture, return_tensors="pt").pixel_values).logits[0]
    assert [p["label"] for p in predictions] == [model.config.id2label[int(i)] for i in logits.argsort(descending=True)]


def test_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    pixels = images()
    with torch.no_grad():
        expected = model(pixels).logits
    torch.save({"pixels": pixels, "expected": expected}, tmp_path / "expected.pt")
    run_without_m2_hf(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageClassification
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(data["pixels"]).logits, data["expected"])
            AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)(data["pixels"])
        """,
        tmp_path,
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(pooling="cls").train()
    pixels, labels = images(), torch.tensor([0, 2])

    def gradients():
        model.zero_grad()
        model(pixels, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_trainer_lowers_the_loss(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    pixels = images(batch=16)
    labels = (pixels.mean((1, 2, 3)) > 0).long() + (pixels[:, 0].mean((1, 2)) > 0).long()
    dataset = Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()}).with_format("torch")
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=12, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0]
