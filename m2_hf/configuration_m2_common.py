"""What the configurations of the M2 models share: the checks of the mixer and MLP fields they all have."""

from __future__ import annotations

from .monarch import _check_inference_path, _check_training_path

MLP_TYPES = ("blockdiag", "monarch")

# Default budget of a model's filter-spectrum cache (`filter_cache.FilterCache`): every spectrum of M2-BERT-base up to
# 1024 tokens (151 MB), while its peak memory stays below BERT-base's (SDPA) at 4096 tokens and within 1.5x of it at
# 16384 (benchmarks/RESULTS.md).
DEFAULT_FILTER_CACHE_BYTES = 160 * 2**20


def check_mixer_fields(config) -> None:
    """Refuse values of the shared fields that the mixer and the structured MLP cannot build."""
    if config.monarch_mlp_type not in MLP_TYPES:
        raise ValueError(f"`monarch_mlp_type` must be one of {MLP_TYPES}, got {config.monarch_mlp_type!r}.")
    if config.hyena_emb_dim < 3 or config.hyena_emb_dim % 2 == 0:
        raise ValueError(
            f"`hyena_emb_dim` must be an odd integer >= 3 (time plus sine/cosine pairs), got {config.hyena_emb_dim}."
        )
    check_filter_cache_bytes(config.filter_cache_bytes)
    _check_inference_path(config.structured_inference_path, "structured_inference_path")
    _check_training_path(config.structured_training_path, "structured_training_path")


def check_filter_cache_bytes(budget) -> None:
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(
            f"`filter_cache_bytes` must be a number of bytes >= 0 (0 disables the filter cache) or None (no limit), "
            f"got {budget!r}."
        )
