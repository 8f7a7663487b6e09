"""Models: the offline zoo, loading of local Hugging Face folders, tiny random models for tests."""

from __future__ import annotations

from ivl.models.loading import load_model, load_tokenizer
from ivl.models.zoo import fetch, is_cached, list_models, tokenizer_path

__all__ = ["fetch", "is_cached", "list_models", "load_model", "load_tokenizer", "tokenizer_path"]
