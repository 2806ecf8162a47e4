"""Downstream evaluation of (compressed) embeddings: linear probes, kNN, retrieval recall,
and intervals (bootstrap over training seeds, RFS seeds and test items)."""

from .neighbours import nearest, neighbour_recall
from .probe import (knn_accuracy, knn_predict, linear_probe_accuracy, retrieval_ranks, retrieval_recall,
                    ridge_loo_accuracy, ridge_probe, ridge_probe_accuracy)

__all__ = ["knn_accuracy", "knn_predict", "linear_probe_accuracy", "nearest", "neighbour_recall", "retrieval_ranks",
           "retrieval_recall", "ridge_loo_accuracy", "ridge_probe", "ridge_probe_accuracy"]
