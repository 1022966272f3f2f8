"""Lesson 3 of the 60-minute blitz: neural networks and the training loop.

Covers the blitz's "Neural Networks" and the loop of "Training a Classifier" on a task this
script generates itself, so it runs offline: 16x16 grey images of four shapes (a horizontal
bar, a vertical bar, a box outline, a cross) at random places and sizes, in noise. A cross
contains both bars, so a pixel count is not enough; the network has to see the layout.

    python blitz/train.py              # prints validation accuracy per epoch, ~99% at the end
    python blitz/sample.py             # then: load, inspect, fine-tune and export it

What is shown, in order: a Dataset and a DataLoader; an nn.Module with its layers in
__init__ and weight-free functions (F.relu, F.max_pool2d) in forward; a custom layer with its
own initialisation; the loss; the five steps of a training step; train()/eval() with a
no_grad validation; a learning-rate scheduler; a dict checkpoint written atomically.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import autocast, get_device, precision_for, precision_name, seed_everything, synchronize

CLASSES = ["horizontal", "vertical", "box", "cross"]
IMAGE_SIZE = 16


# ----------------------------------------------------------------------------- model


class ScaledLinear(nn.Module):
    """A custom layer: y = x W^T + b with its own parameters and initialisation.
    Anything assigned as nn.Parameter is registered, so parameters(), .to() and
    state_dict() find it. Initialised as nn.Linear is (Kaiming-uniform, He et al. 2015)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):  # (B, in) -> (B, out)
        return x @ self.weight.t() + self.bias


class Net(nn.Module):
    """The blitz's LeNet shape, sized for 16x16 inputs: layers with weights live in
    __init__; functions without weights (relu, max-pooling, flatten) are called in forward."""

    def __init__(self, channels=16, hidden=64, n_classes=len(CLASSES)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = ScaledLinear(2 * channels * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x):  # x: (B, 1, 16, 16)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2C, 4, 4)
        x = torch.flatten(x, 1)  # (B, 2C * 16)
        x = F.relu(self.fc1(x))  # (B, hidden)
        return self.fc2(x)  # (B, n_classes) logits; the loss applies the softmax


# ----------------------------------------------------------------------------- data


class ShapesDataset(Dataset):
    """A map-style Dataset: the DataLoader asks for len() and for items by index."""

    def __init__(self, n, seed):
        self.images, self.labels = make_shapes(n, seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]  # (1, 16, 16), ()


def make_loaders(args, device):
    """The training and validation sets come from different seeds, so they differ."""
    train_set = ShapesDataset(args.train_size, args.seed)
    val_set = ShapesDataset(args.val_size, args.seed + 1)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,  # a new order every epoch
        num_workers=args.workers,  # >0 loads batches in parallel processes (helps when loading is slow)
        pin_memory=device.type == "cuda",  # page-locked host memory makes copies to the GPU faster
        drop_last=True,  # every step sees a full batch
    )
    val_loader = DataLoader(val_set, batch_size=512, shuffle=False)
    print(f"data: {len(train_set)} train / {len(val_set)} val images of {tuple(train_set[0][0].shape)}, "
          f"classes {CLASSES}")
    return train_loader, val_loader


# ----------------------------------------------------------------------------- training


def train_step(model, images, labels, optimizer, scaler, amp_dtype):
    """The blitz's five steps on one batch; returns the loss (a tensor: no wait for the GPU)."""
    optimizer.zero_grad(set_to_none=True)  # 1. clear the gradients of the last step
    with autocast(images.device, amp_dtype):  # --amp: the forward pass in bf16 or fp16 where faster
        logits = model(images)  # 2. forward
        loss = F.cross_entropy(logits, labels)  # 3. loss
    if not scaler.is_enabled():
        loss.backward()  # 4. backward: fill .grad of every parameter
        optimizer.step()  # 5. update the parameters
    else:  # fp16 mixed precision: the loss scaled up so small gradients do not round to zero
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales first; skips the step if a gradient overflowed
        scaler.update()
    return loss


def train_epoch(model, loader, optimizer, scheduler, scaler, device, amp_dtype):
    """One pass over the training set. Returns the mean loss as a tensor on the device:
    loss.item() per step would make the CPU wait for the GPU."""
    model.train()  # training behaviour for dropout and batch norm
    loss_sum = torch.zeros((), device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss_sum += train_step(model, images, labels, optimizer, scaler, amp_dtype).detach()
        scheduler.step()  # the learning rate follows its schedule, per step
    return loss_sum / len(loader)


def make_optimizer(model, lr, device):
    """SGD with Nesterov momentum. fused: one kernel updates every parameter, and under fp16 the
    GradScaler then skips an overflowed step on the device; with the plain SGD the CPU would wait to
    read the GPU's overflow flag at every step."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                           fused=device.type in ("cuda", "cpu"))


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(model, model_args, train_loader, val_loader, args, device, amp_dtype, needs_scaler):
    """Train for args.epochs, validate after each, keep the best checkpoint; returns its accuracy."""
    optimizer = make_optimizer(model, args.lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)  # fp16 only: see common.choose_precision
    # One-cycle schedule (Smith & Topin 2018): warm up, then anneal; converges in few epochs.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.epochs * len(train_loader))
    best_acc, start = -1.0, time.time()
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        loss = train_epoch(model, train_loader, optimizer, scheduler, scaler, device, amp_dtype)
        synchronize(device)  # GPU work runs behind the Python code: wait for it before reading the clock
        dt, elapsed = time.time() - t0, time.time() - start
        val_loss, val_acc = evaluate(model, val_loader, device)
        print(f"epoch {epoch}/{args.epochs} | loss {loss.item():.4f} | "
              f"{len(train_loader) * args.batch_size / dt:,.0f} img/s | {1000 * dt / len(train_loader):.1f} "
              f"ms/step | elapsed {elapsed:.1f}s | eta {elapsed / epoch * (args.epochs - epoch):.1f}s | "
              f"val loss {val_loss:.4f} acc {100 * val_acc:.1f}%")
        if val_acc > best_acc:  # keep the best model seen so far
            best_acc = val_acc
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "model_args": model_args,
                             "classes": CLASSES,
                             "epoch": epoch, "best_val_acc": best_acc, "config": vars(args),
                             "kind": "blitz"},  # sample.py refuses checkpoints of other models
                            Path(args.out))
    return best_acc


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()  # no graph is recorded: validation needs no gradients
def evaluate(model, loader, device):
    model.eval()  # layers such as dropout and batch norm switch to inference behaviour
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return loss_sum / count, correct / count


# ------------------------------------------------------------------------ built-in data: four shapes in noise


def make_shapes(n, seed, size=IMAGE_SIZE):
    """n noisy images of the four CLASSES, drawn with tensor ops (no per-pixel loops).
    Returns images (n, 1, size, size) float32 and labels (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    half = torch.randint(2, 6, (n, 1, 1), generator=g)  # half-length of a bar / half-side of a box
    cy = torch.randint(0, size, (n, 1, 1), generator=g).clamp(half, size - 1 - half)  # keep it inside
    cx = torch.randint(0, size, (n, 1, 1), generator=g).clamp(half, size - 1 - half)
    dy = (torch.arange(size).view(1, size, 1) - cy).abs()  # (n, size, 1) distance from the centre row
    dx = (torch.arange(size).view(1, 1, size) - cx).abs()  # (n, 1, size)
    horizontal = (dy == 0) & (dx <= half)  # (n, size, size)
    vertical = (dx == 0) & (dy <= half)
    box = torch.maximum(dy, dx) == half
    cross = horizontal | vertical
    masks = torch.stack([horizontal, vertical, box, cross], dim=1)  # (n, 4, size, size)
    shape = masks[torch.arange(n), labels].float()  # (n, size, size): each image's own shape
    brightness = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=g)
    images = shape * brightness + 0.2 * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), labels  # add the channel dimension: (n, 1, size, size)


# ----------------------------------------------------------------------------- main


def get_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="peak SGD learning rate (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=10000,
                        help="generated training images (default: %(default)s)")
    parser.add_argument("--val-size", type=int, default=2000,
                        help="generated validation images (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=16,
                        help="channels of the first conv layer (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes; 0 loads in the main process (default: "
                             "%(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "blitz.pt"),
                        help="checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision; auto: bf16 on GPUs from Ampere on, fp16 with a GradScaler on "
                             "older GPUs (a T4), fp32 on CPUs and MPS (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a GPU run repeats exactly (slower)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one epoch of two batches: checks that every line runs, in seconds")
    args = parser.parse_args()
    if args.dry_run:  # pytorch/examples' --dry-run: the whole script once, on the smallest data
        args.epochs, args.train_size, args.val_size = 1, 2 * args.batch_size, args.batch_size
    return args


def main():
    args = get_args()
    print("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    seed_everything(args.seed, args.deterministic)
    device = get_device(args.device)
    amp_dtype, needs_scaler = precision_for(device, args.amp)  # common.py: the same rule in every train.py
    train_loader, val_loader = make_loaders(args, device)

    model_args = dict(channels=args.channels, hidden=64, n_classes=len(CLASSES))
    model = Net(**model_args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters on {device}, autocast {precision_name(amp_dtype, needs_scaler)}")
    print(model)

    start = time.time()
    best_acc = fit(model, model_args, train_loader, val_loader, args, device, amp_dtype, needs_scaler)
    print(f"saved best checkpoint to {args.out}")
    print(f"result: val_acc={100 * best_acc:.2f} chance=25.00 epochs={args.epochs} "
          f"train_seconds={time.time() - start:.1f}")

if __name__ == "__main__":
    main()
