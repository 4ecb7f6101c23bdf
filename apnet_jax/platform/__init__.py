"""Platform tuning: what makes one platform's compiler fast, never what is computed.

Each module here serves one platform (`cpu`: XLA:CPU options and CPU
kernels). The places that compile (the train step, feature extraction) ask
it for its settings; the model's code never imports it, so on other
platforms the model stays plain ``lax`` and every JAX transformation works.
"""
