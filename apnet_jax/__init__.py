"""apnet-jax: APNet (Person Re-identification via Attention Pyramid) in JAX/Flax NNX."""

from apnet_jax.models import APNet, build_model
from apnet_jax.weights import LoadReport, load_torch_weights, save_torch_weights

__all__ = ["APNet", "LoadReport", "build_model", "load_torch_weights", "save_torch_weights"]
__version__ = "0.1.0"
