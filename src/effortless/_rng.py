"""Random draws from a ``torch.Generator`` for tensors on any device.

A generator lives on one device, and ``torch.randn(..., generator=g, device=d)`` fails when they
differ, e.g. a CPU generator (``torch.Generator().manual_seed(0)``, the usual way to seed) with a
model on CUDA. These draw on the generator's device (the tensor's if ``generator`` is None) and
move the result, so the numbers depend on the generator alone, whatever the tensor's device.
"""

from __future__ import annotations

import torch


def _device(generator, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def randn(shape, generator: torch.Generator | None, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """N(0, 1) draws of ``shape``, with ``like``'s device and (by default) dtype."""
    out = torch.randn(shape, generator=generator, dtype=dtype or like.dtype, device=_device(generator, like))
    return out.to(like.device)


def rand(shape, generator: torch.Generator | None, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """U[0, 1) draws of ``shape``, with ``like``'s device and (by default) dtype."""
    out = torch.rand(shape, generator=generator, dtype=dtype or like.dtype, device=_device(generator, like))
    return out.to(like.device)


def signs(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform ±1 of ``shape`` (Rademacher), with ``like``'s device and dtype."""
    bits = torch.randint(0, 2, shape, generator=generator, device=_device(generator, like))
    return bits.to(device=like.device, dtype=like.dtype) * 2 - 1
