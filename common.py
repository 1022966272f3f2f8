"""The only code shared across folders: choose a device and a precision for it, seed every
random number generator.

Every script puts the repository root on sys.path before importing this file, so
`python blitz/train.py` (from the root) and `cd blitz && python train.py` both work.
"""
import os
import random
import sys
from contextlib import nullcontext

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
            raise SystemExit(f"error: --device {name} asked for, but this PyTorch sees no CUDA GPU: use "
                             "--device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {name} asked for, but only {torch.cuda.device_count()} CUDA "
                             "GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"error: --device {name} asked for, but Apple MPS is not available here: use "
                         "--device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return device


def torchrun_device(name="auto"):
    """(device, backend) for this process when torchrun started several (it sets LOCAL_RANK and
    LOCAL_WORLD_SIZE): on CUDA, GPU number LOCAL_RANK with NCCL between the GPUs; otherwise the
    CPU with Gloo. More processes than GPUs would ask for GPUs that do not exist: one line."""
    device = get_device(name)
    if device.type == "mps":
        raise SystemExit("error: torchrun cannot share work between MPS processes: use --device cpu (Gloo) "
                         "or one process")
    if device.type == "cpu":
        return device, "gloo"
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count()
    if local_world > gpus:
        raise SystemExit(f"error: torchrun started {local_world} processes but this machine has {gpus} CUDA "
                         "GPU(s): "
                         f"use --nproc_per_node={gpus}, or --device cpu for {local_world} CPU processes")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device, "nccl"


def synchronize(device):
    """Wait until the device has finished its queued work. GPU calls return as soon as the work is
    queued, so a clock read without this measures the queueing, not the computing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch (every CUDA device too). On a CPU the same seed, machine and
    thread count repeat a run exactly. On a GPU some kernels still differ from run to run (cuDNN
    picks convolution algorithms by timing them; backward passes of indexing and embeddings add
    with atomics in any order), so results agree only to rounding; deterministic=True (the
    scripts' --deterministic) asks PyTorch for deterministic kernels, warns where an operation has
    none, and runs slower."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to repeat itself
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------- precision: --amp


def choose_precision(device_type, choice="auto", gpu_capability=None, cpu_native_bf16=False):
    """The one --amp rule of every train.py -> (autocast dtype, or None for fp32; whether a
    GradScaler is needed; a warning or None). Pure, so it is testable without a GPU;
    `precision_for(device, choice)` fills in the facts of this machine.

    The PyTorch AMP recipe: fp16 has 5 exponent bits, so small gradients underflow to zero; the
    GradScaler multiplies the loss by a large factor before backward and divides the gradients by
    it before the step (skipping steps whose gradients overflowed). bf16 has fp32's 8 exponent
    bits and needs no scaler, but only GPUs from Ampere on (compute capability 8.0: A100, RTX 30,
    H100) have bf16 tensor cores; older ones (a Colab T4 is 7.5) get fp16 and the scaler. A CPU
    gains from bf16 only with native instructions (AVX512-BF16 or AMX), and only for some models:
    a script passes cpu_native_bf16=True where it does. Elsewhere oneDNN emulates bf16 and it only
    costs time. On Apple MPS everything runs in fp32."""
    if device_type == "mps":
        if choice in ("bf16", "fp16"):
            return None, False, f"warning: --amp {choice} is not used on MPS; training runs in fp32"
        return None, False, None
    if choice == "off":
        return None, False, None
    if choice == "fp16":
        return torch.float16, True, None
    if choice == "bf16":
        if device_type == "cuda" and gpu_capability < (8, 0):
            return torch.bfloat16, False, ("warning: --amp bf16 on a GPU of compute capability "
                                           f"{gpu_capability[0]}."
                                           f"{gpu_capability[1]}, which has no bf16 tensor cores: it is "
                                           "emulated and slow; "
                                           f"--amp auto picks fp16 with a GradScaler there")
        return torch.bfloat16, False, None
    if device_type == "cuda":
        return (torch.bfloat16, False, None) if gpu_capability >= (8, 0) else (torch.float16, True, None)
    if device_type == "cpu" and cpu_native_bf16:
        return torch.bfloat16, False, None
    return None, False, None


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX; PyTorch before 2.5 cannot tell, and then the answer is no (fp32)."""
    ask = lambda name: getattr(torch.cpu, name, lambda: False)()
    return ask("_is_avx512_bf16_supported") or ask("_is_amx_tile_supported")


def precision_for(device, choice, bf16_helps_on_cpu=False):
    """-> (autocast dtype or None, whether a GradScaler is needed) for this machine; a warning,
    if the choice deserves one, goes to stderr."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    dtype, scaler, warning = choose_precision(device.type, choice, capability,
                                              bf16_helps_on_cpu and cpu_has_native_bf16())
    if warning:
        print(warning, file=sys.stderr)
    return dtype, scaler


def precision_name(dtype, scaler):
    """"bfloat16", "float16 +GradScaler" or "off": what precision_for chose, for the printed settings."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "off"
    return name + (" +GradScaler" if scaler else "")


def autocast(device, dtype):
    """torch.autocast for a dtype from precision_for; None: nothing, the model runs in fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def rnn_fp32(rnn, x, hx=None):
    """Call an nn.GRU or nn.LSTM outside bf16 autocast, in fp32. PyTorch's autocast wrapper for
    cuDNN's RNNs casts them to fp16 whatever dtype autocast was asked for, so under bf16 (which
    has no GradScaler) they would train in fp16 and small gradients could underflow; on a CPU
    without native bf16 oneDNN's LSTM fails outright under bf16. Under fp16 autocast (with its
    GradScaler) and in fp32 the call is unchanged."""
    device_type = x.data.device.type  # x.data: also a PackedSequence's
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type) \
            and torch.get_autocast_dtype(device_type) == torch.bfloat16:
        with torch.autocast(device_type, enabled=False):
            x = x.float() if torch.is_tensor(x) else x
            if hx is not None:
                hx = tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float()
            return rnn(x, hx)
    return rnn(x, hx)
