"""Universal Music Translation Network: one encoder, one WaveNet decoder per instrument.

"A Universal Music Translation Network" (Mor, Wolf, Polyak and Taigman, ICLR 2019): a shared
non-causal WaveNet-style encoder turns audio into a slow latent code; a domain-confusion
classifier is trained to tell the instrument from that code while the encoder learns to hide
it (adversarially, sec. 3.2), so the code keeps what is played but not what plays it; one
autoregressive WaveNet decoder per instrument turns a code back into that instrument's audio.
Translation: encode any input, decode with the target instrument's decoder.

    python umtn/train.py                        # three synthesised instruments: pluck, organ, reed
    python umtn/train.py --data medley          # one sub-folder of .wav files per instrument
    python umtn/train.py --data bach/train --test-data bach/test   # held-out clips from their own folder
    torchrun --nproc_per_node=2 umtn/train.py   # DistributedDataParallel: Gloo on CPU, NCCL on CUDA
    python umtn/sample.py input.wav --to organ --out out.wav

Audio is 8-bit mu-law (256 classes); the decoders are trained by teacher forcing with a
softmax over the next sample's class, reported in bits per sample (8 is a uniform guess).
On the built-in data every melody is rendered by every instrument, so the true translation
of a held-out melody is known, and the end of training scores every translation against the
written notes (raw pitch accuracy), a timbre classifier (does it sound like the target?) and
the true rendering (log-mel distance), beside a topline (the target's decoder on the code of
the true target rendering) and two baselines (the untranslated input; the code of silence).
On recordings the same report scores pitch against each clip's notes (NAME.csv beside
NAME.wav: onset_s,offset_s,midi) or, without them, against the clip's own f0, and timbre by a
judge learnt from the training clips. umtn/README.md shows what a working run prints.
"""
import argparse
import csv
import math
from collections import deque
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.io import wavfile
from scipy.ndimage import maximum_filter1d
from scipy.signal import lfilter, resample, resample_poly
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import (autocast, get_device, precision_for, precision_name, seed_everything, synchronize,
                    torchrun_device)

MU = 255  # 8-bit mu-law: 256 classes
DOMAINS = ("pluck", "organ", "reed")


def fail(message):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- model


class Encoder(nn.Module):
    """Non-causal dilated residual convolutions (kernel 3, dilation 2^i, ReLU, 1x1), a 1x1 down to
    the latent channels, average-pooled in time (Mor et al. sec. 3.1; the reference's encoder);
    with level_norm, what it reads is first divided by its own loudness."""

    def __init__(self, channels, blocks, layers, latent, pool, level_norm=False):
        super().__init__()
        self.pool, self.level_norm = pool, level_norm
        self.inp = nn.Conv1d(1, channels, 3, padding=1)
        self.dilated = nn.ModuleList(nn.Conv1d(channels, channels, 3, dilation=2 ** i, padding=2 ** i)
                                     for _ in range(blocks) for i in range(layers))
        self.mix = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in range(blocks * layers))
        self.out = nn.Conv1d(channels, latent, 1)

    def forward(self, audio):  # (B, T) in [-1, 1]
        x = audio.unsqueeze(1)  # (B, 1, T)
        if self.level_norm:  # the input divided by its loudness over four latent frames (32 ms at the
            # defaults): how a note swells or dies away, by which the instrument could be told, is then
            # not in what the encoder sees; 1e-3 (60 dB down) keeps silence silent
            window = 4 * self.pool - 1
            rms = F.avg_pool1d(x * x, window, stride=1, padding=window // 2, count_include_pad=False).sqrt()
            x = 0.3 * x / (rms + 1e-3)  # (B, 1, T), about 0.3 RMS wherever something plays
        x = self.inp(x)  # (B, C, T)
        for dilated, mix in zip(self.dilated, self.mix):
            x = x + mix(F.relu(dilated(F.relu(x))))
        return F.avg_pool1d(self.out(x), self.pool)  # (B, L, T / pool)


class PitchEncoder(nn.Module):
    """The instruments recipe's shared encoder: no weights, it measures what the learned code should
    hold, the input's pitch and loudness per latent frame (as DDSP conditions its synthesiser, Engel
    et al. 2020): the pitch as a soft one-hot over MIDI 36-95, C2-B6 (a Gaussian half a semitone wide
    around the tracked f0, zero where unvoiced), log2(f0 / 220 Hz), voiced or not, and the log RMS.
    With the pitch given as one of 60 inputs, a decoder plays it by selecting, not by decoding a
    number. No weights, so domain confusion has nothing to train: the domain classifier's loss only
    shows how much of the instrument the pitch and the loudness give away."""

    channels = 63  # 60 notes, log f0, voiced, loudness

    def __init__(self, pool, rate):
        super().__init__()
        self.pool, self.rate = pool, rate

    def forward(self, audio, f0=None):
        """audio (B, T); f0 (B, T) the tracked f0 at every sample (Hz, 0 unvoiced), found here when
        not given (training passes it, tracked once per clip) -> (B, 63, T / pool)."""
        if f0 is None:
            tracks = [f0_per_sample(x, self.rate) for x in audio.float().cpu().numpy()]
            f0 = torch.from_numpy(np.stack(tracks)).to(audio.device)
        B, T = audio.shape
        L = T // self.pool
        f = f0[:, self.pool // 2::self.pool][:, :L].float()  # (B, L): at each frame's centre
        voiced = (f > 0).float()
        midi = 69 + 12 * torch.log2(f.clamp(min=1) / 440)
        bins = torch.arange(36, 96, device=audio.device, dtype=torch.float32)[:, None]  # (60, 1)
        one_hot = torch.exp(-0.5 * ((midi[:, None] - bins) / 0.5) ** 2) * voiced[:, None]  # (B, 60, L)
        log_f0 = torch.log2(f.clamp(min=1) / 220) * voiced
        return torch.cat([one_hot, log_f0[:, None], voiced[:, None], self.loudness(audio)[:, None]], 1)

    def loudness(self, audio):
        """(B, T) -> (B, T / pool): the log RMS of every latent frame, -2 (silence) to 0 (full scale)."""
        B, L = len(audio), audio.shape[1] // self.pool
        rms = audio[:, :L * self.pool].float().reshape(B, L, self.pool).pow(2).mean(2).sqrt()
        return torch.log10(rms + 1e-4) / 2


LEVELS = tuple(k / 20 for k in range(21))  # the quantiles that describe a loudness distribution


class DomainClassifier(nn.Module):
    """Names the domain from the latent: dropout on the latent (the reference's
    --p-dropout-discriminator), three convolutions with ELU, a 1x1 to the domains, logits averaged
    over time (the reference's domain confusion network). kernel=1 sees one frame at a time, as the
    reference does; a wider kernel sees how the code evolves over neighbouring frames."""

    def __init__(self, latent, channels, domains, kernel=1, dropout=0.0):
        super().__init__()
        conv = lambda c_in: nn.Conv1d(c_in, channels, kernel, padding=kernel // 2)
        self.net = nn.Sequential(nn.Dropout(dropout), conv(latent), nn.ELU(), conv(channels), nn.ELU(),
                                 conv(channels), nn.ELU(), nn.Conv1d(channels, domains, 1))

    def forward(self, z):  # (B, L, F)
        return self.net(z).mean(2)  # (B, domains)


class WaveNet(nn.Module):
    """A causal WaveNet decoder (van den Oord et al. 2016): embedded previous samples, blocks of
    dilated kernel-2 convolutions with gated tanh * sigmoid units, residual and skip 1x1s; the
    latent is added to every layer and the output head through 1x1 convolutions.

    Written channels-last, (B, T, C): a 1x1 convolution is then an nn.Linear, and a kernel-2
    convolution with dilation d is one product x -> [W0 x, W1 x] whose first half is used d
    steps later: h_t = W0 x_{t-d} + W1 x_t + b. On a CPU these large matrix products run several
    times faster than Conv1d with 32 channels."""

    def __init__(self, channels, skip, blocks, layers, latent, pool):
        super().__init__()
        self.pool, self.channels, self.skip = pool, channels, skip
        self.dilations = [2 ** i for _ in range(blocks) for i in range(layers)]
        n = len(self.dilations)
        self.embed = nn.Embedding(MU + 1, channels)  # the same as one-hot input into a 1x1 convolution
        # [W0; W1] of each kernel-2 convolution
        self.dilated = nn.ModuleList(nn.Linear(channels, 4 * channels) for _ in range(n))
        self.res_skip = nn.ModuleList(nn.Linear(channels, channels + skip) for _ in range(n))
        # every layer's conditioning (and the head's) in one 1x1
        self.cond = nn.Linear(latent, n * 2 * channels + skip)
        self.head1 = nn.Linear(skip, skip)
        self.head2 = nn.Linear(skip, MU + 1)

    def receptive_field(self):
        return sum(self.dilations) + 1

    def conditioning(self, z):
        """Project the latent once per frame, not once per sample: a 1x1 convolution commutes with
        repeating frames in time. z (B, L, F) -> per-layer [(B, F, 2C)] and the head's (B, F, S)."""
        c = self.cond(z.transpose(1, 2))
        return list(c[..., :-self.skip].split(2 * self.channels, -1)), c[..., -self.skip:]

    def forward(self, prev, z):
        """Teacher forcing. prev (B, T): the class of the sample before each position; z (B, L, T / pool).
        Returns logits (B, T, 256) for each position's class, each seeing only earlier samples."""
        B, T = prev.shape
        F_ = T // self.pool
        layer_cond, head_cond = self.conditioning(z)
        x = self.embed(prev)  # (B, T, C)
        skip = 0
        for dilated, res_skip, c, d in zip(self.dilated, self.res_skip, layer_cond, self.dilations):
            w0x, w1x = dilated(x).chunk(2, -1)  # (B, T, 2C) each: W0 x + b0, W1 x + b1
            # causal: W0 x_{t-d} + b0, where before the start x is zero (a convolution's left padding),
            # leaving b0
            start = dilated.bias[:2 * self.channels].expand(B, min(d, T), -1)
            h = w1x + torch.cat([start, w0x[:, :max(T - d, 0)]], 1)
            # the frame's conditioning, broadcast over its samples
            h = (h.view(B, F_, self.pool, -1) + c[:, :, None]).view(B, T, -1)
            a, b = h.chunk(2, -1)
            out = res_skip(torch.tanh(a) * torch.sigmoid(b))  # gated unit (van den Oord et al. 2016, eq. 2)
            x = x + out[..., :self.channels]
            skip = skip + out[..., self.channels:]
        h = self.head1(F.relu(skip)).view(B, F_, self.pool, -1) + head_cond[:, :, None]
        return self.head2(F.relu(h.view(B, T, -1)))


class UMTN(nn.Module):
    """The shared encoder and one WaveNet decoder per domain; the domain classifier is kept apart
    (it has its own optimizer and objective)."""

    def __init__(self, domains, enc_channels=32, enc_blocks=2, enc_layers=8, latent=16, pool=32,
                 dec_channels=32, skip_channels=32, dec_blocks=2, dec_layers=6, level_norm=False,
                 encoder="learned", rate=4000):
        super().__init__()
        if encoder == "pitch":  # the instruments recipe: the code is measured, not learned
            self.encoder, latent = PitchEncoder(pool, rate), PitchEncoder.channels
            # each decoder's training loudness, at the quantiles LEVELS: translation moves an input's
            # loudness onto its target's (match_loudness)
            self.register_buffer("loudness", torch.zeros(len(domains), len(LEVELS)))
        else:
            self.encoder = Encoder(enc_channels, enc_blocks, enc_layers, latent, pool, level_norm)
        self.latent = latent
        decoder = lambda: WaveNet(dec_channels, skip_channels, dec_blocks, dec_layers, latent, pool)
        self.decoders = nn.ModuleList(decoder() for _ in domains)  # one per instrument

    def encode(self, audio, f0=None):
        """The code the decoders read: (B, T) -> (B, L, T / pool); f0 only for the pitch encoder."""
        return self.encoder(audio) if f0 is None else self.encoder(audio, f0)

    def match_loudness(self, z, target):
        """The code a target's decoder translates from, z (B, L, F) -> (B, L, F). For the pitch encoder,
        each item's loudness over its voiced frames is moved and scaled so that its 10th and 90th
        percentiles land on those the target's decoder trained on: a recording with a wider range of
        levels than the training clips (a real violin's bow changes, a room's reverberation) would
        otherwise ask the decoder for levels it never heard (DDSP's timbre transfer adjusts the
        loudness the same way, Engel et al. 2020). A straight line, not a quantile map: a two-second
        clip has too few frames to reshape the whole distribution. The learned code is left as it is."""
        if not isinstance(self.encoder, PitchEncoder):
            return z
        z, ref = z.clone(), self.loudness[target, [2, 18]]  # LEVELS 0.1 and 0.9
        for item in z:  # a handful of items: each with its own voiced frames
            voiced = item[-2] > 0
            if voiced.sum() > 1:
                levels = item[-1, voiced]
                # the percentiles on the host: not every device has torch.quantile
                low, high = torch.quantile(levels.float().cpu(), torch.tensor([0.1, 0.9])).tolist()
                item[-1, voiced] = ref[0] + (levels - low) * (ref[1] - ref[0]) / max(high - low, 1e-3)
        return z

    def forward(self, audio_in, prev, target, domain, f0=None):
        """audio_in (B, T) the (augmented) input, prev (B, T) the classes shifted right, target (B, T)
        the classes to predict, domain (B,) on the host, f0 (B, T) the pitch encoder's tracked f0 ->
        the reconstruction loss (nats per sample), each item through its own domain's decoder, and the
        latent (B, L, F)."""
        z = self.encode(audio_in, f0)
        loss = 0
        for d, decoder in enumerate(self.decoders):
            # the items of domain d, found on the host: nonzero() of a GPU tensor would wait for the GPU
            idx = (domain.cpu() == d).nonzero().squeeze(1).to(z.device, non_blocking=True)
            logits = decoder(prev[idx], z[idx])  # (b, T, 256)
            loss = loss + F.cross_entropy(logits.flatten(0, 1).float(), target[idx].flatten(),
                                          reduction="sum")
        return loss / target.numel(), z


# ----------------------------------------------------------------------------- generation


def gumbel_noise(shape, n, seed, dtype, device, block=512):
    """Gumbel noise for sampling, block by block: (t, K, B, 256) for t steps at a time, drawn on
    the device in the model's dtype from one seeded generator, so that every path that asks in
    the same order (fast and naive generation) gets the same numbers."""
    g = torch.Generator(device=device).manual_seed(seed)
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    for t0 in range(0, n, block):
        u = torch.rand((min(block, n - t0),) + shape + (MU + 1,), generator=g, dtype=dtype, device=device)
        yield -torch.log(-torch.log(u.clamp_(tiny, 1 - eps)))


def generate(decoders, z, n, temperature=1.0, seed=0, method="fast"):
    """Sample n samples autoregressively: decoders[k] continues the latents z[k], for z of shape
    (K, B, L, F >= n / pool). Returns classes (K, B, n). Three ways that draw the same samples:
    "plain", the Fast WaveNet algorithm as the paper writes it (read it first); "fast", the same
    algorithm fused for speed (the default); "naive", the whole receptive field recomputed for
    every sample. Sampling is Gumbel-max: the argmax of logits / temperature plus Gumbel noise is
    an exact draw from the softmax, and every method uses the same noise."""
    return {"plain": generate_plain, "fast": generate_fast,
            "naive": generate_naive}[method](decoders, z, n, temperature, seed)


@torch.inference_mode()
def generate_plain(decoders, z, n, temperature=1.0, seed=0, block=512):
    """Fast WaveNet generation (Paine et al. 2016, "Fast Wavenet Generation Algorithm"). A dilated
    kernel-2 layer needs its input of d steps ago, so each layer keeps a queue of its last d inputs:
    at every step it pops the oldest (x_{t-d}), pushes the new one (x_t), and computes only this
    step's output. A step then costs one small product per layer, not the whole receptive field."""
    K, B = z.shape[:2]
    noise = gumbel_noise((K, B), n, seed, z.dtype, z.device, block)
    out = torch.empty(K, B, n, dtype=torch.long, device=z.device)
    prev = torch.full((K, B), MU // 2 + 1, dtype=torch.long, device=z.device)  # the class of silence
    # per latent frame: [(B, F, 2C)], (B, F, S)
    conds = [dec.conditioning(z[k]) for k, dec in enumerate(decoders)]
    # before the start every layer's input is zero, as the convolution's left padding is in training
    queues = [[deque(z.new_zeros(B, dec.channels) for _ in range(d)) for d in dec.dilations]
              for dec in decoders]
    for t in range(n):
        if t % block == 0:
            gumbel = next(noise)  # (block, K, B, 256)
        logits = []
        for dec, (layer_cond, head_cond), queue in zip(decoders, conds, queues):
            f, C = t // dec.pool, dec.channels
            x = dec.embed(prev[len(logits)])  # (B, C): the previous sample
            skip = 0
            for dilated, res_skip, q, c in zip(dec.dilated, dec.res_skip, queue, layer_cond):
                past = q.popleft()  # this layer's input d steps ago ...
                q.append(x)  # ... and now's, popped again d steps later
                w0, w1 = dilated.weight.chunk(2)  # the two taps of the kernel-2 convolution
                b0, b1 = dilated.bias.chunk(2)
                # (B, 2C), with the frame's conditioning
                h = F.linear(past, w0, b0) + F.linear(x, w1, b1) + c[:, f]
                a, g = h.chunk(2, -1)
                o = res_skip(torch.tanh(a) * torch.sigmoid(g))  # gated unit, then the residual and skip 1x1s
                x, skip = x + o[:, :C], skip + o[:, C:]
            logits.append(dec.head2(F.relu(dec.head1(F.relu(skip)) + head_cond[:, f])))  # (B, 256)
        prev = out[:, :, t] = (torch.stack(logits) / temperature + gumbel[t % block]).argmax(-1)  # Gumbel-max
    return out


@torch.inference_mode()
def generate_naive(decoders, z, n, temperature=1.0, seed=0, block=512):
    """The reference for both: for every sample, the decoder's plain forward over the last
    receptive-field samples; only its last output is used."""
    K, B, device = z.shape[0], z.shape[1], z.device
    noise = gumbel_noise((K, B), n, seed, z.dtype, device, block)
    out = torch.empty(K, B, n, dtype=torch.long, device=device)
    R, pool = decoders[0].receptive_field(), decoders[0].pool
    # silence, then everything drawn
    history = torch.full((K, B, 1), MU // 2 + 1, dtype=torch.long, device=device)
    for t in range(n):
        if t % block == 0:
            gumbel = next(noise)
        # the last output depends on these alone; before sample 0, zeros as in training
        window = history[:, :, -R:]
        frames = torch.arange(t + 1 - window.shape[2], t + 1, device=device) // pool
        logits = []
        for k, decoder in enumerate(decoders):
            decoder.pool = 1  # the latent frame of each position, given per sample
            try:
                logits.append(decoder(window[k], z[k][:, :, frames])[:, -1])
            finally:
                decoder.pool = pool
        out[:, :, t] = (torch.stack(logits) / temperature + gumbel[t % block]).argmax(-1)
        history = torch.cat([history, out[:, :, t:t + 1]], 2)
    return out


# ----------------------------------------------------------------------------- fast generation, fused
# generate_plain's algorithm with the operations fused: the same samples (the tests check), faster.


@torch.inference_mode()
def generate_fast(decoders, z, n, temperature=1.0, seed=0, block=512):
    """generate_plain's algorithm for speed: the conditioning and the biases folded in once per
    latent frame, the K decoders' weights stacked so that one batched product serves every
    decoder, clip and chunk, every layer's queue kept in one ring buffer read and written at once,
    and every buffer allocated once and written in place."""
    K, B, device = z.shape[0], z.shape[1], z.device
    noise = gumbel_noise((K, B), n, seed, z.dtype, device, block)
    prev = torch.full((K, B), MU // 2 + 1, dtype=torch.long, device=device)  # the class of silence
    if device.type == "cpu" and decoders[0].channels <= 64 and torch.get_num_threads() > 1:
        # Products this small finish before a second thread has started, so one thread is faster
        # (at 128 channels two threads win: the weights no longer fit in one core's cache).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return generate_fast(decoders, z, n, temperature, seed, block)
        finally:
            torch.set_num_threads(threads)

    # At batch 1 a step is a few hundred tiny operations, so their count decides the speed, each
    # costing about what its dispatch costs: every buffer is allocated once and written with out=, no tensor
    # is sliced inside the loop, and the work that does not depend on the previous layer is done for
    # all layers at once. Per layer there are four operations: the kernel-2 product, tanh, the
    # gate, and the residual.
    dec = decoders[0]
    C, pool, L = dec.channels, dec.pool, len(dec.dilations)
    dt = dict(device=device, dtype=z.dtype)
    half = torch.cat([torch.ones(C), torch.full((C,), 0.5)]).to(**dt)  # sigmoid(g) = (1 + tanh(g / 2)) / 2
    # (L, K, ...)
    per = lambda get: torch.stack([torch.stack([get(d, l) for d in decoders]) for l in range(L)])
    # h = W1 x_t + [W0 x_{t-d} + b + conditioning]: the bracket comes from the queue and the frame, the
    # gate half of everything halved so that one tanh serves both halves
    W1 = per(lambda d, l: d.dilated[l].weight[2 * C:].t() * half)  # (L, K, C, 2C)
    W0 = per(lambda d, l: d.dilated[l].weight[:2 * C].t() * half).view(L * K, C, 2 * C)
    bias = per(lambda d, l: d.dilated[l].bias[:2 * C] + d.dilated[l].bias[2 * C:])  # (L, K, 2C)
    conds = [d.conditioning(z[k]) for k, d in enumerate(decoders)]  # projected once per frame
    # (L, K, B, F, 2C)
    frame_bias = ((torch.stack([torch.stack(c[0]) for c in conds], 1) + bias[:, :, None, None]) * half)
    frame_bias = frame_bias.permute(3, 0, 1, 2, 4).contiguous()  # (F, L, K, B, 2C): one frame is one block
    head_bias = torch.stack([d.head1.bias for d in decoders])[:, None, None]  # (K, 1, 1, S)
    # (F, K, B, S)
    head_frame = (torch.stack([c[1] for c in conds]) + head_bias).permute(2, 0, 1, 3).contiguous()
    # tanh(a) * sigmoid(g) = (t_a + t_a * t_g) / 2, the / 2 folded into the next products. Each gate
    # output carries a constant 1 in an extra column, so the products below add their biases too.
    # (L, K, C + 1, C)
    Wr = per(lambda d, l: torch.cat([d.res_skip[l].weight[:C].t() / 2, d.res_skip[l].bias[None, :C]]))
    Ws = torch.stack([torch.cat([torch.cat([d.res_skip[l].weight[C:].t() / 2, d.res_skip[l].bias[None, C:]])
                                 for l in range(L)])
                      for d in decoders])  # (K, L (C + 1), S): every layer's skip at once
    H1 = torch.stack([d.head1.weight.t() for d in decoders])
    # logits already divided by the temperature
    H2 = torch.stack([d.head2.weight.t() for d in decoders]) / temperature
    b2 = torch.stack([d.head2.bias for d in decoders])[:, None] / temperature
    embed = torch.stack([d.embed.weight for d in decoders]).view(K * (MU + 1), C)
    # buffers
    X = torch.empty(L + 1, K, B, C, **dt)  # X[l]: the input of layer l at this step
    pre = torch.empty(L, K, B, 2 * C, **dt)
    H = torch.empty(L, K, B, 2 * C, **dt)
    G = torch.ones(K, B, L, C + 1, **dt)  # gate outputs, with the constant-1 column
    W0x = torch.empty(L * K, B, 2 * C, **dt)
    # one ring buffer per layer, end to end
    offsets = torch.tensor([0] + dec.dilations[:-1], device=device).cumsum(0)
    period = max(dec.dilations)  # every t % d repeats with this period: the ring rows of step t, tabled once
    dilations = torch.tensor(dec.dilations, device=device)
    slots = torch.arange(period, device=device)[:, None] % dilations + offsets  # (period, L)
    # W0 x of the last d steps: zero before the start
    ring = torch.zeros(sum(dec.dilations), K, B, 2 * C, **dt)
    vocab_offset = (torch.arange(K, device=device) * (MU + 1))[:, None]
    views = [(X[l], pre[l], H[l], H[l][..., :C], H[l][..., C:], G[:, :, l, :C], G[:, :, l], W1[l], Wr[l],
              X[l + 1]) for l in range(L)]
    views[-1] = views[-1][:-2] + (None, None)  # the last layer's residual output is never used
    X0, Xall = X[0].view(K * B, C), X[:L].view(L * K, B, C)
    W0x_rows, G_flat = W0x.view(L, K, B, 2 * C), G.view(K, B, L * (C + 1))
    index = torch.empty(K, B, dtype=torch.long, device=device)
    drawn = torch.empty(n, K, B, dtype=torch.long, device=device)
    for t in range(n):
        f = t // pool
        if t % block == 0:
            gumbel = next(noise)  # (block, K, B, 256)
        torch.index_select(ring, 0, slots[t % period], out=pre)  # every layer's W0 x_{t-d} at once
        pre += frame_bias[f]
        torch.add(prev, vocab_offset, out=index)
        # each decoder's embedding of its previous sample
        torch.index_select(embed, 0, index.view(-1), out=X0)
        for x, p, h, ha, hg, g, g1, w1, wr, x_next in views:
            torch.baddbmm(p, x, w1, out=h)  # (K, B, 2C)
            h.tanh_()
            torch.addcmul(ha, ha, hg, out=g)  # gated unit
            if wr is not None:
                torch.baddbmm(x, g1, wr, out=x_next)  # x + residual
        torch.bmm(Xall, W0, out=W0x)  # every layer's W0 x_t at once ...
        ring.index_copy_(0, slots[t % period], W0x_rows)  # ... read again d steps later
        skip = torch.bmm(G_flat, Ws)  # (K, B, S)
        h = torch.baddbmm(head_frame[f], skip.relu_(), H1).relu_()
        logits = torch.baddbmm(b2, h, H2).add_(gumbel[t % block])  # already divided by the temperature
        prev = drawn[t] = logits.argmax(-1)  # Gumbel-max: a draw from softmax(logits / temperature)
    return drawn.permute(1, 2, 0)


# ----------------------------------------------------------------------------- audio in and out


def read_wav(path, rate):
    """Any common WAV (8/16/24/32-bit integer, 32/64-bit float, mono or stereo, any rate) as
    float32 mono in [-1, 1] at `rate`; ValueError with the reason when it cannot be used."""
    try:
        file_rate, x = wavfile.read(path)
    except Exception as e:  # scipy raises ValueError, EOFError, struct.error... on bad files
        raise ValueError(f"not a readable WAV file ({type(e).__name__}: {str(e)[:60]})") from None
    if x.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        x = (x.astype(np.float32) - 128) / 128
    elif x.dtype.kind == "i":  # 16-bit; 24-bit arrives left-justified in int32, as 32-bit does
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    else:
        x = x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(1)  # mix to mono
    if len(x) == 0:
        raise ValueError("empty (no samples)")
    if np.abs(x).max() < 1e-4:
        raise ValueError("silent")
    if file_rate != rate:
        g = math.gcd(file_rate, rate)
        # polyphase, with an anti-alias filter
        x = resample_poly(x, rate // g, file_rate // g).astype(np.float32)
    return np.clip(x, -1, 1)


def write_wav(path, x, rate):
    """16-bit PCM, written to a temporary file and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    wavfile.write(tmp, rate, (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype(np.int16))
    os.replace(tmp, path)


def mu_law_encode(x):
    """[-1, 1] -> classes 0..255 (ITU-T G.711 mu-law, mu = 255): finer steps near silence."""
    y = torch.sign(x) * torch.log1p(MU * x.abs()) / math.log1p(MU)
    return ((y + 1) / 2 * MU + 0.5).long().clamp(0, MU)


def mu_law_decode(q):
    """Classes 0..255 -> [-1, 1], the inverse of mu_law_encode up to its quantisation."""
    y = 2 * q.float() / MU - 1
    return torch.sign(y) * ((1 + MU) ** y.abs() - 1) / MU


def read_notes(path, rate):
    """A clip's notes from NAME.csv beside NAME.wav: a header naming onset_s, offset_s and midi, then
    one note per row (seconds, seconds, MIDI number) -> [(start, length, pitch)] in samples at
    `rate`, the format of the built-in scores. A bad row stops the script with one line naming the
    file and the row (the header is row 1, as a spreadsheet counts)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    missing = [c for c in ("onset_s", "offset_s", "midi") if c not in header]
    if missing:
        fail(f"{path} row 1: the header lacks {', '.join(missing)}: write onset_s,offset_s,midi")
    columns = [header.index(c) for c in ("onset_s", "offset_s", "midi")]
    notes = []
    for k, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # a blank line
        try:
            onset, offset, midi = (float(row[c]) for c in columns)
        except IndexError:
            fail(f"{path} row {k}: {len(row)} columns, the header names {len(header)}")
        except ValueError:
            fail(f"{path} row {k}: onset_s, offset_s and midi must be numbers, not {','.join(row)!r}")
        if not (math.isfinite(onset) and onset >= 0 and offset >= onset and 0 < midi < 128):
            fail(f"{path} row {k}: a note needs 0 <= onset_s <= offset_s and a MIDI number from 1 to 127, "
                 f"not {','.join(row)!r}")
        if offset > onset:  # a note of no length (an automatic alignment writes some) sounds nowhere
            notes.append((round(onset * rate), round((offset - onset) * rate), midi))
    return notes


def folder_audio(data, rate):
    """{domain: [clip, ...]} from DIR/<domain>/*.wav, and {domain: [notes or None, ...]} from the
    NAME.csv beside each NAME.wav where there is one (see read_notes); unreadable WAV files are
    skipped with a warning."""
    root = Path(data)
    if not root.is_dir():
        fail(f"--data {data} is not a folder: give a folder with one sub-folder of .wav files per domain")
    out, scores = {}, {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        clips, notes = [], []
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav"):
            try:
                clips.append(read_wav(path, rate))
            except ValueError as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
                continue
            score = path.with_suffix(".csv")
            notes.append(read_notes(score, rate) if score.is_file() else None)
        if len(clips) >= 2:
            out[folder.name], scores[folder.name] = clips, notes
        else:
            print(f"warning: skipping domain {folder.name}: it needs at least 2 readable .wav files (train "
                  "and test)", file=sys.stderr)
    if len(out) < 2:
        fail(f"--data {data} has {len(out)} usable domain(s): need at least 2 sub-folders of .wav files")
    return out, scores


def level(clip, rms):
    """The clip scaled to the given RMS, clipped to [-1, 1]."""
    return np.clip(clip * rms / max(1e-4, float(np.sqrt(np.mean(clip ** 2)))), -1, 1).astype(np.float32)


def load_audio(args, say):
    """The training and held-out clips per domain, {domain: [(T,) float32]}, and their scores: the
    melodies' notes on the built-in data (a list shared by every domain), else each clip's notes from
    its NAME.csv or None ({domain: [notes or None]}); the training scores only on the built-in data."""
    train, test, train_scores = {}, {}, None
    if args.data == "builtin":  # the last --eval-melodies melodies are held out, with their scores
        audio, tunes = builtin_audio(args.melodies + args.eval_melodies, args.seconds, args.rate, args.seed)
        train = {d: clips[:args.melodies] for d, clips in audio.items()}
        test = {d: clips[args.melodies:] for d, clips in audio.items()}
        train_scores, test_scores = tunes[:args.melodies], tunes[args.melodies:]
    else:
        audio, notes = folder_audio(args.data, args.rate)
        if args.test_data:
            test, test_scores = folder_audio(args.test_data, args.rate)
            if sorted(test) != sorted(audio):
                fail(f"--test-data {args.test_data} holds {', '.join(sorted(test))}, but --data holds "
                     f"{', '.join(sorted(audio))}: give both the same sub-folders")
            train, test, test_scores = audio, {d: test[d] for d in audio}, {d: test_scores[d] for d in audio}
        else:
            test_scores = {}
            for d, clips in audio.items():
                order = list(range(len(clips)))
                random.Random(args.seed).shuffle(order)
                n_test = max(1, round(args.test_frac * len(clips)))
                test[d], train[d] = [clips[i] for i in order[:n_test]], [clips[i] for i in order[n_test:]]
                test_scores[d] = [notes[d][i] for i in order[:n_test]]
    if args.clip_rms:  # every clip at one level: recordings differ by the microphone, not the music
        train, test = ({d: [level(c, args.clip_rms) for c in clips] for d, clips in part.items()}
                       for part in (train, test))
    domains = list(train)
    if args.batch_size < len(domains):
        fail(f"--batch-size {args.batch_size} is smaller than the {len(domains)} domains: every batch needs "
             "one segment of each")
    for d in domains:
        if min(len(c) for c in train[d]) < args.segment + 1:
            train[d] = [c for c in train[d] if len(c) > args.segment]
            if not train[d]:
                fail(f"domain {d}: every training clip is shorter than --segment {args.segment} samples")
    say(f"data: {', '.join(f'{d} {len(train[d])} train / {len(test[d])} test clips' for d in domains)}; "
        f"{args.rate} Hz")
    return train, test, train_scores, test_scores


# ----------------------------------------------------------------------------- training


def augment(audio, generator):
    """Pitch augmentation (Mor et al. sec. 3.3): a random 1/4 to 1/2 of each segment is shifted by
    up to +-0.5 semitone, so the encoder cannot memorise exact pitch and timbre. The shift is a
    resampling: `span` = n * ratio samples of the input are played in n samples, which multiplies
    every frequency by the ratio and leaves no gap. audio (B, T) on any device; the random choices
    are drawn on the host from `generator`, the resampling is done for the whole batch at once as
    linear interpolation (F.interpolate's, align_corners=False)."""
    B, T = audio.shape
    u = torch.rand(B, 3, generator=generator, dtype=torch.float64)
    n = (T * (0.25 + 0.25 * u[:, 0])).long()  # (B,) samples shifted
    span = (n * 2 ** ((u[:, 1] - 0.5) / 12)).round().long().clamp(max=T)  # (B,) samples of input they play
    start = (u[:, 2] * (T - torch.maximum(n, span) + 1)).long()
    n, span, start = (v.to(audio.device, non_blocking=True)[:, None] for v in (n, span, start))
    j = torch.arange(T, device=audio.device)[None] - start  # (B, T) position inside the shifted part
    src = ((j + 0.5) * (span / n) - 0.5).clamp(min=0)  # where in the input each output sample lies
    i0 = src.long().clamp(max=span - 1)
    frac = (src - i0).to(audio.dtype)
    i1 = (i0 + 1).clamp(max=span - 1)
    at = lambda i: audio.gather(1, (start + i).clamp(0, T - 1))
    shifted = at(i0) * (1 - frac) + at(i1) * frac
    return torch.where((j >= 0) & (j < n), shifted, audio)


def played_higher(clip, semitones, f0=None):
    """A clip played `semitones` higher: resampled by the ratio (band-limited, by the FFT: nothing
    folds back below the Nyquist frequency), so it is shorter by that ratio too; with its per-sample
    f0, also that f0 moved with it."""
    ratio = 2 ** (semitones / 12)
    n = int(len(clip) / ratio)
    higher = resample(clip, n).astype(np.float32)
    if f0 is None:
        return higher
    i = np.minimum(np.rint(np.arange(n) * ratio).astype(int), len(clip) - 1)
    return higher, (f0[i] * ratio).astype(np.float32)


class SegmentPool:
    """All training audio as one tensor on the device; a batch is one random segment of a random
    clip per item, of that item's domain, cut out with one gather (no DataLoader, no copies).

    For the pitch encoder (rate given) every clip's f0 is tracked once and kept beside its samples,
    and `loudness` holds each domain's loudness quantiles (LEVELS) over its voiced latent frames of
    `pool` samples. With `register`, every clip is also played 4, 8, ... up to that many semitones
    higher (played_higher), so that each decoder learns the notes above its instrument's lines; the
    clips as recorded are drawn as often as all their copies together."""

    def __init__(self, clips_by_domain, segment, device, rate=None, pool=32, register=0):
        shifts = range(4, int(register) + 1, 4)
        clips, f0s, picks, self.loudness = [], [], [], []
        for d, own in clips_by_domain.items():
            first = len(clips)
            own_f0 = [f0_per_sample(c, rate) if rate else np.zeros(0, np.float32) for c in own]
            clips += own
            f0s += own_f0
            picks.append(list(range(first, len(clips))) * max(1, len(shifts)))
            for c, f in zip(own, own_f0):
                for s in shifts:
                    higher, f_higher = played_higher(c, s, f)
                    if len(higher) > segment:  # a copy is shorter than its clip
                        picks[-1].append(len(clips))
                        clips.append(higher)
                        f0s.append(f_higher)
            if rate:  # as PitchEncoder measures them: voiced where the frame's centre has an f0
                frames = [PitchEncoder(pool, rate).loudness(torch.from_numpy(c[None]))[0] for c in own]
                voiced = [torch.from_numpy(f[pool // 2::pool][:len(x)] > 0) for f, x in zip(own_f0, frames)]
                levels = torch.cat([x[v] for x, v in zip(frames, voiced)])
                self.loudness.append(torch.quantile(levels, torch.tensor(LEVELS)))
        self.audio = torch.from_numpy(np.concatenate(clips)).to(device)
        self.f0 = torch.from_numpy(np.concatenate(f0s)).to(device) if rate else None
        self.clip_len = torch.tensor([len(c) for c in clips])
        self.clip_start = self.clip_len.cumsum(0) - self.clip_len
        # each domain's clips to draw from, the clips as recorded repeated: (picks,), (D,), (D,)
        self.picks = torch.tensor([i for p in picks for i in p])
        self.n_clips = torch.tensor([len(p) for p in picks])
        self.first_clip = self.n_clips.cumsum(0) - self.n_clips
        self.segment, self.offsets = segment, torch.arange(segment + 1, device=device)

    def batch(self, domain_of, generator):
        """domain_of (B,) -> (B, segment + 1) samples, and their f0 (B, segment + 1) or None; the
        positions are drawn on the host."""
        B = len(domain_of)
        u = torch.rand(B, generator=generator)
        clip = self.picks[self.first_clip[domain_of] + (u * self.n_clips[domain_of]).long()]
        u = torch.rand(B, generator=generator)
        start = self.clip_start[clip] + (u * (self.clip_len[clip] - self.segment)).long()
        idx = start.to(self.audio.device, non_blocking=True)[:, None] + self.offsets
        return self.audio[idx], None if self.f0 is None else self.f0[idx]


def train_step(ae, dc, opt, opt_dc, scaler, audio_in, prev, target, domain, dc_lambda, amp_dtype, f0=None):
    """One step of the alternating training (Mor et al. eq. 1-2): the domain classifier `dc` learns
    to name the domain from the latent, then the autoencoder `ae` (encoder and decoders) learns to
    reconstruct while making the classifier wrong. Either may be wrapped in DDP. audio_in (B, T)
    the augmented input, prev and target (B, T) classes, domain (B,) on the host, f0 (B, T) the pitch
    encoder's tracked f0 (None for the learned encoder). Returns the
    reconstruction loss (nats per sample) and the classifier's loss, left on the device."""
    model, classifier = getattr(ae, "module", ae), getattr(dc, "module", dc)
    device, d_idx = audio_in.device, domain.to(audio_in.device, non_blocking=True)
    # 1) the domain classifier, on the latent of the encoder as it is
    with torch.no_grad(), autocast(device, amp_dtype):
        z = model.encode(audio_in, f0)
    opt_dc.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        dc_loss = F.cross_entropy(dc(z.float()), d_idx)
    backward_and_step(dc_loss, opt_dc, classifier.parameters(), scaler)
    # 2) encoder and decoders: reconstruct, minus lambda times the classifier's loss
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp_dtype):
        rec, z = ae(audio_in, prev, target, domain, f0)
        confusion = F.cross_entropy(classifier(z.float()), d_idx)
        loss = rec - dc_lambda * confusion
    backward_and_step(loss, opt, model.parameters(), scaler)
    scaler.update()  # fp16: once per step, after both optimizers (the AMP recipe for several optimizers)
    return rec.detach(), confusion.detach()


def backward_and_step(loss, optimizer, params, scaler):
    """Backward, every gradient clipped to [-1, 1] (the reference clips by value), and the step."""
    if not scaler.is_enabled():
        loss.backward()
        nn.utils.clip_grad_value_(params, 1.0)
        optimizer.step()
    else:  # fp16 mixed precision: the loss scaled up so small gradients do not round to zero
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the true gradients, before clipping
        nn.utils.clip_grad_value_(params, 1.0)
        scaler.step(optimizer)  # skipped if a gradient overflowed


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """A umtn checkpoint and its model, or one line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}: run python umtn/train.py first")
    try:
        # onto the CPU first: a checkpoint saved on any device opens on any other, and the model is moved
        # afterwards (MPS, for one, cannot hold every dtype a file may carry)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "umtn":
        fail(f"{path} is not a umtn checkpoint (it was written by another script): train one with python "
             "umtn/train.py")
    model = UMTN(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    model.to(device)
    return ckpt, model.eval()


def make_batch(data, domain_of, args, g, g_dev):
    """One training batch: a random segment per item of its domain, as the encoder's (augmented)
    input (B, T), the decoder's teacher-forced input prev (B, T), its target classes (B, T) and, for
    the pitch encoder, the segment's f0 (B, T) (else None)."""
    clean, f0 = data.batch(domain_of, g)  # (B, segment + 1) each
    codes = mu_law_encode(clean)
    prev, target = codes[:, :-1], codes[:, 1:]  # predict each sample from the ones before it
    # a noisy past: the decoder cannot just continue the waveform, it must read the latent
    if args.input_noise:
        noise = torch.randn(prev.shape, generator=g_dev, device=clean.device)
        prev = mu_law_encode((clean[:, :-1] + args.input_noise * noise).clamp(-1, 1))
    audio_in = augment(clean[:, :-1], g) if args.augment else clean[:, :-1]
    return audio_in, prev, target, None if f0 is None else f0[:, :-1]


def autoencoder_lr(args, step, progress):
    """The reference's slow decay, and ten times lower for the last --anneal of training (by steps or
    by the clock, whichever is further), where the decoders settle on following the code."""
    return args.lr * args.lr_decay ** ((step - 1) // 1000) * (0.1 if progress >= 1 - args.anneal else 1)


def fit(ae, dc, opt, opt_dc, scaler, data, args, amp_dtype, say, rank=0, world=1):
    """The training loop: alternate the classifier's step and the autoencoder's (Mor et al. eq. 1-2),
    every domain in every batch so that every decoder trains. Returns the steps taken, the first and
    the last logged reconstruction loss (bits per sample), the last domain loss and the seconds."""
    g = torch.Generator().manual_seed(args.seed + 1000 * rank)  # on the host: which clips, where, what shift
    g_dev = torch.Generator(device=data.audio.device).manual_seed(args.seed + 1000 * rank)  # the input noise
    domain_of = torch.arange(args.batch_size) % len(data.n_clips)
    log = Log(args, data.segment, world, len(data.n_clips), data.audio.device, say)
    for step in range(1, args.steps + 1):
        audio_in, prev, target, f0 = make_batch(data, domain_of, args, g, g_dev)
        progress = max((step - 1) / args.steps, log.elapsed() / args.time_limit if args.time_limit else 0)
        for group in opt.param_groups:
            group["lr"] = autoencoder_lr(args, step, progress)
        rec, confusion = train_step(ae, dc, opt, opt_dc, scaler, audio_in, prev, target, domain_of,
                                    args.dc_lambda, amp_dtype, f0)
        last = step == args.steps or (args.time_limit and log.elapsed() > args.time_limit)
        log.add(step, rec, confusion, last)
        if last:
            break
    return step, log.first.item() / math.log(2), log.final_bits, confusion.item(), log.elapsed()


class Log:
    """The progress lines: the mean losses of the last --log-every steps, summed on the device and read
    only when a line is printed, so that a step never waits for the GPU."""

    def __init__(self, args, segment, world, n_domains, device, say):
        self.args, self.segment, self.world, self.n_domains, self.device, self.say = (args, segment, world,
                                                                                       n_domains, device, say)
        self.start, self.first, self.final_bits = time.time(), None, None
        self.rec, self.dc, self.n = torch.zeros((), device=device), torch.zeros((), device=device), 0

    def elapsed(self):
        return time.time() - self.start

    def add(self, step, rec, confusion, last):
        args = self.args
        if step == 1:
            self.first = rec  # read at the end, not now: reading it would wait for the GPU
        self.rec, self.dc, self.n = self.rec + rec, self.dc + confusion, self.n + 1
        if step % args.log_every and not last:
            return
        synchronize(self.device)  # the GPU's queued steps are done before the clock is read
        elapsed = self.elapsed()
        self.final_bits = self.rec.item() / self.n / math.log(2)  # reported at the end: steadier than a step
        total = min(args.steps, args.steps if not args.time_limit else int(step * args.time_limit / elapsed))
        self.say(f"step {step}/{args.steps} | loss {self.final_bits:.3f} bits/sample | domain loss "
                 f"{self.dc.item() / self.n:.3f} (chance {math.log(self.n_domains):.3f}) | "
                 f"{step * args.batch_size * self.segment * self.world / elapsed:,.0f} samples/s | "
                 f"{1000 * elapsed / step:.0f} ms/step | elapsed {elapsed:.0f}s | eta "
                 f"{max(0, (total - step)) * elapsed / step:.0f}s")
        self.rec, self.dc, self.n = self.rec.new_zeros(()), self.dc.new_zeros(()), 0


# ----------------------------------------------------------------------------- evaluation
# On the built-in data the score of every held-out melody is known and every instrument plays
# it, so a translation is judged against the written notes and the true rendering. Each metric is
# checked on known cases by the tests: the true rendering, the true rendering with the decoders'
# level of sampling noise, the untranslated input and silence must come out in that order.


def frames(x, size=256, hop=128):
    n = 1 + max(0, (len(x) - size) // hop)
    idx = np.arange(size)[None, :] + hop * np.arange(n)[:, None]
    return np.pad(x, (0, max(0, size - len(x))))[idx] * np.hanning(size)


def frame_size(rate):
    return 2 ** round(math.log2(0.064 * rate))  # about 64 ms: four periods of the lowest note (C2)


def pitch_track(x, rate, fmin=60.0, fmax=1400.0, harmonics=6):
    """Frame-wise f0 (Hz) by subharmonic summation (Hermes 1988); 0 where unvoiced or quiet. Frames
    of about 64 ms, every 16 ms. Every candidate on a 10-cent grid sums the (compressed) spectrum at
    its first six harmonics, the h-th weighted 0.84^(h-1): the true f0 meets every partial with the
    largest weights, its lower octave meets the same partials only as its even harmonics, so an
    odd-harmonic spectrum (a clarinet's), which an autocorrelation reads an octave low, reads right.
    The spectrum's noise floor (three times its median bin) is taken away first: a high note has few
    partials inside the band, and noise summed at its lower octave's odd harmonics would outweigh
    them.
    The winner is refined at its harmonics' peaks (a parabola through the log spectrum at each, their
    f0s averaged by amplitude). A frame is voiced where the normalised autocorrelation at that period
    reaches 0.3."""
    size = frame_size(rate)
    fr = frames(x, size, size // 4)
    nfft = 4 * size  # zero-padded: bins of rate / (4 size) Hz
    mag = np.abs(np.fft.rfft(fr, nfft, axis=1))  # (frames, bins)
    top = mag.max(1, keepdims=True) + 1e-12
    clean = np.maximum(mag - 3 * np.median(mag, 1, keepdims=True), 0)
    # compressed, and widened by two bins each way so that a partial between grid points still counts
    spread = maximum_filter1d(np.sqrt(clean / top), 5, axis=1)
    grid = fmin * 2 ** (np.arange(int(120 * math.log2(fmax / fmin)) + 1) / 120)
    score = np.zeros((len(fr), len(grid)))
    for h in range(1, harmonics + 1):
        inside = h * grid < rate / 2 - 2 * rate / nfft  # a harmonic above the band counts for nothing
        bins = np.rint(h * grid * nfft / rate).astype(int).clip(0, nfft // 2)
        score += 0.84 ** (h - 1) * inside * spread[:, bins]  # (frames, candidates)
    best = grid[score.argmax(1)]
    rows, offsets = np.arange(len(fr)), np.arange(-32, 33)
    logmag = np.log(mag + 1e-12)
    total, weight = np.zeros(len(fr)), np.zeros(len(fr))
    for h in range(1, harmonics + 1):  # the strongest bin within a quarter tone of each harmonic
        centre = np.rint(h * best * nfft / rate).astype(int)
        # (at least 3 bins: the widened spectrum lets the winner lie 2 bins off its partial)
        half = np.maximum(3, np.rint(centre * (2 ** (1 / 24) - 1)))
        idx = (centre[:, None] + offsets).clip(1, nfft // 2 - 1)  # (frames, 65)
        near = np.where(np.abs(offsets) <= half[:, None], mag[rows[:, None], idx], -1)
        peak = idx[rows, near.argmax(1)]
        a, b, c = logmag[rows, peak - 1], logmag[rows, peak], logmag[rows, peak + 1]
        curve = np.where(np.abs(a - 2 * b + c) > 1e-12, a - 2 * b + c, -1e-12)
        shift = np.clip(0.5 * (a - c) / curve, -0.5, 0.5)  # the log spectrum's parabola peaks here
        # a harmonic counts where it lies inside the band and stands above the noise
        counts = (h * best < rate / 2 - 4 * rate / nfft) & (mag[rows, peak] > 0.03 * top[:, 0])
        level = mag[rows, peak] * counts
        total += level * (peak + shift) * rate / nfft / h
        weight += level
    f0 = np.where(weight > 0, total / np.maximum(weight, 1e-12), best)
    # Boersma (1993), eq. 9: the autocorrelation divided by the window's own
    acf = lambda v: np.fft.irfft(np.abs(np.fft.rfft(v, 2 * size, axis=-1)) ** 2, axis=-1)[..., :size]
    r = acf(fr)
    w = acf(np.hanning(size))
    r = r / np.maximum(r[:, :1], 1e-12) / np.maximum(w / w[0], 0.1)
    lag = np.rint(rate / f0).astype(int).clip(1, size - 2)
    periodic = np.max([r[rows, lag + d] for d in (-1, 0, 1)], 0)
    return np.where((periodic > 0.3) & (fr.std(1) > 1e-3), f0, 0.0)


def f0_per_sample(x, rate):
    """pitch_track's f0 at every sample of x (T,): each sample takes the frame centred nearest to it."""
    f0 = pitch_track(x, rate)
    hop = frame_size(rate) // 4
    # frame k covers samples [k hop, k hop + 4 hop): its centre is (k + 2) hop
    i = np.rint((np.arange(len(x)) - 2 * hop) / hop).astype(int).clip(0, len(f0) - 1)
    return f0[i].astype(np.float32)


def written_pitch(notes, n, rate, skip=0.02):
    """For each pitch-track frame of an n-sample clip, the written MIDI note when the whole frame lies
    inside that note and starts `skip` seconds after its onset (the attack is not a pitch), else 0."""
    size = frame_size(rate)
    hop = size // 4
    out = np.zeros(1 + max(0, (n - size) // hop))
    for start, length, pitch in notes:
        first, last = -(-(start + int(skip * rate)) // hop), (min(start + length, n) - size) // hop
        out[first:last + 1] = pitch
    return out


def cents_off(x, notes, rate):
    """For each pitch-track frame inside a written note, how far its f0 lies from that note in cents
    (+ is sharp; -inf where the frame is unvoiced); frames outside notes are dropped."""
    f0 = pitch_track(x, rate)
    written = written_pitch(notes, len(x), rate)[:len(f0)]
    inside = written > 0
    with np.errstate(divide="ignore"):
        return 1200 * np.log2(f0[inside] / (440 * 2 ** ((written[inside] - 69) / 12)))


def raw_pitch_accuracy(x, notes, rate):
    """mir_eval's raw pitch accuracy against the score: the share of frames inside written notes
    whose f0 lies within 50 cents of the written note (an unvoiced frame counts as wrong)."""
    cents = cents_off(x, notes, rate)
    return float((np.abs(cents) < 50).sum() / max(1, len(cents)))


def pitch_offset(x, notes, rate):
    """The median of cents_off over voiced frames: a decoder that plays every note a constant ratio
    too high or too low shows it here, where pitch accuracy only says that it is wrong."""
    cents = cents_off(x, notes, rate)
    cents = cents[np.isfinite(cents)]
    return float(np.median(cents)) if len(cents) else float("nan")


def partial_levels(x, pitch, rate, floor=-30.0):
    """Timbre without pitch: the levels (dB) of partials 1-8 relative to the strongest, read at the
    f0 of every frame where `pitch` (per pitch-track frame, MIDI; 0 to skip) names a note, averaged.
    Clamped at -30 dB, so sampling noise, which lies about 30 dB below the partials, does not count
    as a partial."""
    size = frame_size(rate)
    # zero-padded: 4 bins per Hz step
    spec = np.abs(np.fft.rfft(frames(x, size, size // 4), 4 * size, axis=1))
    pitch = np.asarray(pitch)[:len(spec)]
    levels = []
    for s, note in zip(spec[:len(pitch)][pitch > 0], pitch[pitch > 0]):
        bins = np.rint(np.arange(1, 9) * 440 * 2 ** ((note - 69) / 12) * 4 * size / rate).astype(int)
        a = np.array([s[max(0, b - 2):b + 3].max() if b < len(s) - 2 else 0.0 for b in bins]) + 1e-9
        levels.append(np.maximum(20 * np.log10(a / a.max()), floor))
    return np.mean(levels, 0) if levels else np.full(8, floor)


def mu_law_noise(x, width, seed):
    """x with every sample moved by up to +-width mu-law classes at random: the sampling noise of a
    decoder that is uncertain by about log2(2 width + 1) bits per sample (3.2 bits for width 4)."""
    g = torch.Generator().manual_seed(seed)
    q = mu_law_encode(torch.from_numpy(np.asarray(x, np.float32)))
    return mu_law_decode((q + torch.randint(-width, width + 1, q.shape, generator=g)).clamp(0, MU)).numpy()


class TimbreClassifier:
    """Which instrument does audio sound like? The nearest class mean of its partial levels. `fit`
    learns the means from renderings of training melodies, clean and with a decoder's level of
    sampling noise; they travel in the checkpoint, so sample.py can ask too."""

    def __init__(self, domains, centres, rate):
        self.domains, self.centres, self.rate = list(domains), np.asarray(centres), rate

    @classmethod
    def fit(cls, clips_by_domain, scores, rate):
        levels = lambda c, notes: [partial_levels(x, written_pitch(notes, len(c), rate), rate)
                                   for x in (c, mu_law_noise(c, 4, len(notes)))]
        centres = [np.mean([v for c, notes in zip(clips, scores) for v in levels(c, notes)], 0)
                   for clips in clips_by_domain.values()]
        return cls(clips_by_domain, centres, rate)

    def __call__(self, x, pitch):
        """x (T,) audio, pitch: MIDI per pitch-track frame (from the score, or tracked) -> a domain."""
        return self.domains[int(((self.centres - partial_levels(x, pitch, self.rate)) ** 2).sum(1).argmin())]


class InstrumentJudge(nn.Module):
    """Which instrument does a recording sound like, on any data? A small network on the shape of
    the log-mel spectrum over quarter-second windows of the frames where something plays (each
    window's mean, relative to its loudest band, and its spread over time). `fit` trains it on the
    training clips of every domain, clean and with the decoders' levels of sampling noise (+-2, 4 and
    6 mu-law classes), so that a decoder's noise is not heard as a timbre. Five such networks, from
    different initial weights, vote, and each trains until it settles (large batches, the learning
    rate annealed to zero): a judge stopped early, or one alone, is right on every true recording yet
    names a decoder's output, which lies between the instruments it knows, by its own seed. A clip's
    verdict is the mean of its windows' log-probabilities over the five. Its state_dict travels in
    the checkpoint."""

    def __init__(self, domains, rate, n_mels=40, hidden=64, members=5):
        super().__init__()
        self.domains, self.rate = list(domains), rate
        bank = mel_bank(rate, frame_size(rate), n_mels)
        self.register_buffer("bank", torch.tensor(bank, dtype=torch.float32))  # (n_mels, bins)
        self.register_buffer("mean", torch.zeros(2 * n_mels))  # of the training features
        self.register_buffer("std", torch.ones(2 * n_mels))
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(2 * n_mels, hidden), nn.ReLU(),
                                                nn.Linear(hidden, len(domains))) for _ in range(members))

    def features(self, x, window=16):
        """x (T,) audio -> (windows, 2 n_mels): per window of 16 frames (about 0.25 s), the mean log-mel
        spectrum relative to its loudest band, and each band's spread over the window (dB)."""
        size = frame_size(self.rate)
        power = torch.from_numpy(np.abs(np.fft.rfft(frames(x, size, size // 4), axis=1)) ** 2).float()
        level = 10 * torch.log10(power @ self.bank.T + 1e-10)  # (frames, n_mels)
        loud = level.amax(1)
        level = level[loud > loud.max() - 30]  # the frames where something plays
        n = max(1, len(level) // window)
        w = level[:n * window].reshape(n, -1, level.shape[1]) if len(level) >= window else level[None]
        shape = w.mean(1) - w.mean(1).amax(1, keepdim=True)
        return torch.cat([shape, w.std(1, unbiased=False)], 1).clamp_min(-80)

    def forward(self, features):  # (windows, 2 n_mels) -> (members, windows, domains) logits
        return torch.stack([net((features - self.mean) / self.std) for net in self.nets])

    @torch.no_grad()
    def hears(self, x, pitch=None):
        """The domain a clip x (T,) sounds like (`pitch` is ignored: the judge needs no score)."""
        return self.domains[int(self(self.features(x)).log_softmax(2).mean((0, 1)).argmax())]

    @classmethod
    def fit(cls, clips_by_domain, rate, steps=6000, seconds=20.0, seed=0, batch=1024):
        """Trained on up to `seconds` of each training clip, clean and noisy, `batch` windows a step."""
        torch.manual_seed(seed)  # the initial weights too: the same judge from the same seed
        judge, g = cls(clips_by_domain, rate), np.random.default_rng(seed)
        feats, labels = [], []
        for d, clips in enumerate(clips_by_domain.values()):
            for c in clips:
                c = c[:int(seconds * rate)]
                for width in (0, 2, 4, 6):
                    f = judge.features(mu_law_noise(c, width, int(g.integers(1 << 30))) if width else c)
                    feats.append(f)
                    labels += [d] * len(f)
        feats, labels = torch.cat(feats), torch.tensor(labels)
        judge.mean.copy_(feats.mean(0))
        judge.std.copy_(feats.std(0) + 1e-3)
        opt = torch.optim.Adam(judge.nets.parameters(), lr=3e-3, weight_decay=1e-4)
        # annealed to zero, so that where it stops does not depend on the last few batches
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            pick = torch.randint(0, len(feats), (batch,))  # the same windows for every member
            logits = judge(feats[pick])  # (members, batch, domains)
            # the members' own losses summed: each learns as it would alone
            members = len(judge.nets)
            loss = members * F.cross_entropy(logits.flatten(0, 1), labels[pick].repeat(members))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        return judge.eval()


def mel_bank(rate, size, n_mels=40):
    """(n_mels, size // 2 + 1) triangular filters on the mel scale, from 50 Hz to half the rate."""
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    edges = 700 * (10 ** (np.linspace(mel(50.0), mel(rate / 2), n_mels + 2) / 2595) - 1)
    f = np.fft.rfftfreq(size, 1 / rate)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.clip(np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)), 0, None)


def log_mel_distance(x, y, rate, floor_db=40.0, n_mels=40):
    """Mean over frames of the RMS difference (dB) of the log mel spectra of output x and target y,
    both floored 40 dB below the target's peak. Mel bands (40, from 50 Hz to half the rate) pool the
    bins between partials, where a clean rendering is silent and any sampled output is not."""
    size = frame_size(rate)
    bank = mel_bank(rate, size, n_mels)
    X, Y = ((np.abs(np.fft.rfft(frames(v, size, size // 4), axis=1)) ** 2) @ bank.T for v in (x, y))
    floor = Y.max() * 10 ** (-floor_db / 10) + 1e-12
    return float(np.sqrt(((10 * np.log10(np.maximum(X, floor) / np.maximum(Y, floor))) ** 2).mean(1)).mean())


def bootstrap(values, melody, n=1000, seed=0):
    """Mean of `values` and its 95% interval, resampling the melodies (a melody's clips together)."""
    values, melody = np.asarray(values, float), np.asarray(melody)
    ids = np.unique(melody)
    sums, counts = np.array([values[melody == m].sum()
                             for m in ids]), np.array([(melody == m).sum() for m in ids])
    pick = np.random.default_rng(seed).integers(0, len(ids), (n, len(ids)))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def decode_per_target(model, per_target, audio_of, n, device, temperature=1.0, seed=0):
    """Every clip encoded and decoded by its target's decoder, all targets in one generate call:
    per_target[t] lists the clips for target t as keys (kind, k), audio_of(kind, k) gives a clip's n
    samples. Targets with fewer clips are padded with silence. Returns {key: (n,) audio}."""
    width = max(len(rows) for rows in per_target)
    model.eval()
    with torch.inference_mode():
        inputs = [torch.stack([torch.from_numpy(np.float32(audio_of(kind, k))) for kind, k in rows]
                              + [torch.zeros(n)] * (width - len(rows))) for rows in per_target]
        # (D, clips per target, L, F): for the pitch encoder, loudness moved onto each target's
        z = torch.stack([model.match_loudness(model.encoder(x.to(device)), t) for t, x in enumerate(inputs)])
        audio = mu_law_decode(generate(list(model.decoders), z, n, temperature, seed)).cpu().numpy()
    model.train()
    return {key: audio[t, j] for t, rows in enumerate(per_target) for j, key in enumerate(rows)}


def translation_report(model, test, scores, rate, device, seconds, timbre, temperature=1.0, seed=0):
    """Translate every held-out melody from every domain into every other and score each output
    against the score and the true rendering, beside three references decoded by the same sampler:
    the topline (the target's decoder fed the code of the true target rendering: the best a
    translation can be at this training), the untranslated input, and the target's decoder fed the
    code of silence. Returns {kind: {metric: [value per clip]}}, the clips' (source, target,
    melody), and {clip: audio} of the translations."""
    domains = list(test)
    n = int(seconds * rate) // model.encoder.pool * model.encoder.pool  # whole latent frames
    m = len(scores)
    clip = lambda d, i: test[domains[d]][i][:n]
    pairs = [(s, t) for s in range(len(domains)) for t in range(len(domains)) if s != t]
    jobs = {"translation": [(s, t, i) for s, t in pairs for i in range(m)],
            "topline": [(t, t, i) for t in range(len(domains)) for i in range(m)],
            "silence": [(None, t, i) for t in range(len(domains)) for i in range(m)]}
    per_target = [[(kind, k) for kind in jobs for k, job in enumerate(jobs[kind]) if job[1] == t]
                  for t in range(len(domains))]
    audio_of = lambda kind, k: (np.zeros(n, np.float32) if kind == "silence"
                                else clip(jobs[kind][k][0], jobs[kind][k][2]))
    outputs = decode_per_target(model, per_target, audio_of, n, device, temperature, seed)
    rows = {kind: {"pitch": [], "target": [], "mel": [], "cents": []}
            for kind in ("translation", "topline", "input", "silence")}
    for kind, todo in (*jobs.items(), ("input", jobs["translation"])):
        for k, (s, t, i) in enumerate(todo):
            out = clip(s, i) if kind == "input" else outputs[(kind, k)]
            rows[kind]["pitch"].append(raw_pitch_accuracy(out, scores[i], rate))
            rows[kind]["cents"].append(pitch_offset(out, scores[i], rate))
            rows[kind]["target"].append(timbre(out, written_pitch(scores[i], n, rate)) == domains[t])
            rows[kind]["mel"].append(log_mel_distance(out, clip(t, i), rate))
    # the joint score: the melody kept (80% of its frames) and the target's timbre heard
    for r in rows.values():
        r["joint"] = [p >= 0.8 and h for p, h in zip(r["pitch"], r["target"])]
    who = {**jobs, "input": jobs["translation"]}  # the (source, target, melody) of each row
    return rows, who, {k: outputs[("translation", k)] for k in range(len(jobs["translation"]))}


def pitch_kept(x, source, rate):
    """Without a score: the share of the frames where the source clip has a pitch in which output x
    plays within 50 cents of it (unvoiced output frames count as wrong), and the median offset in
    cents over the frames where both have one."""
    f0_in, f0_out = pitch_track(source, rate), pitch_track(x, rate)
    n = min(len(f0_in), len(f0_out))
    f0_in, f0_out = f0_in[:n], f0_out[:n]
    with np.errstate(divide="ignore", invalid="ignore"):
        cents = 1200 * np.log2(f0_out[f0_in > 0] / f0_in[f0_in > 0])
    both = cents[np.isfinite(cents)]
    return (float((np.abs(cents) < 50).sum() / max(1, len(cents))),
            float(np.median(both)) if len(both) else float("nan"))


def window_of(clip, notes, n, start=None):
    """n samples of a clip from where it starts to play (its first note, or its first sample above a
    tenth of its peak), zero-padded, and its notes moved to that window."""
    if start is None:
        start = notes[0][0] if notes else int(np.argmax(np.abs(clip) > 0.1 * np.abs(clip).max()))
        start = max(0, min(start, len(clip) - n))
    x = np.pad(clip[start:start + n], (0, max(0, n - len(clip[start:]))))
    moved = None if notes is None else [(max(0, a - start), b + min(0, a - start), p) for a, b, p in notes
                                        if a + b > start and a < start + n]
    return x, moved, start


def parallel(notes, rate):
    """Whether the held-out clips are the same lines in every domain: as many clips, and clip i's
    notes the same pitches at the same times (within 10 ms) in every domain."""
    lists = list(notes.values())
    if len({len(clips) for clips in lists}) > 1 or any(v is None for clips in lists for v in clips):
        return False
    alike = lambda a, b: len(a) == len(b) and all(abs(x[0] - y[0]) <= 0.01 * rate and x[2] == y[2]
                                                  for x, y in zip(a, b))
    return all(alike(lists[0][i], other[i]) for other in lists[1:] for i in range(len(other)))


def folder_report(model, test, test_notes, rate, device, seconds, judge, temperature=1.0, seed=0):
    """translation_report for recordings: every held-out clip (a `seconds` window of it) translated
    into every other domain and scored for pitch (against its notes where it has them, else against
    its own f0) and timbre (the judge), beside the topline (each clip through its own domain's
    decoder), the untranslated input and the code of silence. When the clips are parallel, the log-mel
    distance to the true rendering in the target domain too (else nan)."""
    domains = list(test)
    n = int(seconds * rate) // model.encoder.pool * model.encoder.pool
    same = parallel(test_notes, rate)
    windows = {}
    for d in domains:
        for i, clip in enumerate(test[d]):
            start = window_of(test[domains[0]][i], test_notes[domains[0]][i], n)[2] if same else None
            windows[d, i] = window_of(clip, test_notes[d][i], n, start)[:2]
    jobs = {"translation": [(s, t, i) for s in range(len(domains)) for t in range(len(domains)) if s != t
                            for i in range(len(test[domains[s]]))],
            "topline": [(t, t, i) for t in range(len(domains)) for i in range(len(test[domains[t]]))],
            "silence": [(None, t, i) for t in range(len(domains)) for i in range(len(test[domains[t]]))]}
    per_target = [[(kind, k) for kind in jobs for k, job in enumerate(jobs[kind]) if job[1] == t]
                  for t in range(len(domains))]
    audio_of = lambda kind, k: (np.zeros(n, np.float32) if kind == "silence"
                                else windows[domains[jobs[kind][k][0]], jobs[kind][k][2]][0])
    outputs = decode_per_target(model, per_target, audio_of, n, device, temperature, seed)
    rows = {kind: {"pitch": [], "target": [], "mel": [], "cents": []}
            for kind in ("translation", "topline", "input", "silence")}
    for kind, todo in (*jobs.items(), ("input", jobs["translation"])):
        for k, (s, t, i) in enumerate(todo):
            source, notes = windows[domains[t if s is None else s], i]
            out = source if kind == "input" else outputs[(kind, k)]
            if notes is not None:
                pitch, cents = raw_pitch_accuracy(out, notes, rate), pitch_offset(out, notes, rate)
            else:
                pitch, cents = pitch_kept(out, source, rate)
            rows[kind]["pitch"].append(pitch)
            rows[kind]["cents"].append(cents)
            rows[kind]["target"].append(judge.hears(out) == domains[t])
            rows[kind]["mel"].append(log_mel_distance(out, windows[domains[t], i][0], rate) if same
                                     else float("nan"))
    for r in rows.values():
        r["joint"] = [p >= 0.8 and h for p, h in zip(r["pitch"], r["target"])]
    return rows, {**jobs, "input": jobs["translation"]}, same


def latent_codes(model, clips, scores, rate, device, skip=0.02):
    """The codes of clips (a list of (T,) arrays, cut to the shortest whole number of frames) and the
    written note of each latent frame: (N, L, F) and (N, F) on the host, the note 0 where the frame
    is not wholly inside a note or lies within `skip` seconds of its onset."""
    pool = model.encoder.pool
    n = min(len(c) for c in clips) // pool * pool
    with torch.inference_mode():
        z = torch.cat([model.encoder(torch.from_numpy(np.stack([c[:n] for c in clips[i:i + 24]])).to(device))
                       .float().cpu() for i in range(0, len(clips), 24)])
    notes = np.zeros((len(clips), n // pool), np.int64)
    for row, score in zip(notes, scores):
        for start, length, pitch in score:
            row[-(-(start + int(skip * rate)) // pool):min(start + length, n) // pool] = pitch
    return z, torch.from_numpy(notes)


def probe_accuracy(z_train, y_train, z_test, y_test, context, steps=300, seed=0):
    """Train a fresh probe on frozen codes and return its accuracy on held-out frames. z (N, L, F),
    y (N, F) a class per frame, -1 where there is none. context=True: three convolutions that see 21
    frames (a judge of how a note evolves, which the 1x1 domain classifier of training cannot be);
    False: a linear layer on one frame, a linear probe."""
    torch.manual_seed(seed)
    L, classes = z_train.shape[1], int(max(y_train.max(), y_test.max())) + 1
    probe = (nn.Sequential(nn.Conv1d(L, 32, 5, padding=2), nn.ReLU(),
                           nn.Conv1d(32, 32, 5, padding=8, dilation=4), nn.ReLU(), nn.Conv1d(32, classes, 1))
             if context else nn.Conv1d(L, classes, 1))
    mean, std = z_train.mean((0, 2), keepdim=True), z_train.std((0, 2), keepdim=True) + 1e-6
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(z_train), (32,), generator=g)
        loss = F.cross_entropy(probe((z_train[idx] - mean) / std), y_train[idx], ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.inference_mode():
        guess = probe((z_test - mean) / std).argmax(1)
    keep = y_test >= 0
    return float((guess[keep] == y_test[keep]).float().mean())


def latent_probe(model, train, train_scores, test, test_scores, rate, device, seconds, steps=300):
    """Probes of the frozen code: what a fresh judge reads from it, trained on the codes of 24
    training melodies and scored on the held-out ones, over frames inside written notes. Domain
    confusion should leave the instrument unreadable (chance is 1 / domains) and the note readable.
    Returns {probe: accuracy} for the instrument and the note, each from one frame (a linear
    probe) and from 21 frames, and the commonest note's share (what guessing it would score)."""
    n = int(seconds * rate)
    sets = []
    for clips_by_domain, scores in ((train, train_scores[:24]), (test, test_scores)):
        clips = [c[:n] for clips in clips_by_domain.values() for c in clips[:len(scores)]]
        z, notes = latent_codes(model, clips, list(scores) * len(clips_by_domain), rate, device)
        domain = torch.arange(len(clips_by_domain)).repeat_interleave(len(scores))[:, None].expand_as(notes)
        sets.append((z, torch.where(notes > 0, domain, -1), torch.where(notes > 0, notes, -1)))
    (z_tr, d_tr, p_tr), (z_te, d_te, p_te) = sets
    if not ((p_tr >= 0).any() and (p_te >= 0).any()):  # clips too short to hold a whole note frame
        return dict.fromkeys(("domain_frame", "domain", "note_linear", "note", "common_note"), math.nan)
    return {"domain_frame": probe_accuracy(z_tr, d_tr, z_te, d_te, context=False, steps=steps),
            "domain": probe_accuracy(z_tr, d_tr, z_te, d_te, context=True, steps=steps),
            "note_linear": probe_accuracy(z_tr, p_tr, z_te, p_te, context=False, steps=steps),
            "note": probe_accuracy(z_tr, p_tr, z_te, p_te, context=True, steps=steps),
            "common_note": float(np.bincount(p_te[p_te >= 0].numpy()).max() / (p_te >= 0).sum())}


def print_report(rows, who, domains, say):
    """The scoreboard: each kind of output with 95% intervals, then translation per ordered pair."""
    fmt = lambda v, pct: ("-" if not np.isfinite(v[0]) else
                          f"{100 * v[0]:5.1f}% [{100 * v[1]:.0f}-{100 * v[2]:.0f}]" if pct
                          else f"{v[0]:5.2f} [{v[1]:.1f}-{v[2]:.1f}]")
    cols = (("pitch", "pitch accuracy", True), ("target", "hears the target", True),
            ("mel", "log-mel dist (dB)", False),
            ("joint", "pitch >= 80% and target", True))
    say(f"  {'':<30}" + "".join(f"{title:>25}" for _, title, _ in cols))
    for kind, label in (("translation", "translation"), ("topline", "topline: target's own code"),
                        ("input", "baseline: untranslated input"), ("silence", "baseline: code of silence")):
        melody = [i for _, _, i in who[kind]]
        say(f"  {label:<30}" + "".join(f"{fmt(bootstrap(rows[kind][key], melody), pct):>25}"
                                       for key, _, pct in cols))
    say("  translation by ordered pair (the topline of its target in brackets):")
    width = max(18, 2 * max(len(d) for d in domains) + 4)  # the columns line up for any names
    for s, source in enumerate(domains):
        for t, target in enumerate(domains):
            if s == t:
                continue
            pick = [k for k, (a, b, _) in enumerate(who["translation"]) if (a, b) == (s, t)]
            top = [k for k, (_, b, _) in enumerate(who["topline"]) if b == t]
            mean = lambda kind, key, ks: np.mean([rows[kind][key][k] for k in ks])
            say(f"    {source + ' -> ' + target:<{width}} pitch "
                f"{100 * mean('translation', 'pitch', pick):5.1f}% "
                f"({100 * mean('topline', 'pitch', top):5.1f}%)  hears target "
                f"{100 * mean('translation', 'target', pick):5.1f}% "
                f"({100 * mean('topline', 'target', top):5.1f}%)  log-mel "
                f"{mean('translation', 'mel', pick):5.2f} dB "
                f"({mean('topline', 'mel', top):5.2f})")
    # A decoder that plays every note a constant ratio off shows it here as a steady offset, which
    # pitch accuracy alone does not tell apart from wandering; "unvoiced" where no clip had a pitch.
    def offset(kind, t):
        c = [c for c, (_, b, _) in zip(rows[kind]["cents"], who[kind]) if b == t and np.isfinite(c)]
        return f"{np.median(c):+.0f}" if c else "unvoiced"
    say("  median pitch error into each target (cents, + is sharp): translation "
        + ", ".join(f"{d} {offset('translation', t)}" for t, d in enumerate(domains))
        + "; topline " + ", ".join(f"{d} {offset('topline', t)}" for t, d in enumerate(domains)))


def result_fields(rows):
    """The report's means as `key=value` fields of the result line: translation_, topline_, input_
    and silence_ pitch, timbre, log-mel distance and joint score."""
    return "".join(f" {prefix}pitch_acc={100 * np.mean(r['pitch']):.1f}"
                   f" {prefix}timbre_acc={100 * np.mean(r['target']):.1f}"
                   f" {prefix}mel_dist={np.mean(r['mel']):.2f}"
                   f" {prefix}joint={100 * np.mean(r['joint']):.1f}"
                   for kind, prefix in (("translation", ""), ("topline", "topline_"), ("input", "input_"),
                                        ("silence", "silence_")) for r in [rows[kind]])


def fit_judges(args, train, test, train_scores, say):
    """A judge of timbre for the evaluation and for sample.py: on the built-in data the partial levels
    at the written pitch (TimbreClassifier); on recordings, which have no score to read the partials
    at, a learned InstrumentJudge, validated on the held-out clips clean and noisy. Returns (timbre,
    judge, {noise width: [right or not per held-out clip]}), the unused ones None."""
    if args.data == "builtin":
        return TimbreClassifier.fit({d: clips[:24] for d, clips in train.items()}, train_scores[:24],
                                    args.rate), None, None
    t0 = time.time()
    # with --register the judge also hears the copies the decoders train on: one that has never heard a
    # bassoon above its lines names a translated violin's top octave by the wrong instrument
    shifts = range(4, args.register + 1, 4)
    heard_clips = {d: own + [played_higher(c, s) for c in own for s in shifts] for d, own in train.items()}
    judge = InstrumentJudge.fit(heard_clips, args.rate, steps=60 if args.dry_run else 6000, seed=args.seed)
    heard = {w: [judge.hears(mu_law_noise(c, w, 0) if w else c) == d for d, clips in test.items()
                 for c in clips] for w in (0, 4)}
    say(f"instrument judge, trained on the training clips{' and their copies' if shifts else ''} "
        f"({time.time() - t0:.1f}s): right on "
        f"{100 * np.mean(heard[0]):.1f}% of the held-out clips, {100 * np.mean(heard[4]):.1f}% with a "
        "decoder's sampling noise (+-4 mu-law classes)")
    return None, judge, heard


def builtin_report(model, args, train, test, train_scores, test_scores, timbre, device, say):
    """The end of a built-in run: every held-out melody translated and scored (print_report), and the
    latent probes. Returns the result line's fields."""
    t0 = time.time()
    rows, who, _ = translation_report(model, test, test_scores, args.rate, device, args.eval_seconds, timbre,
                                      args.temperature)
    n = int(args.eval_seconds * args.rate)
    clean = np.mean([timbre(c[:n], written_pitch(notes, n, args.rate)) == d
                     for d, clips in test.items() for c, notes in zip(clips, test_scores)])
    say(f"translation of {len(test_scores)} held-out melodies, {args.eval_seconds:.1f} s each, from every "
        f"domain into every other ({len(who['translation'])} clips), in {time.time() - t0:.1f}s; 95% "
        "intervals over melodies:")
    say(f"  timbre classifier (partial levels at the written pitch): right on {100 * clean:.1f}% of the true "
        f"renderings, {100 * np.mean(rows['topline']['target']):.1f}% of the decoders' reconstructions "
        "(topline)")
    print_report(rows, who, list(test), say)
    fields = result_fields(rows) + f" classifier_clean={100 * clean:.1f}"
    t0 = time.time()
    probe = latent_probe(model, train, train_scores, test, test_scores, args.rate, device, args.eval_seconds,
                         steps=20 if args.dry_run else 300)  # a dry run takes seconds
    pct = {k: f"{100 * v:.1f}%" for k, v in probe.items()}
    say(f"latent probes (fresh judges trained on the frozen code of training melodies, scored on held-out "
        f"frames inside notes, {time.time() - t0:.1f}s): the instrument named in {pct['domain_frame']} from "
        f"one frame, {pct['domain']} from 21 frames (chance {100 / len(test):.1f}%); the written note in "
        f"{pct['note_linear']} by a linear probe, {pct['note']} from 21 frames (the commonest note "
        f"{pct['common_note']})")
    return fields + "".join(f" probe_{k}={100 * v:.1f}" for k, v in probe.items())


def recordings_report(model, args, test, test_scores, judge, heard, device, say):
    """The end of a run on recordings: every held-out clip translated into every other domain and
    scored (print_report). Returns the result line's fields."""
    t0 = time.time()
    rows, who, same = folder_report(model, test, test_scores, args.rate, device, args.eval_seconds, judge,
                                    args.temperature)
    say(f"translation of every held-out clip ({args.eval_seconds:.1f} s of each) into every other domain "
        f"({len(who['translation'])} clips), in {time.time() - t0:.1f}s; pitch against the clip's notes "
        "where it has a .csv, else against its own f0; "
        + ("the clips are parallel, so the log-mel distance is to the true rendering"
           if same else "the clips are not parallel: no true rendering to compare spectra with"))
    print_report(rows, who, list(test), say)
    return (result_fields(rows) + f" judge_clean={100 * np.mean(heard[0]):.1f} "
            f"judge_noisy={100 * np.mean(heard[4]):.1f}")


# ----------------------------------------------------------------------------- built-in instruments
# Three timbres play the same melodies, so the true translation of every input is known:
#   pluck: a Karplus-Strong string (its plucked shape circulating in a damped delay loop): bright
#          attack, then a decay in which the high partials die first;
#   organ: additive partials 1, 2, 4 and 8 (octaves) at a steady level with a quick attack;
#   reed:  odd partials 1, 3, 5, 7 (a closed pipe, as a clarinet) with a slow swell.


def melody(rng, seconds, rate):
    """A random tune in a pentatonic scale: [(start sample, length in samples, MIDI note)].
    Notes C2-C4 (65-262 Hz): at 4 kHz a period then lasts 15 samples or more. A decoder that runs
    free tends to lock onto a whole number of samples per period; at higher notes (7.6 samples for
    C5) that alone put its output a semitone off."""
    notes, t, key = [], 0, rng.randrange(36, 42)
    pitch = key + 12
    while t < seconds * rate:
        length = int(rate * rng.choice([0.125, 0.25, 0.25, 0.375, 0.5]))
        pitch = min(key + 19, max(key, pitch + rng.choice([-5, -3, -2, 0, 2, 3, 5])))
        pitch = key + min(range(0, 20),
                          key=lambda s: abs(s - (pitch - key)) if s % 12 in (0, 2, 4, 7, 9) else 99)
        notes.append((t, length, pitch))
        t += length
    return notes


def render(notes, domain, seconds, rate):
    """Render a melody in one instrument: float32 (seconds * rate,) in [-1, 1]."""
    out = np.zeros(int(seconds * rate) + rate, np.float32)
    for start, length, pitch in notes:
        f0 = 440.0 * 2 ** ((pitch - 69) / 12)
        t = np.arange(length) / rate
        if domain == "pluck":  # Karplus and Strong (1983), run at 4x the rate for an exact enough pitch;
            # the loop starts from the string's plucked shape, not from noise, so every note of a pitch
            # sounds the same (Jaffe and Smith 1983) and the timbre can be learnt
            up = 4
            delay = rate * up / f0
            n = max(2, int(round(delay - 0.5)))  # the loop's two-tap average adds half a sample of delay
            gain = 0.5 * 10 ** (-3 / (f0 * 1.5))  # per period, so that every string dies away 60 dB in 1.5 s
            a = np.zeros(n + 2)
            # y[t] = x[t] + gain (y[t-n] + y[t-n-1]): a damped string
            a[0], a[n], a[n + 1] = 1.0, -gain, -gain
            u = np.arange(n) / n
            # the string's shape when plucked at 30% of its length
            shape = np.where(u < 0.3, u / 0.3, (1 - u) / 0.7)
            pluck = np.zeros(length * up)
            pluck[:n] = shape - shape.mean()
            tone = resample_poly(lfilter([1.0], a, pluck), 1, up)[:length]
            # every note starts at the same level as the other instruments
            tone *= 0.6 / max(1e-9, np.abs(tone).max())
        elif domain == "organ":
            tone = sum(w * np.sin(2 * np.pi * k * f0 * t)
                       for k, w in ((1, 0.5), (2, 0.35), (4, 0.2), (8, 0.1)) if k * f0 < rate / 2)
            tone *= np.minimum(1, t / 0.01) * np.minimum(1, (length / rate - t) / 0.01)
        else:  # reed
            tone = sum(w * np.sin(2 * np.pi * k * f0 * t)
                       for k, w in ((1, 0.5), (3, 0.3), (5, 0.18), (7, 0.1)) if k * f0 < rate / 2)
            tone *= np.minimum(1, t / 0.06) * np.minimum(1, (length / rate - t) / 0.02)
        out[start:start + length] += tone.astype(np.float32)
    return np.clip(out[: int(seconds * rate)], -1, 1)


def builtin_audio(n_melodies, seconds, rate, seed):
    """({domain: [clip, ...]}, [notes, ...]): clip i of every domain plays melody i, whose notes
    (the score) are returned too."""
    rng = random.Random(seed)
    tunes = [melody(rng, seconds, rate) for _ in range(n_melodies)]
    return {d: [render(m, d, seconds, rate) for m in tunes] for d in DOMAINS}, tunes


# ----------------------------------------------------------------------------- main


RECIPES = {  # --recipe: the defaults a run starts from
    "builtin": {},
    # Recordings of real instruments (the lesson page's recipe section): on their richer timbres the
    # learned code kept the instrument along with the notes, and the decoders followed the instrument,
    # so the code is measured instead (PitchEncoder), and every clip brought to one level, so that the
    # loudness channel means the same on any recording. A recording to translate may play higher than
    # any training line (a violin's top octave into a bassoon), so every clip is also played up to an
    # octave higher, and three times the default steps learn the wider register.
    "instruments": dict(encoder="pitch", dc_lambda=0.0, clip_rms=0.2, register=12, steps=9000),
}


def get_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="builtin", choices=list(RECIPES),
                        help="settings to start from: builtin, the paper's model for the built-in "
                             "instruments; instruments, for recordings of real ones (see RECIPES); a flag "
                             "given as well still wins (default: %(default)s)")
    parser.add_argument("--data", default="builtin",
                        help="builtin, or a folder with one sub-folder of .wav files per domain (default: "
                             "%(default)s)")
    parser.add_argument("--melodies", type=int, default=64,
                        help="builtin: melodies, each rendered by every instrument (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="builtin: length of each melody (default: %(default)s)")
    parser.add_argument("--eval-melodies", type=int, default=12,
                        help="builtin: held-out melodies, rendered by every instrument, translated at the "
                             "end (default: %(default)s)")
    parser.add_argument("--test-frac", type=float, default=0.1,
                        help="folder data: held-out files per domain (default: %(default)s)")
    parser.add_argument("--test-data", default=None,
                        help="folder data: hold out this folder's clips (the same sub-folder names) instead "
                             "of --test-frac of --data's")
    parser.add_argument("--rate", type=int, default=4000,
                        help="sample rate of the model; the reference used 16000 (default: %(default)s)")
    parser.add_argument("--segment", type=int, default=1024,
                        help="samples per training segment; reference 12000 (default: %(default)s)")
    parser.add_argument("--encoder", default="learned", choices=["learned", "pitch"],
                        help="learned: the paper's encoder; pitch: the input's tracked pitch and loudness as "
                             "the code, no weights (default: %(default)s)")
    parser.add_argument("--clip-rms", type=float, default=0,
                        help="scale every clip to this RMS level, 0 to keep it as recorded "
                             "(default: %(default)s)")
    parser.add_argument("--register", type=int, default=0,
                        help="every training clip also played 4, 8, ... up to this many semitones "
                             "higher (resampled once, at the start), for recordings that play above "
                             "the training lines (default: %(default)s)")
    parser.add_argument("--enc-channels", type=int, default=32, help="reference 128 (default: %(default)s)")
    parser.add_argument("--enc-blocks", type=int, default=2, help="reference 3 (default: %(default)s)")
    parser.add_argument("--enc-layers", type=int, default=8, help="reference 10 (default: %(default)s)")
    parser.add_argument("--latent", type=int, default=16,
                        help="latent channels; reference 64 (default: %(default)s)")
    parser.add_argument("--pool", type=int, default=32,
                        help="samples per latent frame; reference 800 (default: %(default)s)")
    parser.add_argument("--dec-channels", type=int, default=32,
                        help="residual channels; reference 128 (default: %(default)s)")
    parser.add_argument("--skip-channels", type=int, default=32, help="reference 128 (default: %(default)s)")
    parser.add_argument("--dec-blocks", type=int, default=2, help="reference 4 (default: %(default)s)")
    parser.add_argument("--dec-layers", type=int, default=6, help="reference 14 (default: %(default)s)")
    parser.add_argument("--dc-channels", type=int, default=64,
                        help="domain classifier width; reference 100 (default: %(default)s)")
    parser.add_argument("--dc-kernel", type=int, default=3,
                        help="domain classifier's kernel over latent frames; reference 1 (default: "
                             "%(default)s)")
    parser.add_argument("--dc-dropout", type=float, default=0.0,
                        help="dropout on the classifier's input latent; reference 0 (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature of the final translations (default: %(default)s)")
    parser.add_argument("--dc-lambda", type=float, default=0.2,
                        help="weight of domain confusion (reference 1e-2; the lesson page's exercises try "
                             "others) (default: %(default)s)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="pitch augmentation of the encoder's input (default: %(default)s)")
    parser.add_argument("--level-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="the encoder reads its input divided by its loudness (default: %(default)s)")
    parser.add_argument("--input-noise", type=float, default=0.2,
                        help="Gaussian noise (sd) on the decoder's teacher-forced input, so that it must "
                             "read the latent (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3000,
                        help="training steps; the decoders follow the code better with more, and so do "
                             "translations (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="stop training after this many seconds, 0 for none (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=12,
                        help="segments per step, all domains in each (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate, both parts; reference 1e-3 (default: %(default)s)")
    parser.add_argument("--lr-decay", type=float, default=0.995,
                        help="autoencoder rate times this every 1,000 steps, as the reference (default: "
                             "%(default)s)")
    parser.add_argument("--anneal", type=float, default=1 / 6,
                        help="the last fraction of training, at a tenth of the autoencoder's rate; reference "
                             "0, never (default: %(default).3g)")
    parser.add_argument("--eval-seconds", type=float, default=2.0,
                        help="builtin: seconds of each held-out clip translated at the end (default: "
                             "%(default)s)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                        help="mixed precision; auto: bf16 on GPUs from Ampere on, fp16 with a GradScaler on "
                             "older GPUs (a T4), fp32 on CPUs (where bf16 made a step slower) and MPS "
                             "(default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=100,
                        help="steps between progress lines (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "umtn.pt"),
                        help="checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a GPU run repeats exactly (slower)")
    parser.add_argument("--dry-run", action="store_true",
                        help="two steps, a short evaluation, a checkpoint: checks that every line runs, in "
                             "seconds")
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line, not argparse's usage block
    parser.set_defaults(**RECIPES[parser.parse_known_args()[0].recipe])
    args = parser.parse_args()
    if not 0 <= args.anneal < 1:
        fail(f"--anneal {args.anneal} is a fraction of training: from 0 (never) to below 1")
    if args.clip_rms < 0 or not 0 <= args.register <= 24:
        fail("--clip-rms is a level (0 to keep each clip's own) and --register a number of semitones "
             "from 0 to 24")
    if args.dry_run:  # pytorch/examples' --dry-run: the whole script once, on the least data
        args.steps, args.melodies, args.eval_melodies, args.eval_seconds, args.log_every = 2, 6, 2, 0.25, 1

    return args


def setup_processes(args):
    """torchrun sets WORLD_SIZE and LOCAL_RANK; each process then trains on its own batches.
    Returns the device, this process's rank, the number of processes and whether it is distributed."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    distributed = "LOCAL_RANK" in os.environ  # under torchrun, even with one process
    if not distributed:
        return get_device(args.device), rank, world, distributed
    device, backend = torchrun_device(args.device)  # GPU number LOCAL_RANK (NCCL), or the CPU (Gloo)
    dist.init_process_group(backend)
    return device, rank, world, distributed


def main():
    args = get_args()
    device, rank, world, distributed = setup_processes(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    say("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    seed_everything(args.seed, args.deterministic)  # the same data and initial weights in every process
    if device.type == "cuda" and not args.deterministic:
        torch.backends.cudnn.benchmark = True  # fixed shapes: time cuDNN's algorithms once, keep the fastest
    train, test, train_scores, test_scores = load_audio(args, say)
    domains = list(train)

    model_args = dict(domains=domains, enc_channels=args.enc_channels, enc_blocks=args.enc_blocks,
                      enc_layers=args.enc_layers, latent=args.latent, pool=args.pool,
                      dec_channels=args.dec_channels, skip_channels=args.skip_channels,
                      dec_blocks=args.dec_blocks, dec_layers=args.dec_layers, level_norm=args.level_norm,
                      encoder=args.encoder, rate=args.rate)
    model = UMTN(**model_args).to(device)
    classifier = DomainClassifier(model.latent, args.dc_channels, len(domains), args.dc_kernel,
                                  args.dc_dropout).to(device)
    # DDP averages gradients across processes inside backward()
    ae, dc = (DDP(model), DDP(classifier)) if distributed else (model, classifier)
    fused = device.type in ("cpu", "cuda")  # one kernel updates every tensor
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=fused)
    opt_dc = torch.optim.Adam(classifier.parameters(), lr=args.lr, fused=fused)
    data = SegmentPool(train, args.segment - args.segment % args.pool, device,  # whole latent frames
                       args.rate if args.encoder == "pitch" else None, args.pool, args.register)
    if args.encoder == "pitch":  # what each decoder hears as loud, for translation (match_loudness)
        model.loudness.copy_(torch.stack(data.loudness))
    amp_dtype, needs_scaler = precision_for(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)  # fp16 only: see common.choose_precision
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({len(domains)} decoders, "
        + ("the pitch-and-loudness encoder, no weights; " if args.encoder == "pitch" else "") +
        f"receptive field {model.decoders[0].receptive_field()} samples), domain classifier "
        f"{sum(p.numel() for p in classifier.parameters()):,}; on {device}"
        + (f", {world} processes" if world > 1 else "")
        + f"; autocast {precision_name(amp_dtype, needs_scaler)}")

    step, first_bits, final_bits, confusion, train_time = fit(ae, dc, opt, opt_dc, scaler, data, args,
                                                             amp_dtype, say, rank, world)
    timbre, judge, heard = fit_judges(args, train, test, train_scores, say) if rank == 0 else (None,) * 3
    if rank == 0:
        save_checkpoint({"kind": "umtn", "model": model.state_dict(), "classifier": classifier.state_dict(),
                         "optimizer": opt.state_dict(), "model_args": model_args, "domains": domains,
                         # float32: MPS has no float64
                         "timbre_centres": (torch.tensor(timbre.centres, dtype=torch.float32) if timbre
                                            else None),
                         "rate": args.rate, "judge": judge.state_dict() if judge else None, "step": step,
                         "config": vars(args)}, Path(args.out))
        say(f"saved {args.out}")

    result = (f"result: bits_per_sample={final_bits:.3f} first_bits={first_bits:.3f} "
              f"domain_loss={confusion:.3f} chance_domain_loss={math.log(len(domains)):.3f} "
              f"samples_per_s={step * args.batch_size * data.segment * world / train_time:.0f} "
              f"train_seconds={train_time:.1f} world={world}")
    if rank == 0 and args.eval_seconds > 0:
        result += (builtin_report(model, args, train, test, train_scores, test_scores, timbre, device, say)
                   if args.data == "builtin" else
                   recordings_report(model, args, test, test_scores, judge, heard, device, say))
    say(result)
    if distributed:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
