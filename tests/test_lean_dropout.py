"""The LoRA family's lean backward with adapter dropout (variants/methods/lean_dropout.py): the same
outputs and gradients as the plain formulation, bit for bit, and less saved for backward."""

import copy

import pytest
import torch
from helpers.saved import held_for_backward
from torch import nn

import variants
from variants import DoRALinear, LoRALinear


def pair(kind, dropout=0.3, d_in=64, d_out=48):
    """The same trained layer twice: lean (the default) and plain."""
    torch.manual_seed(0)
    lean = kind(nn.Linear(d_in, d_out), rank=4, alpha=8.0, dropout=dropout).train()
    with torch.no_grad():
        lean.lora_B.normal_(std=0.1)
    plain = copy.deepcopy(lean)
    plain.lean_backward = False
    return lean, plain


def step(layer, x, seed, bf16=False):
    """Output and the gradients of x, A, B (and m) after one backward, the dropout drawn from ``seed``."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    out.float().pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in layer.adapter_parameters()]
    for p in layer.adapter_parameters():
        p.grad = None
    return out, grads


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
def test_lean_and_plain_give_identical_outputs_and_gradients(kind, bf16):
    lean, plain = pair(kind)
    x = torch.randn(3, 10, 64)
    for seed in (1, 2):
        (out, grads), (expected, expected_grads) = step(lean, x, seed, bf16), step(plain, x, seed, bf16)
        assert out.dtype == expected.dtype
        assert torch.equal(out, expected)
        for got, want in zip(grads, expected_grads, strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)


def graph_names(tensor) -> set[str]:
    """The names of every backward node ``tensor`` was computed through."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
def test_the_lean_path_is_the_one_taken(kind):
    lean, plain = pair(kind)
    x = torch.randn(4, 64, requires_grad=True)
    assert "DroppedDownProjectionBackward" in graph_names(lean(x))
    assert "DroppedDownProjectionBackward" not in graph_names(plain(x))


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("x_grad, a_grad", [(False, True), (True, False), (False, False)])
def test_inputs_and_a_with_and_without_gradients(kind, x_grad, a_grad):
    """The first adapted layer's input needs no gradient; LoRA-FA freezes A."""
    lean, plain = pair(kind)
    x = torch.randn(7, 64)
    grads = []
    for layer in (lean, plain):
        layer.lora_A.requires_grad_(a_grad)
        x_ = x.clone().requires_grad_(x_grad)
        torch.manual_seed(3)
        layer(x_).pow(2).sum().backward()
        grads.append([x_.grad, layer.lora_A.grad, layer.lora_B.grad])
    for got, want in zip(*grads, strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
    assert (grads[0][0] is not None) == x_grad and (grads[0][1] is not None) == a_grad


def test_a_second_order_gradient_is_refused_not_wrong():
    lean, _ = pair(LoRALinear)
    x = torch.randn(5, 64, requires_grad=True)
    (grad_a,) = torch.autograd.grad(lean(x).pow(2).sum(), lean.lora_A, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_a.sum().backward()


def test_the_offset_layer_takes_it_too():
    """PiSSA, MiLoRA and LoRA-GA's layer: A·x' through the lean path, A₀·x undropped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    variants.inject_adapters(model, "pissa", ["0"], rank=4, alpha=8, dropout=0.3)
    lean = variants.layers_of(model)["0"].train()
    with torch.no_grad():
        lean.lora_A.add_(0.01 * torch.randn_like(lean.lora_A))
    plain = copy.deepcopy(lean)
    plain.lean_backward = False
    x = torch.randn(3, 10, 64)
    assert "DroppedDownProjectionBackward" in graph_names(lean(x.clone().requires_grad_()))
    (out, grads), (expected, expected_grads) = step(lean, x, 4), step(plain, x, 4)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)


def test_eval_mode_and_zero_dropout_take_the_plain_path():
    lean, plain = pair(LoRALinear)
    x = torch.randn(5, 64)
    lean.eval()
    plain.eval()
    assert torch.equal(lean(x), plain(x))
    lean, _ = pair(LoRALinear, dropout=0.0)
    assert lean.dropped_down_projection(x)[0] is x


def saved_bytes(model, run):
    """Bytes autograd holds for backward after ``run()``, each storage once, parameters left out."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held_for_backward(run, model)}
    return sum(storages.values())


class ThreeReaders(nn.Module):
    """q, k and v reading one input, as in attention."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.q(x) + self.k(x) * self.v(x)


def test_layers_reading_one_input_save_it_once_and_a_bool_mask_each():
    """Per element of x: plain keeps x' (4 bytes) and a float mask (4) per layer; lean keeps x once
    (4, shared) and a bool mask (1) per layer. The output's own saves are the same in both."""
    torch.manual_seed(0)
    model = ThreeReaders()
    variants.inject_adapters(model, "lora", ["q", "k", "v"], rank=4, alpha=8, dropout=0.1)
    model.train()
    plain = copy.deepcopy(model)
    for layer in variants.layers_of(plain).values():
        layer.lean_backward = False
    x = torch.randn(256, 64, requires_grad=True)
    lean_bytes, plain_bytes = saved_bytes(model, lambda: model(x)), saved_bytes(plain, lambda: plain(x))
    elements = x.numel()
    assert plain_bytes - lean_bytes == 3 * 8 * elements - (4 + 3 * 1) * elements


def test_the_setting_reaches_every_layer_of_the_lora_family():
    for variant in ("lora", "dora", "qlora", "staged", "pissa", "milora", "lora_ga", "lora_pro", "eva"):
        model = ThreeReaders()
        variants.inject_adapters(model, variant, ["q", "v"], rank=4, alpha=8, lean_backward=False)
        assert all(layer.lean_backward is False for layer in variants.layers_of(model).values()), variant


@pytest.mark.parametrize("dropout", [0.123, 0.999])
def test_transposed_inputs_odd_rates_and_rows_dropped_whole(dropout):
    """A non-contiguous input, a rate whose 1/(1 − p) rounds differently by path, and at p = 0.999
    whole rows dropped (the scaled value is then looked up elsewhere)."""
    lean, plain = pair(LoRALinear, dropout=dropout)
    x = torch.randn(64, 2, 9).transpose(0, 2)  # (9, 2, 64), non-contiguous
    (out, grads), (expected, expected_grads) = step(lean, x, 5), step(plain, x, 5)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.equal(got, want)
