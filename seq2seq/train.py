"""Sequence to sequence translation: a GRU encoder-decoder with attention, batched.

Every idea of the PyTorch tutorials "NLP From Scratch: Translation with a Sequence to
Sequence Network and Attention" and "Chatbot Tutorial" in one file: an encoder GRU over the
source (Sutskever et al. 2014), a decoder GRU that attends to it (Bahdanau et al. 2015; the
three scores of Luong et al. 2015), teacher forcing, masked loss, gradient clipping, greedy
and beam-search decoding, corpus BLEU-4 on a held-out split, and attention maps.

    python seq2seq/train.py                    # built-in French->English corpus; prints test BLEU
    python seq2seq/train.py --attention none   # the same without attention, for comparison
    python seq2seq/train.py --data eng-fra     # the tutorial's data.zip, downloaded once, SHA-256-checked
    python seq2seq/train.py --data data.zip    # a copy you have (the zip, eng-fra.txt or any pairs)
    python seq2seq/sample.py "elle est plus grande que moi ."   # translate with the checkpoint

A run prints the settings, the data and the model, then one line per epoch (loss, pairs/s, val
BLEU) with two validation translations, and ends with the test BLEU of the best epoch and a
`result:` line. seq2seq/README.md shows a real run and what to expect.

Speed: with Luong attention (dot/general/concat) and full teacher forcing the decoder GRU
runs over the whole target sequence in one call and attention is one batched matmul. Bahdanau
attention (whose query is the previous decoder state) and free-running steps need a Python
loop over time; the tutorial's step (Decoder.bahdanau_plain) is the default, and --fast-bahdanau
writes the GRU equations out so that each step costs one weight product (bahdanau_fused, in its
own section, tested equal).
Batches are bucketed by length, so little is padding; the output layer sees only real target
positions, in bf16 where the hardware has it.
"""
import argparse
import hashlib
import math
import os
import random
import re
import sys
import time
import unicodedata
import urllib.request
import zipfile
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import (autocast, choose_precision, cpu_has_native_bf16, get_device, precision_for,
                    precision_name, rnn_fp32, seed_everything, synchronize)

PAD, SOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<sos>", "<eos>", "<unk>"]
# The tutorial keeps only pairs whose English side starts like this (after normalisation).
ENG_PREFIXES = ("i am ", "i m ", "he is", "he s ", "she is", "she s ", "you are", "you re ",
                "we are", "we re ", "they are", "they re ")


def fail(message):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------- model


class Encoder(nn.Module):
    def __init__(self, vocab, hidden, layers, bidirectional, dropout):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden, padding_idx=PAD)
        self.gru = nn.GRU(hidden, hidden, layers, batch_first=True, bidirectional=bidirectional,
                          dropout=dropout if layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, src_len):  # src (B, S)
        x = self.dropout(self.embedding(src))  # (B, S, H)
        # Packing makes the GRU stop at each sentence's real end, so padding never enters the state.
        # It needs the lengths on the host (training keeps them there) and the batch longest first.
        # The sort is done here, its order sent to the device without waiting: enforce_sorted=False
        # would sort too, but copy its order to the GPU and back, and the CPU would wait twice a step.
        lengths = src_len.cpu()
        order = lengths.argsort(descending=True)  # (B,) on the host
        packed = pack_padded_sequence(x.index_select(0, order.to(x.device, non_blocking=True)),
                                      lengths[order], batch_first=True)
        out, h = rnn_fp32(self.gru, packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, dirs*H)
        unsort = order.argsort().to(x.device, non_blocking=True)  # back to the batch's own order
        out, h = out.index_select(0, unsort), h.index_select(1, unsort)
        if self.gru.bidirectional:  # sum the two directions, as the chatbot tutorial does
            H = self.gru.hidden_size
            out = out[..., :H] + out[..., H:]
            h = h.view(self.gru.num_layers, 2, -1, H).sum(1)  # (layers, B, H)
        return out, h


class Attention(nn.Module):
    """score(query, key) over source positions, softmax, weighted sum of the values.
    bahdanau / concat: v^T tanh(W q + U k) (Bahdanau et al. 2015 eq. 6; Luong et al. 2015 eq. 8 "concat");
    dot: q . k; general: q . W k (Luong eq. 8). The key side is computed once per sentence."""

    def __init__(self, kind, hidden):
        super().__init__()
        self.kind = kind
        if kind in ("bahdanau", "concat"):
            self.W = nn.Linear(hidden, hidden, bias=False)  # applied to the query (the decoder state)
            self.U = nn.Linear(hidden, hidden)  # applied to the keys (the encoder states)
            self.v = nn.Linear(hidden, 1, bias=False)
        elif kind == "general":
            self.W = nn.Linear(hidden, hidden, bias=False)

    def keys(self, enc_out):  # (B, S, H): the part of the score that depends only on the source
        if self.kind in ("bahdanau", "concat"):
            return self.U(enc_out)
        return self.W(enc_out) if self.kind == "general" else enc_out

    # query (B, T, H), keys (B, S, H), values (B, S, D), pad_bias (B, S)
    def forward(self, query, keys, values, pad_bias):
        return self.attend(self.W(query) if self.kind in ("bahdanau", "concat") else query, keys, values,
                           pad_bias)

    def attend(self, q, keys, values, pad_bias):  # q (B, T, H): the query after its own projection, if any
        if self.kind in ("bahdanau", "concat"):
            scores = self.v(torch.tanh(q.unsqueeze(2) + keys.unsqueeze(1))).squeeze(-1)  # (B, T, S)
        else:
            scores = q @ keys.transpose(1, 2)  # (B, T, S): one batched matmul for every step
        # pad_bias is -inf at padding: it gets no weight
        weights = (scores + pad_bias.unsqueeze(1)).softmax(-1)
        return weights @ values, weights  # context (B, T, D), weights (B, T, S)


class Decoder(nn.Module):
    """One forward serves teacher forcing (tokens = the whole shifted target) and generation
    (tokens = the last word, with the hidden state carried between calls: incremental decoding)."""

    def __init__(self, vocab, hidden, layers, attention, dropout):
        super().__init__()
        self.kind = attention
        self.embedding = nn.Embedding(vocab, hidden, padding_idx=PAD)
        # Bahdanau feeds the context into the GRU with the word; Luong combines it after the GRU.
        self.gru = nn.GRU(2 * hidden if attention == "bahdanau" else hidden, hidden, layers, batch_first=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.attention = Attention(attention, hidden) if attention != "none" else None
        self.combine = nn.Linear(2 * hidden, hidden) if attention in ("dot", "general", "concat") else None
        self.out = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(dropout)
        self.bf16_output = False  # a speed setting, not saved: train.py turns it on where bf16 is fast
        # Bahdanau: bahdanau_fused (below, --fast-bahdanau) instead of bahdanau_plain; the same numbers
        self.fused = False

    def memory(self, enc_out, src_len):
        """What every step needs from the source, computed once per sentence: attention keys,
        values, the padding bias, and for the fused Bahdanau step its folded values."""
        keys = self.attention.keys(enc_out) if self.attention is not None else None
        folded = None
        if self.kind == "bahdanau":
            # The context c_t = sum_s a_ts h_s only enters the GRU's input gates, through W_c c_t =
            # sum_s a_ts (W_c h_s). So the fused step applies W_c to the S encoder states once and
            # attends over these (B, S, 3H) values directly: no context product inside the loop.
            folded = F.linear(enc_out, self.gru.weight_ih_l0[:, self.gru.hidden_size:])
        src_len = src_len.to(enc_out.device, non_blocking=True)  # from the host, without waiting for the GPU
        # (B, S)
        pad = torch.arange(enc_out.shape[1], device=enc_out.device).unsqueeze(0) >= src_len.unsqueeze(1)
        pad_bias = torch.zeros(pad.shape, device=enc_out.device).masked_fill(pad, float("-inf"))
        return keys, enc_out, pad_bias, folded

    def forward(self, tokens, hidden, memory):  # tokens (B, T), hidden (layers, B, H)
        x = self.dropout(self.embedding(tokens))  # (B, T, H)
        weights = None
        if self.kind == "bahdanau":  # the query is the previous state, so step through time
            if self.fused:
                out, hidden, weights = bahdanau_fused(self, x, hidden, *memory)
            else:
                out, hidden, weights = self.bahdanau_plain(x, hidden, *memory)
        else:
            out, hidden = rnn_fp32(self.gru, x, hidden)  # all T steps in one call
            if self.attention is not None:
                context, weights = self.attention(out, *memory[:3])
                # Luong eq. 5: h~ = tanh(Wc [c; h])
                out = torch.tanh(self.combine(torch.cat([out, context], -1)))
        return out, hidden, weights  # features (B, T, H): self.project turns them into logits

    def bahdanau_plain(self, x, hidden, keys, values, pad_bias, folded=None):
        """The translation tutorial's AttnDecoderRNN, one step per target word: the previous state
        of the top layer is the query; attention over the encoder states forms the context vector
        c_t; [word; context] is the GRU's input for one step (Bahdanau et al. 2015, section 3.1)."""
        outs, ws = [], []
        for t in range(x.shape[1]):
            query = hidden[-1].unsqueeze(1)  # (B, 1, H): s_{t-1}
            context, w = self.attention(query, keys, values, pad_bias)  # c_t (B, 1, H), weights (B, 1, S)
            out, hidden = rnn_fp32(self.gru, torch.cat([x[:, t:t + 1], context], -1), hidden)  # (B, 1, H)
            outs.append(out)
            ws.append(w)
        return torch.cat(outs, 1), hidden, torch.cat(ws, 1)  # (B, T, H), (L, B, H), (B, T, S)

    def project(self, features):  # (..., H) -> (..., V) logits over the target vocabulary
        # The largest product of the model (N x H x V): with bf16_output it alone runs in bf16 (see
        # bf16_output_layer).
        with torch.autocast(features.device.type,
                            dtype=torch.bfloat16) if self.bf16_output else nullcontext():
            return self.out(self.dropout(features))


class Seq2Seq(nn.Module):
    def __init__(self, src_vocab, tgt_vocab, hidden=128, layers=1, bidirectional=True, attention="general",
                 dropout=0.1):
        super().__init__()
        self.encoder = Encoder(src_vocab, hidden, layers, bidirectional, dropout)
        self.decoder = Decoder(tgt_vocab, hidden, layers, attention, dropout)

    def encode(self, src, src_len):
        enc_out, hidden = self.encoder(src, src_len)
        # the memory is computed once and reused at every step
        return self.decoder.memory(enc_out, src_len), hidden

    def forward(self, src, src_len, tgt_in, keep):
        """Teacher forcing: logits (N, V) for the N real target positions keep (N,), indices into
        the flattened (B * T) positions (see real_positions). The output layer is the costliest
        matmul, so padding positions never reach it."""
        memory, hidden = self.encode(src, src_len)
        return self.decoder.project(self.decoder(tgt_in, hidden, memory)[0].flatten(0, 1)[keep])

    def free_running(self, src, src_len, T, keep):
        """Training without teacher forcing: each step is fed the model's own previous guess."""
        memory, hidden = self.encode(src, src_len)
        token, logits = torch.full((src.shape[0], 1), SOS, device=src.device), []
        for _ in range(T):
            features, hidden, _ = self.decoder(token, hidden, memory)
            logits.append(self.decoder.project(features))
            token = logits[-1].argmax(-1).detach()
        return torch.cat(logits, 1).flatten(0, 1)[keep]

    @torch.inference_mode()
    def greedy(self, src, src_len, max_len):
        """Batched greedy decoding: (B, L) tokens and (B, L, S) attention; stops when all have <eos>."""
        memory, hidden = self.encode(src, src_len)
        token = torch.full((src.shape[0], 1), SOS, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        tokens, weights = [], []
        for _ in range(max_len):
            features, hidden, w = self.decoder(token, hidden, memory)
            token = self.decoder.project(features).argmax(-1)  # (B, 1)
            tokens.append(token)
            weights.append(w if w is not None
                           else torch.zeros(src.shape[0], 1, src.shape[1], device=src.device))
            done |= token.squeeze(1) == EOS
            if done.all():
                break
        return torch.cat(tokens, 1), torch.cat(weights, 1)

    @torch.inference_mode()
    def beam_search(self, src, src_len, beam, max_len):
        """Beam search for one sentence (src (1, S)); the beams travel as a batch. Finished
        hypotheses are ranked by mean log-probability per token, so longer ones are not punished.
        With beam 1 it is exactly greedy decoding. Returns (tokens, attention (L, S))."""
        memory, hidden = self.encode(src, src_len)
        memory = tuple(m.expand(beam, *m.shape[1:]) if m is not None else None for m in memory)
        # hidden (layers, k, H) holds the k live hypotheses' states, one at the start
        scores = torch.zeros(1, device=src.device)  # log-probabilities of the live hypotheses
        seqs, attns = [[]], [[]]
        finished = []  # (score per token, tokens, attention rows)
        token = torch.full((1, 1), SOS, device=src.device)
        for step in range(max_len):
            k = len(seqs)
            features, h, w = self.decoder(token, hidden,
                                          tuple(m[:k] if m is not None else None for m in memory))
            # (k, V)
            logp = self.decoder.project(features[:, -1]).float().log_softmax(-1) + scores.unsqueeze(1)
            top, flat = logp.flatten().topk(min(2 * beam, logp.numel()))
            keep, new_scores, new_seqs, new_attns = [], [], [], []
            for score, f in zip(top.tolist(), flat.tolist()):
                b, word = divmod(f, logp.shape[1])
                row = w[b, -1] if w is not None else torch.zeros(src.shape[1], device=src.device)
                if word == EOS or step == max_len - 1:
                    finished.append((score / (len(seqs[b]) + 1), seqs[b] + [word], attns[b] + [row]))
                else:
                    keep.append(b)
                    new_scores.append(score)
                    new_seqs.append(seqs[b] + [word])
                    new_attns.append(attns[b] + [row])
                if len(finished) >= beam or len(keep) == beam:
                    break
            if len(finished) >= beam or not keep:
                break
            idx = torch.tensor(keep, device=src.device)
            # kept contiguous: cuDNN refuses a strided hx (a slice such as hidden[:, :1] with 2+ layers)
            hidden = h[:, idx].contiguous()
            scores, seqs, attns = torch.tensor(new_scores, device=src.device), new_seqs, new_attns
            token = torch.tensor([s[-1] for s in seqs], device=src.device).unsqueeze(1)
        best = max(finished, key=lambda f: f[0])
        return best[1], torch.stack(best[2])


# ------------------------------------------------------------------ the Bahdanau step, fused for speed
# Decoder.bahdanau_plain is the lesson; --fast-bahdanau runs this instead: the same numbers (the tests
# check), fewer and larger products per step.


def bahdanau_fused(decoder, x, hidden, keys, values, pad_bias, folded):
    """Decoder.bahdanau_plain, computed faster and tested equal to it (test_all.py). The GRU equations
    (Cho et al. 2014, in nn.GRU's gate order r, z, n and with nn.GRU's own weights) are
    written out so that each step needs one weight product instead of four:
    - the word's share of the input gates, W_w x_t, does not depend on the state, so it is
      computed for all T steps at once before the loop;
    - the context's share comes from the folded values prepared in memory();
    - the attention query W s_{t-1} and the recurrent gates W_hh s_{t-1} read the same
      state, so one product with the two weight matrices stacked gives both."""
    g, H, L = decoder.gru, decoder.gru.hidden_size, decoder.gru.num_layers
    # layer 0: (3H, 2H) for [word; context], the others (3H, H)
    w_ih = [getattr(g, f"weight_ih_l{l}") for l in range(L)]
    b_ih = [getattr(g, f"bias_ih_l{l}") for l in range(L)]
    w_hh = [getattr(g, f"weight_hh_l{l}") for l in range(L)]  # (3H, H)
    b_hh = [getattr(g, f"bias_hh_l{l}") for l in range(L)]
    word_gates = F.linear(x, w_ih[0][:, :H], b_ih[0]).unbind(1)  # T x (B, 3H), all steps in one product
    w_top = torch.cat([w_hh[-1], decoder.attention.W.weight])  # (3H + H, H): recurrent gates and query
    b_top = torch.cat([b_hh[-1], b_hh[-1].new_zeros(H)])
    h = list(hidden.unbind(0))  # per layer (B, H)
    outs, ws = [], []
    # (Whole tensors are split and unbound rather than sliced with [:, a:b] inside the loop:
    # the backward of a slice allocates a zero tensor of the full size at every step.)
    for t in range(x.shape[1]):
        # r|z (B, 2H), n (B, H), query (B, H)
        *top_gates, q = F.linear(h[-1], w_top, b_top).split([2 * H, H, H], -1)
        # W_c c_t (B, 1, 3H), (B, 1, S)
        context_gates, w = decoder.attention.attend(q.unsqueeze(1), keys, folded, pad_bias)
        inp = word_gates[t] + context_gates.squeeze(1)  # layer 0's input gates (B, 3H)
        for l in range(L):
            if l > 0:  # the layer below's new state, with nn.GRU's dropout between layers
                inp = F.linear(F.dropout(h[l - 1], g.dropout, decoder.training), w_ih[l], b_ih[l])
            if l == L - 1:
                rec_rz, rec_n = top_gates
            else:
                rec_rz, rec_n = F.linear(h[l], w_hh[l], b_hh[l]).split([2 * H, H], -1)
            inp_rz, inp_n = inp.split([2 * H, H], -1)
            r, z = torch.sigmoid(inp_rz + rec_rz).chunk(2, -1)  # reset and update gates (B, H) each
            n = torch.tanh(inp_n + r * rec_n)  # candidate state
            h[l] = n + z * (h[l] - n)  # = (1 - z) n + z h
        outs.append(h[-1])
        ws.append(w)
    return torch.stack(outs, 1), torch.stack(h), torch.cat(ws, 1)  # (B, T, H), (L, B, H), (B, T, S)


# ------------------------------------------------------------------- data: pairs files, vocabularies, batches


def normalize(s):
    """The tutorial's normalisation: accents dropped (Unicode NFD, combining marks removed),
    lower case, ! and ? split off, every other non-letter run (. included) becomes a space."""
    s = "".join(c for c in unicodedata.normalize("NFD", s.lower().strip()) if unicodedata.category(c) != "Mn")
    s = re.sub(r"([.!?])", r" \1", s)
    return re.sub(r"[^a-zA-Z!?]+", " ", s).strip()  # the tutorial drops "." here too, keeping ! and ?


def read_pairs_file(path):
    """Tab-separated pairs from a UTF-8 text file or a zip holding one (the tutorial's data.zip)."""
    path = Path(path)
    if not path.is_file():
        fail(f"--data {path}: no such file (give eng-fra.txt, the tutorial's data.zip, or any tab-separated "
             "pairs)")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(".txt")]
                if not names:
                    fail(f"{path} holds no .txt file of tab-separated pairs")
                name = next((n for n in names if n.endswith("eng-fra.txt")), names[0])
                text = z.read(name).decode("utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    except (zipfile.BadZipFile, OSError) as e:
        fail(f"cannot read {path}: {e}")
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) < 2:  # a third column (Tatoeba's attribution) is ignored
            fail(f"{path} line {number}: expected 2 tab-separated columns, found {len(columns)}")
        pairs.append((normalize(columns[0]), normalize(columns[1])))
    if not pairs:
        fail(f"{path} is empty: expected lines of 'sentence<TAB>translation'")
    return pairs


ENG_FRA_URL = "https://download.pytorch.org/tutorial/data.zip"  # the translation tutorial's download


ENG_FRA_SHA256 = "fb317e80248faeb62dc25ef3390ae24ca34b94e276bbc5141fd8862c2200bff5"


def fetch_eng_fra(data_dir):
    """The tutorial's data.zip in data_dir, downloaded when missing. A download is checked
    before it takes the name data.zip, and an existing file is checked before it is read."""
    path = Path(data_dir) / "data.zip"
    if not path.is_file():
        print(f"downloading {ENG_FRA_URL} (2.9 MB) to {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        try:
            urllib.request.urlretrieve(ENG_FRA_URL, part)
        except OSError as e:
            fail(f"could not download the tutorial's data ({e}); offline? fetch {ENG_FRA_URL} elsewhere and "
                 "pass it with --data")
        if hashlib.sha256(part.read_bytes()).hexdigest() != ENG_FRA_SHA256:  # 2.9 MB: read at once
            part.unlink()
            fail(f"the download from {ENG_FRA_URL} has the wrong SHA-256 (expected {ENG_FRA_SHA256}); "
                 "nothing was kept")
        os.replace(part, path)
    if hashlib.sha256(path.read_bytes()).hexdigest() != ENG_FRA_SHA256:
        fail(f"{path} has the wrong SHA-256 (expected {ENG_FRA_SHA256}): delete it to download it again")
    return path


def split_pairs(pairs, val_frac, test_frac, seed):
    """Seeded shuffle, then (train, val, test). The pairs are distinct, so the splits share none."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    n_test, n_val = max(1, int(test_frac * len(pairs))), max(1, int(val_frac * len(pairs)))
    return pairs[n_test + n_val:], pairs[n_test:n_test + n_val], pairs[:n_test]


class Vocab:
    """Words <-> indices. The four specials come first; words seen fewer than min_count
    times in training are left out and read as <unk> (the chatbot tutorial's trimming)."""

    def __init__(self, words):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, sentences, min_count):
        counts = Counter(w for s in sentences for w in s.split())
        return cls(SPECIALS + sorted(w for w, c in counts.items() if c >= min_count))

    def encode(self, sentence):
        return [self.index.get(w, UNK) for w in sentence.split()]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)

    def __len__(self):
        return len(self.words)


def to_tensors(pairs, src_vocab, tgt_vocab, device):
    """Padded index tensors on the device: src (N, S), src_len (N,), tgt (N, T+1) ending in <eos>."""
    src = [src_vocab.encode(s) for s, _ in pairs]
    tgt = [tgt_vocab.encode(t) + [EOS] for _, t in pairs]
    pad = lambda seqs: torch.tensor([s + [PAD] * (max(map(len, seqs)) - len(s)) for s in seqs],
                                    dtype=torch.long)
    return pad(src).to(device), torch.tensor([len(s) for s in src]).to(device), pad(tgt).to(device)


def batches(src_len, tgt_len, batch_size, generator):
    """Shuffled batches of similar length (bucketing): shuffle, sort chunks of 50 batches by target
    length and then source length, cut into batches, shuffle the batches. Less padding, less wasted
    compute. The target comes first because each target word is a decoder step, the costliest part
    (on eng-fra this cuts the decoder steps per batch from 8.5 to 6.3 against sorting by source)."""
    order = torch.randperm(len(src_len), generator=generator)
    key = (tgt_len * (int(src_len.max()) + 1) + src_len).cpu()
    chunk = 50 * batch_size
    out = []
    for i in range(0, len(order), chunk):
        idx = order[i:i + chunk]
        idx = idx[key[idx].argsort()]
        out += list(idx.split(batch_size))
    return [out[j] for j in torch.randperm(len(out), generator=generator)]


def load_pairs(args):
    """(English, French) pairs -> (source, target) pairs, split into train, val and test, and the
    vocabularies, built from the training pairs only."""
    if args.data == "builtin":
        pairs = builtin_pairs(args.pairs, args.seed, args.max_length)
    else:
        raw = read_pairs_file(fetch_eng_fra(args.data_dir) if args.data == "eng-fra" else args.data)
        short = lambda e, f: len(e.split()) < args.max_length and len(f.split()) < args.max_length
        pairs = [(e, f) for e, f in raw if short(e, f) and (args.all_pairs or e.startswith(ENG_PREFIXES))]
        print(f"read {len(raw):,} pairs from {args.data}; {len(pairs):,} pass the filter; "
              f"{len(set(pairs)):,} distinct")
        pairs = sorted(set(pairs))  # duplicates removed, so no test pair is also a training pair
    pairs = [(e, f) if args.reverse else (f, e) for e, f in pairs]
    if args.reverse_source:  # Sutskever et al. 2014 sec. 3.3: reversed input shortens early dependencies
        pairs = [(" ".join(s.split()[::-1]), t) for s, t in pairs]
    if len(pairs) < 20:
        fail(f"only {len(pairs)} usable pairs in {args.data}: need at least 20 under --max-length "
             f"{args.max_length}")
    train_pairs, val_pairs, test_pairs = split_pairs(pairs, args.val_frac, args.test_frac, args.seed)
    src_vocab = Vocab.build([s for s, _ in train_pairs], args.min_count)
    tgt_vocab = Vocab.build([t for _, t in train_pairs], args.min_count)
    print(f"data: {len(train_pairs)} train / {len(val_pairs)} val / {len(test_pairs)} test pairs; "
          f"vocabularies {len(src_vocab)} source, {len(tgt_vocab)} target words")
    for s, t in train_pairs[:3]:
        print(f"  example: {s}  ->  {t}")
    return train_pairs, val_pairs, test_pairs, src_vocab, tgt_vocab


# ----------------------------------------------------------------------------- training


def real_positions(lengths, T):
    """lengths (B,) on the host -> (N,) indices of the real (not padding) positions of a (B, T)
    batch, flattened row by row. Computed on the host from the lengths, so selecting them on a
    GPU needs no sync (a boolean mask would: its size is known only after counting)."""
    return (torch.arange(T) < lengths.cpu()[:, None]).flatten().nonzero().squeeze(1)


def train_step(model, optimizer, scaler, src, src_len, tgt, tgt_len, teacher_forcing, clip, amp_dtype):
    """One update on a batch: src (B, S) and tgt (B, T) padded, tgt ending in <eos>; their lengths
    src_len, tgt_len (B,) on the host. Returns the loss, left on the device (reading it would sync)."""
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], SOS), tgt[:, :-1]], 1)  # shifted right: <sos> w1 w2 ...
    # (N,) the real target positions
    keep = real_positions(tgt_len, tgt.shape[1]).to(tgt.device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with autocast(src.device, amp_dtype):
        if random.random() < teacher_forcing:  # decided per batch, as in the chatbot tutorial
            logits = model(src, src_len, tgt_in, keep)  # (N, V)
        else:
            logits = model.free_running(src, src_len, tgt.shape[1], keep)
        # Masked loss: only real positions count, so padding does not dilute short sentences.
        loss = F.cross_entropy(logits.float(), tgt.flatten()[keep])
    if not scaler.is_enabled():
        loss.backward()
        # keeps an exploding RNN gradient in check; foreach left to PyTorch, which uses it where the
        # device has it (MPS has not, and refuses foreach=True)
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    else:  # fp16 mixed precision: the loss scaled up so small gradients do not round to zero
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # the true gradients, before clipping
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)  # skipped if a gradient overflowed
        scaler.update()
    return loss.detach()


def bf16_output_layer(device_type, choice, cpu_native_bf16, gpu_capability=None):
    """seq2seq's addition to the --amp rule of common.py: "bf16-output" runs only the (N x H x V)
    output product in bf16, and auto chooses it on a CPU with native bf16 (AVX512-BF16 or AMX),
    where that product gains from bf16 while the recurrent steps' small products lose (their
    casts cost more than they save). An explicit bf16-output obeys common.py's bf16 rule: not used
    on MPS, warned of on a GPU without bf16 tensor cores.
    -> (whether the output layer runs in bf16, a warning or None)."""
    if choice == "bf16-output":
        dtype, _, warning = choose_precision(device_type, "bf16", gpu_capability)
        return dtype is not None, warning and warning.replace("--amp bf16", "--amp bf16-output")
    return choice == "auto" and device_type == "cpu" and cpu_native_bf16, None


def save_checkpoint(obj, path):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device):
    """A seq2seq checkpoint and its model, or one line saying what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"no checkpoint at {path}: run python seq2seq/train.py first")
    try:
        # onto the CPU first: a checkpoint saved on any device opens on any other, and the model is moved
        # afterwards (MPS, for one, cannot hold every dtype a file may carry)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "seq2seq":
        fail(f"{path} is not a seq2seq checkpoint (it was written by another script): train one with python "
             "seq2seq/train.py")
    model = Seq2Seq(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    model.to(device)
    return ckpt, model.eval(), Vocab(ckpt["src_vocab"]), Vocab(ckpt["tgt_vocab"])


def choose_amp(model, args, device):
    """The --amp rule of common.py, with seq2seq's bf16 output layer. Returns autocast's dtype, the
    GradScaler (enabled for fp16 only), and the name of what runs in lower precision."""
    amp_dtype, needs_scaler = precision_for(device, "off" if args.amp == "bf16-output" else args.amp)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    bf16_output, warning = bf16_output_layer(device.type, args.amp, cpu_has_native_bf16(), capability)
    if warning:
        print(warning, file=sys.stderr)
    model.decoder.bf16_output = amp_dtype is None and bf16_output
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)  # fp16 only: see common.choose_precision
    return amp_dtype, scaler, "bf16-output" if model.decoder.bf16_output else precision_name(amp_dtype,
                                                                                             needs_scaler)


def train_epoch(model, optimizer, scaler, data, args, generator, amp_dtype, time_left):
    """One pass over the training pairs in length-bucketed batches, or until time_left seconds have
    passed. data: src (N, S) and tgt (N, T) on the device, their lengths (N,) on the host. Returns
    the summed loss (on the device), the batches and the pairs trained on."""
    src, src_len, tgt, tgt_len = data
    model.train()
    t0, loss_sum, n_batches, seen = time.time(), torch.zeros((), device=src.device), 0, 0
    for idx in batches(src_len, tgt_len, args.batch_size, generator):
        S, T = int(src_len[idx].max()), int(tgt_len[idx].max())  # trim padding to this batch's longest
        rows = idx.to(src.device, non_blocking=True)
        loss_sum += train_step(model, optimizer, scaler, src[rows, :S], src_len[idx], tgt[rows, :T],
                               tgt_len[idx], args.teacher_forcing, args.clip, amp_dtype)
        n_batches, seen = n_batches + 1, seen + len(idx)
        if time.time() - t0 > time_left or args.dry_run and n_batches == 2:
            break
    return loss_sum, n_batches, seen


def eta(train_time, epoch, args):
    """Seconds of training left: the epochs to come at the pace so far, within any --time-limit."""
    remaining = train_time / epoch * (args.epochs - epoch)
    return max(0.0, min(remaining, args.time_limit - train_time)) if args.time_limit else remaining


def fit(model, optimizer, scaler, data, val_pairs, vocabs, args, amp_dtype, save):
    """The epoch loop: train, translate the validation pairs, log, save the best epoch. Returns the
    best validation BLEU, the pairs trained on and the seconds spent training."""
    best_bleu, train_time, seen = -1.0, 0.0, 0
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        time_left = args.time_limit - train_time if args.time_limit else math.inf
        loss_sum, n_batches, n = train_epoch(model, optimizer, scaler, data, args, generator, amp_dtype,
                                             time_left)
        synchronize(data[0].device)  # the epoch's GPU work is done before the clock is read
        dt, seen = time.time() - t0, seen + n
        train_time += dt
        bleu, exact, outputs = translate_split(model, val_pairs, *vocabs, data[0].device, args.max_length + 1)
        remaining = eta(train_time, epoch, args)
        print(f"epoch {epoch}/{args.epochs} | loss {loss_sum.item() / n_batches:.4f} | "
              f"{n_batches * args.batch_size / dt:,.0f} pairs/s | {1000 * dt / n_batches:.1f} ms/step | "
              f"elapsed {train_time:.0f}s | eta {remaining:.0f}s | val BLEU {bleu:.4f} "
              f"exact {100 * exact:.1f}%")
        for (s, t), o in list(zip(val_pairs, outputs))[:2]:
            print(f"  > {s}\n  = {t}\n  < {o}")
        if bleu > best_bleu:
            best_bleu = bleu
            save(epoch, best_bleu)
        if args.time_limit and train_time > args.time_limit:
            print(f"time limit of {args.time_limit:.0f}s reached")
            break
    return best_bleu, seen, train_time


# ----------------------------------------------------------------------------- evaluation


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus-level BLEU-4 (Papineni et al. 2002) on whitespace tokens, one reference each:
    n-gram counts clipped by the reference's and summed over the corpus for n = 1..4, their
    geometric mean, times the brevity penalty exp(1 - r/c) when the output is shorter."""
    clipped, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            clipped[n - 1] += sum(min(count, r[gram]) for gram, count in h.items())
            total[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(clipped) == 0:
        return 0.0
    log_precision = sum(math.log(c / t) for c, t in zip(clipped, total)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def strip_eos(ids):
    return ids[:ids.index(EOS)] if EOS in ids else ids


def translate_split(model, pairs, src_vocab, tgt_vocab, device, max_len, beam=1, batch_size=500):
    """Decode every source of a split: batched greedy, or beam search one sentence at a time."""
    model.eval()
    outputs = []
    for i in range(0, len(pairs), batch_size):
        src, src_len, _ = to_tensors(pairs[i:i + batch_size], src_vocab, tgt_vocab, device)
        if beam > 1:
            for j in range(len(src)):  # one sentence at a time: its beams are the batch
                tokens, _ = model.beam_search(src[j:j + 1, :src_len[j]], src_len[j:j + 1], beam, max_len)
                outputs.append(tgt_vocab.decode(strip_eos(tokens)))
        else:
            tokens, _ = model.greedy(src, src_len, max_len)
            outputs += [tgt_vocab.decode(strip_eos(row)) for row in tokens.tolist()]
    bleu = corpus_bleu([o.split() for o in outputs], [t.split() for _, t in pairs])
    exact = sum(o == t for o, (_, t) in zip(outputs, pairs)) / len(pairs)
    return bleu, exact, outputs


# ----------------------------------------------------- built-in corpus: French sentences from a small grammar
# A small English-French grammar in the territory of the tutorial's filtered data. French
# agrees where English does not (adjectives with gender and number, articles with the noun),
# puts colour adjectives after the noun, wraps negation around the verb (ne ... pas) and says
# "j ai faim" for "i am hungry": a decoder must look at the right source word at each step.


SUBJECTS = [  # English, French, person (0-5 selects the verb form), plural
    ("i", "je", 0, False), ("you", "tu", 1, False), ("he", "il", 2, False), ("she", "elle", 2, False),
    ("we", "nous", 3, True), ("you", "vous", 4, True), ("they", "ils", 5, True), ("they", "elles", 5, True)]


BE_EN = {"i": ("am", "m"), "you": ("are", "re"), "he": ("is", "s"), "she": ("is", "s"), "we": ("are", "re"),
         "they": ("are", "re")}


ETRE = ["suis", "es", "est", "sommes", "etes", "sont"]


AVOIR = ["ai", "as", "a", "avons", "avez", "ont"]


def forms(m, f=None, mp=None, fp=None):
    """French adjective forms (masc, fem, masc plural, fem plural), regular unless given."""
    f = f or (m if m.endswith("e") else m + "e")
    return (m, f, mp or (m if m[-1] in "sx" else m + "s"), fp or f + "s")


ADJECTIVES = {  # English: (comparative, French forms)
    "tall": ("taller", forms("grand")), "small": ("smaller", forms("petit")),
    "happy": ("happier", forms("heureux", "heureuse")),
    "tired": ("more tired", forms("fatigue", "fatiguee")), "sad": ("sadder", forms("triste")),
    "ready": (None, forms("pret", "prete")),
    "busy": ("busier", forms("occupe", "occupee")), "rich": ("richer", forms("riche")),
    "young": ("younger", forms("jeune")),
    "angry": (None, forms("fache", "fachee")), "sick": (None, forms("malade")),
    "strong": ("stronger", forms("fort")),
    "lazy": ("lazier", forms("paresseux", "paresseuse")), "proud": ("prouder", forms("fier", "fiere")),
    "married": (None, forms("marie", "mariee")), "alone": (None, forms("seul")),
    "polite": ("more polite", forms("poli")),
    "curious": ("more curious", forms("curieux", "curieuse")), "calm": ("calmer", forms("calme")),
    "shy": ("shyer", forms("timide")),
    "smart": ("smarter", forms("intelligent")), "brave": ("braver", forms("courageux", "courageuse")),
    "late": (None, ("en retard",) * 4), "early": (None, ("en avance",) * 4),
}


AVOIR_EXPRESSIONS = {"hungry": "faim", "thirsty": "soif", "cold": "froid", "hot": "chaud", "afraid": "peur",
                     "right": "raison", "wrong": "tort", "sleepy": "sommeil"}


AGES = {"ten": "dix", "twelve": "douze", "fifteen": "quinze", "twenty": "vingt", "thirty": "trente",
        "forty": "quarante", "fifty": "cinquante", "sixty": "soixante"}


PRONOUNS = {"me": "moi", "you": "toi", "him": "lui", "her": "elle", "us": "nous", "them": "eux"}


INTENSIFIERS = {"very": "tres", "too": "trop", "so": "si"}


VERBS = {  # English -ing form: the six French present-tense forms
    "looking at": "regarde regardes regarde regardons regardez regardent",
    "buying": "achete achetes achete achetons achetez achetent",
    "washing": "lave laves lave lavons lavez lavent",
    "painting": "peins peins peint peignons peignez peignent",
    "drawing": "dessine dessines dessine dessinons dessinez dessinent",
    "selling": "vends vends vend vendons vendez vendent",
    "carrying": "porte portes porte portons portez portent",
    "cleaning": "nettoie nettoies nettoie nettoyons nettoyez nettoient",
    "looking for": "cherche cherches cherche cherchons cherchez cherchent",
    "repairing": "repare repares repare reparons reparez reparent"}


NOUNS = [  # English singular, plural; French singular, plural; feminine?
    ("car", "cars", "voiture", "voitures", True), ("book", "books", "livre", "livres", False),
    ("house", "houses", "maison", "maisons", True),
    ("letter", "letters", "lettre", "lettres", True), ("chair", "chairs", "chaise", "chaises", True),
    ("bike", "bikes", "velo", "velos", False),
    ("shirt", "shirts", "chemise", "chemises", True), ("hat", "hats", "chapeau", "chapeaux", False),
    ("ball", "balls", "balle", "balles", True),
    ("picture", "pictures", "photo", "photos", True), ("window", "windows", "fenetre", "fenetres", True),
    ("table", "tables", "table", "tables", True),
    ("box", "boxes", "boite", "boites", True), ("door", "doors", "porte", "portes", True),
    ("boat", "boats", "bateau", "bateaux", False),
    ("bag", "bags", "sac", "sacs", False), ("coat", "coats", "manteau", "manteaux", False),
    ("cup", "cups", "tasse", "tasses", True),
    ("pen", "pens", "stylo", "stylos", False), ("dress", "dresses", "robe", "robes", True),
    ("truck", "trucks", "camion", "camions", False),
    ("horse", "horses", "cheval", "chevaux", False), ("dog", "dogs", "chien", "chiens", False),
    ("cat", "cats", "chat", "chats", False)]


BEFORE_NOUN = {"small": forms("petit"), "big": forms("grand"),
               "new": forms("nouveau", "nouvelle", "nouveaux"),
               "old": forms("vieux", "vieille"), "pretty": forms("joli"),
               "beautiful": forms("beau", "belle", "beaux")}


COLOURS = {"red": forms("rouge"), "green": forms("vert"), "white": forms("blanc", "blanche"),
           "black": forms("noir"),
           "blue": forms("bleu"), "yellow": forms("jaune"), "grey": forms("gris", "grise")}


DETERMINERS = {  # English: (plural?, French masc, French fem)
    "a": (False, "un", "une"), "the": (False, "le", "la"), "my": (False, "mon", "ma"),
    "this": (False, "ce", "cette"),
    "the+": (True, "les", "les"), "my+": (True, "mes", "mes"), "these": (True, "ces", "ces"),
    "two": (True, "deux", "deux"), "three": (True, "trois", "trois")}


PLACES = {"kitchen": "la cuisine", "garden": "le jardin", "office": "le bureau", "park": "le parc",
          "bedroom": "la chambre",
          "car": "la voiture", "street": "la rue", "library": "la bibliotheque", "shop": "le magasin",
          "living room": "le salon"}


def elide(word, following):
    """je -> j, ne -> n before a vowel sound, as French writes j'ai, n'est (normalised to j ai, n est)."""
    return word[0] if word in ("je", "ne") and following[0] in "aeiouh" else word


def french_subject_verb(fr_subj, verb, negative):
    """'je' + 'suis' -> 'je suis'; negative: 'je ne suis pas', 'il n est pas'."""
    if negative:
        return f"{elide(fr_subj, 'ne')} {elide('ne', verb)} {verb} pas"
    return f"{elide(fr_subj, verb)} {verb}"


def make_pair(rng):
    """One random (English, French) pair, both normalised as the tutorial normalises."""
    en_subj, fr_subj, person, plural = rng.choice(SUBJECTS)
    feminine = fr_subj in ("elle", "elles") or (fr_subj not in ("il", "ils") and rng.random() < 0.5)
    agree = (2 if plural else 0) + (1 if feminine else 0)  # index into an adjective's four forms
    negative = rng.random() < 0.3
    full, short = BE_EN[en_subj]
    # negatives use the contraction: "he s not"
    en_be = f"{en_subj} {short} not" if negative else f"{en_subj} {full}"
    kind = rng.choices(["adjective", "comparative", "avoir", "age", "place", "verb"],
                       [20, 10, 10, 5, 5, 50])[0]
    if kind in ("adjective", "comparative"):
        en_adj, (comparative, fr_forms) = rng.choice(list(ADJECTIVES.items()))
        if kind == "comparative" and comparative:
            en_pron, fr_pron = rng.choice(list(PRONOUNS.items()))
            fr = f"{french_subject_verb(fr_subj, ETRE[person], negative)} plus {fr_forms[agree]}"
            fr += f" que {fr_pron} ."
            return f"{en_be} {comparative} than {en_pron} .", fr
        en_int, fr_int = rng.choice([("", "")] * 3 + list(INTENSIFIERS.items()))
        fr = f"{french_subject_verb(fr_subj, ETRE[person], negative)} {fr_int} {fr_forms[agree]} ."
        return re.sub(" +", " ", f"{en_be} {en_int} {en_adj} ."), re.sub(" +", " ", fr)
    if kind == "avoir":
        en_word, fr_word = rng.choice(list(AVOIR_EXPRESSIONS.items()))
        very = rng.random() < 0.3
        fr = f"{french_subject_verb(fr_subj, AVOIR[person], negative)} {'tres ' if very else ''}{fr_word} ."
        return f"{en_be} {'very ' if very else ''}{en_word} .", fr
    if kind == "age":
        en_age, fr_age = rng.choice(list(AGES.items()))
        fr = f"{french_subject_verb(fr_subj, AVOIR[person], negative)} {fr_age} ans ."
        return f"{en_be} {en_age} years old .", fr
    if kind == "place":
        en_place, fr_place = rng.choice(list(PLACES.items()))
        fr = f"{french_subject_verb(fr_subj, ETRE[person], negative)} dans {fr_place} ."
        return f"{en_be} in the {en_place} .", fr
    # "she is buying a small red car and two books" -> "elle achete une petite voiture rouge et deux livres"
    verb_en, verb_fr = rng.choice(list(VERBS.items()))
    (obj_en, obj_fr), and_en, and_fr = noun_phrase(rng), "", ""
    if rng.random() < 0.5:  # a second object: more to carry, and a long way from the verb
        second_en, second_fr = noun_phrase(rng)
        and_en, and_fr = f" and {second_en}", f" et {second_fr}"
    fr_verb = verb_fr.split()[person]
    fr = f"{french_subject_verb(fr_subj, fr_verb, negative)} {obj_fr}{and_fr} ."
    return f"{en_be} {verb_en} {obj_en}{and_en} .", fr


def noun_phrase(rng):
    """('a small red car', 'une petite voiture rouge'): the article and both adjectives agree
    with the noun's gender and number; the colour moves behind the noun in French."""
    det_en, (det_plural, det_m, det_f) = rng.choice(list(DETERMINERS.items()))
    en_sg, en_pl, fr_sg, fr_pl, fem = rng.choice(NOUNS)
    agree = (2 if det_plural else 0) + (1 if fem else 0)
    words_en, words_fr = [det_en.rstrip("+")], [det_f if fem else det_m]
    if rng.random() < 0.4:
        adj_en, adj_fr = rng.choice(list(BEFORE_NOUN.items()))
        words_en.append(adj_en)
        words_fr.append(adj_fr[agree])
    words_fr.append(fr_pl if det_plural else fr_sg)
    if rng.random() < 0.5:
        col_en, col_fr = rng.choice(list(COLOURS.items()))
        words_en.append(col_en)
        words_fr.append(col_fr[agree])
    words_en.append(en_pl if det_plural else en_sg)
    if words_en[0] == "a" and words_en[1][0] in "aeiou":
        words_en[0] = "an"  # "an old car"
    return " ".join(words_en), " ".join(words_fr)


def builtin_pairs(n, seed, max_length):
    """n distinct (English, French) pairs, deterministic for a seed, each side under max_length words."""
    rng, pairs, seen = random.Random(seed), [], set()
    for _ in range(50 * n):
        en, fr = map(normalize, make_pair(rng))  # exactly what sample.py will make of typed input
        if (en, fr) not in seen and len(en.split()) < max_length and len(fr.split()) < max_length:
            seen.add((en, fr))  # distinct pairs: no pair can be in two splits
            pairs.append((en, fr))
            if len(pairs) == n:
                break
    return pairs


# ----------------------------------------------------------------------------- main


def get_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="builtin",
                        help="builtin; eng-fra (the tutorial's data.zip, downloaded to --data-dir when "
                             "missing); "
                        "or a file of tab-separated pairs: eng-fra.txt, the tutorial's data.zip, any other "
                        "(default: %(default)s)")
    parser.add_argument("--data-dir", default=str(Path(__file__).parent / "data"),
                        help="where --data eng-fra keeps data.zip (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=20000,
                        help="builtin: distinct pairs to generate (default: %(default)s)")
    parser.add_argument("--reverse", action="store_true",
                        help="translate column 1 -> column 2 (English -> French); default is French -> "
                             "English as in the tutorial")
    parser.add_argument("--all-pairs", action="store_true",
                        help="files: keep pairs whatever their English side starts with (for chatbot data)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="keep pairs with both sides under this many words (default: 10 for files, as "
                             "the tutorial; 16 for builtin)")
    parser.add_argument("--min-count", type=int, default=1,
                        help="words seen fewer times in training become <unk> (default: %(default)s)")
    parser.add_argument("--test-frac", type=float, default=0.1,
                        help="held-out test split (default: %(default)s)")
    parser.add_argument("--val-frac", type=float, default=0.05,
                        help="validation split, picks the best epoch (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=128,
                        help="embedding and GRU size (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=1, help="GRU layers (default: %(default)s)")
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=True,
                        help="bidirectional encoder (default: %(default)s)")
    parser.add_argument("--attention", default="general",
                        choices=["none", "bahdanau", "dot", "general", "concat"],
                        help="(default: %(default)s)")
    parser.add_argument("--fast-bahdanau", action="store_true",
                        help="Bahdanau attention: the fused step (the same numbers, faster) instead of the "
                             "tutorial's")
    parser.add_argument("--dropout", type=float, default=0.1, help="(default: %(default)s)")
    parser.add_argument("--teacher-forcing", type=float, default=1.0,
                        help="share of batches fed the true previous word (default: %(default)s)")
    parser.add_argument("--reverse-source", action="store_true",
                        help="feed the source backwards (Sutskever et al. 2014)")
    parser.add_argument("--epochs", type=int, default=4, help="(default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="stop training after this many seconds, 0 for none (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="gradient norm clipping (default: %(default)s)")
    parser.add_argument("--beam", type=int, default=1,
                        help="beam size for the final test evaluation; 1 is greedy (default: %(default)s)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "bf16-output", "off"],
                        help="mixed precision: everything in bf16 or fp16 (the GRUs in fp32 under bf16), "
                             "the output layer only in bf16, or nothing; auto: bf16 on GPUs from Ampere on, "
                             "fp16 with a GradScaler on older GPUs (a T4), the output layer on CPUs with "
                             "native bf16 (default: %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "seq2seq.pt"),
                        help="checkpoint path (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels, so a GPU run repeats exactly (slower)")
    parser.add_argument("--dry-run", action="store_true",
                        help="two batches, one evaluation, a checkpoint: checks that every line runs, in "
                             "seconds")
    parser.error = lambda message: fail(f"{message} (see --help)")  # one line, not argparse's usage block
    args = parser.parse_args()
    if args.dry_run:  # pytorch/examples' --dry-run: the whole script once, on the least data
        args.epochs, args.pairs = 1, min(args.pairs, 1000)
    args.max_length = args.max_length or (16 if args.data == "builtin" else 10)
    return args


def main():
    args = get_args()
    print("settings:", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    seed_everything(args.seed, args.deterministic)
    device = get_device(args.device)
    train_pairs, val_pairs, test_pairs, src_vocab, tgt_vocab = load_pairs(args)
    src, src_len, tgt = to_tensors(train_pairs, src_vocab, tgt_vocab, device)
    # lengths stay on the host: batching and trimming read them
    data = (src, src_len.cpu(), tgt, (tgt != PAD).sum(1).cpu())

    model_args = dict(src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab), hidden=args.hidden,
                      layers=args.layers, bidirectional=args.bidirectional, attention=args.attention,
                      dropout=args.dropout)
    model = Seq2Seq(**model_args).to(device)
    model.decoder.fused = args.fast_bahdanau
    # fused=True: one kernel updates every parameter, instead of a handful of ops per tensor
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=device.type in ("cpu", "cuda"))
    amp_dtype, scaler, amp = choose_amp(model, args, device)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, attention {args.attention}, "
          f"on {device}, autocast {amp}")

    out = Path(args.out)
    save = lambda epoch, bleu: save_checkpoint({
        "kind": "seq2seq",  # sample.py refuses checkpoints of other scripts
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
        "src_vocab": src_vocab.words, "tgt_vocab": tgt_vocab.words, "max_length": args.max_length,
        "reverse_source": args.reverse_source, "epoch": epoch, "best_val_bleu": bleu,
        "config": vars(args)}, out)
    best_bleu, seen, train_time = fit(model, optimizer, scaler, data, val_pairs, (src_vocab, tgt_vocab), args,
                                      amp_dtype, save)

    # ---- the best epoch on the test split, which neither training nor model selection saw
    ckpt, model, _, _ = load_checkpoint(out, device)
    model.decoder.fused = args.fast_bahdanau
    bleu, exact, outputs = translate_split(model, test_pairs, src_vocab, tgt_vocab, device,
                                           args.max_length + 1, beam=args.beam)
    decoding = f"beam {args.beam}" if args.beam > 1 else "greedy"
    print(f"test ({len(test_pairs)} held-out pairs, {decoding}): "
          f"BLEU {bleu:.4f} exact match {100 * exact:.1f}% (best epoch {ckpt['epoch']})")
    for (s, t), o in list(zip(test_pairs, outputs))[:4]:
        print(f"  > {s}\n  = {t}\n  < {o}")
    print(f"result: test_bleu={bleu:.4f} test_exact={100 * exact:.2f} val_bleu={best_bleu:.4f} "
          f"attention={args.attention} pairs_per_s={seen / max(train_time, 1e-9):.0f} "
          f"train_seconds={train_time:.1f}")

if __name__ == "__main__":
    main()
