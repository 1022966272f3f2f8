"""Lesson 1 of the 60-minute blitz: tensors.

Follows "Deep Learning with PyTorch: A 60 Minute Blitz" (pytorch.org/tutorials), section
"Tensors". Every printed claim is also asserted, so if a claim stops being true the test
suite fails. Run it and read it side by side:

    python blitz/tensors.py            # about a second on a laptop CPU
    python blitz/tensors.py --device cuda
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
args = parser.parse_args()
seed_everything(args.seed)


def show(title, value=None):
    print(f"\n# {title}")
    if value is not None:
        print(value)


# ----------------------------------------------------------------------------- construction
x = torch.empty(5, 3)  # memory is allocated but not initialised: values are whatever was there
show("torch.empty(5, 3): uninitialised memory, only the shape is promised", x.shape)
assert x.shape == (5, 3)

x = torch.rand(5, 3)  # uniform on [0, 1)
show("torch.rand(5, 3): uniform on [0, 1)", x)
assert ((x >= 0) & (x < 1)).all()

x = torch.zeros(5, 3, dtype=torch.long)
show("torch.zeros(5, 3, dtype=torch.long)", x)
assert x.dtype == torch.int64 and x.sum().item() == 0

x = torch.ones(2, 2)
assert x.dtype == torch.float32 and x.sum().item() == 4  # float32 is the default dtype
x = torch.tensor([5.5, 3.0])  # straight from data
show("torch.tensor([5.5, 3.0]) from data", x)
assert x.tolist() == [5.5, 3.0]

x = x.new_ones(5, 3, dtype=torch.float64)  # new_* methods take the dtype/device of x unless told
y = torch.randn_like(x, dtype=torch.float32)  # same shape as x, different dtype
show("randn_like(x, dtype=float32): same shape, different dtype", (x.dtype, y.dtype, y.shape))
assert y.shape == x.shape and y.dtype != x.dtype
show("x.size() is a torch.Size, which is a tuple", x.size())
assert isinstance(x.size(), tuple)

# ----------------------------------------------------------------------------- operations
# The full list of operations: https://pytorch.org/docs/stable/torch.html
x, y = torch.rand(5, 3), torch.rand(5, 3)
a = x + y  # 1. operator
b = torch.add(x, y)  # 2. function
c = torch.empty(5, 3)
torch.add(x, y, out=c)  # 3. into a given output tensor
show("addition three ways agrees: x + y, torch.add(x, y), torch.add(x, y, out=c)")
assert torch.equal(a, b) and torch.equal(b, c)
y_before = y.clone()
y.add_(x)  # in place: methods ending in _ mutate their tensor
show("in place: y.add_(x) changes y itself")
assert torch.equal(y, y_before + x)
assert torch.allclose(torch.sub(a, y_before), x)  # subtraction undoes the addition

m1, m2 = torch.randn(2, 3), torch.randn(3, 4)
elementwise = m1 * m1  # (2, 3): multiplies matching entries
matrix = m1 @ m2  # (2, 4): rows of m1 times columns of m2
show("m1 * m1 is element-wise (2, 3); m1 @ m2 is the matrix product (2, 4)",
     (elementwise.shape, matrix.shape))
assert elementwise.shape == (2, 3) and matrix.shape == (2, 4)
assert torch.allclose(matrix, torch.matmul(m1, m2))
assert torch.allclose(matrix[1, 2], (m1[1] * m2[:, 2]).sum())  # one entry worked by hand

batch = torch.randn(10, 2, 3)  # (B, 2, 3): ten matrices
out = batch @ m2  # m2 (3, 4) is broadcast over the batch -> (10, 2, 4)
show("batched matmul: (10, 2, 3) @ (3, 4) broadcasts to (10, 2, 4)", out.shape)
assert out.shape == (10, 2, 4) and torch.allclose(out[7], batch[7] @ m2)

# ----------------------------------------------------------------------------- indexing, shapes
x = torch.arange(12).reshape(3, 4)
show("NumPy-style indexing: x[:, 1] is the second column", x[:, 1])
assert x[:, 1].tolist() == [1, 5, 9] and x[1:, 2:].tolist() == [[6, 7], [10, 11]]
assert x[x > 8].tolist() == [9, 10, 11]  # boolean mask

x = torch.randn(4, 4)
y = x.view(16)  # view shares memory and needs a contiguous tensor
z = x.view(-1, 8)  # -1 is inferred from the other dimensions
show("view: (4, 4) -> (16,) and (-1, 8) -> (2, 8)", (y.shape, z.shape))
assert y.shape == (16,) and z.shape == (2, 8)
x[0, 0] = 100.0
assert y[0] == 100.0  # a view is the same storage
t = x.t()  # transposing makes a non-contiguous view ...
assert not t.is_contiguous()
r = t.reshape(-1)  # ... which view() refuses but reshape() copies when it must
show("reshape works where view cannot (non-contiguous input)", r.shape)
try:
    t.view(-1)
    raise AssertionError("view of a non-contiguous tensor should fail")
except RuntimeError:
    pass

x = torch.randn(1)
show("a one-element tensor gives a Python number with .item()", x.item())
assert isinstance(x.item(), float)

a, b = torch.zeros(2, 3), torch.ones(2, 3)
show("cat joins along an existing dim, stack makes a new one",
     (torch.cat([a, b]).shape, torch.stack([a, b]).shape))
assert torch.cat([a, b], dim=0).shape == (4, 3) and torch.cat([a, b], dim=1).shape == (2, 6)
assert torch.stack([a, b]).shape == (2, 2, 3)

col, row = torch.arange(3).view(3, 1), torch.arange(4).view(1, 4)
table = col * 10 + row  # (3, 1) and (1, 4) broadcast to (3, 4)
show("broadcasting: (3, 1) * 10 + (1, 4) -> (3, 4)", table)
assert table.shape == (3, 4) and table[2, 3] == 23

x = torch.randn(2, 3, 5)
show("transpose swaps two dims, permute reorders all", (x.transpose(0, 2).shape, x.permute(2, 0, 1).shape))
assert x.transpose(0, 2).shape == (5, 3, 2) and x.permute(2, 0, 1).shape == (5, 2, 3)

image = torch.randn(3, 32, 32)  # (C, H, W): one image
batch = image.unsqueeze(0)  # (1, C, H, W): nn layers expect a batch dimension
show("unsqueeze(0) fakes a batch dimension", batch.shape)
assert batch.shape == (1, 3, 32, 32) and batch.squeeze(0).shape == image.shape

# ----------------------------------------------------------------------------- NumPy bridge
a = torch.ones(5)
b = a.numpy()  # shares memory with a (CPU tensors only)
a.add_(1)
show("tensor -> NumPy: a.numpy() shares memory, so a.add_(1) shows in b", b)
assert isinstance(b, np.ndarray) and (b == 2).all()

a = np.ones(5)
b = torch.from_numpy(a)  # also shares memory
np.add(a, 1, out=a)
show("NumPy -> tensor: torch.from_numpy(a) shares memory too", b)
assert (b == 2).all() and b.dtype == torch.float64  # NumPy's float64 is kept
assert not torch.tensor(a).data_ptr() == b.data_ptr()  # torch.tensor() copies instead

# ----------------------------------------------------------------------------- devices
device = get_device(args.device)  # common.py: cuda, then mps, then cpu
x = torch.randn(3)
y = torch.ones_like(x, device=device)  # create directly on the device
z = (x.to(device) + y).to("cpu").to(torch.float64)  # move first: MPS has no float64, so convert on the CPU
show(f"tensors moved to {device} and back with .to()", z)
assert z.device.type == "cpu" and torch.allclose(z, (x + 1).double())

print("\nresult: lesson=tensors claims_checked=all device=" + str(device))
