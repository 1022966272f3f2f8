"""Perform a MIDI file in a style with the checkpoint tonenet/train.py wrote.

    python tonenet/sample.py                                # a built-in piece, performed in every style
    python tonenet/sample.py piece.mid --style pop --out performed.mid
    python tonenet/sample.py piece.mid                      # every style: out/piece_<style>.mid
    python tonenet/sample.py performance.mid --level keep   # the style's shape at the input's loudness
    python tonenet/sample.py piece.mid --level 50           # ... at a mean velocity of 50

Only the velocity of each sounding note_on changes: it becomes the model's prediction for its
key at its grid cell (rounded, clamped to 1-127). The overall loudness is the style's own unless
--level asks for another mean velocity: then the whole performance is shifted by one constant,
so the style's shape of the dynamics is kept at the chosen level. --level keep uses the input's
own mean where the input is a performance (its velocities vary, sd of 2 or more); a score at one
velocity has no loudness of its own, and gets the style's. Every other message (timing, tracks, tempo,
pedal, program changes, note-offs, meta events) is copied as it was, so the output has the same
notes at the same times. The input file is never overwritten.

It prints a piano roll of the first bars before and after (velocity as shading, '-' a held
key) and, per style, the velocity statistics of the performance.
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

# the sibling train.py
from train import (LOWEST, compose, encode, fail, is_performance, load_checkpoint, open_midi, read_notes,
                   seconds_of, set_level)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything

SHADES = "\u2591\u2592\u2593\u2588"  # velocity 1-31, 32-63, 64-95, 96-127: light to full block
NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def piano_roll(before, after, step, key, roll, columns):
    """Rows: keys sounding in the first `columns` steps, high to low; a block per struck cell
    shaded by velocity, '-' where the key is held; the input on the left, the output on the right."""
    shown = step < columns
    if not shown.any():
        return "(no notes in the first bars)"
    keys = range(int(key[shown].max()), int(key[shown].min()) - 1, -1)
    held = roll[:columns, :, 1].T == 1  # (88, <= columns)
    grids = []
    for vel in (before, after):
        grid = np.full((88, columns), " ", dtype="<U1")
        grid[:, :held.shape[1]][held] = "-"
        grid[key[shown], step[shown]] = np.array(list(SHADES))[(np.asarray(vel)[shown] - 1) // 32]
        grids.append(grid)
    lines = [f"     {'before'.ljust(columns)}   after"]
    for k in keys:
        name = NAMES[(k + LOWEST) % 12] + str((k + LOWEST) // 12 - 1)
        lines.append(f"{name:>4} {''.join(grids[0][k])} | {''.join(grids[1][k])}")
    return "\n".join(lines)


def voice_stats(velocity, step, key):
    """Mean velocity of the highest note struck in a cell, the lowest, and those between, over the
    cells where two or more keys are struck together; and which of the three is loudest."""
    top = np.full(step.max() + 1, -1)
    low = np.full(step.max() + 1, 999)
    np.maximum.at(top, step, key)
    np.minimum.at(low, step, key)
    count = np.bincount(step)
    chordal = count[step] >= 2
    is_top, is_low = chordal & (key == top[step]), chordal & (key == low[step])
    groups = {"top voice": velocity[is_top], "inner voices": velocity[chordal & ~is_top & ~is_low],
              "bass": velocity[is_low]}
    means = {name: float(v.mean()) for name, v in groups.items() if len(v)}
    if not means or max(means.values()) - min(means.values()) < 1:
        return means, "none, all equal"
    loudest = max(means, key=means.get)
    return means, loudest


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="a .mid file (default: a built-in piece)")
    parser.add_argument("--style", default="all",
                        help="a style from the checkpoint, or all (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output .mid; with several styles, _<style> is added to its name (default: "
                             "tonenet/out/<input>_<style>.mid)")
    parser.add_argument("--level", default=None,
                        help="mean velocity of the performance: a number 1-127, or keep (the input's own, "
                             "if it is a performance); default: the style's own")
    parser.add_argument("--bars", type=int, default=2,
                        help="bars (of 4 beats) shown in the piano roll (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "out" / "tonenet.pt"),
                        help="from tonenet/train.py (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the built-in piece (default: %(default)s)")
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
    args = parser.parse_args()
    if args.level not in (None, "keep") and not (args.level.isdigit() and 1 <= int(args.level) <= 127):
        fail(f"--level {args.level}: give a mean velocity from 1 to 127, or keep")
    seed_everything(args.seed)
    device = get_device(args.device)
    ckpt, model = load_checkpoint(args.checkpoint, device)
    styles = ckpt["styles"]
    if args.style != "all" and args.style not in styles:
        fail(f"unknown style '{args.style}': this checkpoint knows {', '.join(styles)}")
    chosen = styles if args.style == "all" else [args.style]

    # ---- the input: a file, or a built-in piece written next to the outputs so it can be heard too
    out_dir = Path(__file__).parent / "out"
    if args.input is None:
        source = out_dir / "example.mid"
        out_dir.mkdir(parents=True, exist_ok=True)
        # velocity 64 throughout: a score, not a performance
        compose(random.Random(args.seed), None).save(source)
    else:
        source = Path(args.input)
        if not source.is_file():
            fail(f"no such file: {source}")
    try:
        mid = open_midi(source)
    except ValueError as e:
        fail(f"{source} is {e}")
    notes = read_notes(mid, ckpt["pedal"])
    if len(notes["onset"]) == 0:
        fail(f"{source} has no piano notes to perform")
    roll, velocity, step = encode(notes, mid.ticks_per_beat, ckpt["steps_per_beat"])
    seconds = float(seconds_of(mid, notes["end"].max(keepdims=True))[0])  # through the tempo map
    print(f"{source}: {len(step)} notes, {len(roll)} steps, {seconds:.0f} s; styles {', '.join(styles)}")

    def stats(label, vel):
        means, loudest = voice_stats(vel, step, notes["key"])
        print(f"  {label:>10}: mean {vel.mean():5.1f}  spread (sd) {vel.std():4.1f}  "
              + "  ".join(f"{k} {v:.1f}" for k, v in means.items()) + f"  -> loudest: {loudest}")

    stats("input", notes["velocity"])
    level = None if args.level in (None, "keep") else float(args.level)  # None: the style's own
    if args.level == "keep":
        if is_performance(notes["velocity"]):
            level = float(notes["velocity"].mean())
            print(f"  --level keep: the input's mean velocity, {level:.1f}")
        else:
            print(f"  --level keep: the input is a score (velocity sd {notes['velocity'].std():.1f}, under "
                  "2), "
                  "so the style's own level")

    # ---- where each style's performance goes; never onto the input
    outputs = {}
    for style in chosen:
        if args.out is None:
            path = out_dir / f"{source.stem}_{style}.mid"
        elif len(chosen) == 1:
            path = Path(args.out)
        else:
            path = Path(args.out).with_name(f"{Path(args.out).stem}_{style}{Path(args.out).suffix or '.mid'}")
        if path.resolve() == source.resolve():
            fail(f"--out {path} is the input file: choose another name, the input is never overwritten")
        outputs[style] = path

    # ---- perform: predict velocities for every grid cell, copy them into the note_on messages
    roll_t = torch.from_numpy(roll).to(device).float()
    columns = 4 * args.bars * ckpt["steps_per_beat"]
    for style, path in outputs.items():
        t0 = time.time()
        with torch.inference_mode():
            pred = model.perform(roll_t, styles.index(style), ckpt["window"])  # (T, 88)
            new = pred[torch.from_numpy(step).to(device), torch.from_numpy(notes["key"]).to(device)]
            new = (new.round().clamp(1, 127) if level is None
                   else set_level(new, level)).to(torch.int64).cpu().numpy()
        model_seconds = time.time() - t0
        for n in range(len(new)):
            track, index = int(notes["track"][n]), int(notes["index"][n])
            mid.tracks[track][index] = mid.tracks[track][index].copy(velocity=int(new[n]))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        mid.save(tmp)
        os.replace(tmp, path)
        print(f"\n== {style}: wrote {path} (model time {model_seconds:.3f} s for {seconds:.0f} s of music)")
        print(piano_roll(notes["velocity"], new, step, notes["key"], roll, columns))
        stats(style, new)


if __name__ == "__main__":
    main()
