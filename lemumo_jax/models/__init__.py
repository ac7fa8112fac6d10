"""Flax models: ViT pieces, fusion routing, encoder families, heads."""
