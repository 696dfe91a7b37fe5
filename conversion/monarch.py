"""`m2-convert monarch` and `m2-convert dense`: dense Transformers checkpoints to Monarch-structured ones and back.

`monarch` replaces the targeted linear layers of a checkpoint of any Transformers architecture (`nn.Linear` or GPT-2's
`Conv1D`) by `MonarchLinear` (or `BlockdiagLinear`) layers, projected from the dense weights; the result is a
`monarch_<type>` folder that the original head's `AutoModel*` class loads after `import m2_hf`, or anywhere with
`trust_remote_code=True`. The target presets are found from the module structure, with no table per architecture.
`dense` materialises every structured layer exactly and writes the original architecture back (reverse
sparsification).
"""

from __future__ import annotations

import copy
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

import transformers
from m2_hf import BlockdiagLinear, MonarchLinear, dense_weight_and_bias
from m2_hf.configuration_monarch_converted import (
    STRUCTURES,
    converted_config_class,
    original_transformers_class,
    source_model_type,
)
from m2_hf.modeling_monarch_converted import STRUCTURED_CLASSES, converted_class, has_submodule, original_heads

from .budget import check_budget, format_budget_table, input_second_moments, plan_budget
from .checkpoints import (
    ConversionError,
    OutputFolder,
    Source,
    check_finite,
    check_repo_id,
    check_weight_files,
    copy_sentence_transformers_files,
    copy_tokenizer_files,
    has_tokenizer_vocabulary,
    local_folder,
    push_folder_to_hub,
    read_config,
    resolve_source,
)
from .inspect import head_layers_line
from .refinement import REFINE_LEARNING_RATE, refine, teacher_states

PRESETS = ("mlp", "attention", "all")
# A module (by attribute or class name) of attention: self-, cross- or fused-QKV attention of any architecture.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
# A mixture-of-experts router (`gate`, `shared_expert_gate`, `router`), which must stay exact: it picks the experts.
_ROUTER = re.compile(r"(?:^|_)(?:gate|router)$|router", re.IGNORECASE)
# The converted config's own entries, which the original config does not have.
_MONARCH_FIELDS = ("monarch_layers", "monarch_head_layers", "monarch_structure")
# Config entries written by Transformers or by a previous tool, not part of the architecture.
_BOOKKEEPING_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


# --------------------------------------------------------------------------------------------------------------------
# Sources and targets
# --------------------------------------------------------------------------------------------------------------------


def linear_layers(base_model: nn.Module) -> dict[str, nn.Module]:
    """The dense linear layers (``nn.Linear`` and GPT-2's ``Conv1D``) of a base model, by module name."""
    return {name: module for name, module in base_model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}


def block_role(name: str, modules: dict[str, nn.Module]) -> Optional[str]:
    """``"attention"`` or ``"mlp"`` for a linear layer of a repeated block (an element of a ``ModuleList``: a
    transformer layer of an encoder, a decoder or a vision tower), None for any other layer: embeddings' projections,
    poolers, heads and routers stay dense unless a regular expression names them. A layer is attention's when a
    module between the block and the layer is, by attribute or class name; every other layer of the block is the
    MLP's (gated or not, fused or not)."""
    parts = name.split(".")
    block = next((index for index, part in enumerate(parts) if part.isdigit()), None)
    if block is None:
        return None
    inner = parts[block + 1:]
    ancestors = [modules[".".join(parts[:depth])] for depth in range(block + 2, len(parts))]
    if any(_ROUTER.search(part) for part in inner) or any("Router" in type(m).__name__ for m in ancestors):
        return None
    if any(_ATTENTION.search(part) for part in inner) or any(_ATTENTION.search(type(m).__name__) for m in ancestors):
        return "attention"
    return "mlp"


def preset_layers(base_model: nn.Module) -> dict[str, list[str]]:
    """The linear layers each preset selects, in module order."""
    modules = dict(base_model.named_modules())
    roles = {name: block_role(name, modules) for name in linear_layers(base_model)}
    selected = {preset: [name for name, role in roles.items() if role == preset] for preset in ("mlp", "attention")}
    selected["all"] = [name for name, role in roles.items() if role is not None]
    return selected


def head_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The dense linear layers of a head model outside its base model (``lm_head``, ``classifier.dense``, ...), by
    module name relative to the head model; none for a base model."""
    base = getattr(model, "base_model", model)
    if base is model:
        return {}
    inside = {id(module) for module in base.modules()}
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in inside}


def layer_root(model: nn.Module, name: str) -> nn.Module:
    """The module that a target layer's name is relative to: the base model, or for a head's layer the head model."""
    base = getattr(model, "base_model", model)
    return base if has_submodule(base, name) else model


def resolve_targets(base_model: nn.Module, targets: list[str], nblocks: dict[str, int]) -> dict[str, int]:
    """``{layer name: nblocks}`` for the target presets or regular expressions in ``targets``; ``nblocks`` maps a
    target (as written) or ``"*"`` (every target) to its number of blocks."""
    return _resolve(base_model, {}, targets, nblocks)


def resolve_model_targets(model: nn.Module, targets: list[str], nblocks: dict[str, int]) -> dict[str, int]:
    """As :func:`resolve_targets` on ``model``'s base model, plus the layers of its head (outside the base model) that
    a regular expression names in full (``lm_head``): presets never select a head. A layer whose weight is tied to
    another parameter (an LM head tied to the input embeddings) is refused: a structured copy would untie it."""
    heads = head_linear_layers(model)
    resolved = _resolve(model.base_model, heads, targets, nblocks)
    parameters = list(model.named_parameters(remove_duplicate=False))
    for name in resolved:
        weight = dense_weight_and_bias(layer_root(model, name).get_submodule(name))[0]
        names = [other for other, p in parameters if p is weight or p is getattr(weight, "_base", None)]
        ties = [other for other in names if not other.endswith(f"{name}.weight")] if len(names) > 1 else []
        if ties:
            raise ConversionError(
                f"{name} shares its weight with {ties[0]} (tie_word_embeddings="
                f"{getattr(model.config, 'tie_word_embeddings', None)}): a structured {name} would untie them and "
                f"change the model. Leave {name} out of the targets, or convert a checkpoint saved with "
                "tie_word_embeddings=False."
            )
    return resolved


def _resolve(base_model: nn.Module, heads: dict[str, nn.Module], targets: list[str],
             nblocks: dict[str, int]) -> dict[str, int]:
    """Targets among the base model's linear layers (presets or regular expressions) and the head's (regular
    expressions only)."""
    layers = linear_layers(base_model)
    if not layers:
        raise ConversionError(f"{type(base_model).__name__} has no linear layers (nn.Linear or Conv1D) to convert.")
    presets = preset_layers(base_model)
    unknown = [name for name in nblocks if name != "*" and name not in targets]
    if unknown:
        raise ConversionError(f"--nblocks names {unknown}, which are not among the targets {targets}.")
    resolved: dict[str, int] = {}
    for target in targets:
        if target in presets:
            matched = presets[target]
        else:
            try:
                compiled = re.compile(target)
            except re.error as error:
                raise ConversionError(f"Target {target!r} is neither a preset ({', '.join(presets)}) nor a valid "
                                      f"regular expression: {error}.") from error
            matched = [name for name in [*layers, *heads] if compiled.fullmatch(name)]
        if not matched:
            head_names = f"; outside the base model: {', '.join(heads)}" if heads else ""
            raise ConversionError(
                f"Target {target!r} matches no linear layer. Presets: {', '.join(presets)}; a regular expression must "
                f"match whole layer names, which are: {', '.join(layers)}{head_names}."
            )
        blocks = nblocks.get(target, nblocks.get("*", 4))
        for name in matched:
            resolved.setdefault(name, blocks)
    every = {**layers, **heads}
    for name, blocks in resolved.items():
        out_features, in_features = _shape(every[name])
        if not 1 <= blocks <= min(in_features, out_features):
            raise ConversionError(
                f"nblocks={blocks} does not fit {name} ({in_features} -> {out_features}): it must be between 1 and "
                f"{min(in_features, out_features)}."
            )
    order = list(every)
    return dict(sorted(resolved.items(), key=lambda item: order.index(item[0])))


def _shape(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear layer."""
    return tuple(dense_weight_and_bias(layer)[0].shape)


def _supported_classes(model_type: str) -> list[str]:
    """The heads that the Auto classes map ``model_type`` to."""
    return sorted({cls.__name__ for cls in original_heads(CONFIG_MAPPING[model_type]).values()})


def _expected_tensor_names(class_name: str, config) -> set[str]:
    """The tensors a checkpoint saved from ``class_name`` holds: its state dict less the tied copies."""
    with torch.device("meta"):
        model = getattr(transformers, class_name)(copy.deepcopy(config))
    return set(model.state_dict()) - set(model.all_tied_weights_keys)


def infer_head(folder: Path, config_values: dict, model_type: str, tensor_names: list[str]) -> str:
    """The class a checkpoint without ``architectures`` was saved from: the supported head whose tensors are exactly
    the checkpoint's. Refuses when none or several fit (a decoder-only head is set aside unless ``is_decoder``)."""
    config = transformers.AutoConfig.for_model(model_type, **config_values)
    names = set(tensor_names)
    fitting = [name for name in _supported_classes(model_type) if _expected_tensor_names(name, config) == names]
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if len(fitting) > 1 and not getattr(config, "is_decoder", True):
        fitting = [name for name in fitting if name not in causal] or fitting
    if len(fitting) == 1:
        return fitting[0]
    found = f"several heads fit its weights ({', '.join(fitting)})" if fitting else "no supported head fits its weights"
    raise ConversionError(
        f"{folder / 'config.json'} names no architecture, and {found}. Add the class the model was saved from, for "
        f'example "architectures": ["{(fitting or _supported_classes(model_type))[0]}"], to config.json.'
    )


def _load_report_problem(source: Path, class_name: str, info: dict) -> Optional[str]:
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if not missing and not unexpected:
        return None
    listed = "; ".join(
        f"{kind} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
        for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys
    )
    return (f"The weights in {source} do not fit {class_name} ({listed}): converting would drop weights or invent "
            "random ones. Fix `architectures` in config.json, or complete the checkpoint.")


def _check_transformers_model_type(model_type, source: Path) -> None:
    """Refuse a model type that Transformers cannot build, or whose code is not Transformers' own (which the converted
    folder's remote code could not find)."""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ConversionError(
            f"Transformers {transformers.__version__} does not know the model type {model_type!r} in "
            f"{source / 'config.json'}, so it cannot build the model to convert; fix `model_type`, or upgrade "
            "Transformers if the architecture is newer."
        )
    if not CONFIG_MAPPING[model_type].__module__.startswith("transformers."):
        raise ConversionError(
            f"{model_type!r} ({source / 'config.json'}) is not a Transformers architecture but custom code "
            f"({CONFIG_MAPPING[model_type].__module__}); m2-convert monarch converts architectures that Transformers "
            "ships."
        )


def load_source(source: Path) -> tuple[nn.Module, str]:
    """The source model (float weights as stored) and its model type; refuses what cannot be converted faithfully:
    unknown architectures, weights that do not fit the head, non-finite weights."""
    config = read_config(source)
    model_type = config.get("model_type")
    if source_model_type(model_type) is not None:
        raise ConversionError(f"{source} is already a {model_type} checkpoint; `m2-convert dense` converts it back.")
    _check_transformers_model_type(model_type, source)
    tensor_names = check_weight_files(source)
    architectures = config.get("architectures")
    if architectures:
        class_name = architectures[0]
    else:
        values = {k: v for k, v in config.items() if k not in _BOOKKEEPING_KEYS}
        class_name = infer_head(source, values, model_type, tensor_names)
    original_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(original_class, type) and issubclass(original_class, PreTrainedModel)):
        raise ConversionError(f"{class_name!r} (in {source / 'config.json'}) is not a Transformers model class; "
                              f"{model_type} classes: {', '.join(_supported_classes(model_type))}.")
    try:
        model, info = original_class.from_pretrained(source, dtype="auto", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError, KeyError) as error:
        message = " ".join(str(error).split())
        raise ConversionError(f"Transformers could not load {source} as {class_name}: {message[:500]}") from error
    problem = _load_report_problem(source, class_name, info)
    if problem:
        raise ConversionError(problem)
    check_finite(model.state_dict().items(), source)
    return model.eval(), model_type


# --------------------------------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    nblocks: int
    relative_error: float
    parameters_before: int
    parameters_after: int


# Projections run in float32: about 2x faster than float64 and as exact as the float32 weights they produce.
PROJECTION_DTYPE = torch.float32


def closed_form(dense: nn.Module, nblocks: int, structure: str, **_) -> tuple[nn.Module, float]:
    """The Frobenius-optimal structured layer (Theorem 1 of the Monarch paper; exact for nblocks=1) and its relative
    error, which the projection's discarded singular values give for free."""
    return STRUCTURED_CLASSES[structure].from_linear(
        dense, nblocks=nblocks, projection_dtype=PROJECTION_DTYPE, return_error=True
    )


def calibrated(
    dense: nn.Module, nblocks: int, structure: str, *, name: str, model: nn.Module, original: nn.Module, calibration,
    fit_settings: Optional[dict] = None, **_,
) -> nn.Module:
    """The closed form, refined so that the layer reproduces the original model's outputs on the calibration text
    (`conversion/calibration.py`; ``fit_settings`` overrides the keyword defaults of its `fit_to_statistics`)."""
    from .calibration import fit_to_statistics, input_statistics

    weight = dense_weight_and_bias(dense)[0]
    statistics = input_statistics(model, original, name, calibration.batches)
    start, _ = closed_form(dense, nblocks, structure)
    with _fit_threads(weight):
        fitted = fit_to_statistics(start, weight, statistics, **(fit_settings or {}))
    return fitted.to(weight.dtype), None


# Each method returns the structured layer and its relative error, or None when it must be measured.
PROJECTION_METHODS: dict[str, Callable[..., tuple[nn.Module, Optional[float]]]] = {
    "closed-form": closed_form,
    "calibrated": calibrated,
}


def _relative_error(dense: nn.Module, structured: nn.Module) -> float:
    weight = dense_weight_and_bias(dense)[0].detach().double()
    return float((structured.dense_weight().double() - weight).norm() / weight.norm().clamp_min(1e-30))


# Methods whose result for one layer does not depend on the others (the calibrated method sees earlier layers' results).
LAYER_INDEPENDENT_METHODS = ("closed-form",)


@contextmanager
def _single_threaded_ops() -> Iterator[int]:
    """Torch ops on one thread each, inside; yields the number of threads there were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


# A small layer's fit is many small float64 products: on two cores shared with other jobs (load 5), one thread ran a
# MiniLM layer's fit 13x faster than two, whose threads wait for each other. A large layer's products are big enough
# to share out, and one thread would leave a many-core machine idle for its whole fit.
SINGLE_THREAD_FIT_MAX_WEIGHTS = 1 << 22


def _fit_threads(weight: torch.Tensor):
    """The threading of one layer's calibrated fit: a single thread for small layers, all threads for large ones."""
    return _single_threaded_ops() if weight.numel() <= SINGLE_THREAD_FIT_MAX_WEIGHTS else nullcontext()


def _map_on_all_cores(function: Callable, items: list) -> Iterator:
    """``map`` with one layer per core: LAPACK's eigensolver on a batch of small matrices keeps one core busy but not
    several, so a layer per thread projects 1.4-1.7x faster on two cores than layers one after another."""
    with _single_threaded_ops() as workers, ThreadPoolExecutor(workers) as pool:
        yield from pool.map(function, items)


def project_layers(
    model: nn.Module, targets: dict[str, int], structure: str, method: str, progress: bool = True, **method_kwargs
) -> list[LayerReport]:
    """Replace each target layer of ``model`` (named relative to its base model, or to the head model for a head's
    layer) by its structured projection, in place."""
    project = PROJECTION_METHODS[method]

    def structured_layer(item: tuple[str, int]) -> tuple[nn.Module, Optional[float]]:
        name, nblocks = item
        dense = layer_root(model, name).get_submodule(name)
        return project(dense, nblocks, structure, name=name, model=model, **method_kwargs)

    items = list(targets.items())
    # Lazily, so that a method that depends on earlier layers sees them replaced.
    results = (_map_on_all_cores if method in LAYER_INDEPENDENT_METHODS else map)(structured_layer, items)
    reports = []
    progress_bar = tqdm(zip(items, results), total=len(items), desc="projecting layers", unit="layer",
                        disable=not progress)
    for (name, nblocks), (structured, error) in progress_bar:
        root = layer_root(model, name)
        dense = root.get_submodule(name)
        out_features, in_features = _shape(dense)
        reports.append(
            LayerReport(
                name, in_features, out_features, nblocks,
                _relative_error(dense, structured) if error is None else error,
                sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in structured.parameters()),
            )
        )
        root.set_submodule(name, structured)
    return reports


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def linear_flops_per_token(model: nn.Module) -> int:
    """2 x multiply-adds per token of every (dense or structured) linear layer in ``model`` (a head's included)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            total += 2 * module.weight.numel()
        elif isinstance(module, MonarchLinear):
            total += 2 * (module.blkdiag1.numel() + module.blkdiag2.numel())
        elif isinstance(module, BlockdiagLinear):
            total += 2 * module.weight.numel()
    return total


def format_layer_table(layers: list[dict]) -> str:
    header = f"{'layer':58} {'shape':>12} {'nblocks':>7} {'rel. error':>10} {'params before':>14} {'params after':>13}"
    lines = [header, "-" * len(header)]
    for row in layers:
        shape = f"{row['in_features']}->{row['out_features']}"
        lines.append(
            f"{row['name']:58} {shape:>12} {row['nblocks']:>7} {row['relative_error']:>10.4f} "
            f"{row['parameters_before']:>14,} {row['parameters_after']:>13,}"
        )
    return "\n".join(lines)


def format_report(report: dict) -> str:
    totals = report["totals"]
    lines = [
        format_layer_table(report["layers"]),
        "",
        *([format_budget_table(report["budget"]), ""] if "budget" in report else []),
        f"parameters       {totals['parameters_before']:,} -> {totals['parameters_after']:,} "
        f"({totals['parameters_after'] / totals['parameters_before']:.3f}x)",
        f"linear FLOPs/tok {totals['linear_flops_per_token_before']:,} -> {totals['linear_flops_per_token_after']:,} "
        f"({totals['linear_flops_per_token_after'] / totals['linear_flops_per_token_before']:.3f}x)",
    ]
    if "refinement" in report:
        refinement = report["refinement"]
        lines.append(f"refinement       {refinement['steps']} steps, hidden-state error "
                     f"{refinement['hidden_state_error_before']:.4f} -> {refinement['hidden_state_error_after']:.4f} "
                     f"({refinement['seconds']:.0f} s)")
        if refinement["kept_projection"]:
            lines.append("                 not lower: the projection was kept (try more steps or a lower "
                         "--refine-learning-rate)")
    for key, value in report.get("calibration", {}).items():
        lines.append(f"{key:16} {value:.4f}" if isinstance(value, float) else f"{key:16} {value}")
    for preset, names in (report.get("presets") or {}).items():  # --dry-run: what each preset would select
        lines.append(f"preset {preset:9} {len(names)} layers")
    if report.get("head_layers"):
        lines.append(head_layers_line(report["head_layers"]))
    if "destination" in report:
        lines.append(f"written to       {report['destination']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Calibration text: how close the converted model stays to the original
# --------------------------------------------------------------------------------------------------------------------

CALIBRATION_MAX_LENGTH = 128
CALIBRATION_BATCH = 32
MASKING_RATE = 0.15


def read_calibration_text(path: Path, limit: Optional[int] = None) -> list[str]:
    """Non-empty lines of a plain-text file (one sample per line)."""
    if not Path(path).is_file():
        raise ConversionError(f"The text file {path} does not exist (plain text, one sample per line).")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConversionError(f"The text file {path} is not UTF-8 text ({error.reason} at byte {error.start}); pass "
                              "plain text, one sample per line.") from error
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConversionError(f"The text file {path} has no non-empty lines.")
    return lines[:limit] if limit else lines


def load_tokenizer(source: Path):
    """The source's tokenizer, which calibration and evaluation text need."""
    if not has_tokenizer_vocabulary(source):
        raise ConversionError(
            f"{source} has no tokenizer files (tokenizer.json, vocab.txt, ...), which --calibration-file and "
            "--evaluation-file need. Copy the original model's tokenizer files into it, or leave out the text files."
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as error:  # missing or broken tokenizer files surface as many different exceptions
        reason = " ".join(str(error).split())[:300]
        raise ConversionError(
            f"{source} has no usable tokenizer ({type(error).__name__}: {reason}), which --calibration-file and "
            "--evaluation-file need. Copy the original model's tokenizer files into it, or leave out the text files."
        ) from error


@dataclass
class CalibrationData:
    batches: list[dict[str, torch.Tensor]]
    mask_token_id: Optional[int]

    @property
    def samples(self) -> int:
        return sum(len(batch["input_ids"]) for batch in self.batches)


def calibration_data(tokenizer, texts: list[str]) -> CalibrationData:
    """Tokenized batches, right-padded, truncated to ``CALIBRATION_MAX_LENGTH`` tokens; the texts are batched in order
    of length, so that padding (which every forward pass computes and then discards) stays small."""
    if tokenizer.pad_token is None:  # GPT-2 has none; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=CALIBRATION_MAX_LENGTH)["input_ids"]]
    texts = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    batches = []
    for start in range(0, len(texts), CALIBRATION_BATCH):
        encoded = tokenizer(
            texts[start : start + CALIBRATION_BATCH], padding=True, truncation=True,
            max_length=CALIBRATION_MAX_LENGTH, return_tensors="pt",
        )
        batches.append({key: encoded[key] for key in ("input_ids", "attention_mask")})
    return CalibrationData(batches, tokenizer.mask_token_id)


def _with_decoder_inputs(model: nn.Module, data: Optional[CalibrationData]) -> Optional[CalibrationData]:
    """For an encoder-decoder, ``data`` with decoder inputs: the text shifted right behind the decoder's start token,
    under the encoder's attention mask, so that every layer's inputs (encoder, decoder, cross-attention) have the
    text's length and its real positions where the mask says (the last real token is not fed to the decoder)."""
    if data is None or not getattr(model.config, "is_encoder_decoder", False):
        return data
    start = model.config.decoder_start_token_id
    if start is None:
        raise ConversionError(f"{type(model).__name__}'s config has no decoder_start_token_id, which the decoder's "
                              "calibration inputs begin with; set it in config.json.")
    batches = []
    for batch in data.batches:
        ids = batch["input_ids"]
        decoder_ids = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)
        batches.append({**batch, "decoder_input_ids": decoder_ids, "decoder_attention_mask": batch["attention_mask"]})
    return CalibrationData(batches, data.mask_token_id)


def _lm_kind(model: nn.Module) -> Optional[str]:
    name = type(model).__name__
    if name.endswith(("LMHeadModel", "ForCausalLM")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return None


@torch.no_grad()
def _language_model_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], kind: str, mask_token_id: Optional[int]
) -> tuple[float, int]:
    """Summed token loss and token count; masked LMs predict a fixed 15% of tokens, replaced by the mask token."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = input_ids.masked_fill(mask == 0, -100)
    if kind == "masked":
        generator = torch.Generator().manual_seed(0)
        chosen = (torch.rand(input_ids.shape, generator=generator) < MASKING_RATE) & (mask == 1)
        labels = labels.masked_fill(~chosen, -100)
        input_ids = input_ids.masked_fill(chosen, mask_token_id)
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        targets = labels
    else:
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    return float(loss), int((targets != -100).sum())


@torch.no_grad()
def _perplexity(model: nn.Module, data: CalibrationData, kind: str) -> float:
    losses = [_language_model_loss(model, batch, kind, data.mask_token_id) for batch in data.batches]
    return math.exp(sum(loss for loss, _ in losses) / max(1, sum(count for _, count in losses)))


def _lm_kind_for(model: nn.Module, data: CalibrationData) -> Optional[str]:
    kind = _lm_kind(model)
    return None if kind == "masked" and data.mask_token_id is None else kind


@torch.no_grad()
def reference_outputs(model: nn.Module, data: CalibrationData) -> dict:
    """What the comparison needs from the original model: final hidden states and, for LM heads, the perplexity."""
    reference = {"states": [_final_states(model, batch) for batch in data.batches]}
    kind = _lm_kind_for(model, data)
    if kind:
        reference["perplexity"] = _perplexity(model, data, kind)
    return reference


def _final_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's last hidden states (an encoder-decoder's decoder's), in float32. A model that is its own base
    model (T5ForConditionalGeneration) returns them only among its hidden states."""
    outputs = model.base_model(**batch, output_hidden_states=model.base_model is model)
    state = getattr(outputs, "last_hidden_state", None)
    if state is None:
        state = (getattr(outputs, "decoder_hidden_states", None) or outputs.hidden_states)[-1]
    return state.float()


def _mean_pooled(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def compare_to_reference(model: nn.Module, data: CalibrationData, reference: dict) -> dict:
    """Cosine similarity of the final hidden states (per real token, and of mean-pooled sentence embeddings) and, for
    LM heads, the perplexity before and after."""
    token_cosines, sentence_cosines = [], []
    for batch, expected in zip(data.batches, reference["states"]):
        states = _final_states(model, batch)
        real = batch["attention_mask"].bool()
        token_cosines.append(nn.functional.cosine_similarity(states[real], expected[real], dim=-1))
        mask = batch["attention_mask"]
        sentence_cosines.append(
            nn.functional.cosine_similarity(_mean_pooled(states, mask), _mean_pooled(expected, mask), dim=-1)
        )
    result = {
        "samples": data.samples,
        "token_cosine": float(torch.cat(token_cosines).mean()),
        "sentence_embedding_cosine": float(torch.cat(sentence_cosines).mean()),
    }
    if "perplexity" in reference:
        result["perplexity_before"] = reference["perplexity"]
        result["perplexity_after"] = _perplexity(model, data, _lm_kind_for(model, data))
    return result


# --------------------------------------------------------------------------------------------------------------------
# The two commands
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MonarchSettings:
    targets: list[str] = field(default_factory=lambda: ["mlp"])
    nblocks: dict[str, int] = field(default_factory=lambda: {"*": 4})
    structure: str = "monarch"
    method: str = "closed-form"
    calibration_file: Optional[Path] = None
    calibration_samples: Optional[int] = 1000
    # Text on which the report compares the converted model with the original; defaults to the calibration file.
    evaluation_file: Optional[Path] = None
    # A fraction of the targeted layers' parameters (or FLOPs) to keep: nblocks is then chosen per layer
    # (`conversion/budget.py`) and `nblocks` is not used.
    budget: Optional[float] = None
    budget_of: str = "parameters"
    # After projection, Adam steps that train the structured layers together towards the original's hidden states on
    # the calibration text (`conversion/refinement.py`); 0: none.
    refine_steps: int = 0
    refine_learning_rate: float = REFINE_LEARNING_RATE


def converted_config(model: nn.Module, layers: dict[str, int], structure: str):
    """The `monarch_<type>` config: the original config's fields plus the structured layers (the base model's and
    the head's, told apart in ``model``)."""
    values = {k: v for k, v in model.config.to_dict().items() if k not in _BOOKKEEPING_KEYS}
    config_class = converted_config_class(type(model.config))
    base = getattr(model, "base_model", model)
    in_base = {name: blocks for name, blocks in layers.items() if layer_root(model, name) is base}
    in_head = {name: blocks for name, blocks in layers.items() if name not in in_base}
    return config_class(**values, monarch_layers=in_base, monarch_head_layers=in_head, monarch_structure=structure)


def _as_converted_model(model: nn.Module, layers: dict[str, int], structure: str) -> nn.Module:
    # The structured layers are already in place: only the class (for saving the code and the auto_map) and the
    # config change, without copying any weight.
    model.config = converted_config(model, layers, structure)
    model.__class__ = converted_class(type(model))
    return model


def _model_card(report: dict, model: nn.Module):
    from huggingface_hub import ModelCardData

    from model_cards import render_model_card

    base_type = source_model_type(model.config.model_type)
    data = ModelCardData(
        library_name="transformers", tags=["monarch", "structured-matrices", "m2-hf", "custom_code", base_type],
        base_model=report["source"],
    )
    return render_model_card(
        "monarch-converted", data, source=report["source"], architecture=type(model).__name__,
        base_type=base_type, settings=report["settings"], totals=report["totals"], layers=report["layers"],
        layer_table=format_layer_table(report["layers"]), calibration=report.get("calibration"),
        refinement=report.get("refinement"),
        model_type=model.config.model_type,
    )


def shrink_warnings(layers: list[LayerReport]) -> list[str]:
    """A warning for every layer that its structured form does not make smaller."""
    return [
        f"{layer.name}: nblocks={layer.nblocks} does not shrink it ({layer.parameters_before:,} -> "
        f"{layer.parameters_after:,} parameters); choose a larger nblocks for it"
        for layer in layers if layer.parameters_after >= layer.parameters_before
    ]


def _check_settings(settings: MonarchSettings) -> None:
    if settings.structure not in STRUCTURES:
        raise ConversionError(f"--structure must be one of {STRUCTURES}, got {settings.structure!r}.")
    if settings.method not in PROJECTION_METHODS:
        raise ConversionError(f"--method must be one of {', '.join(PROJECTION_METHODS)}, got {settings.method!r}.")
    if settings.method != "closed-form" and settings.calibration_file is None:
        raise ConversionError(f"--method {settings.method} fits layers to activations: pass --calibration-file.")
    if settings.budget is not None:
        check_budget(settings.budget, settings.budget_of)
    if settings.refine_steps < 0:
        raise ConversionError(f"--refine-steps must be 0 or more, got {settings.refine_steps}.")
    if settings.refine_steps and settings.calibration_file is None:
        raise ConversionError("--refine-steps trains the converted layers on text: pass --calibration-file.")
    if not settings.refine_learning_rate > 0:
        raise ConversionError(f"--refine-learning-rate must be positive, got {settings.refine_learning_rate}.")
    if settings.calibration_samples is not None and settings.calibration_samples < 1:
        raise ConversionError(f"--calibration-samples must be at least 1, got {settings.calibration_samples}.")


def _text_batches(source: Path, settings: MonarchSettings) -> tuple[Optional[CalibrationData], Optional[CalibrationData]]:
    """The calibration and evaluation batches (the evaluation text defaults to the calibration text); read and
    tokenized before the model is loaded, so that a bad file or a missing tokenizer is found at once."""
    files = {"calibration": settings.calibration_file, "evaluation": settings.evaluation_file}
    texts = {kind: read_calibration_text(path, settings.calibration_samples) for kind, path in files.items() if path}
    if not texts:
        return None, None
    tokenizer = load_tokenizer(source)
    batches = {kind: calibration_data(tokenizer, lines) for kind, lines in texts.items()}
    calibration = batches.get("calibration")
    return calibration, batches.get("evaluation", calibration)


def _budget_plan(model: nn.Module, targets: dict[str, int], settings: MonarchSettings,
                 calibration: Optional[CalibrationData]) -> dict:
    """nblocks per targeted layer within ``settings.budget``; with calibration text, the errors weigh the layers'
    outputs on it."""
    names = list(targets)
    moments = input_second_moments(model, names, calibration.batches) if calibration is not None else None
    return plan_budget(model.base_model, names, settings.structure, settings.budget, settings.budget_of, moments)


def convert_to_monarch(
    source,
    destination: Path,
    settings: Optional[MonarchSettings] = None,
    overwrite: bool = False,
    dry_run: bool = False,
    push_to_hub: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """`m2-convert monarch`: returns the report; writes nothing on error or with `dry_run`."""
    settings = settings or MonarchSettings()
    _check_settings(settings)
    if push_to_hub:
        check_repo_id(push_to_hub)
    source: Source = resolve_source(source)
    with OutputFolder(destination, [source.path], overwrite, dry_run) as output:
        destination_problem = output.prepare()
        calibration, evaluation = _text_batches(source.path, settings)
        model, model_type = load_source(source.path)
        calibration, evaluation = (_with_decoder_inputs(model, data) for data in (calibration, evaluation))
        base = model.base_model
        targets = resolve_model_targets(model, settings.targets, settings.nblocks)
        heads = [name for name in targets if layer_root(model, name) is not base]
        if heads and settings.budget is not None:
            raise ConversionError(
                f"--budget plans the base model's layers; the targets also name {', '.join(heads)} outside it. Leave "
                "the heads out of the targets, or convert without --budget."
            )
        plan = _budget_plan(model, targets, settings, calibration) if settings.budget is not None else None
        if plan is not None:
            targets = {name: nblocks for name, nblocks in plan["choices"].items() if nblocks is not None}
        presets = preset_layers(base) if dry_run else None
        reference = reference_outputs(model, evaluation) if evaluation is not None else None
        teacher = teacher_states(model, calibration.batches) if settings.refine_steps else None
        parameters_before, flops_before = sum(p.numel() for p in model.parameters()), linear_flops_per_token(model)
        # The calibrated method compares each layer's inputs with those of the untouched original.
        original = copy.deepcopy(model) if settings.method == "calibrated" else None
        layers = project_layers(
            model, targets, settings.structure, settings.method, progress, calibration=calibration, original=original
        )
        del original
        refinement = (refine(model, calibration.batches, teacher, settings.refine_steps, settings.refine_learning_rate)
                      if teacher is not None else None)
        del teacher
        report = {
            "command": "monarch",
            "source": source.name,
            "architecture": type(model).__name__,
            "settings": {
                "targets": settings.targets, "nblocks": settings.nblocks, "structure": settings.structure,
                "method": settings.method,
                "calibration_file": None if settings.calibration_file is None else Path(settings.calibration_file).name,
                "evaluation_file": None if settings.evaluation_file is None else Path(settings.evaluation_file).name,
                "budget": settings.budget, "budget_of": settings.budget_of if settings.budget is not None else None,
                "refine_steps": settings.refine_steps,
                "refine_learning_rate": settings.refine_learning_rate if settings.refine_steps else None,
            },
            "layers": [layer.__dict__ for layer in layers],
            "totals": {
                "parameters_before": parameters_before,
                "parameters_after": sum(p.numel() for p in model.parameters()),
                "linear_flops_per_token_before": flops_before,
                "linear_flops_per_token_after": linear_flops_per_token(model),
            },
            "warnings": shrink_warnings(layers),
        }
        if plan is not None:
            report["budget"] = plan["report"]
        if refinement is not None:
            report["refinement"] = refinement
        if evaluation is not None:
            report["calibration"] = compare_to_reference(model, evaluation, reference)
        model = _as_converted_model(model, targets, settings.structure)
        report["architecture_after"] = type(model).__name__
        if dry_run:
            return {**report, "presets": presets, "head_layers": list(head_linear_layers(model)),
                    "destination_problem": destination_problem}
        model.save_pretrained(output.staging)
        report["tokenizer_files"] = copy_tokenizer_files(source.path, output.staging)
        report["sentence_transformers_files"] = copy_sentence_transformers_files(source.path, output.staging)
        _model_card(report, model).save(output.staging / "README.md")
        output.commit(report)
    report["destination"] = str(destination)
    if output.removed_leftovers:
        report["removed_leftovers"] = output.removed_leftovers
    if push_to_hub:
        report["pushed_to"] = push_folder_to_hub(Path(destination), push_to_hub)
    return report


def _dense_layer_like(original: nn.Module, structured: nn.Module) -> nn.Module:
    """The exact dense equivalent of ``structured``, of the original layer's type (``Conv1D`` stores it transposed)."""
    linear = structured.to_linear()
    if not isinstance(original, Conv1D):
        return linear
    conv = Conv1D(linear.out_features, linear.in_features).to(dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def _load_converted(source: Path) -> nn.Module:
    """A `monarch_<type>` folder as its converted class, refusing weights that do not fit its `monarch_layers`."""
    config = read_config(source)
    model_type = config.get("model_type")
    if source_model_type(model_type) is None:
        raise ConversionError(
            f"{source} is a {model_type!r} checkpoint, not a Monarch-converted one (monarch_<type>); there is nothing "
            "to densify."
        )
    name = (config.get("architectures") or [None])[0]
    original = original_transformers_class(name, PreTrainedModel) if isinstance(name, str) else None
    if original is None:
        raise ConversionError(f"{source}'s architecture {name!r} (in config.json) is not a Monarch-converted class of "
                              "m2-hf; restore the config.json that m2-convert monarch wrote.")
    check_weight_files(source)
    try:
        model, info = converted_class(original).from_pretrained(source, dtype="auto", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, AttributeError) as error:
        message = " ".join(str(error).split())[:500]
        raise ConversionError(f"{source}'s config.json does not fit its weights ({type(error).__name__}: {message}); "
                              "restore the config.json (monarch_layers) that m2-convert monarch wrote.") from error
    problem = _load_report_problem(source, name, info)
    if problem:
        raise ConversionError(problem.replace("Fix `architectures` in config.json",
                                              "Restore the config.json (monarch_layers) that m2-convert monarch wrote"))
    check_finite(model.state_dict().items(), source)
    return model.eval()


def convert_to_dense(source, destination: Path, overwrite: bool = False, dry_run: bool = False) -> dict:
    """`m2-convert dense`: every structured layer materialised exactly; the original architecture and config."""
    source = local_folder(source)
    with OutputFolder(destination, [source], overwrite, dry_run) as output:
        destination_problem = output.prepare()
        model = _load_converted(source)
        converted_class = type(model)
        original_class = converted_class.original_class
        layers = {**model.config.monarch_layers, **model.config.monarch_head_layers}
        values = {k: v for k, v in model.config.to_dict().items()
                  if k not in _BOOKKEEPING_KEYS and k not in _MONARCH_FIELDS}
        original_config = original_class.config_class(**values)
        with torch.device("meta"):
            skeleton = original_class(original_config)
        roots = [(model.base_model, skeleton.base_model, model.config.monarch_layers),
                 (model, skeleton, model.config.monarch_head_layers)]
        for root, skeleton_root, names in roots:
            for layer_name in names:
                structured = root.get_submodule(layer_name)
                dense = _dense_layer_like(skeleton_root.get_submodule(layer_name), structured)
                root.set_submodule(layer_name, dense)
        model.config = original_config
        model.__class__ = original_class
        report = {"command": "dense", "source": source.resolve().name, "architecture": original_class.__name__,
                  "densified_layers": len(layers), "parameters": sum(p.numel() for p in model.parameters())}
        if dry_run:
            return {**report, "destination_problem": destination_problem}
        model.save_pretrained(output.staging)
        report["tokenizer_files"] = copy_tokenizer_files(source, output.staging)
        report["sentence_transformers_files"] = copy_sentence_transformers_files(source, output.staging)
        output.commit(report)
    report["destination"] = str(destination)
    return report
