"""The whole test suite. Every script is run as a user runs it (a subprocess, small settings)
and its printed outcome is checked: the loss falls, the metric beats chance by a margin,
the output file parses, the error line appears.

    python test_all.py                 # last line: "N passed, M failed"
    python test_all.py blitz seq2seq   # only tests whose name contains one of these words
    python -m pytest test_all.py       # pytest collects the same test_* functions
"""
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TMP = Path(tempfile.mkdtemp(prefix="test_all_"))  # every file a test writes goes here
_trained = {}  # checkpoints made once and shared by the tests that need them


def run(script, *args, cwd=ROOT, stdin=None, expect_ok=True, timeout=600):
    """Run `python script args...` and return (stdout, stderr); assert the exit status."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, input=stdin,
                       capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}")
    if not expect_ok and p.returncode == 0:
        raise AssertionError(f"{script} should have failed but exited 0\n{p.stdout[-2000:]}")
    return p.stdout, p.stderr


def fails_with(script, *args, message, stdin=None):
    """A user's mistake: non-zero exit, one line on stderr naming the problem, no traceback."""
    _, err = run(script, *args, stdin=stdin, expect_ok=False)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"expected one error line, got:\n{err}"
    assert re.search(message, lines[0], re.I), f"expected /{message}/ in: {lines[0]}"
    return lines[0]


def result(stdout):
    """The `result: key=value ...` summary line as a dict (numbers as floats)."""
    line = [l for l in stdout.splitlines() if l.startswith("result:")][-1]
    pairs = dict(kv.split("=", 1) for kv in line.split()[1:])
    return {k: float(v) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", v) else v for k, v in pairs.items()}


def epoch_losses(stdout):
    return [float(x) for x in re.findall(r"^(?:epoch|step) .*?\| loss ([\d.]+)", stdout, re.M)]


# ============================================================================= common.py / blitz


def test_device_helper_errors():
    fails_with("blitz/tensors.py", "--device", "cuda:99", message=r"--device cuda:99 .*(no CUDA|only \d+ CUDA)")
    fails_with("blitz/tensors.py", "--device", "abacus", message=r"unknown device 'abacus'")


def test_blitz_lessons_assert_their_claims():
    for lesson in ("blitz/tensors.py", "blitz/autograd.py"):
        out, _ = run(lesson)
        assert result(out)["claims_checked"] == "all"
    out, _ = run("tensors.py", cwd=ROOT / "blitz")  # also runs from inside its folder
    assert "result:" in out


def blitz_checkpoint():
    if "blitz" not in _trained:
        ckpt = TMP / "blitz.pt"
        out, _ = run("blitz/train.py", "--epochs", 5, "--train-size", 6000, "--out", ckpt)
        _trained["blitz"] = (ckpt, out)
    return _trained["blitz"]


def test_blitz_train_learns():
    ckpt, out = blitz_checkpoint()
    losses = epoch_losses(out)
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], losses
    assert result(out)["val_acc"] >= 90, result(out)  # chance is 25%
    assert ckpt.is_file()


def test_blitz_sample_hook_finetune_export():
    ckpt, _ = blitz_checkpoint()
    exported = TMP / "blitz.pt2"
    out, _ = run("blitz/sample.py", "--checkpoint", ckpt, "--out", exported)
    r = result(out)
    assert r["accuracy"] >= 85 and r["finetune_accuracy"] >= 80 and r["export_matches"] == "True", r
    assert "activation of shape (4, 32, 8, 8)" in out and exported.stat().st_size > 0


def test_blitz_sample_bad_checkpoints():
    fails_with("blitz/sample.py", "--checkpoint", TMP / "missing.pt", message=r"run python blitz/train.py first")
    junk = TMP / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    fails_with("blitz/sample.py", "--checkpoint", junk, message=r"not a readable PyTorch checkpoint")


# ============================================================================= runner


def main(words):
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    tests = [(n, f) for n, f in tests if not words or any(w in n for w in words)]
    passed = failed = 0
    start = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"total {time.time() - start:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
