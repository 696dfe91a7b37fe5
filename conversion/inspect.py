"""`m2-convert inspect`: what a checkpoint folder holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .checkpoints import local_folder, read_config, read_state_dict

PRESET_LISTING_LIMIT = 12  # layer names shown per preset (the JSON report has them all)


def structured_layers(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Monarch (`blkdiag1`/`blkdiag2`) and block-diagonal (3-D `weight`) layers, by module name."""
    layers = {}
    for key, tensor in state.items():
        module, _, name = key.rpartition(".")
        if name == "blkdiag1":
            second = state[module + ".blkdiag2"]
            layers[module] = {"structure": "monarch", "nblocks": tensor.shape[0],
                              "parameters": tensor.numel() + second.numel()}
        elif name == "weight" and tensor.dim() == 3:
            layers[module] = {"structure": "blockdiag", "nblocks": tensor.shape[0], "parameters": tensor.numel()}
    return layers


def _dense_skeleton(folder: Path, config: dict):
    """The dense Transformers model of a checkpoint, built on the meta device from its config (no weights read); None
    for a folder that `m2-convert monarch` would not convert."""
    import transformers
    from m2_hf.configuration_monarch_converted import source_model_type

    if source_model_type(config.get("model_type")) is not None:
        return None
    try:
        model_config = transformers.AutoConfig.from_pretrained(folder)
        head = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0], transformers.AutoModel)
        with torch.device("meta"):
            return head._from_config(model_config) if hasattr(head, "_from_config") else head.from_config(model_config)
    except Exception:  # not a Transformers architecture: inspect still reports the tensors
        return None


def convertible_layers(folder: Path, config: dict) -> tuple[dict[str, list[str]] | None, list[str] | None]:
    """``(presets, head_layers)`` of a dense Transformers checkpoint, from its structure alone: the layers each target
    preset of `m2-convert monarch` selects, and the linear layers of its head outside the base model (`lm_head`,
    `classifier`), which no preset selects and a regular expression may name. ``(None, None)`` for a folder it would
    not convert."""
    from .monarch import head_linear_layers, preset_layers

    model = _dense_skeleton(folder, config)
    if model is None:
        return None, None
    return preset_layers(model.base_model), list(head_linear_layers(model))


def inspect_folder(folder: Path) -> dict:
    folder = local_folder(folder, role="checkpoint")
    config = read_config(folder)
    state = read_state_dict(folder)
    unique = {tensor.data_ptr(): tensor for tensor in state.values() if tensor.is_floating_point()}
    layers = structured_layers(state)
    presets, head_layers = convertible_layers(folder, config)
    return {
        "folder": str(folder),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "remote_code": sorted(config.get("auto_map", {})),
        "tensors": len(state),
        "parameters": sum(t.numel() for t in unique.values()),
        "structured_layers": layers,
        "structured_summary": dict(Counter(f"{v['structure']} nblocks={v['nblocks']}" for v in layers.values())),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in state.values())),
        "presets": presets,
        "head_layers": head_layers,
    }


def head_layers_line(names: list[str]) -> str:
    """The report line (of `m2-convert inspect` and of a conversion's dry run) that lists a model's head layers."""
    return (f"head layers      {', '.join(names)} (outside the base model: in no preset, a regular expression may "
            "name them)")


def format_report(report: dict) -> str:
    lines = [
        f"folder        {report['folder']}",
        f"model type    {report['model_type']}   architectures {report['architectures']}",
        f"remote code   {', '.join(report['remote_code']) or 'none'}",
        f"tensors       {report['tensors']}   parameters {report['parameters']:,}   dtypes {report['dtypes']}",
        f"structured    {report['structured_summary'] or 'none (all linear layers dense)'}",
    ]
    for name, layer in report["structured_layers"].items():
        lines.append(f"  {name:60} {layer['structure']:9} nblocks={layer['nblocks']:<3} params={layer['parameters']:,}")
    for preset, names in (report.get("presets") or {}).items():
        shown = ", ".join(names[:PRESET_LISTING_LIMIT]) + (" ..." if len(names) > PRESET_LISTING_LIMIT else "")
        lines.append(f"preset {preset:9} {len(names)} layers: {shown}")
    if report.get("head_layers"):
        lines.append(head_layers_line(report["head_layers"]))
    return "\n".join(lines)
