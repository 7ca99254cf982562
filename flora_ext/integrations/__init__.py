"""Integrations of flora_ext with training frameworks; each module imports its framework
only when it is imported itself (flora_ext.integrations.hf: Hugging Face transformers)."""
