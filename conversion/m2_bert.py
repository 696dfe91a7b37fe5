"""`m2-convert m2-bert`: a released M2-BERT checkpoint (HazyResearch/m2 format) to a native m2-hf folder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCardData

from m2_hf import M2BertConfig, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTextEncoding, M2BertModel
from model_cards import render_model_card

from .checkpoints import (
    ConversionError,
    OutputFolder,
    check_finite,
    copy_tokenizer_files,
    read_config,
    read_state_dict,
    resolve_source,
)

# Config entries that describe the source's own code or training run, not the model.
_DROPPED_CONFIG_KEYS = ("auto_map", "architectures", "_name_or_path", "transformers_version", "model_type", "torch_dtype")
_FREQ_DUPLICATE = re.compile(r"\.(implicit_filter\.[35]|implicit_filter_rev\.[135])\.freq$")


@dataclass
class ReleasedCheckpoint:
    config: M2BertConfig
    state: dict[str, torch.Tensor]
    head: type
    dropped: list[str] = field(default_factory=list)


def _with_bert_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as in the official heads: without a training framework's `model.` prefix, backbone under `bert.`."""
    if state and all(key.startswith("model.") for key in state):
        state = {key[len("model."):]: value for key, value in state.items()}
    if not any(key.startswith("bert.") for key in state):
        state = {("bert." + key if key.split(".")[0] in ("embeddings", "encoder", "pooler") else key): value
                 for key, value in state.items()}
    return state


def _drop_aliases_and_buffers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Drop FlashFFTConv buffers and the five repeated copies of each filter's sine frequency (checked equal)."""
    kept, dropped = {}, []
    for key, value in state.items():
        if ".flashfft." in key:
            dropped.append(key)
        elif _FREQ_DUPLICATE.search(key):
            owner = _FREQ_DUPLICATE.sub(".implicit_filter.1.freq", key)
            if owner in state and not torch.equal(state[owner], value):
                raise ConversionError(f"{key} differs from {owner}; the official model shares one sine frequency.")
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def _settings_from_keys(state: dict[str, torch.Tensor]) -> dict:
    """Architecture settings that the weights determine, whatever the config says."""
    prefix = "bert.encoder.layer.0."
    z = state.get(prefix + "attention.filter_fn.pos_emb.z")
    gated = state.get(prefix + "mlp.gated_layers.weight")
    if z is None or gated is None:
        raise ConversionError(
            "This is not an M2-BERT checkpoint: expected keys like "
            f"'{prefix}attention.filter_fn.pos_emb.z' and '{prefix}mlp.gated_layers.weight'."
        )
    settings = {
        "hyena_training_additions": prefix + "attention.layernorm.weight" in state,
        "residual_long_conv": prefix + "attention.filter_fn2.bias" in state,
        "bidirectional": prefix + "attention.filter_fn.implicit_filter_rev.0.weight" in state,
        "long_conv_l_max": z.shape[1],
        "max_position_embeddings": z.shape[1],
        "hyena_emb_dim": z.shape[2],
        "use_monarch_mlp": gated.dim() == 3,
    }
    if gated.dim() == 3:
        settings["monarch_mlp_nblocks"] = gated.shape[0]
        settings["monarch_mlp_type"] = "blockdiag"
    if "bert.embeddings.word_embeddings.weight" in state:
        settings["vocab_size"] = state["bert.embeddings.word_embeddings.weight"].shape[0]
    if "classifier.weight" in state:
        settings["num_labels"] = state["classifier.weight"].shape[0]
    return settings


def is_text_encoder(raw_config: dict) -> bool:
    """Released retrieval models: their `auto_map` sends AutoModelForSequenceClassification to `BertForTextEncoding`
    (or the folder was saved from m2-hf's `M2BertForTextEncoding`)."""
    auto_map = raw_config.get("auto_map") or {}
    names = [str(auto_map.get("AutoModelForSequenceClassification", "")), *(raw_config.get("architectures") or [])]
    return any(name.endswith("BertForTextEncoding") for name in names)


def _head_for(state: dict[str, torch.Tensor], raw_config: dict) -> type:
    if any(key.startswith("cls.predictions.") for key in state):
        return M2BertForMaskedLM
    if is_text_encoder(raw_config):
        return M2BertForTextEncoding
    if "classifier.weight" in state:
        return M2BertForSequenceClassification
    return M2BertModel


def _without_unused_classifier(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The retrieval releases keep the classifier of the model they were fine-tuned from; their text encoder never
    applies it."""
    unused = [key for key in state if key.startswith("classifier.")]
    return {key: value for key, value in state.items() if key not in unused}, unused


def read_released_checkpoint(source: Path) -> ReleasedCheckpoint:
    raw_config = read_config(source)
    state, dropped = _drop_aliases_and_buffers(_with_bert_prefix(read_state_dict(source)))
    check_finite(state.items(), source)
    values = {k: v for k, v in raw_config.items() if k not in _DROPPED_CONFIG_KEYS}
    values.update(_settings_from_keys(state))
    head = _head_for(state, raw_config)
    if head is M2BertForTextEncoding:
        state, unused = _without_unused_classifier(state)
        dropped += unused
    if head is M2BertModel:
        state = {key[len("bert."):] if key.startswith("bert.") else key: value for key, value in state.items()}
    try:
        config = M2BertConfig(**values)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"{source / 'config.json'} is not a valid M2-BERT config: {error}") from error
    return ReleasedCheckpoint(config, state, head, dropped)


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"


def _shape_mismatches(model, state: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    return [
        f"{key}: weights {tuple(value.shape)}, config {tuple(expected[key].shape)}"
        for key, value in state.items() if key in expected and expected[key].shape != value.shape
    ]


def _load_strictly(checkpoint: ReleasedCheckpoint, source: Path):
    model = checkpoint.head(checkpoint.config)
    mismatches = _shape_mismatches(model, checkpoint.state)
    if mismatches:
        raise ConversionError(
            f"The weights in {source} do not fit its config.json: {len(mismatches)} tensors have other shapes, for "
            f"example {'; '.join(mismatches[:2])}. Fix config.json (hidden_size, intermediate_size, "
            "num_hidden_layers, ...) to describe these weights."
        )
    missing, unexpected = model.load_state_dict(checkpoint.state, strict=False)
    # The decoder is tied to the word embeddings (some releases store only one of the two).
    missing = [key for key in missing if key != "cls.predictions.decoder.weight"]
    if missing or unexpected:
        raise ConversionError(
            f"The weights in {source} are not a complete {checkpoint.head.__name__}: "
            + "; ".join(f"{kind} {_listed(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                        if keys)
            + ". Converting would invent random weights or drop real ones; use the complete released checkpoint."
        )
    return model.eval()


def _model_card(model, source_name: str, dropped: list[str]):
    config = model.config
    mlp = (
        f"GLU with BlockdiagLinear, {config.monarch_mlp_nblocks} blocks" if config.use_monarch_mlp else "GLU, dense"
    )
    tags = ["m2", "monarch-mixer", "custom_code"]
    if isinstance(model, M2BertForTextEncoding):
        tags += ["sentence-transformers", "sentence-similarity"]
    data = ModelCardData(
        license="apache-2.0", language="en", library_name="transformers", tags=tags,
        pipeline_tag="fill-mask" if isinstance(model, M2BertForMaskedLM) else "feature-extraction",
    )
    return render_model_card(
        "m2-bert", data, model_name=f"M2-BERT ({source_name})", repo_id=source_name,
        model_description=f"Converted with `m2-convert m2-bert` from the released checkpoint `{source_name}`.",
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers, mlp_description=mlp,
        max_length=config.long_conv_l_max, num_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        source=source_name, measurements=f"Dropped {len(dropped)} tensors of the source format that the model never reads "
        "(FlashFFTConv buffers, repeated sine frequencies, a retrieval release's unused classifier).",
    )


def limit_tokenizer_length(folder: Path, max_length: int) -> None:
    """Tokenizers (and sentence-transformers, which reads their limit) truncate at the model's longest sequence."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model_max_length"] = max_length
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert_m2_bert(source, destination: Path, overwrite: bool = False, dry_run: bool = False) -> dict:
    """Convert a released M2-BERT folder; returns a report. Writes nothing when `dry_run` or on any error."""
    source = resolve_source(source)
    with OutputFolder(destination, [source.path], overwrite, dry_run) as output:
        destination_problem = output.prepare()
        checkpoint = read_released_checkpoint(source.path)
        model = _load_strictly(checkpoint, source.path)
        report = {
            "command": "m2-bert",
            "source": source.name,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "long_conv_l_max": checkpoint.config.long_conv_l_max,
            "dropped_tensors": len(checkpoint.dropped),
        }
        if unused_classifier := [key for key in checkpoint.dropped if key.startswith("classifier.")]:
            report["dropped_unused_classifier"] = unused_classifier
        if dry_run:
            return {**report, "destination_problem": destination_problem}
        model.save_pretrained(output.staging)
        report["tokenizer_files"] = copy_tokenizer_files(source.path, output.staging)
        limit_tokenizer_length(output.staging, checkpoint.config.long_conv_l_max)
        _model_card(model, source.name, checkpoint.dropped).save(output.staging / "README.md")
        output.commit(report)
    report["destination"] = str(destination)
    return report
