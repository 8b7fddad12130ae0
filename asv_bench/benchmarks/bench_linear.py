"""Fused linear cross-entropy (fastce.linear_cross_entropy_with_grad) against the unfused path
(NumPy matmul -> fastce.cross_entropy_with_grad -> two matmuls) at N=4096, H=256, V=32000
float32: time_ and peakmem_ of each (peakmem is the process's peak RSS, inputs included; the
fused path saves ~1 GB of logits + logit gradient).

setup() builds the problem and runs each path once on a slice (Numba compiles or loads its
cache), so no timed region includes compilation.
"""

import fastce  # the suite measures the installed fastce (pip install -e ".[bench]")

from fastce.linear import make_problem, unfused_with_grad

N, H, V = 4096, 256, 32000


class LinearCrossEntropy:
    """Loss and the three gradients of cross_entropy(hidden @ classifier.T, target)."""

    params = [["fused", "unfused"]]
    param_names = ["path"]
    timeout = 300
    number = 1
    repeat = (3, 7, 120.0)
    warmup_time = 0

    def setup(self, path):
        self.hidden, self.classifier, self.target = make_problem(N, H, V)
        self.fn = (fastce.linear_cross_entropy_with_grad if path == "fused"
                   else unfused_with_grad)
        self.fn(self.hidden[:64], self.classifier, self.target[:64])

    def time_with_grad(self, path):
        self.fn(self.hidden, self.classifier, self.target)

    def peakmem_with_grad(self, path):
        self.fn(self.hidden, self.classifier, self.target)


class LinearCrossEntropyForward:
    """Loss only: the fused path needs one chunk buffer, the unfused one the full logits."""

    def setup(self):
        self.hidden, self.classifier, self.target = make_problem(N, H, V)
        fastce.linear_cross_entropy(self.hidden[:64], self.classifier, self.target[:64])

    def time_fused(self):
        fastce.linear_cross_entropy(self.hidden, self.classifier, self.target)

    def time_unfused(self):
        fastce.cross_entropy(self.hidden @ self.classifier.T, self.target)

    def peakmem_fused(self):
        fastce.linear_cross_entropy(self.hidden, self.classifier, self.target)

    def peakmem_unfused(self):
        fastce.cross_entropy(self.hidden @ self.classifier.T, self.target)
