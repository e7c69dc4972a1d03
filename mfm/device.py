"""Which device a stage runs on, and the mixed precision it trains in there."""

from __future__ import annotations

import contextlib

import torch

from mfm.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; asking for a missing device is a user error."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        # TF32 matmuls for the fp32 parts (AMP off, or ops autocast keeps in fp32).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device = 'cuda' but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("runtime.device = 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when AMP is on; full precision elsewhere (CPU bf16 is slower)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
