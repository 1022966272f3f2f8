"""Translate with the checkpoint seq2seq/train.py wrote.

    python seq2seq/sample.py "je suis plus grand que lui ." "elle achete une voiture rouge ."
    echo "ils ne sont pas fatigues ." | python seq2seq/sample.py
    python seq2seq/sample.py                      # a prompt when stdin is a terminal; q quits
    python seq2seq/sample.py --beam 5 --attention-map "nous lavons trois petites tasses blanches ."

Input is normalised as the training data was (lower case, accents dropped, punctuation split
off). Words the model never saw are named on one line and read as <unk>. --attention-map
prints which source word each output word looked at, darker meaning more weight.
"""
import argparse
import sys
from pathlib import Path

import torch

from train import EOS, UNK, load_checkpoint, normalize, strip_eos  # the sibling train.py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # find common.py
from common import get_device, seed_everything

SHADES = " \u2591\u2592\u2593\u2588"  # attention weight 0 -> 1: space, light, medium, dark, full block


def attention_map(src_words, out_words, weights):
    """Rows: output words; columns: source words; each cell shaded by its attention weight."""
    width = max(4, *(len(w) for w in src_words))
    left = max(len(w) for w in out_words)
    lines = [" " * (left + 1) + " ".join(w.rjust(width) for w in src_words)]
    for word, row in zip(out_words, weights.tolist()):
        cells = [SHADES[min(len(SHADES) - 1, int(p * len(SHADES)))] * width for p in row]
        lines.append(word.rjust(left) + " " + " ".join(cells))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*",
                        help="sentences to translate (default: read stdin, one per line)")
    parser.add_argument("--checkpoint", default=str(Path(__file__).parent / "out" / "seq2seq.pt"),
                        help="from seq2seq/train.py (default: %(default)s)")
    parser.add_argument("--beam", type=int, default=1, help="beam size; 1 is greedy (default: %(default)s)")
    parser.add_argument("--attention-map", action="store_true",
                        help="print the attention matrix of each translation")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not a usage block
    args = parser.parse_args()
    seed_everything(args.seed)
    device = get_device(args.device)
    if args.beam < 1:
        raise SystemExit("error: --beam must be 1 or more")
    ckpt, model, src_vocab, tgt_vocab = load_checkpoint(args.checkpoint, device)
    max_length = ckpt["max_length"]
    interactive = not args.sentences and sys.stdin.isatty()
    if interactive:
        print(f"loaded {args.checkpoint} (validation BLEU {ckpt['best_val_bleu']:.3f}); type a sentence, q "
              "to quit")

    def translate(text):
        """Print the translation of one sentence; return False if the input was unusable."""
        words = normalize(text).split()
        if not words:
            print("error: empty sentence: nothing to translate", file=sys.stderr)
            return False
        if len(words) >= max_length:
            print(f"error: {len(words)} words is too long: this model was trained on sentences under "
                  f"{max_length} words", file=sys.stderr)
            return False
        ids = src_vocab.encode(" ".join(words))
        unknown = [w for w, i in zip(words, ids) if i == UNK]
        if unknown:
            print(f"unknown words: {', '.join(unknown)} (translated as <unk>)", file=sys.stderr)
        if ckpt["reverse_source"]:  # the model was trained on reversed sources
            ids, words = ids[::-1], words[::-1]
        src = torch.tensor([ids], device=device)
        with torch.no_grad():
            src_len = torch.tensor([len(ids)], device=device)
            tokens, weights = model.beam_search(src, src_len, args.beam, max_length + 1)
        out_ids = strip_eos(tokens)
        print(f"{' '.join(words)} -> {tgt_vocab.decode(out_ids)}")
        if args.attention_map:
            if model.decoder.attention is None:
                print("(this model has no attention: trained with --attention none)")
            else:
                shown = out_ids + [EOS] if EOS in tokens else out_ids
                print(attention_map(words, [tgt_vocab.words[i] for i in shown], weights[:len(shown)]))
        return True

    if args.sentences:
        ok = [translate(s) for s in args.sentences]
        sys.exit(0 if all(ok) else 1)
    ok = True
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if interactive and line.strip() == "q":
            break
        if not interactive and not line.strip():
            continue  # blank lines in a piped file are skipped
        ok = translate(line) and ok
    sys.exit(0 if ok or interactive else 1)


if __name__ == "__main__":
    main()
