"""APNet models: the ResNet backbone, the attention pyramid and the re-ID head."""

from apnet_jax.models.apnet import APNet, build_model, stage_sizes
from apnet_jax.models.resnet import ResNet

__all__ = ["APNet", "ResNet", "build_model", "stage_sizes"]
