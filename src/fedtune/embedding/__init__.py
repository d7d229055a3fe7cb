"""Text embeddings from the fine-tuned decoder itself (GEM, arXiv:2506.04344)."""
