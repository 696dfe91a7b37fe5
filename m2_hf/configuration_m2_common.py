"""What the configurations of the M2 models share: the checks of the mixer and MLP fields they all have."""

from __future__ import annotations

MLP_TYPES = ("blockdiag", "monarch")


def check_mixer_fields(config) -> None:
    """Refuse values of the shared fields that the mixer and the structured MLP cannot build."""
    if config.monarch_mlp_type not in MLP_TYPES:
        raise ValueError(f"`monarch_mlp_type` must be one of {MLP_TYPES}, got {config.monarch_mlp_type!r}.")
    if config.hyena_emb_dim < 3 or config.hyena_emb_dim % 2 == 0:
        raise ValueError(
            f"`hyena_emb_dim` must be an odd integer >= 3 (time plus sine/cosine pairs), got {config.hyena_emb_dim}."
        )
