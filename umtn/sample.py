"""Translate audio into another instrument with the checkpoint umtn/train.py wrote.

    python umtn/sample.py                                  # a built-in pluck melody, into every domain
    python umtn/sample.py input.wav --to organ --out out.wav
    python umtn/sample.py input.wav --to all               # umtn/out/input_to_<domain>.wav for every domain
    python umtn/sample.py input.wav --method plain         # the paper's queues, unfused (same samples)

The input is encoded once; each target's decoder then samples the output autoregressively
(--temperature). Long inputs are cut into chunks of --chunk seconds that are generated side by
side as one batch, together with every target domain, so a 10 s clip costs about as many
sequential steps as one chunk.

Chunk boundaries: a chunk starts with no audio history, so on its own it would begin with a
click and a different phase. Each chunk therefore starts --overlap seconds early (conditioned
on the latent of that earlier audio, so it is already playing the right note when its own
part begins), and the overlap is cross-faded with the end of the previous chunk.
"""
import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from train import (InstrumentJudge, TimbreClassifier, fail, frame_size, generate, level, load_checkpoint,
                   melody, mu_law_decode, pitch_track, read_wav, render, write_wav)  # the sibling train.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything, synchronize

NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]


def notes_over_time(x, rate, seconds, cell=0.125):
    """The pitch track as note names, one per `cell` seconds (the commonest note of its frames; '.'
    where nothing is voiced), and the MIDI note of every pitch-track frame (0 where unvoiced)."""
    f0 = pitch_track(x, rate)
    midi = np.where(f0 > 0, np.rint(69 + 12 * np.log2(np.maximum(f0, 1e-9) / 440)), 0).astype(int)
    per_cell = max(1, round(cell * rate / (frame_size(rate) // 4)))
    cells = []
    for i in range(0, min(len(midi), round(seconds / cell) * per_cell), per_cell):
        voiced = midi[i:i + per_cell][midi[i:i + per_cell] > 0]
        note = np.bincount(voiced).argmax() if len(voiced) else 0
        cells.append(f"{NAMES[note % 12]}{note // 12 - 1}" if note else ".")
    return " ".join(f"{c:<3}" for c in cells), midi


def show(audio, outputs, domains, rate, timbre, seconds):
    """What happened to the music: the input's notes and each output's, side by side, how many of
    the input's voiced frames each output plays at the same note, and which instrument the input and
    each output sound like."""
    line, midi_in = notes_over_time(audio, rate, seconds)
    print(f"notes over the first {min(seconds, len(audio) / rate):.1f} s (one per 1/8 s; '.' is silence or "
          "noise):")
    width = max(12, 4 + max(len(d) for d in domains))  # the note columns line up for any names
    print(f"  {'input':<{width}}{line}")
    if timbre:  # the input first: a judge that does not know your instrument cannot judge its translations
        print(f"  {'':<{width}}(sounds like {timbre(audio, midi_in)})")
    for t, y in outputs.items():
        line, midi = notes_over_time(y, rate, seconds)
        n = min(len(midi), len(midi_in))
        voiced = midi_in[:n] > 0
        same = (midi[:n] == midi_in[:n]) & voiced
        heard = f", sounds like {timbre(y, midi_in)}" if timbre else ""
        print(f"  {'-> ' + domains[t]:<{width}}{line}")
        kept = 100 * same.sum() / max(1, voiced.sum())
        print(f"  {'':<{width}}(plays the input's note in {kept:.0f}% of its voiced frames{heard})")


def translate(model, audio, targets, rate, chunk_seconds, overlap_seconds, temperature, method, device, seed):
    """audio (T,) float -> {target index: (T,) float}, chunks and targets generated as one batch."""
    pool = model.encoder.pool
    T = len(audio)
    chunk = max(pool, int(chunk_seconds * rate) // pool * pool)
    overlap = min(chunk // 2, int(overlap_seconds * rate) // pool * pool)
    padded = -(-T // chunk) * chunk
    x = torch.zeros(padded, device=device)
    x[:T] = torch.from_numpy(audio).to(device)
    n_chunks = padded // chunk
    with torch.inference_mode():
        z = model.encoder(x[None])[0]  # (L, padded / pool): encoded once, for the whole input
        # chunk k covers [k * chunk - overlap, (k + 1) * chunk); before the start, the latent of silence
        silence = model.encoder(torch.zeros(1, overlap + pool, device=device))[0][:, :overlap // pool]
        # for the pitch encoder, each target reads the input's loudness moved onto its own: (K, L, F')
        z_pad = torch.stack([torch.cat([silence, model.match_loudness(z[None], t)[0]], 1) for t in targets])
    f_chunk, f_over = chunk // pool, overlap // pool
    chunks = [z_pad[:, :, k * f_chunk:(k + 1) * f_chunk + f_over] for k in range(n_chunks)]
    zz = torch.stack(chunks, 1)  # (K, N, L, F)
    n = chunk + overlap
    codes = generate([model.decoders[t] for t in targets], zz, n, temperature, seed, method)  # (K, N, n)
    pieces = mu_law_decode(codes).cpu().numpy()
    out = {}
    fade = np.linspace(0, 1, overlap, dtype=np.float32)
    for i, t in enumerate(targets):
        y = np.zeros(padded, np.float32)
        for k in range(n_chunks):
            piece = pieces[i, k]
            y[k * chunk:(k + 1) * chunk] = piece[overlap:]
            if overlap and k > 0:  # cross-fade this chunk's lead-in with the previous chunk's end
                a = slice(k * chunk - overlap, k * chunk)
                y[a] = y[a] * (1 - fade) + piece[:overlap] * fade
        out[t] = y[:T]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", help="a .wav file (default: a built-in melody)")
    parser.add_argument("--to", default="all",
                        help="target domain from the checkpoint, or all (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="output .wav; with several targets, _<domain> is added (default: "
                             "umtn/out/<input>_<domain>.wav)")
    parser.add_argument("--seconds", type=float, default=0,
                        help="translate only the first this many seconds, 0 for all (default: %(default)s)")
    parser.add_argument("--chunk", type=float, default=1.0,
                        help="seconds per chunk generated in parallel (default: %(default)s)")
    parser.add_argument("--overlap", type=float, default=0.05,
                        help="seconds of lead-in cross-faded at each chunk boundary (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature of sampling (default: %(default)s)")
    parser.add_argument("--method", default="fast", choices=["fast", "plain", "naive"],
                        help="generation: fused queues, the paper's plain queues, or the whole receptive "
                             "field per sample; all draw the same samples (default: %(default)s)")
    parser.add_argument("--show", type=float, default=4.0,
                        help="seconds of notes shown for the input and each output (default: %(default)s)")
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "out" / "umtn.pt"),
                        help="from umtn/train.py (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
    args = parser.parse_args()
    seed_everything(args.seed)
    device = get_device(args.device)
    ckpt, model = load_checkpoint(args.checkpoint, device)
    domains, rate = ckpt["domains"], ckpt["rate"]
    if args.to != "all" and args.to not in domains:
        fail(f"unknown domain '{args.to}': this checkpoint knows {', '.join(domains)}")
    if args.temperature <= 0 or args.chunk <= 0 or args.overlap < 0:
        fail("--temperature and --chunk must be positive, --overlap not negative")
    targets = list(range(len(domains))) if args.to == "all" else [domains.index(args.to)]

    if args.input is None:  # a melody the script renders itself, kept so it can be heard beside the outputs
        source = Path(__file__).parent / "out" / "example.wav"
        audio = render(melody(random.Random(args.seed), 4.0, rate), "pluck", 4.0, rate)
        write_wav(source, audio, rate)
    else:
        source = Path(args.input)
        if not source.is_file():
            fail(f"no such file: {source}")
        try:
            audio = read_wav(source, rate)
        except ValueError as e:
            fail(f"{source} is {e}")
    if args.seconds:
        audio = audio[: int(args.seconds * rate)]
    if ckpt["config"].get("clip_rms"):  # the level the training clips were brought to (--recipe instruments)
        audio = level(audio, ckpt["config"]["clip_rms"])
    outputs = {}
    for t in targets:
        if args.out is None:
            path = Path(__file__).parent / "out" / f"{source.stem}_to_{domains[t]}.wav"
        elif len(targets) == 1:
            path = Path(args.out)
        else:
            base = Path(args.out)
            path = base.with_name(f"{base.stem}_to_{domains[t]}{base.suffix or '.wav'}")
        if path.resolve() == source.resolve():
            fail(f"--out {path} is the input file: choose another name, the input is never overwritten")
        outputs[t] = path
    print(f"{source}: {len(audio) / rate:.2f} s at {rate} Hz -> {', '.join(domains[t] for t in targets)} "
          f"({args.method} generation)")

    t0 = time.time()
    result = translate(model, audio, targets, rate, args.chunk, args.overlap, args.temperature, args.method,
                       device, args.seed)
    synchronize(device)
    seconds = time.time() - t0
    total = len(audio) * len(targets)
    print(f"generated {total:,} samples in {seconds:.2f} s: {total / seconds:,.0f} samples/s, "
          f"real-time factor {total / rate / seconds:.2f} (above 1 is faster than real time)")
    centres = ckpt.get("timbre_centres")  # the timbre judge of the built-in instruments, if training had one
    timbre = TimbreClassifier(domains, centres.cpu().numpy(), rate) if centres is not None else None
    if ckpt.get("judge"):  # recordings: the judge learnt from the training clips
        judge = InstrumentJudge(domains, rate)
        judge.load_state_dict(ckpt["judge"])
        timbre = judge.hears
    show(audio, result, domains, rate, timbre, args.show)
    print("listen in this order:")
    print(f"  {source}  (the input)")
    for t, path in outputs.items():
        write_wav(path, result[t], rate)
        print(f"  {path}  (the input played by the {domains[t]} decoder)")


if __name__ == "__main__":
    main()
