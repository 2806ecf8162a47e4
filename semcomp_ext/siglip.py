"""The sigmoid (SigLIP) loss under its historical module name: ``sigmoid_loss`` lives in
:mod:`semcomp_ext.functional`, ``SigLipLoss`` in :mod:`semcomp_ext.losses`, the reference in
:mod:`semcomp_ext.reference` (fake kernels and autograd in :mod:`semcomp_ext._ops`, the
distributed exchange in :mod:`semcomp_ext.distributed.neighbour`)."""

from .functional import sigmoid_loss
from .losses import SigLipLoss
from .reference import sigmoid_loss_reference

__all__ = ["SigLipLoss", "sigmoid_loss", "sigmoid_loss_reference"]
