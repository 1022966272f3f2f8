"""ToneNet: learn how a piano piece is performed (the velocity of every note) in a style.

ToneNet (Jayakumar, Ramesh and Thalasta 2017), after StyleNet (Malik and Ek 2017, "Neural
translation of musical style"), separates composition from performance: from the notes alone
(which keys are struck or held at each step) it predicts how loudly each note is played, with
one decoder per style. Re-performing a piece with another style's decoder "transfers" it.

    python tonenet/train.py                    # built-in pieces in two styles; prints test MAE
    python tonenet/train.py --model stylenet   # the StyleNet baseline: a linear head per style
    python tonenet/train.py --data human_piano --epochs 100 --time-limit 300   # a folder per style
    python tonenet/sample.py piece.mid --style pop --out performed.mid
    python tonenet/sample.py piece.mid --level keep       # the style's shape at the input's own loudness

Files are split into train, validation and test by piece: two performances of one piece (ASAP
names the performer at the end of the file name) always share a split. The test table gives
the MAE, the correlation, and the MAE with each file's mean velocity given (the shape alone).

The pipeline: MIDI -> note events (mido; tracks merged, sustain pedal applied) -> a grid of
--steps-per-beat cells per beat: notes (T, 88, 3) with [1,1,part] struck, [0,1,0] held, [0,0,0]
silent (part: which of the file's tracks the note is in), and velocities (T, 88) at the struck
cells -> windows of --window steps -> the network ->
mean squared error on velocity/127 at struck cells only.

Speed: the decoder reads the encoder states, not its own earlier outputs, so every LSTM runs
over the whole window in one call and attention is one batched matrix product; there is no
Python loop over time. The data set lives on the device as uint8 and a batch is one index.
"""
import argparse
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import mido
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import autocast, get_device, precision_for, precision_name, rnn_fp32, seed_everything, synchronize

LOWEST, KEYS = 21, 88  # the piano: MIDI notes 21 (A0) to 108 (C8)
DRUMS = 9  # MIDI channel 10, counted from 0


def fail(message):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- model


def note_features(roll, voices, parts=False):
    """roll (B, T, 88, 3) -> (B, T, 88, F) floats: struck and sounding. With `voices`, three more per
    key, all from the notes alone: the top voice (the highest key sounding at the step), the bottom
    voice (the lowest), and at a struck key how long the note is held, as log(1 + steps) / log(1 + T).
    With `parts`, three more: which part the struck note belongs to (the file's first, second, or a
    later track with notes), one-hot."""
    struck, sounding = roll[..., 0].float(), roll[..., 1].float()  # (B, T, 88)
    features = [struck, sounding]
    if voices:
        B, T, K = sounding.shape
        key = torch.arange(K, device=roll.device)
        any_sounding = sounding.amax(-1, keepdim=True)  # (B, T, 1)
        # highest sounding key
        top = (key == (sounding * (key + 1)).argmax(-1, keepdim=True)).float() * any_sounding
        bottom = (key == (sounding * (K - key)).argmax(-1, keepdim=True)).float() * any_sounding  # lowest
        # A note struck at t lasts until the first later step where its key is silent or struck again:
        # the suffix minimum of those steps' indices (reversed cummin), minus t.
        step = torch.arange(T, device=roll.device).view(1, T, 1).expand(B, T, K)
        ends = torch.where((sounding == 0) | (struck == 1), step, T)  # (B, T, 88)
        ends = torch.cat([ends[:, 1:], torch.full_like(ends[:, :1], T)], 1)  # only later steps count
        first_end = ends.flip(1).cummin(1).values.flip(1)  # (B, T, 88) the first end after t
        held = torch.log1p((first_end - step).float()) / math.log1p(T) * struck
        features += [top, bottom, held]
    if parts:
        part = roll[..., 2].clamp(max=2)  # (B, T, 88) 0, 1, 2 for the third track on
        features += [struck * (part == p) for p in range(3)]
    return torch.stack(features, -1)


class Encoder(nn.Module):
    """A linear layer over the note features of each step (88 keys x F), then a bidirectional LSTM."""

    def __init__(self, hidden, layers, dropout, voices=False, parts=False):
        super().__init__()
        self.voices, self.parts = voices, parts
        self.inp = nn.Linear(KEYS * (2 + 3 * voices + 3 * parts), hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0)
        self.drop = nn.Dropout(dropout)

    def forward(self, roll):  # (B, T, 88, 3): struck, sounding in {0, 1}; part 0, 1, 2, ...
        features = note_features(roll, self.voices, self.parts).flatten(2)  # (B, T, 88 * F)
        x = self.drop(torch.relu(self.inp(features)))  # (B, T, H)
        out, _ = rnn_fp32(self.lstm, x)  # in fp32 under bf16 autocast: see common.rnn_fp32
        return self.drop(out)  # (B, T, 2H): each step sees the whole window, past and future


class LuongDecoder(nn.Module):
    """One style's decoder: an LSTM over the encoder states, Luong "general" attention over the
    whole window (Luong, Pham and Manning 2015, sec. 3.1), 88 velocities per step."""

    def __init__(self, hidden, dropout):
        super().__init__()
        self.lstm = nn.LSTM(2 * hidden, hidden, batch_first=True)
        self.score = nn.Linear(2 * hidden, hidden, bias=False)  # W_a of score(h_t, h_s) = h_t^T W_a h_s
        self.combine = nn.Linear(3 * hidden, hidden)  # W_c of h~_t = tanh(W_c [c_t; h_t])  (eq. 5)
        self.out = nn.Linear(hidden, KEYS)
        self.drop = nn.Dropout(dropout)

    def forward(self, enc, mask=None):  # enc (B, T, 2H), mask (B, T) True at real steps, None: all real
        h, _ = rnn_fp32(self.lstm, enc)  # (B, T, H): one call over the whole window
        scores = h @ self.score(enc).transpose(1, 2)  # (B, T, T): step t against every step s
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        context = scores.softmax(-1) @ enc  # (B, T, 2H)
        h_tilde = torch.tanh(self.combine(torch.cat([context, h], -1)))  # (B, T, H)
        return self.out(self.drop(h_tilde))  # logits (B, T, 88)


class LinearHead(nn.Module):
    """StyleNet's per-style output (Malik and Ek 2017): a linear layer on the encoder states."""

    def __init__(self, hidden, dropout):
        super().__init__()
        self.out = nn.Linear(2 * hidden, KEYS)

    def forward(self, enc, mask=None):
        return self.out(enc)


class ToneNet(nn.Module):
    """A shared encoder and one head per style; model="stylenet" swaps the attention decoders
    for linear heads. Velocities come out as sigmoid(logit) * 127."""

    def __init__(self, styles, hidden=64, layers=2, dropout=0.2, model="tonenet", voices=False, parts=False):
        super().__init__()
        self.encoder = Encoder(hidden, layers, dropout, voices, parts)
        head = LuongDecoder if model == "tonenet" else LinearHead
        self.heads = nn.ModuleList(head(hidden, dropout) for _ in styles)

    def forward(self, roll, style, mask=None):
        """roll (B, T, 88, 3), style (B,) style index of each window, mask (B, T) real steps or None
        -> velocity (B, T, 88) in 0..127."""
        enc = self.encoder(roll)
        logits = torch.empty(enc.shape[:2] + (KEYS,), device=enc.device, dtype=enc.dtype)
        # which window goes where is decided on the host: nonzero() of a GPU tensor waits for the GPU
        style = style.cpu()
        for s, head in enumerate(self.heads):  # each style's windows go through that style's decoder
            idx = (style == s).nonzero().squeeze(1)
            if len(idx):
                idx = idx.to(enc.device, non_blocking=True)
                logits[idx] = head(enc[idx], None if mask is None else mask[idx]).to(logits.dtype)
        return torch.sigmoid(logits.float()) * 127

    def perform(self, roll, style_index, window, batch_size=64):
        """Velocities (T, 88) for a whole piece (T, 88, 3) in one style, window by window."""
        T = len(roll)
        n = -(-T // window)  # windows, the last padded
        x = F.pad(roll.float(), (0, 0, 0, 0, 0, n * window - T)).view(n, window, KEYS, roll.shape[-1])
        # attention ignores the padding
        mask = (torch.arange(n * window, device=roll.device) < T).view(n, window)
        style = torch.full((n,), style_index)  # on the host, as forward() routes by it
        out = [self(x[i:i + batch_size], style[i:i + batch_size], mask[i:i + batch_size])
               for i in range(0, n, batch_size)]
        return torch.cat(out).reshape(n * window, KEYS)[:T]


# ----------------------------------------------------------------------------- data: MIDI in


def open_midi(path):
    """A mido.MidiFile, or a one-line reason why the file cannot be read (raised as ValueError)."""
    try:
        return mido.MidiFile(path)
    except Exception as e:  # mido raises OSError, EOFError, ValueError, KeyError... on bad files
        raise ValueError(f"not a readable MIDI file ({type(e).__name__}: {str(e)[:60]})") from None


def read_notes(mid, pedal=True):
    """Every piano note of a mido.MidiFile as arrays over notes:
    onset and end (in ticks), key (0-87), velocity (1-127), and where its note_on message is
    (track, index), so that sample.py can rewrite exactly that message later.

    Type 0 and type 1 files alike: the tracks are merged by absolute time. A note_on with
    velocity 0 is a note-off. Overlapping notes of one key on one channel are paired first in,
    first out (a note-off ends the oldest sounding one). With the sustain pedal (CC64 >= 64) down,
    a released note rings on until the pedal goes up or its key is struck again. The drum channel
    and keys outside the piano are left out."""
    events = []  # (tick, order, track, index, message): note-offs before pedal before note-ons at one tick
    for t, track in enumerate(mid.tracks):
        tick = 0
        for i, msg in enumerate(track):
            tick += msg.time
            if msg.type in ("note_on",
                            "note_off") and msg.channel != DRUMS and LOWEST <= msg.note < LOWEST + KEYS:
                on = msg.type == "note_on" and msg.velocity > 0
                events.append((tick, 2 if on else 0, t, i, msg))
            elif msg.type == "control_change" and msg.control == 64 and pedal:
                events.append((tick, 1, t, i, msg))
    events.sort(key=lambda e: e[:4])
    sounding = {}  # (channel, key) -> list of open note numbers, oldest first
    ringing = {}  # (channel, key) -> note numbers released under the pedal, still sounding
    pedal_down = [False] * 16
    notes = []  # [onset, end, key, velocity, track, index]
    for tick, order, t, i, msg in events:
        if order == 1:  # sustain pedal
            pedal_down[msg.channel] = msg.value >= 64
            if not pedal_down[msg.channel]:
                for (ch, key), held in list(ringing.items()):
                    if ch == msg.channel:
                        for n in held:
                            notes[n][1] = tick
                        del ringing[(ch, key)]
            continue
        slot = (msg.channel, msg.note - LOWEST)
        if order == 2:
            for n in ringing.pop(slot, []):  # striking a key again stops its pedalled sound
                notes[n][1] = tick
            sounding.setdefault(slot, []).append(len(notes))
            notes.append([tick, None, slot[1], msg.velocity, t, i])
        elif sounding.get(slot):
            n = sounding[slot].pop(0)
            if pedal_down[msg.channel]:
                ringing.setdefault(slot, []).append(n)
            else:
                notes[n][1] = tick
    last = max([e[0] for e in events], default=0)
    for n in notes:  # never released (or still under the pedal at the end): sound to the last event
        if n[1] is None or n[1] < n[0]:
            n[1] = max(last, n[0])
    a = np.array(notes, dtype=np.int64).reshape(-1, 6)
    return dict(onset=a[:, 0], end=a[:, 1], key=a[:, 2], velocity=a[:, 3], track=a[:, 4], index=a[:, 5])


def seconds_of(mid, ticks):
    """Seconds at each tick through the tempo map (set_tempo in any track; 120 bpm until the first)."""
    changes, tick = [], 0
    for track in mid.tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type == "set_tempo":
                changes.append((tick, msg.tempo))
    changes = sorted(changes) or [(0, 500000)]
    if changes[0][0] > 0:
        changes.insert(0, (0, 500000))
    starts = np.array([c[0] for c in changes])
    # seconds per tick
    tempos = np.array([c[1] for c in changes], dtype=np.float64) / 1e6 / mid.ticks_per_beat
    at_start = np.concatenate([[0], np.cumsum(np.diff(starts) * tempos[:-1])])
    seg = np.searchsorted(starts, ticks, side="right") - 1
    return at_start[seg] + (ticks - starts[seg]) * tempos[seg]


def encode(notes, ticks_per_beat, steps_per_beat):
    """ToneNet's input and target on a grid of steps_per_beat cells per beat:
    roll (T, 88, 3) uint8: [1,1,p] struck in this cell, [0,1,0] held from before, [0,0,0] silent,
    where p is the struck note's part: 0 for the file's first track with notes, 1 for the second, ...;
    velocity (T, 88) uint8, set where a key is struck; step (N,) the cell of each note."""
    step = np.rint(notes["onset"] * steps_per_beat / ticks_per_beat).astype(np.int64)
    stop = np.maximum(np.rint(notes["end"] * steps_per_beat / ticks_per_beat).astype(np.int64), step + 1)
    T = int(stop.max()) + 1 if len(step) else 1
    key = notes["key"]
    held = np.zeros((T + 1, KEYS), np.int32)  # +1 at the onset, -1 after the end; cumsum -> sounding
    np.add.at(held, (step, key), 1)
    np.add.at(held, (stop, key), -1)
    roll = np.zeros((T, KEYS, 3), np.uint8)
    roll[:, :, 1] = np.cumsum(held, 0)[:T] > 0
    roll[step, key, 0] = 1
    roll[step, key, 2] = np.unique(notes["track"], return_inverse=True)[1].reshape(-1)  # tracks ranked
    velocity = np.zeros((T, KEYS), np.uint8)
    # Two onsets of one key in one cell: keep the louder, the strike a listener hears.
    np.maximum.at(velocity, (step, key), notes["velocity"].astype(np.uint8))
    return roll, velocity, step


def load_piece(path, steps_per_beat, pedal):
    """(roll, velocity) of one file, or ValueError with the reason it cannot be used."""
    mid = open_midi(path)
    notes = read_notes(mid, pedal)
    if len(notes["onset"]) == 0:
        raise ValueError("has no piano notes")
    roll, velocity, _ = encode(notes, mid.ticks_per_beat, steps_per_beat)
    return roll, velocity


# ----------------------------------------------------------------------------- data: folders, splits, windows


def folder_pieces(data, steps_per_beat, pedal):
    """{style: [(name, roll, velocity), ...]} from DIR/<style>/*.mid; unreadable files are skipped."""
    root = Path(data)
    if not root.is_dir():
        fail(f"--data {data} is not a folder: give a folder with one sub-folder of .mid files per style")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        fail(f"--data {data} has no style sub-folders: put each style's .mid files in DIR/<style>/")
    out, t0 = {}, time.time()
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".mid", ".midi"))
        pieces = []
        for path in files:
            try:
                roll, velocity = load_piece(path, steps_per_beat, pedal)
                pieces.append((path.name, roll, velocity))
            except ValueError as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
        if not pieces:
            fail(f"style folder {folder} has no readable MIDI file with notes")
        if len(pieces) < 3:
            fail(f"style folder {folder} has only {len(pieces)} usable file(s): need at least 3 (train, "
                 "validation, test)")
        out[folder.name] = pieces
    print(f"read {sum(map(len, out.values()))} MIDI files in {time.time() - t0:.1f}s: "
          + ", ".join(f"{s} {len(p)}" for s, p in out.items()))
    return out


# ASAP names a performance Composer_Work_..._Performer.mid, the performer a capitalised name and a
# number (Giesbrecht01M, FALIKS01_2004): two performances of one piece differ only in that tag.
PERFORMER = re.compile(r"_[A-Z][A-Za-z-]*\d+M?(_\d{4})?$")


def piece_of(name):
    """The piece a file performs: its name without ASAP's performer tag (any other file is a piece
    of its own)."""
    return PERFORMER.sub("", Path(name).stem)


def split_files(pieces, val_frac, test_frac, seed):
    """Split each style by piece (seeded): every performance of a piece falls in one split, so no
    test piece was heard in training, played by someone else."""
    splits = {"train": {}, "val": {}, "test": {}}
    for style, items in pieces.items():
        groups = {}
        for item in items:
            groups.setdefault(piece_of(item[0]), []).append(item)
        order = sorted(groups)
        if len(order) < 3:
            fail(f"style {style} has {len(order)} piece(s) (performances of one piece count once): need at "
                 "least 3 (train, validation, test)")
        random.Random(seed).shuffle(order)
        n_test = max(1, round(test_frac * len(order)))
        n_val = max(1, round(val_frac * len(order)))
        for name, chosen in (("test", order[:n_test]), ("val", order[n_test:n_test + n_val]),
                             ("train", order[n_test + n_val:])):
            splits[name][style] = [item for piece in chosen for item in groups[piece]]
    return splits


def windows(items, window, stride):
    """Cut pieces into windows of `window` steps every `stride` steps, the last one of each piece
    padded with silence (nothing struck, so no loss): roll (N, W, 88, 3) and velocity (N, W, 88), uint8."""
    rolls, vels = [], []
    for _, roll, vel in items:
        T = len(roll)
        for start in range(0, max(T - window, 0) + stride, stride):  # the last start reaches the piece's end
            n = min(window, T - start)
            rolls.append(np.pad(roll[start:start + n], ((0, window - n), (0, 0), (0, 0))))
            vels.append(np.pad(vel[start:start + n], ((0, window - n), (0, 0))))
    return torch.from_numpy(np.stack(rolls)), torch.from_numpy(np.stack(vels))


def shift_keys(roll, target, shift):
    """Move a batch (B, T, 88, 3) and its velocities (B, T, 88) by `shift` keys; keys pushed off
    the keyboard are dropped, so nothing wraps around."""
    if shift == 0:
        return roll, target
    roll, target = roll.roll(shift, 2), target.roll(shift, 2)
    gone = slice(0, shift) if shift > 0 else slice(KEYS + shift, KEYS)
    roll[:, :, gone] = 0
    target[:, :, gone] = 0
    return roll, target


def load_data(args, device):
    """Pieces per style, split by file, the training files cut into half-overlapping windows that live
    on the device. Returns (roll (N, W, 88, 3), velocities (N, W, 88), style (N,) on the host), the
    split, the styles and each style's mean training velocity."""
    if args.data == "builtin":
        pieces = builtin_pieces(args.pieces, args.seed, args.steps_per_beat)
    else:
        pieces = folder_pieces(args.data, args.steps_per_beat, args.pedal)
    styles = list(pieces)
    split = split_files(pieces, args.val_frac, args.test_frac, args.split_seed)
    train_means = {}
    per_style = []
    for s, style in enumerate(styles):
        roll, vel = windows(split["train"][style], args.window, args.window // 2)  # half-overlapping windows
        per_style.append((roll, vel, torch.full((len(roll),), s)))
        struck = [v[r[..., 0] == 1] for _, r, v in split["train"][style]]  # velocities of the struck notes
        train_means[style] = float(np.concatenate(struck).mean())
    roll = torch.cat([p[0] for p in per_style]).to(device)  # (N, W, 88, 3) uint8
    vel = torch.cat([p[1] for p in per_style]).to(device)  # (N, W, 88) uint8
    style_of = torch.cat([p[2] for p in per_style])  # (N,) on the host: the model routes windows by it
    for style in styles:
        counts = {name: (len(part[style]), len({piece_of(f) for f, _, _ in part[style]}),
                         sum(int(r[..., 0].sum()) for _, r, _ in part[style]))
                  for name, part in split.items()}
        sizes = [f"{name} {files} files of {pieces} pieces, {notes:,} notes"
                 for name, (files, pieces, notes) in counts.items()]
        print(f"data: {style}: " + " / ".join(sizes) + f"; mean training velocity {train_means[style]:.1f}")
    print(f"data: {len(roll)} training windows of {args.window} steps "
          f"({args.window / args.steps_per_beat:.0f} beats)")
    return (roll, vel, style_of), split, styles, train_means


# ----------------------------------------------------------------------------- training


def train_step(model, optimizer, scaler, x, target, style, clip, amp_dtype, loss_kind="mse"):
    """One update: x (B, T, 88, 3) the notes, target (B, T, 88) velocities / 127, style (B,) on the
    host. Returns the loss, left on the device (reading it would make the CPU wait for the GPU)."""
    struck = x[..., 0]  # (B, T, 88) 1 where a key is struck: only struck keys have a velocity
    optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp_dtype):
        pred = model(x, style) / 127
    # the error over the struck keys, as a masked sum (pred[struck] would wait for the GPU to count them):
    # squared (ToneNet's), or absolute, the error the evaluation reports (its minimiser is the median)
    error = (pred - target) ** 2 if loss_kind == "mse" else (pred - target).abs()
    loss = (error * struck).sum() / struck.sum().clamp_min(1)
    if not scaler.is_enabled():
        loss.backward()
        # foreach left to PyTorch, which uses it where the device has it (MPS has not, and refuses it)
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    else:  # fp16 mixed precision: the loss scaled up so small gradients do not round to zero
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the true gradients, before clipping
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)  # skipped if a gradient overflowed
        scaler.update()
    return loss.detach()


def train_epoch(model, optimizer, scaler, data, generator, batch_size, transpose, clip, amp_dtype,
                loss_kind="mse", lr_at=None, stop=lambda n: False):
    """One pass over the training windows in a new order, all styles shuffled together. data:
    roll (N, W, 88, 3) and velocities (N, W, 88) uint8 on the device, style (N,) on the host.
    lr_at(n): the learning rate before batch n, if it follows a schedule; stop(n): end early.
    Returns the summed loss, left on the device, and the number of batches."""
    roll, vel, style_of = data
    loss_sum, n = torch.zeros((), device=roll.device), 0
    for idx in torch.randperm(len(roll), generator=generator).split(batch_size):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(n)
        rows = idx.to(roll.device, non_blocking=True)
        x, target = roll[rows].float(), vel[rows].float() / 127
        if transpose:  # augmentation: the same performance a few keys higher or lower
            x, target = shift_keys(x, target,
                                   int(torch.randint(-transpose, transpose + 1, (), generator=generator)))
        loss_sum += train_step(model, optimizer, scaler, x, target, style_of[idx], clip, amp_dtype, loss_kind)
        n += 1
        if stop(n):
            break
    return loss_sum, n


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """A tonenet checkpoint and its model, or one line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}: run python tonenet/train.py first")
    try:
        # onto the CPU first: a checkpoint saved on any device opens on any other, and the model is moved
        # afterwards (MPS, for one, cannot hold every dtype a file may carry)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "tonenet":
        fail(f"{path} is not a tonenet checkpoint (it was written by another script): train one with python "
             "tonenet/train.py")
    model = ToneNet(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    model.to(device)
    return ckpt, model.eval()


def cosine_lr(lr, p):
    """--lr-decay: cosine decay from lr to lr/10 as training progress p goes from 0 to 1."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(p, 1.0))))


def eta(train_time, epoch, args):
    """Seconds of training left: the epochs to come at the pace so far, within any --time-limit."""
    remaining = train_time / epoch * (args.epochs - epoch)
    return max(0.0, min(remaining, args.time_limit - train_time)) if args.time_limit else remaining


def fit(model, optimizer, scaler, data, split, styles, train_means, args, amp_dtype, save):
    """The epoch loop: train, score the validation files, log, save the best epoch. Returns the
    windows trained on and the seconds spent training."""
    best, train_time, seen = float("inf"), 0.0, 0
    generator = torch.Generator().manual_seed(args.seed)
    batches_per_epoch = -(-len(data[0]) // args.batch_size)
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        clock = lambda: train_time + time.time() - t0  # seconds of training so far
        lr_at = lambda n: cosine_lr(args.lr, clock() / args.time_limit if args.time_limit
                                    else (epoch - 1 + n / batches_per_epoch) / args.epochs)
        stop = lambda n: args.time_limit and clock() > args.time_limit or args.dry_run and n == 2
        loss_sum, n_batches = train_epoch(model, optimizer, scaler, data, generator, args.batch_size,
                                          args.transpose, args.clip, amp_dtype, args.loss,
                                          lr_at if args.lr_decay else None, stop)
        seen += min(n_batches * args.batch_size, len(data[0]))  # only the last batch is short
        synchronize(data[0].device)  # the epoch's GPU work is done before the clock is read
        dt = time.time() - t0
        train_time += dt
        report = evaluate(model, split["val"], styles, args.window, data[0].device, train_means)
        remaining = eta(train_time, epoch, args)
        print(f"epoch {epoch}/{args.epochs} | loss {loss_sum.item() / n_batches:.4f} | "
              f"{n_batches * args.batch_size / dt:,.0f} windows/s | {1000 * dt / n_batches:.1f} ms/step | "
              f"elapsed {train_time:.0f}s | eta {remaining:.0f}s | val MAE "
              + " ".join(f"{s} {r['mae']:.2f}" for s, r in report.items()))
        val_mae = sum(r["mae"] for r in report.values()) / len(report)
        if val_mae < best:
            best = val_mae
            save(epoch, best)
        if args.time_limit and train_time > args.time_limit:
            print(f"time limit of {args.time_limit:.0f}s reached")
            break
    return seen, train_time


# -------------------------------------------------------------------------- evaluation, and the level control


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-9))


@torch.inference_mode()
def evaluate(model, split, styles, window, device, train_means):
    """Per style, over every struck note of the split's files: the model's MAE (MIDI units) and
    Pearson correlation; the model's MAE with each file's level given (its predictions shifted so
    their mean is the file's true mean: the shape of the dynamics alone); and three baselines on
    the same notes: a constant 64, the style's mean training velocity, and each file's own mean
    velocity (an oracle told each file's loudness)."""
    model.eval()
    report = {}
    for s, style in enumerate(styles):
        preds, trues, file_means, leveled = [], [], [], []
        for _, roll, vel in split[style]:
            roll_t = torch.from_numpy(roll).to(device)
            vel_t = torch.from_numpy(vel).to(device).float()
            struck = roll_t[..., 0].bool()
            pred, true = model.perform(roll_t.float(), s, window)[struck], vel_t[struck]
            preds.append(pred)
            trues.append(true)
            file_means.append(true.mean().expand(len(true)))
            leveled.append(pred - pred.mean() + true.mean())
        p, t, fm, lv = torch.cat(preds), torch.cat(trues), torch.cat(file_means), torch.cat(leveled)
        report[style] = dict(mae=float((p - t).abs().mean()), corr=pearson(p, t),
                             level_mae=float((lv - t).abs().mean()),
                             notes=len(t), files=len(split[style]),
                             pieces=len({piece_of(name) for name, _, _ in split[style]}),
                             const64=float((t - 64).abs().mean()),
                             style_mean=float((t - train_means[style]).abs().mean()),
                             file_mean=float((t - fm).abs().mean()))
    model.train()
    return report


def print_test_report(report, epoch, model):
    """The test table: the model's velocity error beside its baselines, per style."""
    print(f"test (held-out pieces, best epoch {epoch}): velocity MAE in MIDI units over struck notes")
    print(f"  {'style':<12}{'pieces':>7}{'notes':>8}{model:>10}{'corr':>7}{'level given*':>14}"
          f"{'const 64':>10}{'style mean':>12}{'file mean*':>12}")
    for style, r in report.items():
        print(f"  {style:<12}{r['pieces']:>7}{r['notes']:>8}{r['mae']:>10.2f}{r['corr']:>7.3f}"
              f"{r['level_mae']:>14.2f}{r['const64']:>10.2f}{r['style_mean']:>12.2f}{r['file_mean']:>12.2f}")
    print("  * told each test file's true mean velocity: the model shifted to it, and the file-mean oracle")


def set_level(velocity, level):
    """Velocities (N,) float shifted by one constant so that, rounded and clamped to 1-127 as they
    are written, their mean is `level`: the shift is found by bisection, because clamping at the
    ends pulls a plain shift's mean off. The shape of the dynamics is kept."""
    lo, hi = -127.0, 127.0
    for _ in range(40):
        shift = (lo + hi) / 2
        if float((velocity + shift).round().clamp(1, 127).mean()) < level:
            lo = shift
        else:
            hi = shift
    return (velocity + hi).round().clamp(1, 127)


def is_performance(velocity):
    """True when a file's velocities vary (a performance); False for a score at one or two
    velocities (sd under 2 MIDI units), whose mean says nothing about how loud it should be."""
    return len(velocity) > 1 and float(np.std(velocity)) >= 2


# ----------------------------------------------------------------------------- built-in pieces
# The script composes small piano pieces (a melody over an accompaniment, in varied keys, meters
# and textures) and performs each in one of two styles by rules that depend on the notes alone:
#   lyrical: every 4-bar phrase swells and fades (an arch, 50 -> 80 -> 50), the melody sings
#            16 above the accompaniment, downbeats +5.
#   groove:  the melody is even (78, +6 on the beat); the accompaniment is accented on the
#            off-beat eighths (90), soft on the beat (60), with ghost notes on the odd sixteenths
#            (32); the bass on a downbeat is 84.
# Both add Gaussian noise (sd 3), so the best possible MAE is about 2.4.


STYLES = ("lyrical", "groove")


MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)


# scale degrees, one chord a bar
PROGRESSIONS = ([0, 3, 4, 0], [0, 5, 3, 4], [0, 3, 0, 4], [5, 3, 0, 4], [0, 4, 5, 3])


# 4/4, in sixteenths
RHYTHMS = {16: ([4, 4, 4, 4], [4, 2, 2, 4, 4], [2, 2, 2, 2, 4, 4], [6, 2, 4, 4], [4, 4, 2, 2, 2, 2],
                [8, 4, 4]),
           12: ([4, 4, 4], [4, 2, 2, 4], [6, 2, 4], [2, 2, 4, 4], [8, 4])}  # 3/4


def compose(rng, style, ticks_per_beat=480):
    """One piece as a two-track mido.MidiFile (melody, accompaniment), performed in `style`."""
    bar = rng.choice([16, 16, 12])  # steps (sixteenths) per bar: 4/4 or 3/4
    scale = MAJOR if rng.random() < 0.6 else MINOR
    tonic = 48 + rng.randrange(12)
    texture = rng.choice(["block", "alberti", "arpeggio", "oompah", "sustained"])
    phrases = rng.randint(3, 6)
    tempo = rng.randint(70, 140)
    pitch = lambda degree, octave=0: tonic + 12 * (octave + degree // 7) + scale[degree % 7]
    notes = []  # (start step, length in steps, pitch, voice) with voice 0 melody, 1 accompaniment, 2 bass
    degree = 7 + rng.choice([0, 2, 4])
    for p in range(phrases):
        chords = rng.choice(PROGRESSIONS)
        for b, root in enumerate(chords):
            t0 = (4 * p + b) * bar
            if b == 3:  # a cadence: the phrase ends on one long note, then a breath
                rhythm = [bar - 4, 4] if rng.random() < 0.5 else [bar]
            else:
                rhythm = list(rng.choice(RHYTHMS[bar]))
            t = t0
            for k, length in enumerate(rhythm):
                if b == 3 and k == 1:
                    break  # the rest after the cadence note
                if k == 0:  # chord tone on the downbeat
                    degree = min([root + 7, root + 9, root + 11, root + 14], key=lambda d: abs(d - degree))
                else:
                    degree = max(5, min(16, degree + rng.choice([-2, -1, -1, 1, 1, 2, 0, 3, -3])))
                notes.append((t, length, pitch(degree, 1), 0))
                t += length
            chord = [pitch(root), pitch(root + 2), pitch(root + 4)]
            bass = pitch(root, -1)
            if texture == "block":  # the chord on every beat
                for s in range(0, bar, 4):
                    notes += [(t0 + s, 4, n, 1) for n in chord] + [(t0 + s, 4, bass, 2)]
            elif texture == "alberti":  # low-high-middle-high in sixteenths
                for s in range(0, bar):
                    notes.append((t0 + s, 1, chord[[0, 2, 1, 2][s % 4]], 2 if s == 0 else 1))
            elif texture == "arpeggio":  # rising eighths, a sixteenth pickup on each beat's last
                for s in range(0, bar, 2):
                    notes.append((t0 + s, 2, [bass, chord[0], chord[1], chord[2]][(s // 2) % 4],
                                  2 if s == 0 else 1))
                    if s % 4 == 2:
                        notes.append((t0 + s + 1, 1, chord[2] + 12 - 12 * (rng.random() < 0.5), 1))
            # bass on the beat, chord on the off-beat eighth, a ghost before the beat
            elif texture == "oompah":
                for s in range(0, bar, 4):
                    notes.append((t0 + s, 2, bass if s % 8 == 0 else pitch(root + 4, -1), 2))
                    notes += [(t0 + s + 2, 1, n, 1) for n in chord[1:]]
                    notes.append((t0 + s + 3, 1, chord[0], 1))
            else:  # sustained chord and bass, a sixteenth figure on the last beat
                notes += [(t0, bar, n, 1) for n in chord] + [(t0, bar, bass, 2)]
                notes += [(t0 + bar - 4 + s, 1, chord[s % 3] + 12, 1) for s in (1, 2, 3)]
    rows = [(start, dur, key, voice, perform(rng, style, start, voice, bar))
            for start, dur, key, voice in notes]
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    per_step = ticks_per_beat // 4
    meta = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(tempo), time=0),
                           mido.MetaMessage("time_signature", numerator=bar // 4, denominator=4, time=0)])
    mid.tracks.append(meta)
    for voices, name in (((0,), "melody"), ((1, 2), "accompaniment")):
        timed = []
        for start, dur, key, voice, vel in rows:
            if voice in voices:
                timed.append((start * per_step, 1, key, vel))
                # released just before the next cell
                timed.append(((start + dur) * per_step - per_step // 8, 0, key, 0))
        timed.sort()
        track, now = mido.MidiTrack([mido.MetaMessage("track_name", name=name, time=0)]), 0
        for tick, on, key, vel in timed:
            track.append(mido.Message("note_on" if on else "note_off", note=key, velocity=vel if on else 0,
                                      time=tick - now))
            now = tick
        mid.tracks.append(track)
    return mid


def perform(rng, style, step, voice, bar):
    """A note's velocity by the style's rules (see the banner above), with noise; None: a flat 64."""
    if style is None:
        return 64
    if style == "lyrical":
        phrase = 4 * bar
        arch = math.sin(math.pi * ((step % phrase) + 0.5) / phrase)  # 0 at the phrase's ends, 1 in its middle
        v = 50 + 30 * arch + (16 if voice == 0 else 0) + (5 if step % bar == 0 else 0)
    else:
        if voice == 0:
            v = 78 + (6 if step % 4 == 0 else 0)
        elif voice == 2 and step % bar == 0:
            v = 84
        else:
            v = {0: 60, 2: 90}.get(step % 4, 32)  # on the beat, the off-beat eighth, the odd sixteenths
    return int(min(127, max(1, round(v + rng.gauss(0, 3)))))


def builtin_pieces(n, seed, steps_per_beat):
    """n pieces per style: {style: [(name, roll, velocity), ...]}."""
    rng = random.Random(seed)
    out = {}
    for style in STYLES:
        out[style] = []
        for i in range(n):
            mid = compose(rng, style)
            notes = read_notes(mid)
            roll, velocity, _ = encode(notes, mid.ticks_per_beat, steps_per_beat)
            out[style].append((f"{style}_{i:03d}", roll, velocity))
    return out


# ----------------------------------------------------------------------------- main


def get_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin",
                        help="builtin, or a folder with one sub-folder of .mid files per style (default: "
                             "%(default)s)")
    parser.add_argument("--pieces", type=int, default=120,
                        help="builtin: pieces composed per style (default: %(default)s)")
    parser.add_argument("--model", default="tonenet", choices=["tonenet", "stylenet"],
                        help="Luong-attention decoders, or StyleNet's linear heads (default: %(default)s)")
    parser.add_argument("--steps-per-beat", type=int, default=4,
                        help="grid cells per beat; 4 is sixteenth notes (default: %(default)s)")
    parser.add_argument("--window", type=int, default=200,
                        help="steps per training window, as in StyleNet and ToneNet (default: %(default)s)")
    parser.add_argument("--pedal", action=argparse.BooleanOptionalAction, default=True,
                        help="lengthen notes held by the sustain pedal (default: %(default)s)")
    parser.add_argument("--test-frac", type=float, default=0.15,
                        help="held-out test files per style (default: %(default)s)")
    parser.add_argument("--val-frac", type=float, default=0.1,
                        help="validation files per style, picks the best epoch (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the train/validation/test split, kept apart from --seed so that runs "
                             "with different seeds are tested on the same pieces (default: %(default)s)")
    parser.add_argument("--transpose", type=int, default=3,
                        help="training batches are moved up or down by up to this many keys, 0 for none "
                             "(default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=64, help="LSTM size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="encoder LSTM layers (default: %(default)s)")
    parser.add_argument("--dropout", type=float, default=0.2, help="(default: %(default)s)")
    parser.add_argument("--voices", action=argparse.BooleanOptionalAction, default=False,
                        help="add note features: top voice, bottom voice, how long each note is held "
                             "(default: %(default)s)")
    parser.add_argument("--parts", action=argparse.BooleanOptionalAction, default=False,
                        help="add a note feature: which part (the file's first, second, later track) a note "
                             "is in (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=24, help="(default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="stop training after this many seconds, 0 for none (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="windows per batch; small batches give more updates a minute (default: "
                             "%(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate (ToneNet used 1e-3) (default: %(default)s)")
    parser.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=False,
                        help="cosine decay of the learning rate to a tenth over the run (default: "
                             "%(default)s)")
    parser.add_argument("--loss", default="mse", choices=["mse", "l1"],
                        help="squared error (ToneNet's) or absolute error on velocity/127 (default: "
                             "%(default)s)")
    parser.add_argument("--clip", type=float, default=10.0,
                        help="gradient norm clipping (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "tonenet.pt"),
                        help="checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision (the LSTMs stay in fp32 under bf16); auto: bf16 on GPUs from "
                             "Ampere on, fp16 with a GradScaler on older GPUs (a T4), fp32 on CPUs and MPS "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a GPU run repeats exactly (slower)")
    parser.add_argument("--dry-run", action="store_true",
                        help="two batches, one evaluation, a checkpoint: checks that every line runs, in "
                             "seconds")
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line, not argparse's usage block
    args = parser.parse_args()
    if args.dry_run:  # pytorch/examples' --dry-run: the whole script once, on the least data
        args.epochs, args.pieces = 1, min(args.pieces, 10)
    if args.window < 8 or args.steps_per_beat < 1:
        fail("--window must be at least 8 and --steps-per-beat at least 1")
    return args


def main():
    args = get_args()
    print("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    seed_everything(args.seed, args.deterministic)
    device = get_device(args.device)
    data, split, styles, train_means = load_data(args, device)

    model_args = dict(styles=styles, hidden=args.hidden, layers=args.layers, dropout=args.dropout,
                      model=args.model, voices=args.voices, parts=args.parts)
    model = ToneNet(**model_args).to(device)
    # one kernel for all tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    amp_dtype, needs_scaler = precision_for(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)  # fp16 only: see common.choose_precision
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, {len(styles)} "
          f"style heads, on {device}, autocast {precision_name(amp_dtype, needs_scaler)}")

    out = Path(args.out)
    save = lambda epoch, best: save_checkpoint({
        "kind": "tonenet",  # sample.py refuses checkpoints of other scripts
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
        "styles": styles, "steps_per_beat": args.steps_per_beat, "window": args.window, "pedal": args.pedal,
        "train_means": train_means, "epoch": epoch, "best_val_mae": best, "config": vars(args)}, out)
    seen, train_time = fit(model, optimizer, scaler, data, split, styles, train_means, args, amp_dtype, save)

    # ---- the best epoch on the held-out test files
    ckpt, model = load_checkpoint(out, device)
    report = evaluate(model, split["test"], styles, args.window, device, train_means)
    print_test_report(report, ckpt["epoch"], args.model)
    keys = ("mae", "corr", "level_mae", "const64", "style_mean", "file_mean")
    fields = [f"{s}_{k}={r[k]:.3f}" for s, r in report.items() for k in keys]
    print(f"result: model={args.model} mae={sum(r['mae'] for r in report.values()) / len(report):.3f} "
          f"style_mean_mae={sum(r['style_mean'] for r in report.values()) / len(report):.3f} "
          f"{' '.join(fields)} "
          f"windows_per_s={seen / max(train_time, 1e-9):.0f} train_seconds={train_time:.1f}")

if __name__ == "__main__":
    main()
