"""Write `tests/fixtures/official_m2_bert/`: tiny M2-BERT checkpoints in the released layout and the outputs that the
official code (HazyResearch/m2 at a pinned commit, see `official_m2_bert.py`) computes from them.

Every parameter is moved from the official initialisation to a trained-like scale (weights of standard deviation
1/sqrt(fan-in), O(1) changes of norms, biases, D terms, sine frequencies and positional features): at the
initialisation the gated branch of the mixer is about 1e-6 of its output, so tests against such weights cannot tell a
correct gate from a swapped one. `provenance.json` records, for each case, how much the official outputs change when
one part of the mixer is removed or altered (all far above the tests' tolerance of 1e-5).

For each case (head x `hyena_training_additions`), the fixture folder holds `config.json` and `pytorch_model.bin` in
the released layout (the sine frequency under its six official names) and `expected.safetensors`:

- the head's output (`logits` or `sentence_embedding`) for the padded batch of `inputs.safetensors`, computed as the
  official model computes it: every position, padding included, is a token (the official encoder ignores the mask);
- `hidden_states`: the embedding output and every layer's output for that batch;
- per layer `i`: `layer.i.mixer_output`, `layer.i.projected_signal` (what `out_linear` projects: the gated branch
  plus the residual long convolution), `layer.i.gated_branch` (``long_conv(v * x1) * x2``) and, with the residual
  convolution, `layer.i.residual_branch`; all `[batch, length, hidden]`;
- `row.r.<output>`: the head's output for row ``r`` without its padding (the real tokens alone), which a model that
  honours the attention mask must give for the padded row.

The official model runs in float64 (from the float32 checkpoint), so the expected outputs carry no float32 rounding;
they are stored in float32.

    pip install einops opt_einsum          # imported by the official code; not needed by m2-hf or its tests
    python benchmarks/make_official_fixtures.py [--official-repo PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from official_m2_bert import (
    OUTPUT_NAME,
    OfficialModels,
    add_arguments,
    build_official,
    import_official,
    move_to_trained_scale,
    official_output,
    official_output_of_short_input,
    official_source,
    quiet,
    write_released_folder,
)

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official_m2_bert"

TINY = dict(
    vocab_size=64, hidden_size=24, num_hidden_layers=2, intermediate_size=48, max_position_embeddings=32,
    long_conv_l_max=32, alibi_starting_size=32, use_glu_mlp=True, use_monarch_mlp=True, monarch_mlp_nblocks=4,
    bidirectional=True, hyena_filter_order=8, use_positional_encodings=True, hyena_w=10, hyena_w_mod=1,
    hyena_wd=0.1, hyena_emb_dim=5, hyena_lr_pos_emb=1e-5, long_conv_kernel_learning_rate=1e-3,
    hyena_filter_dropout=0.2, hidden_dropout_prob=0.1, layer_norm_eps=1e-12, pool_all=False,
)
LENGTH = 32
# (padding on the left, real tokens, padding on the right) of each row of the input batch.
ROWS = ((0, 32, 0), (0, 21, 11), (9, 23, 0))
CLS, PAD = 2, 0

# name: (head, hyena_training_additions, residual_long_conv)
CASES = {
    "mlm_additions": ("mlm", True, True),
    "mlm": ("mlm", False, True),
    "classifier_additions": ("classifier", True, True),
    "classifier": ("classifier", False, True),
    "retrieval_additions": ("retrieval", True, True),
    "retrieval": ("retrieval", False, True),
    # Without the residual long convolution, `out_linear` projects the gated branch alone.
    "mlm_no_residual": ("mlm", False, False),
}
TOLERANCE = 1e-5  # the tests' relative tolerance; every sensitivity must exceed it a hundredfold


def fixed_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(17)
    ids = torch.full((len(ROWS), LENGTH), PAD)
    mask = torch.zeros(len(ROWS), LENGTH, dtype=torch.long)
    for row, (left, real, right) in enumerate(ROWS):
        assert left + real + right == LENGTH
        ids[row, left : left + real] = torch.randint(5, TINY["vocab_size"], (real,), generator=generator)
        ids[row, left] = CLS
        mask[row, left : left + real] = 1
    return ids, mask


def record_layers(model, ids: torch.Tensor, head: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the official model on ``ids`` and record, through forward hooks, the embedding output, every layer's output
    and, per layer, the mixer's output, the signal `out_linear` projects, the gated branch and the residual branch."""
    records: dict[str, torch.Tensor] = {}
    hidden_states: list[torch.Tensor] = []
    handles = [model.bert.embeddings.register_forward_hook(lambda m, a, out: hidden_states.append(out))]
    for i, layer in enumerate(model.bert.encoder.layer):
        mixer = layer.attention
        hidden = mixer.d_model

        def keep(name, value, i=i):
            records[f"layer.{i}.{name}"] = value.detach().clone()

        def short_filter_hook(module, args, out, keep=keep, hidden=hidden):
            keep("x2", out[:, hidden : 2 * hidden, : args[0].shape[-1]])  # [B, H, L], as the mixer slices it

        def gated_hook(module, args, out, keep=keep, i=i):
            # The official post-gate: the long convolution of v * x1, times x2 (the same tensors, the same product).
            keep("gated_branch", (out * records[f"layer.{i}.x2"]).transpose(-1, -2))

        handles += [
            layer.register_forward_hook(lambda m, a, out: hidden_states.append(out)),
            mixer.register_forward_hook(lambda m, a, out, keep=keep: keep("mixer_output", out[0])),
            mixer.out_linear.register_forward_pre_hook(lambda m, a, keep=keep: keep("projected_signal", a[0])),
            mixer.short_filter.register_forward_hook(short_filter_hook),
            mixer.filter_fn.register_forward_hook(gated_hook),
        ]
        if hasattr(mixer, "filter_fn2"):
            handles.append(mixer.filter_fn2.register_forward_hook(
                lambda m, a, out, keep=keep: keep("residual_branch", out.transpose(-1, -2))))
    try:
        output = official_output(model, head, ids)
    finally:
        for handle in handles:
            handle.remove()
    for key in [k for k in records if k.endswith(".x2")]:
        del records[key]
    records["hidden_states"] = torch.stack(hidden_states)
    return output, records


def relative_change(altered: torch.Tensor, reference: torch.Tensor) -> float:
    return ((altered - reference).abs().max() / reference.abs().max()).item()


def mixers(model):
    return [layer.attention for layer in model.bert.encoder.layer]


def swap_gates(mixer) -> None:
    """Give x2 the role of x1 and back: swap their rows of the input projection and of the short filter."""
    hidden = mixer.d_model
    order = torch.cat([torch.arange(hidden, 2 * hidden), torch.arange(hidden), torch.arange(2 * hidden, 3 * hidden)])
    for module in (mixer.in_linear, mixer.short_filter):
        module.weight.copy_(module.weight[order])
        module.bias.copy_(module.bias[order])


def swap_filters(filter_fn) -> None:
    filter_fn.implicit_filter, filter_fn.implicit_filter_rev = filter_fn.implicit_filter_rev, filter_fn.implicit_filter


def silence(filter_fn) -> None:
    """The long convolution gives zero: no filter taps and no D term."""
    filter_fn.implicit_filter[-1].weight.zero_()
    filter_fn.implicit_filter_rev[-1].weight.zero_()
    filter_fn.bias.zero_()


ALTERATIONS = {
    "gate roles x1 <-> x2 swapped": lambda m: swap_gates(m),
    "gated branch removed": lambda m: silence(m.filter_fn),
    "D term (filter_fn.bias) removed": lambda m: m.filter_fn.bias.zero_(),
    "forward filter removed": lambda m: m.filter_fn.implicit_filter[-1].weight.zero_(),
    "reverse filter removed": lambda m: m.filter_fn.implicit_filter_rev[-1].weight.zero_(),
    "forward and reverse filters swapped": lambda m: swap_filters(m.filter_fn),
    "residual long convolution removed": lambda m: silence(m.filter_fn2),
    "residual long convolution's filters swapped": lambda m: swap_filters(m.filter_fn2),
    "residual long convolution's D term removed": lambda m: m.filter_fn2.bias.zero_(),
    "hyena_training_additions' LayerNorm skipped": lambda m: setattr(m, "layernorm", torch.nn.Identity()),
}


def applies(alteration: str, mixer) -> bool:
    if "residual" in alteration:
        return hasattr(mixer, "filter_fn2")
    if "additions" in alteration:
        return mixer.hyena_training_additions
    return True


def sensitivities(model, head: str, ids: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How much the official output changes (max |change| / max |output|) when one part of every mixer is altered."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changes = {}
    for name, alter in ALTERATIONS.items():
        if not applies(name, mixers(model)[0]):
            continue
        altered = build_like(model)
        altered.load_state_dict(state)
        with torch.no_grad():
            for mixer in mixers(altered):
                alter(mixer)
            changes[name] = relative_change(official_output(altered, head, ids), reference)
    return changes


def build_like(model):
    with quiet():
        return type(model)(model.config).eval().double()


def write_case(models: OfficialModels, name: str, seed: int, ids: torch.Tensor) -> dict:
    head, additions, residual = CASES[name]
    torch.manual_seed(seed)
    model = build_official(models, head, **TINY, hyena_training_additions=additions, residual_long_conv=residual)
    move_to_trained_scale(model, seed)
    folder = FIXTURES / name
    write_released_folder(model, head, folder)

    model.double()
    with torch.no_grad():
        output, expected = record_layers(model, ids, head)
        magnitudes = {k.split(".", 2)[-1]: round(v.abs().max().item(), 3)
                      for k, v in expected.items() if k.startswith("layer.0.")}
        if head != "mlm":
            # The layers are those of the masked-LM cases; keep the fixtures small.
            expected = {}
        expected[OUTPUT_NAME[head]] = output
        for row, (left, real, _) in enumerate(ROWS):
            if real < LENGTH:
                short = ids[row : row + 1, left : left + real]
                expected[f"row.{row}.{OUTPUT_NAME[head]}"] = official_output_of_short_input(model, head, short)[0]
    save_file({k: v.float().contiguous() for k, v in expected.items()}, folder / "expected.safetensors")

    changes = sensitivities(model, head, ids, output)
    if min(changes.values()) < 100 * TOLERANCE:
        raise SystemExit(f"{name}: a part of the mixer hardly changes the output: {changes}")
    return {
        "head": head, "hyena_training_additions": additions, "residual_long_conv": residual, "seed": seed,
        "output": OUTPUT_NAME[head],
        "relative_output_change_when_altered": {k: round(v, 4) for k, v in changes.items()},
        "layer_0_max_abs (gated and residual branches of like size)": magnitudes,
        "stored": sorted(expected),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    models = import_official(official_source(args.work_dir, args.official_repo))
    torch.set_num_threads(1)  # the same rounding on any machine for the float32 parts of the official code
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    ids, mask = fixed_inputs()
    save_file({"input_ids": ids, "attention_mask": mask}, FIXTURES / "inputs.safetensors")
    cases = {name: write_case(models, name, seed, ids) for seed, name in enumerate(CASES)}
    provenance = {
        "official_code": f"https://github.com/HazyResearch/m2/tree/{models.commit}/bert/src",
        "generated_by": "benchmarks/make_official_fixtures.py",
        "torch": torch.__version__, "python": platform.python_version(),
        "computation": "official model in float64 (model.double() of the float32 checkpoint), stored as float32",
        "relative_output_change_when_altered": "max |altered - official| / max |official| of the head's output for "
                                               "the padded batch, with the part altered in every layer",
        "rows (left padding, real tokens, right padding)": ROWS,
        "tiny_config": TINY,
        "trained_like_scale": "each parameter += N(0, s^2): s = 1/sqrt(last dim) for weights, 0.3 for biases, "
                              "LayerNorm weights and positional features z, 1 for D terms, 3 for sine frequencies",
        "cases": cases,
    }
    (FIXTURES / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(json.dumps(cases, indent=1))
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
