#!/usr/bin/env python
"""Image classification with M2-ViT and `Trainer`, compared with Transformers' ViT of the same size.

By default it needs nothing from the network and runs on a CPU in a few minutes: the images are scikit-learn's
bundled handwritten digits (1797 grey 8x8 scans of 10 classes), upsampled to RGB images, split 80/20 with a fixed
seed; the image processor is Transformers' `ViTImageProcessor` (resize, normalise). Both models are trained by the
same code with the same settings, and the validation accuracies are printed side by side:

    python examples/finetune_image_classification.py --output_dir runs/digits
    python examples/finetune_image_classification.py --output_dir runs/flowers --train_dir flowers/train \\
        --validation_dir flowers/val --image_size 224 --patch_size 16 --hidden_size 768 --num_hidden_layers 12
    python examples/finetune_image_classification.py --output_dir runs/beans --dataset_name beans   # with the Hub

`--train_dir`/`--validation_dir` are image folders (`datasets`' `imagefolder`: one sub-folder per class). Every
trained model is saved under `output_dir/<model>` with its image processor and a model card: a folder that
`from_pretrained` and `pipeline("image-classification")` load (with `trust_remote_code=True` where m2-hf is not
installed), and that `--push_to_hub` uploads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from example_utils import (  # first: it makes the checkout importable
    TrainedModelCard,
    classification_compute_metrics,
    end_distributed_run,
    eval_results,
    parse_arguments,
    publish,
    train_and_evaluate,
    training_arguments_for,
)
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, set_seed
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from m2_hf import M2ViTConfig, M2ViTForImageClassification


@dataclass
class ModelArguments:
    image_size: int = field(default=32, metadata={"help": "Side of the (resized) input images, in pixels."})
    patch_size: int = field(default=4, metadata={"help": "Side of the square patches."})
    hidden_size: int = field(default=128, metadata={"help": "Width of both models."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Depth of both models."})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width as a multiple of the hidden size (both models)."})
    monarch_mlp_type: str = field(default="blockdiag", metadata={"help": "M2-ViT's MLP layers: blockdiag or monarch."})
    monarch_mlp_nblocks: int = field(default=4, metadata={"help": "Blocks of M2-ViT's structured MLP layers."})
    pooling: str = field(default="mean", metadata={"help": "M2-ViT's pooling: mean (over patches) or cls."})
    compare_with_vit: bool = field(default=True, metadata={"help": "Also train ViTForImageClassification."})


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hub dataset (needs the network)."})
    dataset_config_name: Optional[str] = field(default=None)
    train_dir: Optional[str] = field(default=None, metadata={"help": "An image folder: one sub-folder per class."})
    validation_dir: Optional[str] = field(default=None, metadata={"help": "An image folder for validation."})
    image_column_name: str = field(default="image")
    label_column_name: str = field(default="label")
    validation_fraction: float = field(default=0.2, metadata={"help": "Held out when there is no validation split."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on training images."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Cap on validation images."})


def default_training_arguments(output_dir: str = "runs/finetune-image-classification") -> list[str]:
    """Settings of the default CPU run, overridable from the command line."""
    return ["--output_dir", output_dir, "--num_train_epochs", "6", "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "64", "--learning_rate", "1e-3", "--warmup_steps", "20",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0.05", "--logging_steps", "25",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--remove_unused_columns", "false"]


def digits_dataset() -> Dataset:
    """scikit-learn's bundled digits as RGB images (grey levels 0-16 scaled to 0-255)."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    pictures = [PILImage.fromarray(np.uint8(image * 255 / 16)).convert("RGB") for image in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return Dataset.from_dict({"image": pictures, "label": digits.target.tolist()}, features=features)


def load_images(data_args: DataArguments, seed: int) -> tuple[DatasetDict, str]:
    """The training and validation splits, and a description of the data for the model card."""
    if data_args.dataset_name is not None:
        raw, description = load_dataset(data_args.dataset_name, data_args.dataset_config_name), data_args.dataset_name
    elif data_args.train_dir is not None:
        files = {"train": f"{data_args.train_dir}/**"}
        if data_args.validation_dir is not None:
            files["validation"] = f"{data_args.validation_dir}/**"
        raw, description = load_dataset("imagefolder", data_files=files), Path(data_args.train_dir).name
    else:
        raw, description = DatasetDict({"train": digits_dataset()}), "scikit-learn digits (8x8, upsampled)"
    if "validation" not in raw:
        held_out = "test" if "test" in raw else None
        if held_out is None:
            split = raw["train"].train_test_split(
                test_size=data_args.validation_fraction, seed=seed, stratify_by_column=data_args.label_column_name
            )
            raw = DatasetDict({"train": split["train"], "validation": split["test"]})
        else:
            raw = DatasetDict({"train": raw["train"], "validation": raw[held_out]})
    for name, cap in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if cap is not None:
            raw[name] = raw[name].select(range(min(cap, len(raw[name]))))
    return raw, description


def with_pixel_values(splits: DatasetDict, processor, data_args: DataArguments) -> DatasetDict:
    """Each split decoded and processed on the fly (`set_transform`) into `pixel_values` and `labels`."""

    def transform(batch):
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        return {"pixel_values": processor(images, return_tensors="pt").pixel_values,
                "labels": batch[data_args.label_column_name]}

    for split in splits.values():
        split.set_transform(transform)
    return splits


def build_models(model_args: ModelArguments, labels: list[str]) -> dict:
    label_maps = dict(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    shape = dict(image_size=model_args.image_size, patch_size=model_args.patch_size,
                 hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
                 intermediate_size=model_args.mlp_ratio * model_args.hidden_size, num_labels=len(labels))
    models = {"m2-vit": lambda: M2ViTForImageClassification(M2ViTConfig(
        monarch_mlp_type=model_args.monarch_mlp_type, monarch_mlp_nblocks=model_args.monarch_mlp_nblocks,
        pooling=model_args.pooling, **shape, **label_maps,
    ))}
    if model_args.compare_with_vit:
        models["vit"] = lambda: ViTForImageClassification(ViTConfig(
            num_attention_heads=max(1, model_args.hidden_size // 64), hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **shape, **label_maps,
        ))
    return models


def train_one(name: str, build, splits, processor, training_args: TrainingArguments, description: str) -> dict:
    set_seed(training_args.seed)
    model = build()
    trainer = Trainer(
        model=model, args=training_arguments_for(training_args, name), train_dataset=splits["train"],
        eval_dataset=splits["validation"], processing_class=processor,
        compute_metrics=classification_compute_metrics(("accuracy",), is_regression=False),
    )
    figures = train_and_evaluate(trainer)
    result = {
        "model": name,
        **figures,
        "validation_loss": figures["loss"],
        "validation_accuracy": figures["accuracy"],
        "train_images": len(splits["train"]),
        "validation_images": len(splits["validation"]),
    }
    publish(trainer, training_args, lambda folder: write_model_card(folder, model, result, description))
    return result


def write_model_card(folder: Path, model, result: dict, description: str) -> None:
    """M2-ViT: the m2-vit card template; the ViT baseline: the generic card. Both with the validation accuracy as
    `model-index` metadata."""
    from huggingface_hub import ModelCardData

    from model_cards import render_model_card

    metrics = {"accuracy": result["validation_accuracy"]}
    training = (f"{description}: {result['train_images']} images, {result['epochs']:g} epochs in "
                f"{result['train_seconds']:.0f} s")
    validation = f"{result['validation_images']} held-out images ({description})"
    if not isinstance(model, M2ViTForImageClassification):
        TrainedModelCard(
            pipeline_tag="image-classification", description="The ViT baseline of "
            "`examples/finetune_image_classification.py`.", data_description=description,
            validation_description=validation, training_description=training, example_input=repr("image.png"),
            auto_class="AutoModelForImageClassification",
        ).write(folder, model, metrics)
        return
    config = model.config
    card_data = ModelCardData(
        model_name=folder.name, library_name="transformers", pipeline_tag="image-classification",
        tags=["m2", "monarch", "custom_code", "vision"],
        eval_results=eval_results("image-classification", description, metrics, dataset_type="image"),
    )
    mlp = f"{'GLU, ' if config.use_glu_mlp else ''}{config.monarch_mlp_type} with {config.monarch_mlp_nblocks} blocks"
    card = render_model_card(
        "m2-vit", card_data, model_name=folder.name, repo_id=folder.name, image_size=config.image_size,
        patch_size=config.patch_size, num_patches=config.num_patches, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, mlp_description=mlp, pooling=config.pooling,
        num_parameters=f"{result['parameters'] / 1e6:.2f}M", num_labels=config.num_labels,
        training_description=f"Trained with `examples/finetune_image_classification.py` on {training}.",
        measurements=f"Validation accuracy {result['validation_accuracy']:.4f} on {validation}.",
    )
    card.save(folder / "README.md")


def main() -> None:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments), default_training_arguments,
        "runs/finetune-image-classification",
    )
    raw, description = load_images(data_args, training_args.seed)
    labels = raw["train"].features[data_args.label_column_name].names
    processor = ViTImageProcessorPil(size={"height": model_args.image_size, "width": model_args.image_size})
    splits = with_pixel_values(raw, processor, data_args)
    print(f"{len(splits['train'])} training and {len(splits['validation'])} validation images, {len(labels)} classes")
    results = [train_one(name, build, splits, processor, training_args, description)
               for name, build in build_models(model_args, labels).items()]
    if training_args.process_index == 0:
        print(f"\n{'model':<8} {'parameters':>11} {'train s':>8} {'val loss':>9} {'val accuracy':>13}")
        for r in results:
            print(f"{r['model']:<8} {r['parameters']:>11,} {r['train_seconds']:>8.0f} {r['validation_loss']:>9.3f} "
                  f"{r['validation_accuracy']:>13.4f}")
        output = Path(training_args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    end_distributed_run()


if __name__ == "__main__":
    main()
