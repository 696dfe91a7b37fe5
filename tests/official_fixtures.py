"""The official M2-BERT's outputs on tiny checkpoints in the released layout (`tests/fixtures/official_m2_bert/`,
written by `benchmarks/make_official_fixtures.py` from HazyResearch/m2 at a pinned commit), and the means to compare
m2-hf's models with them through their public API only: `from_pretrained` of a fixture folder, the outputs, and
forward hooks.

Per-layer signals are read with hooks, so the comparison does not depend on how the mixer is organised inside:
- a forward pre-hook on the mixer's `out_linear` sees what it projects: the gated branch ``long_conv(v * x1) * x2``
  plus the residual long convolution, or the gated branch alone in a model without the residual convolution;
- the mixer's output is what a forward hook on the mixer module (`bert.encoder.layer[i].attention`, the prefix of
  `in_linear`/`out_linear`/`filter_fn` in the state dict) sees or, where a layer calls the mixer's parts without
  calling the mixer itself, the output of `out_linear` (the mixer's last step in the official algorithm).
Where autograd does not record, a model may skip calling `out_linear` as a module (a fused CPU inference path), so
hook-based checks run with gradients enabled.

The official model ran in float64 from the float32 checkpoints. In float32, rounding in the filter MLP (three sine
layers of frequency about 10) is amplified to about 2e-4 of the outputs, in the official code as in m2-hf; checks at
the relative tolerance of 1e-5 therefore run the models in float64.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from m2_hf import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTextEncoding

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official_m2_bert"
RELATIVE_TOLERANCE = 1e-5  # float64 runs: the fixtures' float32 storage limits agreement to about 5e-8
FLOAT32_RELATIVE_TOLERANCE = 1e-3  # float32 runs differ from the float64 reference by up to about 2e-4

HEADS = {
    "mlm": (M2BertForMaskedLM, "logits"),
    "classifier": (M2BertForSequenceClassification, "logits"),
    "retrieval": (M2BertForTextEncoding, "sentence_embedding"),
}


@lru_cache(maxsize=None)
def provenance() -> dict:
    return json.loads((FIXTURES / "provenance.json").read_text())


def case_names(head: str | None = None, **settings: bool) -> list[str]:
    """Fixture cases, optionally of one head and with given `hyena_training_additions` / `residual_long_conv`."""
    return [name for name, case in provenance()["cases"].items()
            if (head is None or case["head"] == head) and all(case[k] == v for k, v in settings.items())]


@dataclass(frozen=True)
class OfficialCase:
    name: str
    head: str
    residual_long_conv: bool
    expected: dict = field(repr=False)

    @property
    def output_name(self) -> str:
        return HEADS[self.head][1]

    @property
    def output(self) -> torch.Tensor:
        """The official head output for the padded batch, every position a token."""
        return self.expected[self.output_name]

    def row_output(self, row: int) -> torch.Tensor:
        """The official head output for ``row`` without its padding."""
        return self.expected[f"row.{row}.{self.output_name}"]

    def load(self, dtype: torch.dtype = torch.float64):
        """m2-hf's model of this head, loaded from the released-layout folder, in eval mode and in ``dtype``."""
        model_class = HEADS[self.head][0]
        return model_class.from_pretrained(FIXTURES / self.name).eval().to(dtype)

    def output_of(self, outputs) -> torch.Tensor:
        return getattr(outputs, self.output_name)


@lru_cache(maxsize=None)
def official_case(name: str) -> OfficialCase:
    case = provenance()["cases"][name]
    return OfficialCase(name, case["head"], case["residual_long_conv"], load_file(FIXTURES / name / "expected.safetensors"))


@lru_cache(maxsize=None)
def official_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: three rows, the second padded on the right, the third on the left."""
    inputs = load_file(FIXTURES / "inputs.safetensors")
    return inputs["input_ids"], inputs["attention_mask"]


def padded_rows() -> list[int]:
    _, mask = official_inputs()
    return [row for row in range(mask.shape[0]) if not mask[row].all()]


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = RELATIVE_TOLERANCE):
    """``max |actual - expected| <= tolerance * max |expected|``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, official {tuple(expected.shape)}"
    expected = expected.to(actual.dtype)
    difference = (actual.detach() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert difference <= tolerance * scale, (
        f"{what} differs from the official output: max |difference| {difference:.3e} > {tolerance:.0e} x "
        f"max |official| {scale:.3e}"
    )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class MixerRecording:
    """What forward hooks saw in every layer's mixer during one forward."""

    def __init__(self, model) -> None:
        self.mixers = [layer.attention for layer in model.bert.encoder.layer]
        self.projected = [[] for _ in self.mixers]  # inputs of out_linear
        self.projections = [[] for _ in self.mixers]  # outputs of out_linear
        self.outputs = [[] for _ in self.mixers]  # outputs of the mixer module

    def hooks(self):
        handles = []
        for i, mixer in enumerate(self.mixers):
            handles += [
                mixer.out_linear.register_forward_pre_hook(lambda m, args, i=i: self.projected[i].append(args[0])),
                mixer.out_linear.register_forward_hook(lambda m, args, out, i=i: self.projections[i].append(out)),
                mixer.register_forward_hook(lambda m, args, out, i=i: self.outputs[i].append(out)),
            ]
        return handles

    @staticmethod
    def _joined(calls: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """The calls' tensors as one ``[B, L, H]`` tensor: a layer may apply a token-wise module to chunks of tokens."""
        assert calls, "the hooked module was not called"
        return torch.cat([c.reshape(-1, shape[-1]) for c in calls]).view(shape)

    def projected_signal(self, layer: int, shape: torch.Size) -> torch.Tensor:
        return self._joined(self.projected[layer], shape)

    def mixer_output(self, layer: int, shape: torch.Size) -> torch.Tensor:
        calls = self.outputs[layer] or self.projections[layer]
        return self._joined([c[0] if isinstance(c, tuple) else c for c in calls], shape)


@contextmanager
def recording_mixers(model):
    recording = MixerRecording(model)
    handles = recording.hooks()
    try:
        yield recording
    finally:
        for handle in handles:
            handle.remove()
