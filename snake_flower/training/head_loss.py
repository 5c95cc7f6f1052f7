"""The LM head and its loss over chunks of tokens: full-vocabulary logits never exist at once.

An LLM's loss over ``n`` answer tokens and a vocabulary of ``V`` needs ``n x V`` logits. For
SmolLM2 at 8 x 96 tokens that is 151 MB in fp32, and plain autograd holds three such buffers
at once in cross-entropy's backward (the saved log-probabilities, the gradient of the loss
and the gradient of the logits): on a Snake node they were the hop's largest tensors. Here the
head's matmul, the cross-entropy and the distillation term run over ``rows`` tokens at a
time, and each chunk's gradients are taken at once in the forward pass (the loss is a scalar,
so they only wait for backward's scale): the logits of one chunk at most are ever alive,
nothing of them is saved, and no matmul is recomputed. The loss and its gradients equal the
unchunked ones to float tolerance (``tests/snake_flower/training/test_head_loss.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 16 * 2**20  # fp32 logits of one chunk (SmolLM2's 49,152 tokens: 85 rows)
CHUNK_BUFFERS = 3  # fp32 [rows, vocab] alive at once: logits, log-probabilities or gradient, a cast
KD_BUFFERS = 2  # with distillation, also the teacher's and the student's tempered log-probabilities


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk: fp32 logits of at most ``chunk_bytes`` (at least one row)."""
    return max(1, chunk_bytes // (4 * vocab))


def working_bytes(hidden: torch.Tensor, vocab: int, rows: int, kd: bool) -> int:
    """What the chunked loss holds beyond its inputs: the hidden states' gradient and one
    chunk's fp32 buffers (``CHUNK_BUFFERS``, plus ``KD_BUFFERS`` with distillation)."""
    chunk = min(rows, hidden.shape[0]) * vocab * 4
    return hidden.numel() * hidden.element_size() + chunk * (CHUNK_BUFFERS + (KD_BUFFERS if kd else 0))


class _HeadLoss(torch.autograd.Function):
    """``(1-λ)·CE + λ·T²·KL`` of ``hidden @ weight.T`` (fp32 logits), chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, target, kd_weight, temperature, rows):  # noqa: ANN001, ANN205
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32)
        for start in range(0, n, rows):
            h, y = hidden[start:start + rows], labels[start:start + rows]
            logits = F.linear(h, weight).float()
            loss += (1.0 - kd_weight) / n * F.cross_entropy(logits, y, reduction="sum")
            grad = torch.softmax(logits, dim=-1)
            grad[torch.arange(len(y)), y] -= 1.0
            grad *= (1.0 - kd_weight) / n
            if kd_weight > 0.0:
                student = F.log_softmax(logits / temperature, dim=-1)
                del logits
                teacher = F.log_softmax(target[start:start + rows] / temperature, dim=-1)
                # KL(p_t || p_s) = sum p_t (log p_t - log p_s), as F.kl_div(log_target=True)
                gap = teacher - student
                teacher.exp_()
                loss += kd_weight * temperature**2 / n * gap.mul_(teacher).sum()
                del gap
                # d/dlogits of λ·T²·KL / n: λ·T·(softmax(s/T) - softmax(t/T)) / n
                grad += student.exp_().sub_(teacher).mul_(kd_weight * temperature / n)
                del student, teacher
            else:
                del logits
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), h)
            del grad
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # handed over: autograd may keep them as the gradients themselves
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              target: torch.Tensor | None = None, kd_weight: float = 0.0, temperature: float = 2.0,
              rows: int = 0) -> torch.Tensor:
    """The distillation loss of the logits ``hidden @ weight.T`` (in fp32), in chunks of ``rows``.

    Equal to ``distillation_loss(F.linear(hidden, weight).float(), target, labels, kd_weight,
    temperature)`` (``training.loop``) to float tolerance, and so are its gradients.

    Parameters
    ----------
    hidden : torch.Tensor
        ``[n, d]``: one row per prediction, in ``weight``'s dtype.
    weight : torch.Tensor
        ``[V, d]``: the LM head.
    labels : torch.Tensor
        ``[n]`` token ids.
    target : torch.Tensor | None
        ``[n, V]`` teacher logits (``kd_weight > 0`` only).
    kd_weight, temperature : float
        λ and T of distillation; ``kd_weight = 0`` is plain cross-entropy.
    rows : int
        Tokens per chunk; 0: ``chunk_rows(V)``.
    """
    if kd_weight > 0.0 and target is None:
        raise ValueError("head_loss: distillation needs the teacher's logits")
    rows = rows or chunk_rows(weight.shape[0])
    return _HeadLoss.apply(hidden, weight, labels, target if kd_weight > 0.0 else None,
                           float(kd_weight), float(temperature), int(rows))
