"""`m2-convert onnx`: an M2 checkpoint folder (M2-BERT, M2-GPT, M2-ViT, any head) as an ONNX model with a dynamic
batch size (and sequence length, for text), checked in onnxruntime against PyTorch before it is written.

The export goes through `torch.export` (`torch.onnx.export(..., dynamo=True)`), so it needs the `onnx` extra:
`pip install "m2-hf[onnx]"` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoints import (
    ConversionError,
    OutputFolder,
    check_weight_files,
    copy_tokenizer_files,
    local_folder,
    read_config,
)

ONNX_FILE = "model.onnx"
PREPROCESSOR_FILE = "preprocessor_config.json"
M2_MODEL_TYPES = ("m2_bert", "m2_gpt", "m2_vit")
# onnxruntime computes in float32 with other FFT and matrix kernels: the outputs agree to rounding, not bit for bit.
RELATIVE_TOLERANCE = 1e-4
_EXTRA_HINT = 'install the export dependencies: pip install "m2-hf[onnx]" (onnx, onnxscript, onnxruntime)'


class _TensorOutputs(nn.Module):
    """The model's outputs as a tuple of tensors, in ``names``' order: what an exported graph returns."""

    def __init__(self, model: nn.Module, names: list[str], extra_kwargs: dict) -> None:
        super().__init__()
        self.model, self.names, self.extra_kwargs = model, names, extra_kwargs

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.model.onnx_input_names, inputs)), **self.extra_kwargs, return_dict=True)
        return tuple(outputs[name] for name in self.names)


def _require_onnx_packages() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConversionError(f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                              f"not installed: {_EXTRA_HINT}.")


def _model_class(folder: Path, config: dict):
    import m2_hf

    model_type = config.get("model_type")
    if model_type not in M2_MODEL_TYPES:
        raise ConversionError(
            f"{folder} is not an M2 checkpoint folder (its config.json has model_type {model_type!r}; expected one of "
            f"{', '.join(M2_MODEL_TYPES)}). Pass a folder saved from an M2 model, or convert a released M2-BERT "
            "checkpoint first with `m2-convert m2-bert`."
        )
    architectures = config.get("architectures") or []
    name = architectures[0] if architectures else {"m2_bert": "M2BertModel", "m2_gpt": "M2GPTModel",
                                                    "m2_vit": "M2ViTModel"}[model_type]
    cls = getattr(m2_hf, name, None)
    if cls is None or cls.config_class.model_type != model_type:
        raise ConversionError(f"{folder}'s config.json names the architecture {name!r}, which is not an m2-hf class "
                              f"for model_type {model_type!r}; set `architectures` to the class it was saved from.")
    return cls


def example_inputs(model: nn.Module, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for ``model`` of ``batch`` rows (and ``length`` tokens); text rows after the first are left-padded by
    a growing amount, so that exports are checked with padding."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    if config.model_type == "m2_vit":
        size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        return {"pixel_values": torch.randn(batch, config.num_channels, *size, generator=generator)}
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        attention_mask[row, : min(row * (length // (2 * batch) + 1), length - 1)] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _dynamic_shapes(model: nn.Module, names: list[str]) -> dict:
    batch = torch.export.Dim("batch", min=1, max=4096)
    if model.config.model_type == "m2_vit":
        return {"inputs": ({0: batch},)}
    length = torch.export.Dim("sequence", min=2, max=_max_length(model))
    return {"inputs": tuple({0: batch, 1: length} for _ in names)}


def _max_length(model: nn.Module) -> int:
    """The longest text input (M2-ViT's inputs have no length: 1)."""
    config = model.config
    return {"m2_bert": lambda: config.long_conv_l_max, "m2_gpt": lambda: config.max_position_embeddings,
            "m2_vit": lambda: 1}[config.model_type]()


def _wrap(model: nn.Module) -> tuple[_TensorOutputs, dict[str, torch.Tensor]]:
    inputs = example_inputs(model, 2, min(16, _max_length(model)))
    model.onnx_input_names = list(inputs)
    extra = {"use_cache": False} if model.config.model_type == "m2_gpt" else {}
    with torch.no_grad():
        outputs = model(**inputs, **extra, return_dict=True)
    names = [name for name, value in outputs.items() if isinstance(value, torch.Tensor)]
    return _TensorOutputs(model, names, extra).eval(), inputs


def export_model_to_onnx(model: nn.Module, path: Path) -> dict:
    """Write ``model`` (an m2-hf model) to ``path`` as ONNX with dynamic batch (and sequence) dimensions; return its
    input and output names."""
    wrapper, inputs = _wrap(model.eval())
    program = torch.onnx.export(
        wrapper,
        tuple(inputs.values()),
        dynamo=True,
        input_names=list(inputs),
        output_names=wrapper.names,
        dynamic_shapes=_dynamic_shapes(model, list(inputs)),
        verbose=False,
    )
    program.save(str(path))
    return {"inputs": list(inputs), "outputs": wrapper.names}


def check_in_onnxruntime(model: nn.Module, path: Path, shapes: list[tuple[int, int]]) -> list[dict]:
    """Run the ONNX file in onnxruntime at each ``(batch, length)`` (padded rows included) and compare every output
    with PyTorch's: a list of ``{"batch", "length", "output", "max_relative_difference"}``, the difference relative to
    the output's largest magnitude."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapper, _ = _wrap(model.eval())
    checks = []
    for batch, length in shapes:
        inputs = example_inputs(model, batch, length, seed=batch * 1000 + length)
        with torch.no_grad():
            expected = wrapper(*inputs.values())
        got = session.run(wrapper.names, {name: value.numpy() for name, value in inputs.items()})
        for name, reference, value in zip(wrapper.names, expected, got):
            scale = reference.abs().max().clamp(min=torch.finfo(reference.dtype).tiny)
            difference = (torch.from_numpy(value) - reference).abs().max() / scale
            checks.append({"batch": batch, "length": length, "output": name,
                           "max_relative_difference": float(difference)})
    return checks


def export_onnx(source, destination, overwrite: bool = False, dry_run: bool = False,
                check_shapes: Optional[list[tuple[int, int]]] = None) -> dict:
    """`m2-convert onnx SOURCE DESTINATION`: ``DESTINATION/model.onnx``, the folder's config and tokenizer files, and
    a report of the onnxruntime check (two shapes other than the exported one, with padding; default ``(3, L1)`` and
    ``(1, L2)`` for two lengths below the model's maximum)."""
    source = local_folder(source)
    config = read_config(source)
    cls = _model_class(source, config)
    check_weight_files(source)
    _require_onnx_packages()
    with OutputFolder(destination, [source], overwrite, dry_run) as output:
        destination_problem = output.prepare()
        model, loading = cls.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
        missing = loading.get("missing_keys") or []
        if missing:
            raise ConversionError(f"{source} lacks weights of {cls.__name__} ({', '.join(sorted(missing)[:5])}...): "
                                  "an export would hold freshly initialised layers. Pass a complete checkpoint.")
        maximum = _max_length(model)
        shapes = check_shapes or [(3, max(2, min(maximum, 21))), (1, max(2, min(maximum, 40)))]
        report = {"command": "onnx", "source": source.resolve().name, "architecture": cls.__name__,
                  "file": ONNX_FILE, "dynamic_axes": ["batch"] if config["model_type"] == "m2_vit"
                  else ["batch", "sequence"]}
        if dry_run:
            return {**report, "destination_problem": destination_problem}
        path = output.staging / ONNX_FILE
        report.update(export_model_to_onnx(model, path))
        report["onnxruntime_check"] = check_in_onnxruntime(model, path, shapes)
        worst = max(check["max_relative_difference"] for check in report["onnxruntime_check"])
        if not worst <= RELATIVE_TOLERANCE:
            raise ConversionError(f"The exported model differs from PyTorch in onnxruntime by {worst:.2e} (relative; "
                                  f"at most {RELATIVE_TOLERANCE} expected); nothing was written. Please report it.")
        model.config.save_pretrained(output.staging)
        report["tokenizer_files"] = copy_tokenizer_files(source, output.staging)
        if (source / PREPROCESSOR_FILE).is_file():  # an M2-ViT's image processor
            shutil.copy2(source / PREPROCESSOR_FILE, output.staging / PREPROCESSOR_FILE)
            report["tokenizer_files"].append(PREPROCESSOR_FILE)
        output.commit(report)
    report["destination"] = str(destination)
    return report
