"""Classify test images with the checkpoint classifier/train.py wrote, and see where it errs.

    python classifier/sample.py                 # 4 random test images, then the whole test set
    python classifier/sample.py --index 7       # one chosen image
    python classifier/sample.py --color never   # plain characters instead of 24-bit colour

For each image: a picture in the terminal (two pixels per character cell: the upper half
block's foreground colour is one pixel, its background the pixel below) and the top-3
classes with probabilities. Then the confusion matrix of the whole test set and the pairs of
classes the model mixes up most.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from train import (CIFAR_FILES, fail, find_cifar, load_checkpoint, make_shapes, predict, print_evaluation,
                   read_cifar_file, build_model, confusion_matrix, CPU_BF16)  # the sibling train.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, precision_for, seed_everything

RAMP = " .:-=+*#%@"  # plain fallback: darker to brighter


def picture(image, color):
    """Lines of text drawing a uint8 image (3, 32, 32): 32 columns by 16 rows."""
    img = image.permute(1, 2, 0).tolist()  # (32, 32, 3) nested lists: cheap per-pixel access
    lines = []
    for y in range(0, 32, 2):
        if color:  # "\x1b[38;2;R;G;Bm" sets the foreground, "48" the background, in 24-bit colour
            cells = [f"\x1b[38;2;{a[0]};{a[1]};{a[2]}m\x1b[48;2;{b[0]};{b[1]};{b[2]}m\u2580"
                     for a, b in zip(img[y], img[y + 1])]
            lines.append("".join(cells) + "\x1b[0m")
        else:
            grey = [(sum(a) + sum(b)) / (6 * 256) for a, b in zip(img[y], img[y + 1])]
            lines.append("".join(RAMP[int(g * len(RAMP))] for g in grey))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "out" / "classifier.pt"),
                        help="from classifier/train.py (default: %(default)s)")
    parser.add_argument("--n", type=int, default=4, help="random test images to show (default: %(default)s)")
    parser.add_argument("--index", type=int, default=None, help="show this test image instead")
    parser.add_argument("--data-dir", default=None,
                        help="cifar10 checkpoints: where the data is (default: where training found it)")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="24-bit colour pictures; auto: when printing to a terminal (default: "
                             "%(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks the random images (default: %(default)s)")
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
    args = parser.parse_args()
    seed_everything(args.seed)
    device = get_device(args.device)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty()
                                       and "NO_COLOR" not in os.environ)

    ckpt = load_checkpoint(args.checkpoint)
    config, classes = ckpt["config"], ckpt["classes"]
    # checkpoints saved before the activation was a setting hold ReLU networks
    model_args = {"act": "relu", **ckpt["model_args"]}
    model = build_model(**model_args)
    model.load_state_dict(ckpt["model"])
    model.to(device, memory_format=torch.channels_last)
    model.eval()

    mean, std = ckpt["mean"].view(1, 3, 1, 1).to(device), ckpt["std"].view(1, 3, 1, 1).to(device)
    amp_dtype, _ = precision_for(device, config.get("amp", "auto"), CPU_BF16)  # the same numerics as training
    tta = config.get("tta", 0)  # and the same test-time augmentation (checkpoints from before --tta had none)
    print(f"loaded {args.checkpoint}: {config['model']} trained on {config['data']}, validation accuracy "
          f"{100 * ckpt['best_val_acc']:.2f}%")

    # The same test set training reported on: regenerated from the seed, or read from disk.
    if config["data"] == "shapes":
        images, labels = make_shapes(config["test_size"], config["seed"] + 1)
    else:
        data_dir = args.data_dir or config["data_dir"]
        folder = find_cifar(data_dir or Path(__file__).parent / "data", explicit=data_dir is not None)
        images, labels = read_cifar_file(folder / CIFAR_FILES[-1])

    if args.index is not None:
        if not 0 <= args.index < len(labels):
            fail(f"--index {args.index} is out of range: the test set has {len(labels)} images "
                 f"(0-{len(labels) - 1})")
        chosen = [args.index]
    else:
        chosen = torch.randperm(len(labels))[:args.n].tolist()
    with torch.no_grad():
        probs = predict(model, images[chosen], mean, std, device, amp_dtype, tta).softmax(1)  # (n, classes)
    for row, i in enumerate(chosen):
        top_p, top_k = probs[row].topk(3)
        text = [f"test image {i}: true class {classes[labels[i]]}"]
        text += [f"  {100 * p:5.1f}%  {classes[k]}" + ("  <- correct" if k == labels[i] else "")
                 for p, k in zip(top_p.tolist(), top_k.tolist())]
        for line, words in zip(picture(images[i], color), text + [""] * 16):
            print(line + "  " + words)
        print()

    pred = predict(model, images, mean, std, device, amp_dtype, tta).argmax(1).cpu()
    cm = confusion_matrix(pred, labels, len(classes))
    print(f"whole test set: {len(labels)} images, accuracy {100 * (pred == labels).float().mean():.2f}%")
    print_evaluation(cm, classes)
    off = cm.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(5)
    print("most confused pairs (true -> predicted):")
    for count, f in zip(counts.tolist(), flat.tolist()):
        t, p = divmod(f, len(classes))
        print(f"  {classes[t]:>10} -> {classes[p]:<10} {count:5d}  ({100 * count / max(1, cm[t].sum()):.1f}% "
              f"of {classes[t]})")


if __name__ == "__main__":
    main()
