"""adjax: AD-DINOv3 zero-shot anomaly detection in JAX/Flax NNX."""

__version__ = "0.1.0"
