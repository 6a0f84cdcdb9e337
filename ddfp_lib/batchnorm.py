"""Auxiliary BatchNorm: separate normalisation statistics for perturbed features.

Perturbed features have other statistics than clean ones; normalising both with one BatchNorm mixes
the two distributions. As in AdvProp and the reference DDFP decoder, every BatchNorm of a sub-module
gets a twin: the main branch normalises clean passes, the auxiliary branch perturbed ones.

    head = convert_to_dual_bn(model.head)
    h_clean = head(v)                      # main BatchNorm
    with perturbed_bn(head):
        h_perturbed = head(v + delta)      # auxiliary BatchNorm (training mode only)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["DualBatchNorm2d", "convert_to_dual_bn", "perturbed_bn"]


def _twin(batchnorm: _BatchNorm) -> _BatchNorm:
    """A deep copy that shares the process group of a SyncBatchNorm (groups cannot be copied)."""
    group = getattr(batchnorm, "process_group", None)
    return copy.deepcopy(batchnorm, {} if group is None else {id(group): group})


class DualBatchNorm2d(nn.Module):
    """A main and an auxiliary BatchNorm with the same configuration; one of them runs per call.

    ``y = aux(x)`` while routed to the auxiliary branch (see :func:`perturbed_bn`) in training mode,
    ``y = main(x)`` otherwise: eval mode always uses the main branch, so inference is unchanged by
    the auxiliary statistics. Each branch only updates its own running statistics. Both branches
    have the class of the layer they were made from (``SyncBatchNorm`` stays ``SyncBatchNorm``).

    The state dict holds ``main.*`` and ``aux.*``. Loading the state dict of a model with a plain
    BatchNorm at this place fills both branches from it (the auxiliary branch starts as a copy of
    the main one), so pretrained checkpoints load with ``strict=True``.

    Args:
        num_features: channels C.
        **batchnorm_kwargs: passed to ``nn.BatchNorm2d`` for both branches (eps, momentum, ...).

    Shape:
        - input: ``(B, C, H, W)``
        - output: same

    References:
        Xie et al., "Adversarial Examples Improve Image Recognition", CVPR 2020 (AdvProp).
        Wang et al., "Towards the Uncharted: Density-Descending Feature Perturbation for
        Semi-supervised Semantic Segmentation", CVPR 2024.

    Examples:
        >>> bn = DualBatchNorm2d(4)
        >>> _ = bn(torch.randn(2, 4, 3, 3) + 5.0)
        >>> with perturbed_bn(bn):
        ...     _ = bn(torch.randn(2, 4, 3, 3) - 5.0)
        >>> bool((bn.main.running_mean > 0).all()), bool((bn.aux.running_mean < 0).all())
        (True, True)
    """

    def __init__(self, num_features: int, **batchnorm_kwargs: Any):
        super().__init__()
        self.main: _BatchNorm = nn.BatchNorm2d(num_features, **batchnorm_kwargs)
        self.aux: _BatchNorm = _twin(self.main)
        self.use_aux = False

    @classmethod
    def from_batchnorm(cls, batchnorm: _BatchNorm) -> DualBatchNorm2d:
        """Wrap an existing BatchNorm layer as the main branch, with a copy of it as the auxiliary one."""
        if not isinstance(batchnorm, _BatchNorm):
            raise ValueError(f"expected a BatchNorm layer, got {type(batchnorm).__name__}")
        dual = cls(batchnorm.num_features)
        dual.main = batchnorm
        dual.aux = _twin(batchnorm)
        return dual

    def extra_repr(self) -> str:
        return f"use_aux={self.use_aux}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.aux if self.use_aux and self.training else self.main
        return branch(x)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        names = [name for name, _ in self.main.named_parameters(recurse=False)]
        names += [name for name, _ in self.main.named_buffers(recurse=False)]
        for name in names:
            if prefix + name in state_dict:
                value = state_dict.pop(prefix + name)
                state_dict.setdefault(f"{prefix}main.{name}", value)
                state_dict.setdefault(f"{prefix}aux.{name}", value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def convert_to_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer inside ``module`` by a :class:`DualBatchNorm2d` around it.

    The layers are replaced in place (their weights and statistics become the main branch); layers
    that are already dual are left alone. Works for ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``.

    Args:
        module: the sub-module whose BatchNorm layers should get an auxiliary twin (e.g. the
            decoder's fuse block), or a BatchNorm layer itself.

    Returns:
        ``module`` itself, converted; a new :class:`DualBatchNorm2d` if ``module`` is a BatchNorm.

    Examples:
        >>> head = convert_to_dual_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        >>> type(head[1]).__name__, type(head[1].aux).__name__
        ('DualBatchNorm2d', 'BatchNorm2d')
    """
    if isinstance(module, DualBatchNorm2d):
        return module
    if isinstance(module, _BatchNorm):
        return DualBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        converted = convert_to_dual_bn(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


@contextlib.contextmanager
def perturbed_bn(module: nn.Module) -> Iterator[nn.Module]:
    """Route every :class:`DualBatchNorm2d` inside ``module`` to its auxiliary branch.

    The previous routing is restored on exit, also when the block raises, so contexts nest.

    Raises:
        ValueError: ``module`` holds no DualBatchNorm2d (call :func:`convert_to_dual_bn` first).

    Examples:
        >>> head = convert_to_dual_bn(nn.Sequential(nn.BatchNorm2d(2)))
        >>> with perturbed_bn(head):
        ...     head[0].use_aux
        True
        >>> head[0].use_aux
        False
    """
    layers = [m for m in module.modules() if isinstance(m, DualBatchNorm2d)]
    if not layers:
        raise ValueError(
            f"{type(module).__name__} holds no DualBatchNorm2d; call convert_to_dual_bn on it first"
        )
    previous = [layer.use_aux for layer in layers]
    for layer in layers:
        layer.use_aux = True
    try:
        yield module
    finally:
        for layer, flag in zip(layers, previous):
            layer.use_aux = flag
