"""Language-model loss without materialising [tokens x vocab] logits.

At 128K tokens per row and a 152K vocabulary, full logits would take 80 GB in fp32. Both
implementations below multiply the hidden states by the output embedding a chunk of tokens at
a time and compute the gradients of hidden states and weight during the forward pass (as
liger-kernel does), so only one chunk of logits exists at any moment and the weight is not
needed again in backward (which also keeps ZeRO-3's gathered weight short-lived).

    linear_cross_entropy(hidden, weight, labels)   # sum or mean over labels != -100

- CUDA: liger-kernel's fused linear cross-entropy (Triton).
- elsewhere (CPU tests, quickstart): `ChunkedLinearCrossEntropy`, pure PyTorch, float32 math.

`next_token_labels(input_ids, position_ids)` builds the targets of packed rows: the next token
inside the same document, -100 where the next token starts a new document and at the row end.
"""

from __future__ import annotations

import torch

from l2a_common import UserError

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (128 MiB in float32)
BACKENDS = ("auto", "liger", "chunked")  # auto: liger on CUDA, chunked elsewhere (trainer.loss_backend)


def check_backend(backend: str) -> None:
    """The one check of the loss backend's name, as the setting that chooses it."""
    if backend not in BACKENDS:
        raise UserError(f"trainer.loss_backend='{backend}': choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")


def next_token_labels(input_ids: torch.Tensor, position_ids: torch.Tensor,
                      padding: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for packed rows: input_ids shifted left, -100 across document starts, at the end
    and on `padding` (bool, the filler of the data set's last row: pad -> pad is not text)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, :-1][position_ids[:, 1:] == 0] = IGNORE_INDEX
    if padding is not None:
        labels[padding] = IGNORE_INDEX
    return labels


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of cross_entropy(hidden @ weight.T, labels), gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_rows: int):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32 = weight.float()
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start : start + chunk_rows].float()
            y = labels[start : start + chunk_rows]
            valid = y != ignore_index
            if not bool(valid.any()):
                continue
            logits = h @ w32.t()  # [c, V], the only vocabulary-sized buffer
            lse = torch.logsumexp(logits, dim=-1)
            safe_y = torch.where(valid, y, torch.zeros_like(y))
            target = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if need_h or need_w:
                # d loss / d logits = softmax - onehot, zero for ignored tokens; reuse the buffer
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(y), device=y.device), safe_y] -= 1.0
                grad_logits *= valid[:, None]
                if need_h:
                    grad_h[start : start + chunk_rows] = (grad_logits @ w32).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_h if need_h else None, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None


def chunked_linear_cross_entropy(hidden, weight, labels, ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None):
    """Summed loss over valid tokens, pure PyTorch (any device)."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, int(chunk_rows))


_LIGER = {}


def _liger_loss(ignore_index: int):
    """liger-kernel's fused loss module (sum reduction, float32 accumulation where supported)."""
    if ignore_index not in _LIGER:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        try:
            _LIGER[ignore_index] = LigerFusedLinearCrossEntropyLoss(
                ignore_index=ignore_index, reduction="sum", accum_dtype=torch.float32
            )
        except TypeError:  # older liger without accum_dtype
            _LIGER[ignore_index] = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")
    return _LIGER[ignore_index]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels`, never building all the logits.

    hidden [..., H], weight [V, H], labels [...] (ignore_index skipped). reduction: "sum" or
    "mean" (over valid tokens; 0 when there are none). backend: auto (liger on CUDA, chunked
    elsewhere) | liger | chunked.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if backend == "auto":
        backend = "liger" if hidden.is_cuda else "chunked"
    check_backend(backend)
    if backend == "liger":
        total = _liger_loss(ignore_index)(weight, hidden.contiguous(), labels).float()
    else:
        total = chunked_linear_cross_entropy(hidden, weight, labels, ignore_index)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count
