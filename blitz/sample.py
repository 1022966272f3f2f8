"""Lesson 4 of the 60-minute blitz: using a trained model.

Loads the checkpoint that blitz/train.py wrote and shows what one does with a model after
training: inference in eval mode under no_grad, a forward hook that captures an
intermediate activation, fine-tuning only the last layer with the rest frozen, and export
with torch.export (the route PyTorch recommends since TorchScript was deprecated), checked
to give the same outputs as the eager model.

    python blitz/train.py && python blitz/sample.py     # a few seconds on a laptop CPU
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from train import CLASSES, Net, make_shapes  # the sibling train.py: model and data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "out" / "blitz.pt"),
                    help="from blitz/train.py (default: %(default)s)")
parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "blitz_exported.pt2"),
                    help="exported program (default: %(default)s)")
parser.add_argument("--n", type=int, default=8, help="images to classify and show (default: %(default)s)")
parser.add_argument("--finetune-steps", type=int, default=150,
                    help="steps of last-layer fine-tuning (default: %(default)s)")
parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
parser.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")
parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
args = parser.parse_args()
seed_everything(args.seed)
device = get_device(args.device)

# ----------------------------------------------------------------------------- load
path = Path(args.checkpoint)
if not path.is_file():
    sys.exit(f"error: no checkpoint at {path}: run python blitz/train.py first")
try:
    # weights_only=True unpickles tensors and plain containers only, never arbitrary code.
    # map_location="cpu": a checkpoint saved on a GPU opens anywhere; the model moves to the device below
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
except Exception as e:
    sys.exit(f"error: {path} is not a readable PyTorch checkpoint ({type(e).__name__}): run python "
             "blitz/train.py")
if not isinstance(ckpt, dict) or ckpt.get("kind") != "blitz":
    sys.exit(f"error: {path} is not a blitz checkpoint: run python blitz/train.py first")
model = Net(**ckpt["model_args"])  # rebuilt from the saved constructor arguments alone
model.load_state_dict(ckpt["model"])
model.to(device)
model.eval()
print(f"loaded {path}: epoch {ckpt['epoch']}, validation accuracy {100 * ckpt['best_val_acc']:.1f}%")

# ----------------------------------------------------------------------------- inference
images, labels = make_shapes(1000, seed=args.seed)  # fresh images neither split has seen
images, labels = images.to(device), labels.to(device)
with torch.no_grad():
    probs = F.softmax(model(images), dim=1)  # (1000, 4)
accuracy = (probs.argmax(1) == labels).float().mean().item()
print(f"\n# inference in eval mode on 1000 new images: accuracy {100 * accuracy:.1f}% (chance 25%)")
for i in range(min(args.n, len(labels))):
    p, k = probs[i].max(0)
    print(f"  image {i}: predicted {CLASSES[k]:<10} p={p:.2f}   true {CLASSES[labels[i]]}")
trained = not ckpt["config"].get("dry_run")  # a --dry-run checkpoint has barely trained
assert accuracy > 0.8 or not trained, "the checkpoint should classify new images far above chance"

# ----------------------------------------------------------------------------- forward hook
captured = {}


def save_activation(module, inputs, output):  # called after module.forward
    captured["conv2"] = output.detach()


handle = model.conv2.register_forward_hook(save_activation)
with torch.no_grad():
    model(images[:4])
handle.remove()  # hooks stay until removed
act = captured["conv2"]  # (4, 2C, 8, 8): conv2 runs on the pooled 8x8 maps
print(f"\n# forward hook on conv2 captured an activation of shape {tuple(act.shape)}")
assert act.shape == (4, model.conv2.out_channels, 8, 8)

# ----------------------------------------------------------------------------- fine-tune the head
# A new task for the same features: "has a horizontal stroke" (horizontal bar or cross)
# versus not. Freeze everything, then give the network a new, trainable last layer.
for p in model.parameters():
    p.requires_grad_(False)
model.fc2 = torch.nn.Linear(model.fc2.in_features, 2).to(device)  # new layers require grad
frozen_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc2")}
trainable = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.Adam(trainable, lr=1e-2)  # only the head is given to the optimizer
new_labels = ((labels == CLASSES.index("horizontal")) | (labels == CLASSES.index("cross"))).long()
x_tr, y_tr, x_te, y_te = images[:800], new_labels[:800], images[800:], new_labels[800:]
model.train()
for step in range(args.finetune_steps):
    idx = torch.randint(0, len(y_tr), (64,), device=device)
    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
with torch.no_grad():
    ft_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_before.items())
print(f"\n# fine-tuned only fc2 ({sum(p.numel() for p in trainable)} of "
      f"{sum(p.numel() for p in model.parameters())} "
      f"parameters) for 'horizontal stroke?': held-out accuracy {100 * ft_acc:.1f}%; frozen layers "
      f"unchanged: {unchanged}")
assert unchanged and (ft_acc > 0.8 or not trained)

# ----------------------------------------------------------------------------- export
# torch.export traces the model into a graph that runs without this Python source; the batch
# dimension is declared dynamic so any batch size works. Export on CPU for portability.
model = model.cpu()
example = (images[:2].cpu(),)
program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
torch.export.save(program, out)
reloaded = torch.export.load(out).module()
with torch.no_grad():
    same = torch.allclose(reloaded(images.cpu()), model(images.cpu()), atol=1e-5)
print(f"\n# exported with torch.export to {out}; reloaded program matches the eager model on 1000 images: "
      f"{same}")
assert same
print(f"result: accuracy={100 * accuracy:.2f} finetune_accuracy={100 * ft_acc:.2f} export_matches={same}")
