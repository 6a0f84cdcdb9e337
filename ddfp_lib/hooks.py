"""Perturb the output of a named sub-module of any model with a forward hook.

with perturb_output(model, "decoder.block2", DropoutPerturbation()):
    logits = model(x)
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn

from .perturbations.base import Head

__all__ = ["perturb_output"]

Perturbation = Callable[..., torch.Tensor]


def find_submodule(model: nn.Module, module_name: str) -> nn.Module:
    """``model``'s sub-module called ``module_name`` (as in ``named_modules``).

    Raises:
        ValueError: no such name; the message lists the closest names, or the top-level children.
    """
    modules = dict(model.named_modules())
    if module_name in modules:
        return modules[module_name]
    close = difflib.get_close_matches(module_name, [n for n in modules if n], n=5, cutoff=0.5)
    if close:
        hint = f"close names: {', '.join(close)}"
    else:
        hint = f"top-level modules: {', '.join(name for name, _ in model.named_children())}"
    raise ValueError(f"{type(model).__name__} has no sub-module {module_name!r}; {hint}")


@contextlib.contextmanager
def perturb_output(
    model: nn.Module,
    module_name: str,
    perturbation: Perturbation,
    head: Head | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[nn.Module]:
    """Within the block, every call of ``model.<module_name>`` returns
    ``perturbation(output, head=head, mask=mask, generator=generator)`` instead of ``output``.

    The hook is removed on exit, also when the block raises. A module called several times in one
    forward pass is perturbed every time. Gradients reach the module's output as the perturbation
    lets them (the identity for DDFP, VAT and random directions).

    Args:
        model: any ``nn.Module``.
        module_name: dotted name of the sub-module, as listed by ``model.named_modules()``.
        perturbation: a :class:`~ddfp_lib.perturbations.FeaturePerturbation` or any callable with
            its calling convention.
        head: passed to the perturbation (e.g. the block that follows, for DDFP and VAT).
        mask: passed to the perturbation.
        generator: passed to the perturbation.

    Shape:
        - the hooked module's output: a tensor the perturbation accepts, ``(B, C, H, W)`` or ``(N, C)``

    Yields:
        The hooked sub-module.

    Raises:
        ValueError: unknown ``module_name`` (the message lists close names), or (during the forward
            pass) a hooked module whose output is not a tensor.

    Examples:
        >>> from ddfp_lib.perturbations import RandomDirectionPerturbation
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1))
        >>> x = torch.randn(1, 3, 2, 2)
        >>> with perturb_output(model, "0", RandomDirectionPerturbation(eps=1.0)):
        ...     perturbed = model(x)
        >>> bool(torch.equal(perturbed, model(x)))
        False
    """
    target = find_submodule(model, module_name)

    def hook(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"perturb_output needs a tensor output, but {module_name!r} returned "
                f"{type(output).__name__}"
            )
        return perturbation(output, head=head, mask=mask, generator=generator)

    handle = target.register_forward_hook(hook)
    try:
        yield target
    finally:
        handle.remove()
