"""lm-eval integration: hellaswag and wikitext on HF folders or in-memory models."""
