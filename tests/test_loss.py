"""The fused / chunked linear cross-entropy equals plain F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from l2a_train.training.loss import chunked_linear_cross_entropy, linear_cross_entropy, next_token_labels


def reference(hidden, weight, labels, reduction):
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().t()
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction=reduction)


def make(n=37, h=24, v=101, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_chunked_matches_cross_entropy(reduction, chunk_rows):
    hidden, weight, labels = make()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = reference(h2, w2, labels, reduction)
    ref.backward()
    if reduction == "mean":
        out = chunked_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows) / (labels != -100).sum()
    else:
        out = chunked_linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    (2.0 * out).backward()  # a non-unit upstream gradient is honoured
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, 2.0 * h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2.0 * w2.grad, rtol=1e-5, atol=1e-6)


def test_public_api_batched_and_frozen_weight():
    hidden, weight, labels = make(n=2 * 19)
    weight.requires_grad_(False)
    hb = hidden.detach().reshape(2, 19, -1).requires_grad_()
    out = linear_cross_entropy(hb, weight, labels.reshape(2, 19))  # mean, auto -> chunked on CPU
    out.backward()
    h2 = hidden.detach().clone().requires_grad_()
    ref = reference(h2, weight, labels, "mean")
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hb.grad.reshape(h2.shape), h2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_compute_in_float32():
    hidden, weight, labels = make(dtype=torch.bfloat16)
    out = linear_cross_entropy(hidden, weight, labels, reduction="sum")
    out.backward()
    ref = reference(hidden.detach(), weight.detach(), labels, "sum")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_all_ignored_gives_zero():
    hidden, weight, labels = make()
    labels[:] = -100
    out = linear_cross_entropy(hidden, weight, labels)
    out.backward()
    assert out.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_next_token_labels_respect_documents():
    ids = torch.tensor([[10, 11, 12, 20, 21, 30]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert next_token_labels(ids, pos).tolist() == [[11, 12, -100, 21, -100, -100]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_liger_matches_chunked_on_cuda():
    hidden, weight, labels = make(n=300, h=64, v=1000)
    hidden, weight, labels = (t.detach().cuda() for t in (hidden, weight, labels))
    outs = []
    for backend in ("liger", "chunked"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = linear_cross_entropy(h, w, labels, backend=backend)
        out.backward()
        outs.append((out, h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
