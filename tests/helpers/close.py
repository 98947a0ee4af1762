"""Comparisons against the peft oracle in fp32 or under bf16 autocast."""

import torch


def assert_close_or_bf16(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, bf16: bool) -> None:
    """Close to ``atol``/``rtol``; under bf16, to a few bf16 steps of the largest value instead."""
    if bf16:
        atol, rtol = 5e-2 * expected.abs().max().item(), 0.0
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)
