"""Checkpoint converters: public PyTorch weights -> adjax converted checkpoints."""
