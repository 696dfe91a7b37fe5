"""`m2-convert inspect`: what a checkpoint folder holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .checkpoints import local_folder, read_config, read_state_dict


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


def inspect_folder(folder: Path) -> dict:
    folder = local_folder(folder, role="checkpoint")
    config = read_config(folder)
    state = read_state_dict(folder)
    unique = {tensor.data_ptr(): tensor for tensor in state.values() if tensor.is_floating_point()}
    layers = structured_layers(state)
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
    }


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
    return "\n".join(lines)
