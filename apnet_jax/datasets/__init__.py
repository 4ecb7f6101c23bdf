"""TFDS builders of the re-ID benchmarks, installed as `apnet_jax.datasets`.

One package per dataset in the layout `tfds new` gives (`market1501`,
`dukemtmc_reid`, `cuhk03`, `msmt17`, `synthetic_reid`, and `reid_folder` for
one's own images), the shared code in `reid_common`. Build them with
`apnet_jax.data.prepare.prepare` and read them with
`apnet_jax.data.sources.load_split`.
"""
