"""Input pipeline: TFDS data sources, P x K sampling, Grain loaders and augmentation."""
