"""CIFAR-10 image classifier: the blitz's "Training a Classifier", done properly.

Two networks: `--model lenet` is exactly the tutorial's (two 5x5 convs, three linear layers)
trained the tutorial's way; `--model resnet` (default) is a small residual network trained
with the tricks of the CIFAR-10 speedruns (Page's ResNet-9 "DAWNBench" posts, Jordan's
airbench), each commented where it is used. Data lives on the device as one uint8 tensor and
is augmented there with tensor ops, so no DataLoader or worker process is needed.

    python classifier/train.py                          # generated shapes, ~97% test accuracy, ~50 s on 2 CPU cores
    python classifier/train.py --data cifar10           # real CIFAR-10 (downloaded once, MD5-checked)
    python classifier/train.py --data cifar10 --model lenet --epochs 2 --batch-size 4 --lr 0.001   # the tutorial
    torchrun --nproc_per_node=2 classifier/train.py     # DistributedDataParallel, one process per GPU/core
    python classifier/sample.py                         # classify test images from the checkpoint

Data: `--data shapes` (default) draws ten shape classes (disk, ring, square, outline, triangle,
plus, bar, half-disk, two dots, flower) at random colour, size, position and rotation on a
cluttered background; `--data cifar10` reads the official *binary* release
(cifar-10-binary.tar.gz: one label byte then 3072 pixel bytes, R, G, B planes, per record)
with NumPy; downloaded data is never unpickled.
"""
import argparse
import hashlib
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
from common import get_device, seed_everything

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHAPE_CLASSES = ["disk", "ring", "square", "outline", "triangle", "plus", "bar", "half-disk", "two-dots", "flower"]
RECORD = 1 + 3 * 32 * 32  # bytes per CIFAR record

# ----------------------------------------------------------------------------- data: shapes


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
        lambda u, v, r, phi, box: ((u - 0.55) ** 2 + v**2 < 0.16) | ((u + 0.55) ** 2 + v**2 < 0.16),  # two dots
        lambda u, v, r, phi, box: r < 0.55 + 0.45 * torch.cos(5 * phi),  # five-petal flower
    ]
    mask = torch.zeros(n, 32, 32, dtype=torch.bool)
    for k, inside in enumerate(shapes):  # only the images of class k are drawn as shape k
        sel = labels == k
        uk, vk = u[sel], v[sel]
        mask[sel] = inside(uk, vk, (uk**2 + vk**2).sqrt(), torch.atan2(vk, uk), torch.maximum(uk.abs(), vk.abs()))
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


# ----------------------------------------------------------------------------- data: CIFAR-10


def fail(message):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


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
        fail(f"--data-dir {data_dir} does not exist: give a {CIFAR_FOLDER}/ folder, its parent, or cifar-10-binary.tar.gz")
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
            fail(f"could not download CIFAR-10 ({e}); offline? fetch {CIFAR_URL} elsewhere and pass it with --data-dir")
        os.replace(tarball.with_suffix(".part"), tarball)
    return extract_cifar(tarball, data_dir)


def read_cifar_file(path):
    """Records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32, row-major)."""
    if not path.is_file():
        fail(f"{path} is missing: the CIFAR-10 folder is incomplete")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        fail(f"{path} is truncated or not a CIFAR-10 binary file ({raw.size} bytes is not a multiple of {RECORD})")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        fail(f"{path} is corrupt: label byte {labels.max()} is not a class 0-9")
    return torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_data(args):
    """Returns (train_x, train_y, test_x, test_y, classes) with images uint8 (N, 3, 32, 32)."""
    if args.data == "shapes":
        return (*make_shapes(args.train_size, args.seed), *make_shapes(args.test_size, args.seed + 1), SHAPE_CLASSES)
    folder = find_cifar(args.data_dir or Path(__file__).parent / "data", explicit=args.data_dir is not None)
    parts = [read_cifar_file(folder / name) for name in CIFAR_FILES]
    train_x, train_y = torch.cat([p[0] for p in parts[:5]]), torch.cat([p[1] for p in parts[:5]])
    return train_x, train_y, *parts[5], CIFAR_CLASSES


# ----------------------------------------------------------------------------- models


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


def build_model(name, width):
    if name == "lenet":
        return LeNet()
    if name == "resnet":
        return ResNet(width)
    fail(f"unknown --model {name}: choose lenet or resnet")


# ----------------------------------------------------------------------------- training helpers


def augment(x, pad=4):
    """Random crop (pad by reflection, cut back to 32x32 at a random offset) and random
    horizontal flip, for the whole batch at once with indexing; x: (B, C, 32, 32)."""
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (B, 1, 1), device=x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1) + dy  # (B, H, 1)
    flip = torch.rand(B, 1, 1, device=x.device) < 0.5
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    cols = torch.where(flip, W - 1 - cols, cols) + dx  # (B, 1, W): read the crop right to left to flip
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def use_bf16(device, choice):
    """bf16 autocast: on CUDA always worth it; on a CPU only where oneDNN has native bf16 (AVX512-BF16/AMX)."""
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@torch.no_grad()
def predict(model, images, mean, std, device, bf16, batch_size=1000):
    """Logits (N, classes) as float32 for uint8 images (N, 3, 32, 32), in eval mode."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = ((images[i:i + batch_size].to(device).float() / 255) - mean) / std
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)


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


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """A classifier checkpoint, or one clear line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}: run python classifier/train.py first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "classifier":
        fail(f"{path} is not a classifier checkpoint (it was written by another script): train one with python classifier/train.py")
    return ckpt


# ----------------------------------------------------------------------------- main

# Each network is trained its own way. LeNet: the tutorial's recipe (plain SGD with momentum,
# no augmentation, inputs scaled to [-1, 1]). ResNet: the speedrun recipe below.
RECIPES = {
    "lenet": dict(epochs=2, batch_size=4, lr=0.001, weight_decay=0.0, label_smoothing=0.0, augment=False, schedule="constant"),
    "resnet": dict(epochs=5, batch_size=256, lr=0.2, weight_decay=5e-4, label_smoothing=0.2, augment=True, schedule="one-cycle"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=["shapes", "cifar10"], help="data set (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="cifar-10-batches-bin/ folder, its parent, or cifar-10-binary.tar.gz (default: classifier/data, downloaded when missing)")
    parser.add_argument("--train-size", type=int, default=16000, help="shapes: generated training images (default: %(default)s)")
    parser.add_argument("--test-size", type=int, default=5000, help="shapes: generated test images (default: %(default)s)")
    parser.add_argument("--val-size", type=int, default=2000, help="training images held out to pick the best epoch (default: %(default)s)")
    parser.add_argument("--model", default="resnet", help="lenet (the tutorial's) or resnet (default: %(default)s)")
    parser.add_argument("--width", type=int, default=16, help="resnet: channels of the first stage (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the data (default: the model's recipe: lenet 2, resnet 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step, all processes together (default: lenet 4, resnet 256)")
    parser.add_argument("--lr", type=float, default=None, help="(peak) learning rate (default: lenet 0.001, resnet 0.2)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "on", "off"], help="bf16 autocast; auto: on CUDA and on CPUs with native bf16 (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start, faster per step)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "classifier.pt"), help="checkpoint path (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    if args.model not in RECIPES:
        fail(f"unknown --model {args.model}: choose lenet or resnet")
    recipe = dict(RECIPES[args.model])
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
        setattr(args, key, recipe[key])

    # Distributed: torchrun starts one process per GPU (or per CPU slot) and sets these variables.
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world > 1:
        cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # share the cores
        dist.init_process_group("nccl" if cuda else "gloo")  # NCCL between GPUs, Gloo between CPU processes
        if args.batch_size % world:
            fail(f"--batch-size {args.batch_size} must divide evenly among {world} processes")
    else:
        device = get_device(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    seed_everything(args.seed)  # the same seed everywhere: every process starts from the same weights
    bf16 = use_bf16(device, args.bf16)
    log("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()), f"world={world} bf16={bf16}")

    # ---- data, on the device as uint8; a seeded validation split held out of training
    train_x, train_y, test_x, test_y, classes = load_data(args)
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    val_idx, train_idx = perm[:args.val_size], perm[args.val_size:]
    val_x, val_y, train_x, train_y = train_x[val_idx], train_y[val_idx], train_x[train_idx], train_y[train_idx]
    if args.model == "lenet":  # the tutorial's Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
    else:  # per-channel statistics of the training images
        mean, std = (train_x.float() / 255).mean((0, 2, 3)), (train_x.float() / 255).std((0, 2, 3))
    mean, std = mean.view(1, 3, 1, 1).to(device), std.view(1, 3, 1, 1).to(device)
    train_x, train_y = train_x.to(device), train_y.to(device)
    log(f"data: {args.data}, {len(train_y)} train / {len(val_y)} val / {len(test_y)} test images, classes {classes}")

    # ---- model and optimizer
    model_args = dict(name=args.model, width=args.width)
    net = build_model(**model_args).to(device).to(memory_format=torch.channels_last)  # NHWC: faster convs on CPU and tensor cores
    log(f"model: {args.model}, {sum(p.numel() for p in net.parameters()):,} parameters, on {device}")
    # Nesterov momentum converges faster than plain momentum at the same step size (Sutskever et al. 2013).
    decay, no_decay = [p for p in net.parameters() if p.ndim > 1], [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=0.9, nesterov=args.model == "resnet")
    local_batch = args.batch_size // world
    steps_per_epoch = len(train_y) // args.batch_size
    total_steps = args.epochs * steps_per_epoch

    def lr_at(step):  # one-cycle (Smith 2018): linear warm-up over 20% of steps, then linear decay to 0
        if recipe["schedule"] == "constant":
            return args.lr
        warm = 0.2 * total_steps
        return args.lr * (step / warm if step < warm else (total_steps - step) / (total_steps - warm))

    out, start_epoch, best_acc, best_state = Path(args.out), 0, 0.0, None
    if args.resume:
        ckpt = load_checkpoint(out, device)
        if ckpt["model_args"] != model_args:
            fail(f"--resume: {out} holds a {ckpt['model_args']} model, not {model_args}")
        net.load_state_dict(ckpt["resume"]["model"])
        optimizer.load_state_dict(ckpt["resume"]["optimizer"])
        start_epoch, best_acc, best_state = ckpt["resume"]["epoch"], ckpt["best_val_acc"], ckpt["model"]
        log(f"resumed {out} after epoch {start_epoch} (best val acc {100 * best_acc:.2f}%)")
    model = net
    if world > 1:  # DDP averages gradients across processes during backward
        model = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    # ---- training
    start, seen = time.time(), 0
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0, loss_sum = time.time(), torch.zeros((), device=device)
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).to(device)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            idx = order[i * args.batch_size + rank * local_batch:][:local_batch]  # this process's share
            x = train_x[idx].float().div_(255)
            if recipe["augment"]:
                x = augment(x)  # random crop + flip: the same image never looks quite the same twice
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # Label smoothing (Szegedy et al. 2016): aim for 0.8 on the true class, not 1.0, so
                # the network is not pushed to ever-larger logits; it generalises better.
                loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=recipe["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()  # stays on the device: no sync with the host every step
        dt = time.time() - t0
        seen += steps_per_epoch * args.batch_size
        val_acc = (predict(net, val_x, mean, std, device, bf16).argmax(1).cpu() == val_y).float().mean().item()
        elapsed = time.time() - start
        log(f"epoch {epoch + 1}/{args.epochs} | loss {loss_sum.item() / steps_per_epoch:.4f} | "
            f"{steps_per_epoch * args.batch_size / dt:,.0f} img/s | {1000 * dt / steps_per_epoch:.1f} ms/step | "
            f"elapsed {elapsed:.0f}s | eta {elapsed / (epoch + 1 - start_epoch) * (args.epochs - epoch - 1):.0f}s | val acc {100 * val_acc:.2f}%")
        if val_acc >= best_acc or best_state is None:
            best_acc, best_state = val_acc, {k: v.detach().clone() for k, v in net.state_dict().items()}
        if master:
            save_checkpoint({
                "kind": "classifier",  # sample.py refuses checkpoints of other scripts
                "model": best_state,  # the best epoch's weights, what sample.py uses
                "model_args": model_args,
                "classes": classes,
                "mean": mean.flatten().cpu(), "std": std.flatten().cpu(),
                "best_val_acc": best_acc,
                "config": vars(args),
                "resume": {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1},
            }, out)
    train_seconds = time.time() - start

    # ---- evaluation of the best epoch on the test set, which training never saw
    if best_state is not None:
        net.load_state_dict(best_state)
    pred = predict(net, test_x, mean, std, device, bf16).argmax(1).cpu()
    test_acc = (pred == test_y).float().mean().item()
    if master:
        print(f"saved {out}; best val acc {100 * best_acc:.2f}%; test accuracy of that model: {100 * test_acc:.2f}%")
        print_evaluation(confusion_matrix(pred, test_y, len(classes)), classes)
        print(f"result: test_acc={100 * test_acc:.2f} val_acc={100 * best_acc:.2f} chance={100 / len(classes):.2f} "
              f"model={args.model} data={args.data} epochs={args.epochs} train_seconds={train_seconds:.1f} "
              f"img_per_s={seen / max(train_seconds, 1e-9):.0f} world={world}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
