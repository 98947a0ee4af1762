"""Comparisons against the peft oracle in fp32 or under bf16 autocast."""

import torch

import variants


def assert_close_or_bf16(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, bf16: bool) -> None:
    """Close to ``atol``/``rtol``; under bf16, to a few bf16 steps of the largest value instead."""
    if bf16:
        atol, rtol = 5e-2 * expected.abs().max().item(), 0.0
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)


def forward_backward_both(model, theirs, batch: dict, bf16: bool, close) -> torch.Tensor:
    """Our model's and peft's logits on ``batch`` (under CPU bf16 autocast when ``bf16``),
    compared with ``close(got, expected)``; then each backward from the sum of its logits.
    Returns our logits."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours_out, theirs_out = model(**batch).logits, theirs(**batch).logits
    close(ours_out, theirs_out)
    ours_out.float().sum().backward()
    theirs_out.float().sum().backward()
    return ours_out


def assert_merged_as_peft(model, theirs, names, atol: float, rtol: float) -> None:
    """Our merge of every adapter and peft's ``merge_and_unload`` leave the same weights in the
    adapted modules ``names``."""
    layers = variants.layers_of(model)
    variants.merge_adapters(model)
    merged = theirs.merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(layers[name].base.weight, merged[f"{name}.weight"], atol=atol, rtol=rtol)


def assert_dropout_draws_as_peft(model, theirs, batch: dict, atol: float, other_atol: float) -> None:
    """In train mode, the same seed gives our model and peft's the same dropout masks (drawn in the
    same order) and so the same logits, to ``atol``; another seed gives other logits (beyond
    ``other_atol``), so the masks matter."""
    model.train()
    theirs.train()
    outputs = []
    for m in (model, theirs):
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(m(**batch).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=atol, rtol=atol)
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, outputs[0], atol=other_atol)
