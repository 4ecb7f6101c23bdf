"""Re-ID evaluation: CMC / mAP / mINP, query expansion and k-reciprocal re-ranking."""

from apnet_jax.evaluation.metrics import evaluate
from apnet_jax.evaluation.query_expansion import alpha_query_expansion
from apnet_jax.evaluation.rerank import k_reciprocal_rerank, k_reciprocal_rerank_chunks

__all__ = ["alpha_query_expansion", "evaluate", "k_reciprocal_rerank", "k_reciprocal_rerank_chunks"]
