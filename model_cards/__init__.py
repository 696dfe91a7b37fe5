"""Model-card templates of m2-hf and the one renderer that every writer of Hub folders uses.

Templates are Jinja Markdown files in this folder (`<name>.md`), rendered with `huggingface_hub.ModelCard`, so the
metadata header (license, tags, `model-index` evaluation results, ...) comes from a `ModelCardData`.
"""

from __future__ import annotations

from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["available_templates", "render_model_card"]


def available_templates() -> list[str]:
    return sorted(p.name[:-3] for p in resources.files(__name__).iterdir() if p.name.endswith(".md") and p.name != "README.md")


def render_model_card(template: str, card_data: ModelCardData, **fields) -> ModelCard:
    """Render template `template` (e.g. `"m2-bert"`) with `card_data` as metadata and `fields` as Jinja variables."""
    path = resources.files(__name__) / f"{template}.md"
    if not path.is_file():
        raise ValueError(f"No model-card template {template!r}; available: {', '.join(available_templates())}.")
    return ModelCard.from_template(card_data, template_str=path.read_text(encoding="utf-8"), **fields)
