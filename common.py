"""The only code shared across folders: choose a device, seed every random number generator.

Every script puts the repository root on sys.path before importing this file, so
`python blitz/train.py` (from the root) and `cd blitz && python train.py` both work.
"""
import random

import numpy as np
import torch


def get_device(name="auto"):
    """'auto' -> CUDA if present, else Apple MPS, else CPU. An explicit name is honoured
    ('cpu', 'cuda', 'cuda:1', 'mps'); one this machine lacks stops the script with one line."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for, but Apple MPS is not available here: use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch (all CUDA devices too) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.cuda.manual_seed_all(seed)
