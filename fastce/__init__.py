"""fastce: the fastest exact cross-entropy loss for NumPy and CuPy arrays.

PyTorch's ``F.cross_entropy`` semantics (class weights with the weighted mean, ignore_index,
label smoothing, probability targets, gradients) on Numba CPU kernels for NumPy arrays and
numba.cuda kernels for CUDA arrays; the backend is chosen from the arrays themselves.
"""
from ._alloc import pool_info, set_pool_bytes
from .api import (CrossEntropyLoss, CrossEntropyOutput, cross_entropy, cross_entropy_backward,
                  cross_entropy_with_grad, nll_loss)
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad
from .softmax import log_softmax, logsumexp, softmax
from .shards import (ShardStats, finalize_stats, merge_stats, shard_grad, shard_stats,
                     target_denominators)

__version__ = "0.1.0"

__all__ = [
    "cross_entropy", "cross_entropy_backward", "cross_entropy_with_grad", "CrossEntropyLoss",
    "CrossEntropyOutput", "nll_loss", "log_softmax", "softmax", "logsumexp",
    "linear_cross_entropy", "linear_cross_entropy_with_grad",
    "ShardStats", "shard_stats", "merge_stats", "finalize_stats", "shard_grad",
    "target_denominators", "set_pool_bytes", "pool_info",
]
