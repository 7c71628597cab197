"""Interpretability of shared vs orphan latents: contexts, LLM explanations, detection scoring."""
