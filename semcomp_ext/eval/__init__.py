"""Downstream evaluation of (compressed) embeddings: linear probe, kNN, retrieval recall."""

from .probe import knn_accuracy, linear_probe_accuracy, retrieval_recall

__all__ = ["knn_accuracy", "linear_probe_accuracy", "retrieval_recall"]
