"""Lesson 2 of the 60-minute blitz: autograd, automatic differentiation.

Follows the blitz's "A Gentle Introduction to torch.autograd". Each claim printed is also
asserted, so the test suite notices if one stops being true.

    python blitz/autograd.py           # about a second on a laptop CPU
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
args = parser.parse_args()
seed_everything(args.seed)
device = get_device(args.device)


def show(title, value=None):
    print(f"\n# {title}")
    if value is not None:
        print(value)


# ----------------------------------------------------------------------------- the graph
# requires_grad=True asks autograd to record every operation on x so it can run them backwards.
x = torch.ones(2, 2, device=device, requires_grad=True)
y = x + 2
show("y = x + 2 was made by an operation, so it has a grad_fn", y.grad_fn)
assert x.grad_fn is None and y.grad_fn is not None  # x is a leaf the user made
z = y * y * 3
out = z.mean()
show("out = mean(3 (x + 2)^2)", out.item())
assert out.item() == 27.0

# ----------------------------------------------------------------------------- backward
out.backward()  # fills x.grad with d(out)/dx
# By hand: out = 1/4 sum 3 (x_i + 2)^2, so d(out)/dx_i = 3/2 (x_i + 2) = 4.5 at x_i = 1.
show("x.grad after out.backward(): analytic value 3/2 (x + 2) = 4.5", x.grad)
assert torch.allclose(x.grad, torch.full_like(x, 4.5))

# A second function with a known derivative: d/dw sin(w) w^2 = cos(w) w^2 + 2 w sin(w).
w = torch.linspace(-2, 2, 7, device=device, requires_grad=True)
(torch.sin(w) * w**2).sum().backward()
analytic = torch.cos(w) * w**2 + 2 * w * torch.sin(w)
show("d/dw sin(w) w^2 matches cos(w) w^2 + 2 w sin(w)", (w.grad - analytic.detach()).abs().max().item())
assert torch.allclose(w.grad, analytic.detach(), atol=1e-6)

# ----------------------------------------------------------------------------- vector-Jacobian
# For a vector output, backward(v) computes v^T J (the Jacobian J is never built).
x = torch.randn(3, device=device, requires_grad=True)
y = x * 2  # J = 2 I
v = torch.tensor([0.1, 1.0, 0.0001], device=device)
y.backward(v)
show("y = 2x is a vector: y.backward(v) gives v^T J = 2 v", x.grad)
assert torch.allclose(x.grad, 2 * v)

# ----------------------------------------------------------------------------- accumulation
# Gradients add up across backward() calls until zeroed; this is why training loops
# call optimizer.zero_grad() every step.
p = torch.tensor(3.0, requires_grad=True)
(p * 2).backward()
(p * 2).backward()
show("two backward() calls accumulate: d(2p)/dp = 2, twice -> 4", p.grad)
assert p.grad.item() == 4.0
p.grad.zero_()
(p * 2).backward()
assert p.grad.item() == 2.0

# ----------------------------------------------------------------------------- stopping autograd
x = torch.randn(3, requires_grad=True)
with torch.no_grad():  # inference: record nothing, save memory and time
    y = x * 2
show("inside torch.no_grad() results do not require grad", y.requires_grad)
assert not y.requires_grad


@torch.no_grad()  # the same as a decorator
def predict(t):
    return t * 2


assert not predict(x).requires_grad
d = x.detach()  # same values, shares storage, cut from the graph
show("detach(): same data, no graph", (d.requires_grad, torch.equal(d, x)))
assert not d.requires_grad and d.data_ptr() == x.data_ptr()

layer = torch.nn.Linear(3, 1)
layer.weight.requires_grad_(False)  # freeze: the optimizer and autograd leave it alone
layer(torch.randn(4, 3)).sum().backward()
show("a frozen weight gets no .grad, the bias still does", (layer.weight.grad, layer.bias.grad))
assert layer.weight.grad is None and layer.bias.grad is not None

# ----------------------------------------------------------------------------- autograd.grad
# torch.autograd.grad returns gradients instead of adding them into .grad; with
# create_graph=True the result is differentiable again (second derivatives).
t = torch.tensor(2.0, requires_grad=True)
(dy,) = torch.autograd.grad(t**3, t, create_graph=True)  # 3 t^2 = 12
(d2y,) = torch.autograd.grad(dy, t)  # 6 t = 12
show("autograd.grad: d/dt t^3 = 3t^2 = 12 and d2/dt2 = 6t = 12 at t = 2", (dy.item(), d2y.item()))
assert dy.item() == 12.0 and d2y.item() == 12.0 and t.grad is None


# ----------------------------------------------------------------------------- gradcheck
# gradcheck compares autograd's gradient with finite differences; it needs float64.
def f(a, b):
    return (a * b.exp()).tanh().sum(dim=0)


inputs = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 3, dtype=torch.float64, requires_grad=True))
ok = torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-4)
show("gradcheck(f) agrees with finite differences", ok)
assert ok

print(f"\nresult: lesson=autograd claims_checked=all device={device}")
