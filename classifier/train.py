"""CIFAR-10 image classifier: the blitz's "Training a Classifier", done properly.

Three networks: `--model lenet` is exactly the tutorial's (two 5x5 convs, three linear layers)
trained the tutorial's way; `--model airbench` (default) is Jordan's airbench network and recipe
(whitening layer, BN without a learned scale and with 64x the learning rate on its shifts,
lookahead, alternating flips, test-time augmentation), each trick commented where it is used;
`--model resnet` is a small ResNet-9 (Page's "How to train your ResNet"). Data lives on the
device as one uint8 tensor and is augmented there with tensor ops, so no DataLoader or worker
process is needed.

    python classifier/train.py                      # generated shapes; prints test accuracy
    python classifier/train.py --data cifar10 --time-limit 600   # CIFAR-10, what 10 minutes allow
    python classifier/train.py --data cifar10 --model lenet --epochs 2 --batch-size 4 --lr 0.001
    torchrun --nproc_per_node=2 classifier/train.py  # DistributedDataParallel, a process per GPU/core
    python classifier/sample.py                     # classify test images from the checkpoint

`--time-limit SECONDS` replaces `--epochs`: the speed of the first steps is measured and the
plan printed (steps, epochs), and training progress is then counted in seconds rather than
steps, so the warm-up, the decay, the weight averaging and the switch from small crops to whole
images fall at the same fractions of the budget on a fast machine and a slow one, and the run
ends on time with the learning rate decayed.

Data: `--data shapes` (default) draws ten shape classes (disk, ring, square, outline, triangle,
plus, bar, half-disk, two dots, flower) at random colour, size, position and rotation on a
cluttered background; `--data cifar10` reads the official *binary* release
(cifar-10-binary.tar.gz: one label byte then 3072 pixel bytes, R, G, B planes, per record)
with NumPy; downloaded data is never unpickled.
"""
import argparse
import copy
import hashlib
import itertools
import math
import os
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import (autocast, get_device, precision_for, precision_name, seed_everything, synchronize,
                    torchrun_device)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHAPE_CLASSES = ["disk", "ring", "square", "outline", "triangle", "plus", "bar", "half-disk", "two-dots",
                 "flower"]
RECORD = 1 + 3 * 32 * 32  # bytes per CIFAR record


# ----------------------------------------------------------------------------- settings


# One recipe per network; a flag given on the command line overrides its key. LeNet: the tutorial's
# (plain SGD with momentum, no augmentation, inputs scaled to [-1, 1]); ResNet and AirNet: speedrun
# recipes. airbench's own hyperparameters are stated per 1024 examples for a summed loss; here the
# loss is a mean at batch 256, so its lr of 11.5 at momentum 0.85 becomes
# 11.5 * 256 / (1024 * (1 + 1 / 0.15)) = 0.375, and its weight decay 0.0153 per unit of lr.
RECIPES = {
    "airbench": dict(
        # channels of the first conv group; the next two have twice as many (airbench93: 64/128/128)
        width=64,
        epochs=4,  # passes over the training images
        batch_size=256,  # images per step (airbench: 1024; smaller batches fit a CPU's caches)
        lr=0.375,  # peak learning rate of the triangle schedule
        momentum=0.85,  # Nesterov momentum
        weight_decay=0.0153 / 11.5,  # per step, decoupled from the lr as in airbench
        bias_lr=64,  # BN shifts learn 64x faster; their weight decay is divided by as much
        label_smoothing=0.2,  # aim for 0.8 on the true class (Szegedy et al. 2016)
        pad=2,  # random translation by up to 2 pixels
        flip="alternate",  # every other epoch flips all images (airbench), instead of coin flips
        schedule="triangle",  # lr from 0.2x up to 1x at 23% of training, then down to 0.07x
        lookahead=True,  # slow weights averaged every 5 x 1024 images (Zhang et al. 2019)
        tta=2,  # test-time augmentation: mirror and one-pixel shifts
        early_crop=24,  # 24x24 crops for the first 40% of training, whole 32x32 images after
        act="gelu",  # airbench's; relu runs faster on a CPU but reaches less in the same time
        whiten_bias_epochs=0,  # train the whitening layer's bias for this many epochs (airbench: 3)
        whiten_images=2000,  # training images whose 2x2 patches set the whitening (airbench: 5000)
    ),
    "resnet": dict(width=16, epochs=5, batch_size=256, lr=0.2, momentum=0.9, weight_decay=5e-4, bias_lr=1,
                   label_smoothing=0.2, pad=4, flip="random", schedule="one-cycle", lookahead=False, tta=0,
                   early_crop=32),
    "lenet": dict(width=0, epochs=2, batch_size=4, lr=0.001, momentum=0.9, weight_decay=0.0, bias_lr=1,
                  label_smoothing=0.0, pad=0, flip="none", schedule="constant", lookahead=False, tta=0,
                  early_crop=32),
}


EARLY_UNTIL = 0.4  # the fraction of training that uses the early (smaller) crops


# --amp auto uses bf16 on CPUs with native bf16: convolutions gain from it (common.choose_precision)
CPU_BF16 = True


def recipe_defaults(key):
    """"airbench 0.375, resnet 0.2, lenet 0.001": a flag's defaults for its help text, from RECIPES."""
    return ", ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items())


def fail(message):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- model


class LeNet(nn.Module):
    """The tutorial's network, unchanged: conv 5x5 (6) - pool - conv 5x5 (16) - pool - 120 - 84 - 10."""

    def __init__(self, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, n_classes)

    def forward(self, x):  # (B, 3, 32, 32)
        x = self.pool(F.relu(self.conv1(x)))  # (B, 6, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))  # (B, 16, 5, 5)
        x = torch.flatten(x, 1)  # (B, 400)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (B, 10)


class ConvBN(nn.Module):
    """3x3 conv (no bias: batch norm's shift replaces it) -> batch norm -> ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ResNet(nn.Module):
    """ResNet-9 layout (Page 2018, "How to train your ResNet"): conv-pool stages that halve the
    resolution, with a residual block after the first and last. `width` scales every layer; at
    width 16 the stages have 16/32/64/128 channels, sized for a CPU."""

    def __init__(self, width=16, n_classes=10):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = ConvBN(3, w[0])  # (B, w0, 32, 32)
        self.layer1 = ConvBN(w[0], w[1])  # then pool -> (B, w1, 16, 16)
        self.res1 = nn.Sequential(ConvBN(w[1], w[1]), ConvBN(w[1], w[1]))
        self.layer2 = ConvBN(w[1], w[2])  # then pool -> (B, w2, 8, 8)
        self.layer3 = ConvBN(w[2], w[3])  # then pool -> (B, w3, 4, 4)
        self.res3 = nn.Sequential(ConvBN(w[3], w[3]), ConvBN(w[3], w[3]))
        self.fc = nn.Linear(w[3], n_classes, bias=False)

    def forward(self, x):  # (B, 3, 32, 32)
        x = self.stem(x)
        x = F.max_pool2d(self.layer1(x), 2)
        x = x + self.res1(x)  # residual connection (He et al. 2016): the block learns a correction
        x = F.max_pool2d(self.layer2(x), 2)
        x = F.max_pool2d(self.layer3(x), 2)
        x = x + self.res3(x)  # (B, w3, 4, 4)
        x = torch.amax(x, dim=(2, 3))  # global max pool -> (B, w3)
        return self.fc(x) * 0.125  # Page: scaling the logits down steadies early training


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class ConvGroup(nn.Module):
    """airbench's block: conv 3x3 -> max-pool 2 -> BN -> act -> conv 3x3 -> BN -> act. Pooling
    straight after the first conv makes the norm and the activation run on a quarter of the pixels."""

    def __init__(self, c_in, c_out, act="gelu"):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4)
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)  # airbench: BN keeps its learned shift but no learned scale
        # airbench: "dirac" init, the first c_in filters start as the identity
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight.data[:conv.weight.shape[1]])

    def forward(self, x):
        x = self.act(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return self.act(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """The network of Jordan's airbench (2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU"),
    with GELU as in airbench (`act="relu"` is faster on a CPU, less accurate). A frozen 2x2
    whitening conv, then three conv groups; `width` sets the first group's channels and the next
    two have 2x width (airbench93's 64/128/128 at width 64; airbench94 widens the last two to 4x)."""

    def __init__(self, width=64, n_classes=10, act="gelu", whiten_bias=False):
        super().__init__()
        # Whitening (airbench; the ZCA idea of Coates & Ng 2011): 24 fixed 2x2 filters, the
        # eigenvectors of the training images' 2x2-patch covariance scaled to unit variance, each
        # with its negative so the activation after it loses nothing. Set once by `init_whitening`.
        # The filters never train. By default there is no bias either, so no gradient has to flow
        # into the first group's input, which saves a backward pass over the largest activations;
        # airbench trains a bias for its first 3 epochs (`whiten_bias`, frozen by fit()).
        self.whiten = nn.Conv2d(3, 24, 2, bias=whiten_bias)  # (B, 24, 31, 31)
        self.whiten.weight.requires_grad_(False)
        if whiten_bias:
            nn.init.zeros_(self.whiten.bias)
        self.act = ACTIVATIONS[act]
        self.group1 = ConvGroup(24, width, act)  # (B, w, 15, 15)
        self.group2 = ConvGroup(width, 2 * width, act)  # (B, 2w, 7, 7)
        self.group3 = ConvGroup(2 * width, 2 * width, act)  # (B, 2w, 3, 3)
        self.fc = nn.Linear(2 * width, n_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images, eps=5e-4):
        """images: normalised float (N, 3, 32, 32) on any device; a few thousand are enough. The
        covariance and its eigenvectors are computed on the CPU in float64 (Apple's MPS has
        neither float64 nor eigh) and the filters copied to the layer's device."""
        patches = images.cpu().unfold(2, 2, 1).unfold(3, 2, 1)  # (N, 3, 31, 31, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()  # every 2x2x3 patch as a row
        cov = patches.T @ patches / len(patches)  # (12, 12)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        filters = (eigvecs.T / (eigvals + eps).sqrt().unsqueeze(1)).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float().to(self.whiten.weight.device))

    def forward(self, x):  # (B, 3, 32, 32)
        x = self.act(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        x = torch.amax(x, dim=(2, 3))  # global max pool -> (B, 2w)
        return self.fc(x) / 9  # airbench: small logits at the start steady the first steps


def build_model(name, width, act="gelu", whiten_bias=False):
    if name == "lenet":
        return LeNet()
    if name == "resnet":
        return ResNet(width)
    if name == "airbench":
        return AirNet(width, act=act, whiten_bias=whiten_bias)
    fail(f"unknown --model {name}: choose airbench, resnet or lenet")


def build_net(args, train_x, mean, std, device):
    """The network the settings name, on the device; airbench's whitening set from training images."""
    model_args = dict(name=args.model, width=args.width)
    if args.model == "airbench":
        model_args.update(act=args.act, whiten_bias=args.whiten_bias_epochs > 0)
    # NHWC (channels last): the layout oneDNN's CPU convolutions and tensor cores are fastest in
    net = build_model(**model_args).to(device).to(memory_format=torch.channels_last)
    if args.model == "airbench":
        net.init_whitening(((train_x[:args.whiten_images].float() / 255) - mean) / std)
    return net, model_args


# ------------------------------------------------------------------ data: CIFAR-10, and batches on the device


def md5sum(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def extract_cifar(tarball, dest):
    """Verify the MD5, then copy out only the known member names: nothing in the archive
    chooses where a file is written, so a crafted archive cannot escape `dest` (path traversal)."""
    if md5sum(tarball) != CIFAR_MD5:
        fail(f"{tarball} has the wrong MD5 (expected {CIFAR_MD5}): delete it and download again")
    folder = dest / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name in CIFAR_FILES + ["batches.meta.txt"]:
                member = tar.getmember(f"{CIFAR_FOLDER}/{name}")
                if not member.isfile():
                    fail(f"{tarball}: {member.name} is not a regular file")
                tmp = folder / (name + ".part")
                tmp.write_bytes(tar.extractfile(member).read())
                os.replace(tmp, folder / name)
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        fail(f"{tarball} is not a complete CIFAR-10 binary archive ({e})")
    return folder


def find_cifar(data_dir, explicit):
    """Return the cifar-10-batches-bin folder, extracting or downloading only what is missing."""
    data_dir = Path(data_dir)
    if explicit and not data_dir.exists():
        fail(f"--data-dir {data_dir} does not exist: give a {CIFAR_FOLDER}/ folder, its parent, or "
             "cifar-10-binary.tar.gz")
    if data_dir.is_file():  # the tarball itself
        return extract_cifar(data_dir, data_dir.parent)
    for folder in (data_dir, data_dir / CIFAR_FOLDER):
        if (folder / CIFAR_FILES[0]).is_file():
            return folder
    tarball = data_dir / "cifar-10-binary.tar.gz"
    if not tarball.is_file():
        if explicit:
            fail(f"--data-dir {data_dir} holds neither {CIFAR_FOLDER}/ nor cifar-10-binary.tar.gz")
        print(f"downloading {CIFAR_URL} (163 MB) to {tarball}")
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            urllib.request.urlretrieve(CIFAR_URL, tarball.with_suffix(".part"))
        except OSError as e:
            fail(f"could not download CIFAR-10 ({e}); offline? fetch {CIFAR_URL} elsewhere and pass it with "
                 "--data-dir")
        os.replace(tarball.with_suffix(".part"), tarball)
    return extract_cifar(tarball, data_dir)


def read_cifar_file(path):
    """Records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32, row-major)."""
    if not path.is_file():
        fail(f"{path} is missing: the CIFAR-10 folder is incomplete")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        fail(f"{path} is truncated or not a CIFAR-10 binary file ({raw.size} bytes is not a multiple of "
             f"{RECORD})")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        fail(f"{path} is corrupt: label byte {labels.max()} is not a class 0-9")
    return torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_data(args):
    """Returns (train_x, train_y, test_x, test_y, classes) with images uint8 (N, 3, 32, 32)."""
    if args.data == "shapes":
        return (*make_shapes(args.train_size, args.seed), *make_shapes(args.test_size, args.seed + 1),
                SHAPE_CLASSES)
    folder = find_cifar(args.data_dir or Path(__file__).parent / "data", explicit=args.data_dir is not None)
    parts = [read_cifar_file(folder / name) for name in CIFAR_FILES]
    train_x, train_y = torch.cat([p[0] for p in parts[:5]]), torch.cat([p[1] for p in parts[:5]])
    return train_x, train_y, *parts[5], CIFAR_CLASSES


def augment(x, pad, flip, size=32):
    """Random crops of size x size (pad by reflection, cut out at a random offset: a translation by
    up to `pad` pixels at size 32) and a horizontal flip of the images where `flip` (B,) is True,
    for the whole batch at once with indexing; x: (B, C, 32, 32) -> (B, C, size, size)."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, H + 2 * pad - size + 1, (B, 1, 1), device=x.device)
    dx = torch.randint(0, W + 2 * pad - size + 1, (B, 1, 1), device=x.device)
    rows = torch.arange(size, device=x.device).view(1, size, 1) + dy  # (B, size, 1)
    cols = torch.arange(size, device=x.device).view(1, 1, size)
    # (B, 1, size): read the crop right to left to flip
    cols = torch.where(flip.view(B, 1, 1), size - 1 - cols, cols) + dx
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, size, size)


class DeviceLoader:
    """The training set on the device as uint8 (N, 3, 32, 32), cut into batches and augmented
    there with tensor ops: no DataLoader, no worker processes, no copy per batch."""

    def __init__(self, images, labels, mean, std, batch_size, recipe, seed, rank=0, world=1):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.batch_size, self.local_batch, self.rank = batch_size, batch_size // world, rank
        self.pad, self.flip, self.seed = recipe["pad"], recipe["flip"], seed
        self.steps_per_epoch = len(labels) // batch_size
        # airbench's alternating flip: each image gets a random side once; then every other epoch
        # flips them all, so over two epochs every image is seen both ways (not left to chance).
        side = torch.Generator().manual_seed(seed + 7)
        self.base_flip = torch.rand(len(labels), generator=side).lt(0.5).to(images.device)

    def order(self, epoch):
        """A new shuffle every epoch, the same in every process (same seed)."""
        return torch.randperm(len(self.labels),
                              generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))

    def batch(self, order, i, epoch, crop):
        """Batch i of the epoch: this process's share, augmented, normalised, channels last."""
        idx = order[i * self.batch_size + self.rank * self.local_batch:][:self.local_batch]
        x = self.images[idx].float().div_(255)
        if self.pad:  # random translation + flip: the same image never looks quite the same twice
            if self.flip == "alternate":
                flip = self.base_flip[idx] ^ bool(epoch % 2)
            else:
                flip = torch.rand(len(idx), device=x.device) < 0.5
            x = augment(x, self.pad, flip, crop)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]


def split_data(args, device, log):
    """The data as uint8 images, a seeded validation split held out of training, and the
    normalisation. Returns (train_x, train_y) on the device, (val_x, val_y), (test_x, test_y),
    mean and std (1, 3, 1, 1) on the device, and the class names."""
    train_x, train_y, test_x, test_y, classes = load_data(args)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    val_idx, train_idx = perm[:args.val_size], perm[args.val_size:]
    val_x, val_y = train_x[val_idx], train_y[val_idx]
    train_x, train_y = train_x[train_idx], train_y[train_idx]
    if args.model == "lenet":  # the tutorial's Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
    else:  # per-channel statistics of the training images
        mean, std = (train_x.float() / 255).mean((0, 2, 3)), (train_x.float() / 255).std((0, 2, 3))
    mean, std = mean.view(1, 3, 1, 1).to(device), std.view(1, 3, 1, 1).to(device)
    log(f"data: {args.data}, {len(train_y)} train / {len(val_y)} val / {len(test_y)} test images, classes "
        f"{classes}")
    if args.dry_run:
        test_x, test_y = test_x[:args.test_size], test_y[:args.test_size]
    return (train_x.to(device), train_y.to(device)), (val_x, val_y), (test_x, test_y), mean, std, classes


# ----------------------------------------------------------------------------- training


def train_step(model, optimizer, scaler, x, y, label_smoothing, amp_dtype):
    """The blitz's five steps on a batch x (B, 3, H, W) normalised, y (B,) labels. Returns the loss,
    left on the device (reading it would make the CPU wait for the GPU)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        # Label smoothing (Szegedy et al. 2016): aim for 0.8 on the true class, not 1.0, so
        # the network is not pushed to ever-larger logits; it generalises better.
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    if not scaler.is_enabled():
        loss.backward()
        optimizer.step()
    else:  # fp16 mixed precision: the loss scaled up so small gradients do not round to zero
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales first; skips the step if a gradient overflowed
        scaler.update()
    return loss.detach()


def train_epoch(model, optimizer, scaler, loader, epoch, step, progress, recipe, amp_dtype, lookahead=None):
    """One pass over the training set; `progress(step)` says how far training is, from 0 to 1
    (of the steps, or of the seconds with --time-limit), and the run stops at 1. Returns the
    step reached, the steps taken, and the summed loss, left on the device."""
    model.train()
    order = loader.order(epoch).to(loader.images.device)
    loss_sum, n_steps = torch.zeros((), device=loader.images.device), 0
    for i in range(loader.steps_per_epoch):
        p = progress(step)
        if p >= 1:
            break
        # Progressive image size (fast.ai's DAWNBench runs resized; Krizhevsky 2012 cropped
        # CIFAR to 24x24): smaller random crops at first cost about half as much per image.
        x, y = loader.batch(order, i, epoch, recipe["early_crop"] if p < EARLY_UNTIL else 32)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(recipe["schedule"], p)
        loss_sum += train_step(model, optimizer, scaler, x, y, recipe["label_smoothing"], amp_dtype)
        step, n_steps = step + 1, n_steps + 1
        if lookahead and step % lookahead.every == 0:
            lookahead.update(rho=0.95 ** 5 * p ** 3)  # airbench's schedule: the slow copy slows as p -> 1
    return step, n_steps, loss_sum


def lr_factor(schedule, p):
    """The learning rate's multiplier at progress p (0 at the start, 1 at the end of training)."""
    if schedule == "constant":
        return 1.0
    if schedule == "one-cycle":  # Smith 2018: linear warm-up over 20% of training, then linear decay to 0
        return p / 0.2 if p < 0.2 else (1 - p) / 0.8
    # airbench's triangle: from 0.2 up to 1 at 23% of training, then down to 0.07
    return 0.2 + 0.8 * p / 0.23 if p < 0.23 else 1 - 0.93 * (p - 0.23) / 0.77


class Lookahead:
    """Lookahead (Zhang et al. 2019) as airbench does it: every `every` steps the slow copy moves
    toward the fast weights by 1 - rho, and the fast weights restart from it. rho grows with
    progress^3, so the slow copy follows ever more slowly as training ends, averaging the noise
    out. Only the slow copy is evaluated and saved; the fast weights are left to training."""

    def __init__(self, net, every):
        self.net, self.every = net, every
        self.slow = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, rho):
        for k, v in self.net.state_dict().items():  # weights and BN statistics
            if k in self.slow:
                self.slow[k].lerp_(v, 1 - rho)
                v.copy_(self.slow[k])

    def averaged(self):
        """A state dict of the net with the slow copy's values: what is validated and saved."""
        return {k: self.slow[k].clone() if k in self.slow else v.clone()
                for k, v in self.net.state_dict().items()}


def plan_time_limit(budget, t_step, early_crop, steps_per_epoch, recipe):
    """The plan of a --time-limit run, from the measured seconds per step of the first steps."""
    # whole images cost about (31 / (crop - 1))^2 as much: the pixels after the 2x2 whitening
    slower = (31 / (early_crop - 1)) ** 2
    steps = budget * (EARLY_UNTIL / t_step + (1 - EARLY_UNTIL) / (t_step * slower))
    return (f"plan: {budget:.0f} s at {t_step:.3f} s/step -> about {steps:.0f} steps "
            f"({steps / steps_per_epoch:.1f} epochs)"
            + (f"; {early_crop}x{early_crop} crops until {EARLY_UNTIL * budget:.0f} s, "
               f"then whole images at about {t_step * slower:.3f} s/step" if slower > 1 else "")
            + f"; learning rate {recipe['schedule']}" + "; lookahead" * recipe["lookahead"])


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A classifier checkpoint, or one clear line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}: run python classifier/train.py first")
    try:
        # onto the CPU first: a checkpoint saved on any device opens on any other, and the model is moved
        # afterwards (MPS, for one, cannot hold every dtype a file may carry)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "classifier":
        fail(f"{path} is not a classifier checkpoint (it was written by another script): train one with "
             "python classifier/train.py")
    return ckpt


def make_optimizer(net, args, recipe, device):
    """SGD with Nesterov momentum, which converges faster than plain momentum at the same step size
    (Sutskever et al. 2013). airbench: BN shifts learn bias_lr (64) times faster than the weights;
    their weight decay is divided by as much, so the decay per step stays that of the other weights.
    fused: one kernel updates every tensor, and with the GradScaler it skips overflowed steps on the
    device instead of asking the host (a sync) at every step."""
    params = [p for p in net.parameters() if p.requires_grad]
    whiten_bias = net.whiten.bias if args.model == "airbench" else None  # airbench: learns as the weights do
    weights = [p for p in params if p.ndim > 1 or p is whiten_bias]
    biases = [p for p in params if p.ndim <= 1 and p is not whiten_bias]
    bias_decay = recipe["weight_decay"] / recipe["bias_lr"] if args.model == "airbench" else 0.0
    optimizer = torch.optim.SGD([dict(params=weights, weight_decay=recipe["weight_decay"], lr=args.lr),
                                 dict(params=biases, weight_decay=bias_decay,
                                      lr=args.lr * recipe["bias_lr"])],
                                momentum=recipe["momentum"], nesterov=args.model != "lenet",
                                fused=device.type in ("cuda", "cpu"))
    for group in optimizer.param_groups:
        # the peak, which the schedule scales (PyTorch's schedulers use this key too)
        group["initial_lr"] = group["lr"]
    return optimizer


class Progress:
    """How far training is, from 0 at its start to 1 at its end: of the steps, or with --time-limit of
    the seconds, so that warm-up, decay and averaging are laid over the budget whatever the speed.
    Under torchrun rank 0's clock is shared, so that every process follows one schedule and stops
    at the same step."""

    def __init__(self, total_steps, budget, device, distributed, plan):
        self.total_steps, self.budget, self.plan = total_steps, budget, plan
        self.device, self.distributed = device, distributed
        self.start, self.clock = time.time(), {}
        self.shared = {"step": None, "p": 0.0, "pace": 0.0}  # the last progress rank 0 shared

    def __call__(self, step):
        if not self.budget:
            return step / self.total_steps
        if step in (3, 8):  # the plan, from the speed of steps 3-7 (the first pay for setup)
            synchronize(self.device)  # a GPU's clock reading needs its queue emptied (twice per run)
            self.clock[step] = time.time()
            if step == 8:
                self.plan((self.clock[8] - self.clock[3]) / 5)
        p = (time.time() - self.start) / self.budget
        if self.distributed:
            # Reading the broadcast value makes the CPU wait for the device, so it is shared every 10
            # steps with its pace per step, and every process extrapolates alike in between.
            shared = self.shared
            if shared["step"] is None or step - shared["step"] >= 10:
                pace = (p - shared["p"]) / (step - shared["step"]) if shared["step"] is not None else 0.0
                now = torch.tensor([p, pace], device=self.device)
                dist.broadcast(now, 0)
                (shared["p"], shared["pace"]), shared["step"] = now.tolist(), step
            p = shared["p"] + (step - shared["step"]) * shared["pace"]
        return p


def fit(model, net, optimizer, scaler, loader, progress, lookahead, val, args, recipe, amp_dtype, state, save,
        log):
    """The epoch loop: train, validate the weights kept (the lookahead's slow copy), log, save. state:
    (first epoch, best val accuracy, best weights), returned updated with the step reached."""
    (epoch0, best_acc, best_state), step = state, state[0] * loader.steps_per_epoch
    eval_net, whiten_bias = copy.deepcopy(net), getattr(getattr(net, "whiten", None), "bias", None)
    p0 = 0.0 if args.time_limit else epoch0 / args.epochs
    for epoch in itertools.count(epoch0) if args.time_limit else range(epoch0, args.epochs):
        if whiten_bias is not None:  # airbench: the whitening bias trains for its first epochs only
            whiten_bias.requires_grad_(epoch < args.whiten_bias_epochs)
        t0 = time.time()
        step, n_steps, loss_sum = train_epoch(model, optimizer, scaler, loader, epoch, step, progress, recipe,
                                              amp_dtype, lookahead)
        if n_steps == 0:
            break
        synchronize(loader.images.device)  # once per epoch: the GPU's work is done before the clock is read
        dt = time.time() - t0
        eval_net.load_state_dict(lookahead.averaged() if lookahead else net.state_dict())
        val_acc = accuracy(eval_net, *val, loader.mean, loader.std, amp_dtype)
        elapsed, p = time.time() - progress.start, progress(step)
        planned = f"~{(epoch + 1) / max(p, 1e-9):.1f}" if args.time_limit else args.epochs
        log(f"epoch {epoch + 1}/{planned} | "
            f"loss {loss_sum.item() / n_steps:.4f} | {n_steps * args.batch_size / dt:,.0f} img/s | "
            f"{1000 * dt / n_steps:.1f} ms/step | elapsed {elapsed:.0f}s | "
            f"eta {elapsed / max(p - p0, 1e-9) * max(0.0, 1 - p):.0f}s | val acc {100 * val_acc:.2f}%")
        if val_acc >= best_acc or best_state is None:
            best_acc, best_state = val_acc, {k: v.detach().clone() for k, v in eval_net.state_dict().items()}
        save(best_state, best_acc, epoch + 1)
        if p >= 1:
            break
    return best_acc, best_state, step


def resume_run(path, net, optimizer, scaler, lookahead, model_args, log):
    """--resume: the run saved in --out continues where it stopped. Returns (first epoch, best
    validation accuracy, best weights)."""
    ckpt = load_checkpoint(path)
    if ckpt["model_args"] != model_args:
        fail(f"--resume: {path} holds a {ckpt['model_args']} model, not {model_args}")
    net.load_state_dict(ckpt["resume"]["model"])
    optimizer.load_state_dict(ckpt["resume"]["optimizer"])
    if scaler.is_enabled() and ckpt["resume"].get("scaler"):
        scaler.load_state_dict(ckpt["resume"]["scaler"])
    if lookahead and ckpt["resume"].get("lookahead"):
        device = next(net.parameters()).device
        lookahead.slow = {k: v.to(device) for k, v in ckpt["resume"]["lookahead"].items()}
    log(f"resumed {path} after epoch {ckpt['resume']['epoch']} "
        f"(best val acc {100 * ckpt['best_val_acc']:.2f}%)")
    return ckpt["resume"]["epoch"], ckpt["best_val_acc"], ckpt["model"]


def run_checkpoint(meta, best_state, best_acc, epoch, net, optimizer, scaler, lookahead):
    """What is saved after every epoch: the best epoch's (slow) weights, which sample.py uses, and
    the state to --resume from."""
    return {**meta, "model": best_state, "best_val_acc": best_acc,
            "resume": {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                       "lookahead": lookahead.slow if lookahead else None,
                       "scaler": scaler.state_dict()}}  # fp16: the loss scale reached; else empty


# ----------------------------------------------------------------------------- evaluation


def tta_logits(model, x, level):
    """Test-time augmentation (airbench): level 0 the image alone; 1 the mean over it and its
    mirror image; 2 half that, and a quarter each for the pair shifted one pixel up-left and the
    pair shifted down-right. x: (B, 3, 32, 32) normalised -> (B, classes)."""
    mirrored = lambda v: 0.5 * (model(v) + model(v.flip(-1))) if level >= 1 else model(v)
    logits = mirrored(x)
    if level >= 2:
        xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
        logits = 0.5 * logits + 0.25 * (mirrored(xp[:, :, :32, :32]) + mirrored(xp[:, :, 2:, 2:]))
    return logits


@torch.inference_mode()
def predict(model, images, mean, std, device, amp_dtype, tta=0, batch_size=1000):
    """Logits (N, classes) as float32 for uint8 images (N, 3, 32, 32), in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = ((images[i:i + batch_size].to(device).float() / 255) - mean) / std
        with autocast(device, amp_dtype):
            out.append(tta_logits(model, x.contiguous(memory_format=torch.channels_last), tta).float())
    return torch.cat(out)


def accuracy(model, images, labels, mean, std, amp_dtype):
    """The share of images (uint8, on the host) whose top class is their label; 0 with no images."""
    if not len(labels):
        return 0.0
    pred = predict(model, images, mean, std, mean.device, amp_dtype).argmax(1).cpu()
    return (pred == labels).float().mean().item()


def test_report(net, best_state, best_acc, test_x, test_y, mean, std, amp_dtype, args, classes, log):
    """The best epoch's weights on the test set, which training never saw: accuracy, per class, and
    the confusion matrix. Returns the accuracy."""
    if best_state is not None:
        net.load_state_dict(best_state)
    t0 = time.time()
    pred = predict(net, test_x, mean, std, mean.device, amp_dtype, args.tta).argmax(1).cpu()
    test_acc = (pred == test_y).float().mean().item()
    log(f"saved {args.out}; best val acc {100 * best_acc:.2f}%; test accuracy of that model: "
        f"{100 * test_acc:.2f}% (test-time augmentation level {args.tta}, {time.time() - t0:.1f} s)")
    if log is print:
        print_evaluation(confusion_matrix(pred, test_y, len(classes)), classes)
    return test_acc


def confusion_matrix(pred, true, n):
    """(n, n) counts: row = true class, column = predicted, one bincount instead of a loop."""
    return torch.bincount(true * n + pred, minlength=n * n).view(n, n).cpu()


def print_evaluation(cm, classes):
    """Per-class accuracy as the tutorial prints it, then the confusion matrix."""
    print("per-class accuracy:")
    for k, name in enumerate(classes):
        print(f"  {name:<10} {100 * cm[k, k] / max(1, cm[k].sum()):5.1f}%")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(" " * 10 + "".join(f"{c[:5]:>6}" for c in classes))
    for k, name in enumerate(classes):
        print(f"{name:<10}" + "".join(f"{int(v):6d}" for v in cm[k]))


# ----------------------------------------------------------------------- built-in data: ten shapes on clutter


def make_shapes(n, seed):
    """n images (n, 3, 32, 32) uint8 and labels (n,) int64 of the ten SHAPE_CLASSES, vectorised:
    every pixel's coordinates are rotated and scaled into each shape's own frame (u, v), where
    each class is one inequality. One loop over the ten classes, none over images or pixels."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    radius = 4 + 8 * rand(n, 1, 1)  # shape size in pixels
    cy, cx = [radius + (32 - 2 * radius) * rand(n, 1, 1) for _ in range(2)]  # keep it on the image
    angle = 2 * math.pi * rand(n, 1, 1)
    y = torch.arange(32.0).view(1, 32, 1) - cy  # (n, 32, 1)
    x = torch.arange(32.0).view(1, 1, 32) - cx  # (n, 1, 32)
    u = (x * angle.cos() + y * angle.sin()) / radius  # (n, 32, 32) in units of the radius
    v = (-x * angle.sin() + y * angle.cos()) / radius
    shapes = [  # each class is one inequality in the shape's frame (u, v), radius r, angle phi
        lambda u, v, r, phi, box: r < 1,  # disk
        lambda u, v, r, phi, box: (r < 1) & (r > 0.6),  # ring
        lambda u, v, r, phi, box: box < 0.8,  # square
        lambda u, v, r, phi, box: (box < 0.85) & (box > 0.55),  # square outline
        lambda u, v, r, phi, box: (v > -0.5) & (v < 1 - math.sqrt(3) * u.abs()),  # equilateral triangle
        lambda u, v, r, phi, box: ((u.abs() < 0.28) | (v.abs() < 0.28)) & (box < 1),  # plus
        lambda u, v, r, phi, box: (u.abs() < 1) & (v.abs() < 0.3),  # bar
        lambda u, v, r, phi, box: (r < 1) & (v > 0),  # half-disk
        # two dots
        lambda u, v, r, phi, box: ((u - 0.55) ** 2 + v**2 < 0.16) | ((u + 0.55) ** 2 + v**2 < 0.16),
        lambda u, v, r, phi, box: r < 0.55 + 0.45 * torch.cos(5 * phi),  # five-petal flower
    ]
    mask = torch.zeros(n, 32, 32, dtype=torch.bool)
    for k, inside in enumerate(shapes):  # only the images of class k are drawn as shape k
        sel = labels == k
        uk, vk = u[sel], v[sel]
        mask[sel] = inside(uk, vk, (uk**2 + vk**2).sqrt(), torch.atan2(vk, uk),
                           torch.maximum(uk.abs(), vk.abs()))
    # Background: a colour gradient plus clutter (five random rectangles), then the shape in
    # a colour at least some distance from the background's, then pixel noise.
    ramp = torch.linspace(0, 1, 32)
    bg = rand(n, 3, 1, 1) * 0.7 + 0.3 * rand(n, 3, 1, 1) * ramp.view(1, 1, 1, 32)
    images = bg.expand(n, 3, 32, 32).clone()
    for _ in range(5):
        y0, x0 = (rand(n, 1, 1) * 28).long(), (rand(n, 1, 1) * 28).long()
        h, w = 1 + (rand(n, 1, 1) * 6).long(), 1 + (rand(n, 1, 1) * 6).long()
        iy, ix = torch.arange(32).view(1, 32, 1), torch.arange(32).view(1, 1, 32)
        clutter = ((iy >= y0) & (iy < y0 + h) & (ix >= x0) & (ix < x0 + w)).unsqueeze(1)  # (n, 1, 32, 32)
        images = torch.where(clutter, rand(n, 3, 1, 1), images)
    colour = (bg.mean((2, 3), keepdim=True) + 0.3 + 0.4 * rand(n, 3, 1, 1)) % 1.0
    images = torch.where(mask.unsqueeze(1), colour, images) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


# ----------------------------------------------------------------------------- main


def get_args():
    """The settings: the flags, over the chosen network's recipe. Returns args and the recipe."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=["shapes", "cifar10"],
                        help="data set (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="cifar-10-batches-bin/ folder, its parent, or cifar-10-binary.tar.gz (default: "
                             "classifier/data, downloaded when missing)")
    parser.add_argument("--train-size", type=int, default=16000,
                        help="shapes: generated training images (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=5000,
                        help="shapes: generated test images (default: %(default)s)")
    parser.add_argument("--val-size", type=int, default=2000,
                        help="training images held out to pick the best epoch (default: %(default)s)")
    parser.add_argument("--model", default="airbench", choices=list(RECIPES),
                        help="the network and its recipe; lenet is the tutorial's (default: %(default)s)")
    parser.add_argument("--width", type=int, default=None,
                        help=f"channels of the first stage (default: {recipe_defaults('width')})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"passes over the data (default: {recipe_defaults('epochs')})")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="train for this many seconds instead of --epochs: the schedule is planned from "
                             "the measured speed")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per step, all processes together (default: "
                             f"{recipe_defaults('batch_size')})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"(peak) learning rate (default: {recipe_defaults('lr')})")
    parser.add_argument("--early-crop", type=int, default=None,
                        help=f"random crops of this size for the first {100 * EARLY_UNTIL:.0f}%% of "
                             f"training, whole 32x32 images after; 32 is off (default: "
                             f"{recipe_defaults('early_crop')})")
    parser.add_argument("--tta", type=int, default=None, choices=[0, 1, 2],
                        help=f"test-time augmentation: 0 none, 1 mirror, 2 mirror and shifts (default: "
                             f"{recipe_defaults('tta')})")
    parser.add_argument("--act", default=None, choices=list(ACTIVATIONS),
                        help=f"airbench's activation (default: {RECIPES['airbench']['act']})")
    parser.add_argument("--whiten-bias-epochs", type=int, default=None,
                        help="airbench: train the whitening layer's bias for this many epochs, then freeze "
                             "it (default: 0, no bias; airbench's own: 3)")
    parser.add_argument("--whiten-images", type=int, default=None,
                        help="airbench: training images whose patches set the whitening filters (default: "
                             "2000; airbench's own: 5000)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision; auto: bf16 on GPUs from Ampere on and CPUs with native bf16, "
                             "fp16 with a GradScaler on older GPUs (a T4), fp32 elsewhere (default: "
                             "%(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (slow to start, faster per step)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "classifier.pt"),
                        help="checkpoint path (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a GPU run repeats exactly (slower)")
    parser.add_argument("--dry-run", action="store_true",
                        help="two steps, one evaluation, a checkpoint: checks that every line runs, in "
                             "seconds")
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line, not argparse's usage block
    args = parser.parse_args()
    if args.dry_run:  # pytorch/examples' --dry-run: the whole script once, on the least data
        args.epochs, args.time_limit, args.train_size, args.val_size, args.test_size = 1, None, 1000, 250, 500
    recipe = dict(RECIPES[args.model])
    for key in ("width", "epochs", "batch_size", "lr", "tta", "early_crop"):  # a flag overrides the recipe
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
        setattr(args, key, recipe[key])
    for key in ("act", "whiten_bias_epochs", "whiten_images"):  # the airbench network's own settings
        if getattr(args, key) is not None and key not in recipe:
            fail(f"--{key.replace('_', '-')} is a setting of --model airbench, not {args.model}")
        setattr(args, key, recipe.get(key) if getattr(args, key) is None else getattr(args, key))
    if args.model == "airbench" and (args.whiten_bias_epochs < 0 or args.whiten_images < 1):
        fail("--whiten-bias-epochs needs 0 or more, --whiten-images 1 or more")
    if not 8 <= args.early_crop <= 32:
        fail(f"--early-crop {args.early_crop}: give a crop size from 8 to 32 (32: whole images all along)")
    if args.time_limit is not None and (args.time_limit <= 0 or args.resume):
        fail("--time-limit needs a positive number of seconds, and a fresh run (not --resume)")
    return args, recipe


def setup_processes(args):
    """Under torchrun (even with one process), one process per GPU or CPU slot; else one process.
    Returns the device, this process's rank and local rank, the number of processes, and whether
    training is distributed."""
    world, distributed = int(os.environ.get("WORLD_SIZE", 1)), "LOCAL_RANK" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if not distributed:
        return get_device(args.device), rank, local_rank, world, distributed
    device, backend = torchrun_device(args.device)  # GPU number local_rank (NCCL), or the CPU (Gloo)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # share the cores
    dist.init_process_group(backend)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must divide evenly among {world} processes")
    return device, rank, local_rank, world, distributed


def main():
    args, recipe = get_args()
    device, rank, local_rank, world, distributed = setup_processes(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    seed_everything(args.seed, args.deterministic)  # the same seed everywhere: the same weights everywhere
    if device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True  # the shapes never change: time cuDNN's algorithms once
    amp_dtype, needs_scaler = precision_for(device, args.amp, CPU_BF16)
    log("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()),
        f"world={world} autocast={precision_name(amp_dtype, needs_scaler)}")
    (train_x, train_y), val, (test_x, test_y), mean, std, classes = split_data(args, device, log)

    net, model_args = build_net(args, train_x, mean, std, device)
    log(f"model: {args.model}, {sum(p.numel() for p in net.parameters()):,} parameters, on {device}")
    optimizer = make_optimizer(net, args, recipe, device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)  # fp16 only: see choose_precision
    loader = DeviceLoader(train_x, train_y, mean, std, args.batch_size, recipe, args.seed, rank, world)
    if loader.steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(train_y)} training images")
    # airbench averages every 5 steps of 1024 images: here every 5 x 1024 images
    lookahead = Lookahead(net, every=max(1, 5 * 1024 // args.batch_size)) if recipe["lookahead"] else None
    state = (resume_run(Path(args.out), net, optimizer, scaler, lookahead, model_args, log) if args.resume
             else (0, 0.0, None))
    model = net
    if distributed:  # DDP averages gradients across processes during backward
        # find_unused_parameters: once the whitening bias is frozen, its gradient never comes
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.model == "airbench" and args.whiten_bias_epochs > 0)
    if args.compile:
        model = torch.compile(model)
    if device.type == "cpu":
        # As the learning rate decays, updates and momentum reach denormal floats (below 1e-38),
        # which x86 CPUs handle in slow microcode; flushing them to zero avoids that.
        torch.set_flush_denormal(True)

    meta = {"kind": "classifier", "model_args": model_args, "classes": classes,  # sample.py checks the kind
            "mean": mean.flatten().cpu(), "std": std.flatten().cpu(), "config": vars(args)}
    save = lambda best, acc, epoch: rank == 0 and save_checkpoint(
        run_checkpoint(meta, best, acc, epoch, net, optimizer, scaler, lookahead), Path(args.out))
    plan = lambda t_step: log(plan_time_limit(args.time_limit, t_step, args.early_crop,
                                              loader.steps_per_epoch, recipe))
    total_steps = None if args.time_limit else 2 if args.dry_run else args.epochs * loader.steps_per_epoch
    progress = Progress(total_steps, args.time_limit, device, distributed, plan)
    best_acc, best_state, step = fit(model, net, optimizer, scaler, loader, progress, lookahead, val, args,
                                     recipe, amp_dtype, state, save, log)
    train_seconds = time.time() - progress.start

    test_acc = test_report(net, best_state, best_acc, test_x, test_y, mean, std, amp_dtype, args, classes,
                           log)
    log(f"result: test_acc={100 * test_acc:.2f} val_acc={100 * best_acc:.2f} chance={100 / len(classes):.2f} "
        f"model={args.model} data={args.data} epochs={step / loader.steps_per_epoch:.2f} "
        f"train_seconds={train_seconds:.1f} world={world} img_per_s="
        f"{(step - state[0] * loader.steps_per_epoch) * args.batch_size / max(train_seconds, 1e-9):.0f}")
    if distributed:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
