"""Numerical parity of m2-hf's M2-BERT with the official implementation (HazyResearch/m2, `bert/src`).

Builds the official masked-LM and classification models on the CPU from a clone of HazyResearch/m2, perturbs every
parameter, loads the official state dict into m2-hf's classes (dropping only the five duplicate sine-frequency keys),
and compares logits without padding, at full and shorter lengths.

    git clone https://github.com/HazyResearch/m2 /tmp/m2   # the official code is not part of this repository
    pip install einops opt_einsum                          # imported by the official code
    python benchmarks/parity_official_m2_bert.py --official-repo /tmp/m2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import types
from pathlib import Path

import torch

from m2_hf import M2BertConfig, M2BertForMaskedLM, M2BertForSequenceClassification

CONFIG = dict(
    vocab_size=30528, hidden_size=96, num_hidden_layers=2, intermediate_size=192, max_position_embeddings=128,
    long_conv_l_max=128, use_glu_mlp=True, use_monarch_mlp=True, monarch_mlp_nblocks=4, residual_long_conv=True,
    bidirectional=True, hyena_filter_order=32, use_positional_encodings=True, hyena_w=10, hyena_wd=0.1,
    hyena_emb_dim=5, hyena_lr_pos_emb=1e-5, long_conv_kernel_learning_rate=1e-3, hidden_dropout_prob=0.0,
    num_labels=2,
)
# Attributes the official heads read without declaring them in their config class.
UNDECLARED = ("use_cls_token", "sequence_token_planting", "expand_positional_embeddings",
              "gather_sentence_embeddings", "use_normalized_embeddings", "performing_BEIR_evaluation", "pool_all")


def import_official(repo: Path):
    bert = repo / "bert"
    sys.path[:0] = [str(bert), str(bert / "src")]
    # `src/__init__.py` imports the training framework (composer); the model files do not need it.
    package = types.ModuleType("src")
    package.__path__ = [str(bert / "src")]
    sys.modules["src"] = package
    with contextlib.redirect_stdout(io.StringIO()):
        from src.bert_layers import BertForMaskedLM, BertForSequenceClassification
        from src.configuration_bert import BertConfig
    return BertConfig, BertForMaskedLM, BertForSequenceClassification


def official_config(config_class, training_additions: bool):
    config = config_class(monarch_mixer_sequence_mixing=True, hyena_training_additions=training_additions,
                          alibi_starting_size=CONFIG["max_position_embeddings"], **CONFIG)
    for name in UNDECLARED:
        setattr(config, name, False)
    return config


def without_duplicate_frequencies(state: dict) -> dict:
    return {k: v for k, v in state.items() if ".freq" not in k or "implicit_filter.1.freq" in k}

# Float32 rounding: the two implementations order some sums differently (short filter, chunked projections).
TOLERANCE = 1e-5


def compare(official_class, ours_class, config_class, training_additions: bool, lengths: list[int]) -> float:
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        official = official_class(official_config(config_class, training_additions)).eval()
    with torch.no_grad():
        for parameter in official.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    ours = ours_class(M2BertConfig(hyena_training_additions=training_additions, **CONFIG)).eval()
    missing, unexpected = ours.load_state_dict(without_duplicate_frequencies(official.state_dict()), strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    worst = 0.0
    for length in lengths:
        ids = torch.randint(5, 30000, (3, length))
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            expected = official(ids, attention_mask=torch.ones_like(ids)).logits
            inference = ours(ids).logits  # the in-place, chunked path
        recorded = ours(ids).logits.detach()  # autograd records: the out-of-place path used in training
        for path, actual in (("no_grad", inference), ("autograd", recorded)):
            difference = (expected - actual).abs().max().item()
            worst = max(worst, difference)
            print(f"{ours_class.__name__:33} additions={training_additions!s:5} L={length:4} {path:8}  "
                  f"max |official - m2_hf| = {difference:.3e}  (max |logit| {expected.abs().max().item():.3f})")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", type=Path, required=True, help="a clone of HazyResearch/m2")
    args = parser.parse_args()
    config_class, official_mlm, official_classifier = import_official(args.official_repo)
    worst = 0.0
    for additions in (True, False):
        worst = max(worst, compare(official_mlm, M2BertForMaskedLM, config_class, additions, [128, 77]))
        # The official classifier asserts that inputs are padded to max_position_embeddings.
        worst = max(worst, compare(official_classifier, M2BertForSequenceClassification, config_class, additions, [128]))
    print(f"worst difference: {worst:.3e} (tolerance {TOLERANCE:.0e})")
    if worst > TOLERANCE:
        raise SystemExit("m2-hf's logits differ from the official ones beyond float32 rounding")


if __name__ == "__main__":
    main()
