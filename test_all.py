"""The whole test suite. Every script is run as a user runs it (a subprocess, small settings)
and its printed outcome is checked: the loss falls, the metric beats chance by a margin,
the output file parses, the error line appears.

    python test_all.py                 # last line: "N passed, M failed, K skipped"
    python test_all.py blitz seq2seq   # only tests whose name contains one of these words
    python test_all.py cuda            # the GPU group on a CUDA machine (skipped where there is none)
    python test_all.py mps             # the same on an Apple laptop
    python -m pytest test_all.py       # pytest collects the same test_* functions
"""
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import unittest
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TMP = Path(tempfile.mkdtemp(prefix="test_all_"))  # every file a test writes goes here
_trained = {}  # checkpoints made once and shared by the tests that need them


def run(script, *args, cwd=ROOT, stdin=None, expect_ok=True, timeout=600, env=None):
    """Run `python script args...` and return (stdout, stderr); assert the exit status. `env`: more
    environment variables for the script."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, input=stdin,
                       capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- "
                             f"stderr\n{p.stderr[-3000:]}")
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


def all_fail_with(*cases):
    """Several independent mistakes, each (script, *args, message), two processes at a time: each
    start of Python and torch is mostly one core's work."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:  # list() re-raises the first failed case's AssertionError
        list(pool.map(lambda case: fails_with(*case[:-1], message=case[-1]), cases))


def result(stdout):
    """The `result: key=value ...` summary line as a dict (numbers as floats)."""
    line = [l for l in stdout.splitlines() if l.startswith("result:")][-1]
    pairs = dict(kv.split("=", 1) for kv in line.split()[1:])
    return {k: float(v) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", v) else v for k, v in pairs.items()}


class Skipped(unittest.SkipTest):  # pytest reports it as a skip too
    pass


def require(device_type):
    """Skip the calling test unless this machine has a CUDA GPU ("cuda") or Apple MPS ("mps")."""
    import torch
    if device_type == "cuda" and not torch.cuda.is_available():
        raise Skipped("no CUDA GPU")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise Skipped("no Apple MPS")


def epoch_losses(stdout):
    return [float(x) for x in re.findall(r"^(?:epoch|step) .*?\| loss ([\d.]+)", stdout, re.M)]


# ============================================================================= common.py / blitz


def test_device_helper_errors():
    fails_with("blitz/tensors.py", "--device", "cuda:99",
               message=r"--device cuda:99 .*(no CUDA|only \d+ CUDA)")
    fails_with("blitz/tensors.py", "--device", "abacus", message=r"unknown device 'abacus'")


def test_blitz_lessons_assert_their_claims():
    for lesson in ("blitz/tensors.py", "blitz/autograd.py"):
        out, _ = run(lesson)
        assert result(out)["claims_checked"] == "all"
    out, _ = run("tensors.py", cwd=ROOT / "blitz")  # also runs from inside its folder
    assert "result:" in out


def trained(name, script, *args):
    """Train once with small settings and share (checkpoint, stdout) among the tests that need it."""
    if name not in _trained:
        ckpt = TMP / f"{name}.pt"
        out, _ = run(script, *args, "--out", ckpt)
        _trained[name] = (ckpt, out)
    return _trained[name]


def blitz_checkpoint():
    return trained("blitz", "blitz/train.py", "--epochs", 5, "--train-size", 6000)


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
    fails_with("blitz/sample.py", "--checkpoint", TMP / "missing.pt",
               message=r"run python blitz/train.py first")
    junk = TMP / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    fails_with("blitz/sample.py", "--checkpoint", junk, message=r"not a readable PyTorch checkpoint")


# ============================================================================= classifier


def classifier_checkpoint():
    return trained("classifier", "classifier/train.py", "--model", "resnet", "--train-size", 4000,
                   "--test-size", 1000,
                   "--val-size", 500, "--epochs", 6, "--width", 8, "--batch-size", 64)


def test_classifier_learns_shapes():
    ckpt, out = classifier_checkpoint()
    losses = epoch_losses(out)
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    r = result(out)
    assert r["test_acc"] >= 50 and r["chance"] == 10, r  # ten classes: chance is 10%
    assert "per-class accuracy:" in out and "confusion matrix" in out


def test_classifier_sample_shows_top3_and_confusions():
    ckpt, _ = classifier_checkpoint()
    out, _ = run("classifier/sample.py", "--checkpoint", ckpt, "--n", 2, "--color", "never")
    assert out.count("test image") == 2 and "most confused pairs" in out
    accuracy = float(re.search(r"whole test set: 1000 images, accuracy ([\d.]+)%", out).group(1))
    # the same test set as training's
    assert accuracy == result(classifier_checkpoint()[1])["test_acc"], accuracy
    out, _ = run("classifier/sample.py", "--checkpoint", ckpt, "--index", 3, "--color", "always")
    assert "\x1b[38;2;" in out and "test image 3:" in out  # 24-bit colour half blocks


def test_classifier_resume_continues():
    ckpt = TMP / "resume.pt"
    common = ["--train-size", 1500, "--test-size", 300, "--val-size", 200, "--width", 8, "--out", ckpt]
    run("classifier/train.py", "--epochs", 1, *common)
    out, _ = run("classifier/train.py", "--epochs", 2, "--resume", *common)
    assert "resumed" in out and "after epoch 1" in out and "epoch 2/2" in out and "epoch 1/2" not in out


def test_classifier_whitening_needs_no_float64_on_the_device():
    # Apple's MPS has no float64 and no eigh. A tensor type that refuses both until it is moved to the
    # CPU stands in for it: the whitening must compute on the CPU and copy its filters back.
    import torch
    ct = import_script("classifier/train.py")

    class NoFloat64Device(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "cpu" or (name == "to" and "cpu" in map(str, args[1:])):  # leaving the "device"
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs).as_subclass(torch.Tensor)
            if name in ("double", "linalg_eigh", "eigh"):
                raise RuntimeError(f"{name}: not supported on this device")
            result = super().__torch_function__(func, types, args, kwargs)
            if isinstance(result, torch.Tensor) and result.dtype == torch.float64:
                raise RuntimeError("float64 is not supported on this device")
            return result

    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    reference = ct.AirNet(8)
    reference.init_whitening(images)
    net = ct.AirNet(8)
    net.init_whitening(images.as_subclass(NoFloat64Device))
    assert torch.allclose(net.whiten.weight,
                          reference.whiten.weight) and net.whiten.weight.dtype == torch.float32
    try:
        images.as_subclass(NoFloat64Device).double()
        raise AssertionError("the stand-in device accepted float64")
    except RuntimeError:
        pass


def test_classifier_lookahead_keeps_the_fast_weights_between_epochs():
    # Lookahead pulls the fast weights back to the slow copy every few steps; between two such pulls
    # the fast weights are training's own. The end of an epoch must not pull them back an extra time:
    # the next epoch starts from the weights the last step left (the slow copy is only evaluated).
    import contextlib, io, torch
    ct = import_script("classifier/train.py")
    first_param = lambda model: next(p for p in model.parameters() if p.requires_grad).detach().clone()
    log, step = [], ct.train_step

    def recording_step(model, *args, **kwargs):
        before = first_param(model)
        loss = step(model, *args, **kwargs)
        log.append((before, first_param(model)))
        return loss

    ct.train_step = recording_step
    # 2,800 training images at batch 256: 10 steps an epoch, lookahead every 20 steps, so epoch 3
    # ends 10 steps after a pull, with the slow copy behind the fast weights
    argv = ["train.py", "--train-size", 3000, "--val-size", 200, "--test-size", 200, "--epochs", 4,
            "--width", 8, "--early-crop", 32, "--tta", 0, "--out", TMP / "lookahead.pt", "--device", "cpu"]
    old_argv, sys.argv = sys.argv, list(map(str, argv))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ct.main()
    finally:
        sys.argv = old_argv
    assert len(log) == 40, len(log)
    for epoch in (1, 2, 3):
        last_step_left, next_epoch_starts = log[10 * epoch - 1][1], log[10 * epoch][0]
        if epoch == 2:  # step 20: a lookahead pull, as in airbench, moves them
            continue
        assert torch.equal(last_step_left,
                           next_epoch_starts), f"epoch {epoch + 1} did not start where epoch {epoch} left off"


def test_classifier_airbench_settings_whitening_bias_trains_then_freezes():
    # airbench's own settings as flags: whitening from more images and a whitening bias that learns
    # for the first epochs only (ReLU, the faster non-default activation, rides along). The steps
    # of epoch 1 move the bias; later steps leave it.
    import contextlib, io, torch
    ct = import_script("classifier/train.py")
    log, step = [], ct.train_step

    def recording_step(model, *args, **kwargs):
        before = model.whiten.bias.detach().clone()
        loss = step(model, *args, **kwargs)
        log.append(not torch.equal(before, model.whiten.bias))
        return loss

    ct.train_step = recording_step
    ckpt = TMP / "airbench_settings.pt"
    argv = ["train.py", "--train-size", 3000, "--val-size", 200, "--test-size", 200, "--epochs", 3,
            "--width", 8, "--tta", 0, "--act", "relu", "--whiten-bias-epochs", 1, "--whiten-images", 500,
            "--out", ckpt, "--device", "cpu"]
    old_argv, sys.argv = sys.argv, list(map(str, argv))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ct.main()
    finally:
        sys.argv = old_argv
    assert len(log) == 30 and all(log[:10]) and not any(log[10:]), log  # 10 steps an epoch
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_args"] == dict(name="airbench", width=8, act="relu",
                                       whiten_bias=True), saved["model_args"]
    out, _ = run("classifier/sample.py", "--checkpoint", ckpt, "--n", 1, "--color", "never")
    assert "whole test set: 200 images" in out
    all_fail_with(("classifier/train.py", "--model", "lenet", "--act", "gelu", "--dry-run",
                   "setting of --model airbench"),
                  ("classifier/train.py", "--whiten-images", 0, "--dry-run", "--whiten-images 1 or more"))


def write_fake_cifar(folder, per_file=120):
    """A tiny CIFAR-10 in the binary layout: each image is a flat colour set by its label."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = bytearray()
        for _ in range(per_file):
            label = rng.randrange(10)
            r, g, b = 25 * label, 250 - 25 * label, rng.randrange(256)
            planes = bytes([r]) * 1024 + bytes([g]) * 1024 + bytes([b]) * 1024
            records += bytes([label]) + planes
        (folder / name).write_bytes(bytes(records))
    return folder


def test_classifier_reads_cifar_binary_format():
    folder = write_fake_cifar(TMP / "cifar" / "cifar-10-batches-bin")
    ckpt = TMP / "cifar.pt"
    out, _ = run("classifier/train.py", "--data", "cifar10", "--data-dir", folder.parent, "--model", "lenet",
                 "--epochs", 4, "--batch-size", 16, "--lr", 0.01, "--val-size", 100, "--out", ckpt)
    assert "data: cifar10, 500 train / 100 val / 120 test images" in out, out[:800]
    assert result(out)["test_acc"] >= 30, result(out)  # the colour gives the label away: far above 10%
    first_label = (folder / "test_batch.bin").read_bytes()[0]
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    out, _ = run("classifier/sample.py", "--checkpoint", ckpt, "--index", 0, "--color", "never")
    assert f"test image 0: true class {names[first_label]}" in out


def test_classifier_bad_inputs():
    bad = TMP / "bad_cifar"
    write_fake_cifar(bad, per_file=3)
    (bad / "data_batch_2.bin").write_bytes(b"\x01" * 3000)  # truncated record
    fails_with("classifier/train.py", "--data", "cifar10", "--data-dir", bad,
               message=r"data_batch_2.bin is truncated")
    write_fake_cifar(bad, per_file=3)
    (bad / "test_batch.bin").write_bytes(b"\x0c" + b"\x00" * 3072)  # label 12
    fails_with("classifier/train.py", "--data", "cifar10", "--data-dir", bad,
               message=r"corrupt: label byte 12")
    tarball = TMP / "tar" / "cifar-10-binary.tar.gz"
    tarball.parent.mkdir(exist_ok=True)
    tarball.write_bytes(b"not the real archive")
    fails_with("classifier/train.py", "--data", "cifar10", "--data-dir", tarball, message=r"wrong MD5")
    fails_with("classifier/train.py", "--data", "cifar10", "--data-dir", TMP / "nowhere",
               message=r"--data-dir .* does not exist")
    fails_with("classifier/train.py", "--model", "vgg", message=r"--model: invalid choice: .vgg.")
    fails_with("classifier/train.py", "--time-limit", 60, "--resume",
               message=r"--time-limit needs .* a fresh run")
    blitz_ckpt, _ = blitz_checkpoint()
    fails_with("classifier/sample.py", "--checkpoint", blitz_ckpt, message=r"not a classifier checkpoint")
    fails_with("classifier/sample.py", "--checkpoint", TMP / "none.pt",
               message=r"run python classifier/train.py first")
    ckpt, _ = classifier_checkpoint()
    fails_with("classifier/sample.py", "--checkpoint", ckpt, "--index", 5000,
               message=r"--index 5000 is out of range")


def load_script(path, name):
    """Import a script as a module (its main() does not run) to test a function of it directly."""
    import importlib.util
    sys.path.insert(0, str((ROOT / path).parent))
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.pop(0)
    return module


def test_precision_rule_without_a_gpu():
    import torch
    common = load_script("common.py", "common")
    choose = lambda *a, **k: common.choose_precision(*a, **k)[:2]
    assert choose("cuda", "auto", gpu_capability=(9, 0)) == (torch.bfloat16, False)  # H100: bf16, no scaler
    assert choose("cuda", "auto", gpu_capability=(8, 0)) == (torch.bfloat16, False)  # A100
    assert choose("cuda", "auto", gpu_capability=(7, 5)) == (torch.float16, True)  # T4: fp16 + GradScaler
    assert choose("cuda", "fp16", gpu_capability=(9, 0)) == (torch.float16, True)  # an explicit choice wins
    assert choose("cuda", "off", gpu_capability=(9, 0)) == (None, False)
    assert choose("mps", "auto") == (None, False) and choose("cpu", "auto") == (None, False)
    # only where a script says bf16 helps
    assert choose("cpu", "auto", cpu_native_bf16=True) == (torch.bfloat16, False)
    assert choose("cpu", "fp16") == (torch.float16, True)
    assert common.choose_precision("cuda", "auto", gpu_capability=(7, 5))[2] is None
    warning = common.choose_precision("cuda", "bf16", gpu_capability=(7, 5))[2]  # bf16 asked for on a T4
    assert warning.startswith("warning:") and "7.5" in warning and "fp16" in warning, warning
    mps = common.choose_precision("mps", "fp16")
    assert mps[:2] == (None, False) and "MPS" in mps[2]
    # seq2seq's CPU refinement
    bf16_output = load_script("seq2seq/train.py", "seq2seq_train").bf16_output_layer
    assert bf16_output("cpu", "auto", True) == (True, None) and not bf16_output("cpu", "auto", False)[0]
    assert not bf16_output("cuda", "auto", True, (9, 0))[0]
    assert bf16_output("cpu", "bf16-output", False) == (True, None)
    assert bf16_output("cuda", "bf16-output", False, (9, 0)) == (True, None)
    # the shared rule: emulated on a T4 (said once), not used on MPS (said once)
    on, warning = bf16_output("cuda", "bf16-output", False, (7, 5))
    assert on and warning.startswith("warning: --amp bf16-output") and "fp16" in warning, warning
    on, warning = bf16_output("mps", "bf16-output", False)
    assert not on and warning.startswith("warning: --amp bf16-output") and "MPS" in warning, warning


def mac_like():
    """Environment variables under which torch, in a script run here, reports its foreach kernels as
    absent for the CPU, as it does for Apple's MPS: a script that insists on them (foreach=True)
    fails on this CPU as it would on a Mac, where no test can run."""
    folder = TMP / "mac_like"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import torch.nn.utils.clip_grad as clip_grad, torch.utils._foreach_utils as foreach_utils\n"
        "for m in (clip_grad, foreach_utils):\n"
        "    m._device_has_foreach_support = lambda device: False\n"
        "    m._has_foreach_support = lambda tensors, device: False\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


def float64_tensors(obj, where="checkpoint"):
    """Where in a loaded checkpoint float64 tensors are (MPS cannot hold them)."""
    import torch
    if torch.is_tensor(obj):
        return [where] if obj.dtype == torch.float64 else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return [w for k, v in items for w in float64_tensors(v, f"{where}[{k!r}]")]


def test_every_train_script_has_a_dry_run_that_sample_reads_with_a_macs_limits():
    # pytorch/examples' --dry-run: a couple of batches, one evaluation and a checkpoint; each
    # sample.py must work from that checkpoint. Both run with foreach reported absent, as on MPS,
    # and the checkpoint may hold no float64 tensor, which MPS cannot load.
    import torch
    samples = {"blitz": ["--out", TMP / "dry_blitz.pt2"], "classifier": ["--n", 1, "--color", "never"],
               "seq2seq": ["il est grand"], "tonenet": ["--out", TMP / "dry_tonenet.mid"],
               "umtn": ["--seconds", 0.25, "--to", "organ", "--out", TMP / "dry_umtn.wav"]}
    for folder, extra in samples.items():
        ckpt = TMP / f"dry_{folder}.pt"
        out, _ = run(f"{folder}/train.py", "--dry-run", "--out", ckpt, env=mac_like())
        assert "result:" in out and ckpt.is_file(), (folder, out[-800:])
        assert re.search(r"^(epoch 1/1|step 2/2) ", out, re.M), (folder, out[-800:])
        found = float64_tensors(torch.load(ckpt, weights_only=True))
        assert not found, (folder, found)
        run(f"{folder}/sample.py", "--checkpoint", ckpt, *extra, env=mac_like())
    # Every loader reads onto the CPU and moves the model afterwards, so a checkpoint saved on any
    # device opens on any other (here the tensor-less "meta" device stands for the Mac's).
    real_load, asked = torch.load, []
    torch.load = lambda *a, **k: asked.append(k.get("map_location")) or real_load(*a, **k)
    try:
        for folder in ("seq2seq", "tonenet", "umtn"):
            loaded = import_script(f"{folder}/train.py").load_checkpoint(TMP / f"dry_{folder}.pt",
                                                                          torch.device("meta"))
            assert next(loaded[1].parameters()).device.type == "meta", folder
        import_script("classifier/train.py").load_checkpoint(TMP / "dry_classifier.pt")
    finally:
        torch.load = real_load
    assert asked == ["cpu"] * 4, asked


def test_every_lesson_reads_as_a_lesson():
    # main() is a table of contents and the epoch (or step) loop a function a student can copy; every
    # exercise on a lesson page has a measured answer
    import ast
    for folder in ("blitz", "classifier", "seq2seq", "tonenet", "umtn"):
        tree = ast.parse((ROOT / folder / "train.py").read_text(encoding="utf-8"))
        functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        # lines of code, the docstring left out
        code_lines = lambda f: f.end_lineno - f.body[isinstance(f.body[0], ast.Expr)].lineno + 1
        assert code_lines(functions["main"]) <= 60, (folder, "main", code_lines(functions["main"]))
        assert code_lines(functions["fit"]) <= 30, (folder, "fit", code_lines(functions["fit"]))
        source = (ROOT / folder / "train.py").read_text(encoding="utf-8")
        step = "".join(ast.get_source_segment(source, functions[name])
                       for name in ("train_step", "backward_and_step") if name in functions)
        plain = step.index("not scaler.is_enabled()")  # the plain step first, fp16 in its own branch
        assert plain < step.index("scaler.scale("), folder
        page = (ROOT / folder / "README.md").read_text(encoding="utf-8")
        exercises = page.split("\n## Exercises", 1)[1].split("\n## ", 1)[0]
        items = re.split(r"\n(?=\d+\. )", "\n" + exercises.strip())[1:]
        assert len(items) >= 4, (folder, len(items))
        unanswered = [item.split("\n")[0][:60] for item in items if "*Observe:*" not in item]
        assert not unanswered, (folder, unanswered)


def test_every_train_script_has_the_one_amp_flag():
    for script in ("blitz/train.py", "classifier/train.py", "seq2seq/train.py", "tonenet/train.py",
                   "umtn/train.py"):
        out, _ = run(script, "--help")
        assert re.search(r"--amp \{auto,bf16,fp16,(bf16-output,)?off\}", out), (script, out[-1500:])
        assert "--bf16" not in out and "--deterministic" in out, script


def test_rnns_run_in_fp32_under_bf16_autocast():
    # PyTorch's autocast wrapper runs cuDNN RNNs in fp16 whatever dtype is asked for, and oneDNN's LSTM
    # fails under CPU bf16: common.rnn_fp32 runs them in fp32 under bf16 and leaves them alone otherwise.
    import torch
    common = load_script("common.py", "common")
    torch.manual_seed(0)
    x = torch.randn(3, 7, 8)
    for rnn in (torch.nn.GRU(8, 16, batch_first=True), torch.nn.LSTM(8, 16, 2, batch_first=True)):
        plain, _ = rnn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = common.rnn_fp32(rnn, x.bfloat16())
        assert out.dtype == torch.float32 and torch.allclose(out, rnn(x.bfloat16().float())[0]), rnn
        assert (out - plain).abs().max() < 0.05
    # ToneNet's LSTMs under bf16 on a CPU: this used to fail inside oneDNN
    tn = import_script("tonenet/train.py")
    model = tn.ToneNet(["a", "b"], hidden=16)
    roll = (torch.rand(4, 32, 88, 3) < 0.05).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        velocity = model(roll, torch.tensor([0, 1, 1, 0]))
    assert velocity.shape == (4, 32, 88) and velocity.dtype == torch.float32
    out, _ = run("tonenet/train.py", "--dry-run", "--amp", "bf16", "--device", "cpu", "--out",
                 TMP / "bf16.pt")
    assert "autocast bfloat16" in out and "result:" in out


def test_torchrun_more_processes_than_gpus_is_one_line():
    # On a one-GPU machine (Colab) rank 1 used to ask for cuda:1 and die with "invalid device ordinal".
    import torch
    common = load_script("common.py", "common")
    saved = torch.cuda.is_available, torch.cuda.device_count, os.environ.get("LOCAL_WORLD_SIZE")
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    try:
        common.torchrun_device("auto")
        raise AssertionError("two processes on one GPU were accepted")
    except SystemExit as e:
        assert (str(e).startswith("error: torchrun started 2 processes but this machine has 1 CUDA GPU")
                and "--device cpu" in str(e)), e
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved[:2]
        if saved[2] is None:
            os.environ.pop("LOCAL_WORLD_SIZE")
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved[2]
    assert common.torchrun_device("cpu") == (torch.device("cpu"), "gloo")


def test_classifier_fp16_gradscaler_and_time_limit():
    # What fp16 with the GradScaler learns is checked over a fixed number of steps, and the time limit
    # by the clock alone: a CPU's speed in fp16 varies several-fold between machines, so what a run
    # learns within a given number of seconds is no outcome to test.
    import torch
    ckpt = TMP / "fp16.pt"
    small = ["--test-size", 200, "--val-size", 100, "--width", 8, "--act", "relu", "--amp", "fp16",
             "--tta", 0]
    out, _ = run("classifier/train.py", *small, "--train-size", 1000, "--batch-size", 32, "--epochs", 4,
                 "--out", ckpt)
    assert "autocast=float16 +GradScaler" in out, out[:600]
    losses = epoch_losses(out)
    # airbench in fp16 with the scaler learns
    assert len(losses) == 4 and losses[-1] < 0.95 * losses[0], losses
    scale = torch.load(ckpt, weights_only=True)["resume"]["scaler"]["scale"]
    assert math.isfinite(scale) and scale > 0, scale  # no overflow ran away with the loss scale
    test_acc = result(out)["test_acc"]
    out, _ = run("classifier/sample.py", "--checkpoint", ckpt, "--n", 1, "--color", "never")
    assert f"accuracy {test_acc:.2f}%" in out, out[-600:]  # the same numerics as training
    # the budget is kept, however many steps this machine fits into it
    out, _ = run("classifier/train.py", *small, "--train-size", 640, "--batch-size", 32, "--time-limit", 15,
                 "--out", TMP / "time_limit.pt")
    assert re.search(r"plan: 15 s at [\d.]+ s/step -> about \d+ steps", out), out[:1200]
    r = result(out)
    assert 15 <= r["train_seconds"] <= 25 and r["epochs"] > 0, r


def test_classifier_torchrun_two_processes():
    def torchrun(*args):
        p = subprocess.run([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", "classifier/train.py", "--model", "resnet",
                                             "--width", 8, "--batch-size", 64, "--device", "cpu", *args]],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert p.stdout.count("result:") == 1  # only rank 0 reports
        return result(p.stdout)
    r = torchrun("--train-size", 3000, "--test-size", 500, "--val-size", 400, "--epochs", 5, "--out",
                 TMP / "ddp.pt")
    assert r["world"] == 2 and r["test_acc"] >= 30, r
    # with a time limit the processes share rank 0's progress only now and then, and must still follow
    # one schedule and stop at the same step (else the next gradient all-reduce would wait forever)
    r = torchrun("--train-size", 1000, "--test-size", 200, "--val-size", 100, "--time-limit", 6, "--out",
                 TMP / "ddp_time_limit.pt")
    assert r["world"] == 2 and 5 <= r["train_seconds"] <= 16, r


# ============================================================================= seq2seq


def import_script(path):
    """Import a script as a module (its work is under `if __name__ == "__main__"`)."""
    import importlib.util
    sys.path.insert(0, str(ROOT / Path(path).parent))
    try:
        spec = importlib.util.spec_from_file_location(Path(path).parent.name + "_train", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def test_seq2seq_builtin_corpus_agrees_and_splits():
    s2s = import_script("seq2seq/train.py")
    pairs = s2s.builtin_pairs(12000, 0, 16)
    # distinct, deterministic
    assert len(set(pairs)) == len(pairs) == 12000 and pairs == s2s.builtin_pairs(12000, 0, 16)
    assert pairs != s2s.builtin_pairs(12000, 1, 16)
    table = dict(pairs)
    for en, fr in pairs:
        if en == "they are tall":
            assert fr in ("ils sont grands", "elles sont grandes"), fr  # gender and number agreement
        if " red car " in f" {en} ":
            assert "voiture rouge" in fr, (en, fr)  # the colour moves behind the noun
        if en.startswith("she s not "):
            assert fr.startswith(("elle ne ", "elle n ")) and " pas " in fr, (en, fr)  # ne ... pas
        if en.startswith("i am hungry"):
            assert fr.startswith("j ai faim"), fr  # avoir, elided
        assert len(en.split()) < 16 and len(fr.split()) < 16
    assert any("une petite voiture rouge" in fr for fr in table.values())
    train, val, test = s2s.split_pairs(pairs, 0.05, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (10200, 600, 1200)
    assert not (set(train) & set(test)) and not (set(train) & set(val)) and not (set(val) & set(test))


def test_bleu_hand_computed():
    bleu = import_script("seq2seq/train.py").corpus_bleu
    split = lambda *ss: [s.split() for s in ss]
    assert abs(bleu(split("a b c d e"), split("a b c d e")) - 1.0) < 1e-12
    # p1..p4 = 5/6, 4/5, 3/4, 2/3 and no brevity penalty: (1/3) ** (1/4)
    assert abs(bleu(split("a b c d e f"), split("a b c d e g")) - (1 / 3) ** 0.25) < 1e-12
    # all precisions 1, but 4 words against 6: brevity penalty exp(1 - 6/4)
    assert abs(bleu(split("a b c d"), split("a b c d e f")) - math.exp(-0.5)) < 1e-12
    # clipping: "the" 4 times counts only as often as the reference has it; no 4-gram matches -> 0
    assert bleu(split("the the the the"), split("the cat sat on")) == 0.0
    # corpus level: counts are summed over sentences before dividing. Sentence 1 matches fully
    # (4/4, 3/3, 2/2, 1/1); sentence 2 "x y z w" against "p q r s" matches nothing (0/4, 0/3, 0/2, 0/1).
    expected = ((4 / 8) * (3 / 6) * (2 / 4) * (1 / 2)) ** 0.25
    assert abs(bleu(split("a b c d", "x y z w"), split("a b c d", "p q r s")) - expected) < 1e-12
    assert bleu([[]], split("a b")) == 0.0


def seq2seq_checkpoint():
    return trained("seq2seq", "seq2seq/train.py", "--pairs", 4000, "--epochs", 4, "--hidden", 96)


def test_seq2seq_learns_to_translate():
    ckpt, out = seq2seq_checkpoint()
    losses = epoch_losses(out)
    assert len(losses) == 4 and losses[-1] < 0.3 * losses[0], losses
    r = result(out)
    assert r["test_bleu"] >= 0.6, r  # an untrained model scores about 0
    assert re.search(r"  > .+\n  = .+\n  < .+", out)  # examples: source, target, output


def test_seq2seq_beam_one_equals_greedy():
    import torch
    s2s = import_script("seq2seq/train.py")
    ckpt, _ = seq2seq_checkpoint()
    meta, model, src_vocab, tgt_vocab = s2s.load_checkpoint(ckpt, torch.device("cpu"))
    pairs = [(f, e) for e, f in s2s.builtin_pairs(60, 123, 16)]
    src, src_len, _ = s2s.to_tensors(pairs, src_vocab, tgt_vocab, "cpu")
    greedy, _ = model.greedy(src, src_len, 17)
    for i in range(len(pairs)):
        beam, attn = model.beam_search(src[i:i + 1, :src_len[i]], src_len[i:i + 1], 1, 17)
        assert s2s.strip_eos(beam) == s2s.strip_eos(greedy[i].tolist()), i
        assert attn.shape == (len(beam), int(src_len[i]))
    wide, _ = model.beam_search(src[:1, :src_len[0]], src_len[:1], 4, 17)
    assert len(wide) >= 1


def test_seq2seq_beam_keeps_the_hidden_state_contiguous():
    # cuDNN refuses a strided hx ("rnn: hx is not contiguous"); a CPU does not check, so the test does.
    import torch
    s2s = import_script("seq2seq/train.py")
    torch.manual_seed(0)
    model = s2s.Seq2Seq(30, 40, hidden=16, layers=2, attention="general").eval()
    seen = []
    model.decoder.gru.register_forward_pre_hook(lambda module, args: seen.append(args[1].is_contiguous()))
    src = torch.randint(4, 30, (1, 6))
    tokens, attention = model.beam_search(src, torch.tensor([6]), 3, 8)
    assert seen and all(seen), seen
    assert attention.shape == (len(tokens), 6)


def test_seq2seq_fused_bahdanau_step_equals_the_tutorials():
    # bahdanau_plain is the tutorial's step (attend with the previous state, context vector,
    # nn.GRU on [word; context]); the fused step writes the GRU equations out. Same numbers,
    # gradients included, with one and two layers; no attention weight on padding.
    import torch
    s2s = import_script("seq2seq/train.py")
    for layers in (1, 2):
        torch.manual_seed(layers)
        model = s2s.Seq2Seq(30, 40, hidden=16, layers=layers, bidirectional=False,
                            attention="bahdanau").eval()
        src, src_len = torch.randint(4, 30, (3, 5)), torch.tensor([5, 2, 4])
        src[1, 2:] = src[2, 4:] = s2s.PAD
        tokens = torch.randint(4, 40, (3, 6))
        enc_out, hidden = model.encoder(src, src_len)
        memory, dec = model.decoder.memory(enc_out, src_len), model.decoder
        outputs = {}
        for fused in (True, False):
            dec.fused = fused
            outputs[fused] = dec(tokens, hidden, memory)
        (fast, fast_h, fast_w), (slow, slow_h, slow_w) = outputs[True], outputs[False]
        assert torch.allclose(fast, slow, atol=1e-5) and torch.allclose(fast_h, slow_h, atol=1e-5)
        assert torch.allclose(fast_w, slow_w, atol=1e-6) and fast_w[1, :, 2:].abs().max() == 0
        params = list(dec.gru.parameters()) + list(dec.attention.parameters())
        grads = [torch.autograd.grad(y.square().sum(), params, retain_graph=True) for y in (fast, slow)]
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(*grads))


def test_seq2seq_other_attentions_and_free_running_train():
    for extra in (["--attention", "bahdanau", "--teacher-forcing", "0.5", "--no-bidirectional"],
                  ["--attention", "bahdanau", "--fast-bahdanau", "--layers", "2"],
                  ["--attention", "concat", "--layers", "2", "--reverse-source", "--beam", "3"]):
        out, _ = run("seq2seq/train.py", "--dry-run", "--hidden", 32, "--out", TMP / "other.pt", *extra)
        assert "result:" in out


def test_seq2seq_sample_arguments_stdin_and_map():
    ckpt, _ = seq2seq_checkpoint()
    out, _ = run("seq2seq/sample.py", "--checkpoint", ckpt, "elle est plus grande que moi",
                 "Nous avons faim !")
    lines = [l for l in out.splitlines() if " -> " in l]
    assert len(lines) == 2 and lines[0].startswith("elle est plus grande que moi -> "), out
    assert lines[1].startswith("nous avons faim ! -> ")  # normalised like the training data
    out, _ = run("seq2seq/sample.py", "--checkpoint", ckpt, stdin="il est grand\n\nje suis fatigue\n")
    assert out.count(" -> ") == 2
    out, err = run("seq2seq/sample.py", "--checkpoint", ckpt, "--beam", 3, "--attention-map", "je lave xyzzy")
    assert "unknown words: xyzzy" in err and re.search("[\u2591\u2592\u2593\u2588]", out), out


def test_seq2seq_bad_inputs():
    ckpt, _ = seq2seq_checkpoint()
    fails_with("seq2seq/train.py", "--data", TMP / "missing.txt", message=r"no such file")
    one_column = TMP / "one_column.txt"
    one_column.write_text("i am cold\tj ai froid\nhe is tall\n", encoding="utf-8")
    fails_with("seq2seq/train.py", "--data", one_column,
               message=r"line 2: expected 2 tab-separated columns, found 1")
    empty = TMP / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    fails_with("seq2seq/train.py", "--data", empty, message=r"is empty")
    fails_with("seq2seq/sample.py", "--checkpoint", ckpt, "il est " + "tres " * 20 + "grand",
               message=r"too long")
    fails_with("seq2seq/sample.py", "--checkpoint", ckpt, " ... ", message=r"empty sentence")
    blitz_ckpt, _ = blitz_checkpoint()
    fails_with("seq2seq/sample.py", "--checkpoint", blitz_ckpt, "il est grand",
               message=r"not a seq2seq checkpoint")
    fails_with("seq2seq/sample.py", "--checkpoint", TMP / "none.pt", "x",
               message=r"run python seq2seq/train.py first")


def test_seq2seq_eng_fra_download_is_checked():
    # --data eng-fra reads the tutorial's data.zip only if its SHA-256 matches, and keeps no bad download.
    bad = TMP / "eng_fra_bad"
    bad.mkdir(exist_ok=True)
    (bad / "data.zip").write_bytes(b"not the tutorial's zip")
    fails_with("seq2seq/train.py", "--data", "eng-fra", "--data-dir", bad,
               message=r"data.zip has the wrong SHA-256 .*delete it")
    s2s = import_script("seq2seq/train.py")
    s2s.ENG_FRA_URL = (bad / "data.zip").resolve().as_uri()  # a "download" of the wrong bytes
    fresh = TMP / "eng_fra_fresh"
    try:
        s2s.fetch_eng_fra(fresh)
        raise AssertionError("a download with the wrong SHA-256 was accepted")
    except SystemExit as e:
        assert "wrong SHA-256" in str(e) and "nothing was kept" in str(e), e
    assert not any(fresh.iterdir())


def test_seq2seq_reads_tab_separated_file():
    data = TMP / "pairs.txt"  # tutorial format with a third column, as newer Tatoeba exports have
    rows = [f"{e.capitalize()}.\t{f.capitalize()}.\tCC-BY 2.0 (France) Attribution: tatoeba.org"
            for e, f in import_script("seq2seq/train.py").builtin_pairs(800, 5, 10)]
    data.write_text("\n".join(rows), encoding="utf-8")
    out, _ = run("seq2seq/train.py", "--data", data, "--epochs", 1, "--hidden", 32, "--out", TMP / "file.pt")
    assert re.search(r"read 800 pairs from .*; \d+ pass the filter", out) and "result:" in out


# ============================================================================= tonenet


def write_test_midi(path, file_type=1):
    """A small MIDI file with what real files hold: a tempo change, velocity-0 note-offs, two
    overlapping notes of one key, one key struck twice in one grid cell, the sustain pedal, a
    program change, a drum track and a note below the piano. 96 ticks a beat: 24 ticks a sixteenth."""
    import mido
    M, Meta = mido.Message, mido.MetaMessage
    tempo = [Meta("set_tempo", tempo=500000, time=0), Meta("set_tempo", tempo=250000, time=192),
             Meta("end_of_track", time=0)]
    piano = [(0, M("program_change", program=0)), (0, M("note_on", note=60, velocity=100)),
             (48, M("note_on", note=60, velocity=0)),
             (96, M("note_on", note=64, velocity=80)), (120, M("note_on", note=64, velocity=70)),
             (144, M("note_off", note=64)),
             (192, M("note_off", note=64)), (192, M("control_change", control=64, value=127)),
             (192, M("note_on", note=67, velocity=90)),
             (216, M("note_off", note=67)), (288, M("control_change", control=64, value=0)),
             (288, M("note_on", note=69, velocity=50)),
             (290, M("note_on", note=69, velocity=110)), (300, M("note_on", note=10, velocity=99)),
             (310, M("note_off", note=69)),
             (320, M("note_off", note=69)), (330, M("note_off", note=10))]
    drums = [(0, M("note_on", channel=9, note=38, velocity=120)), (24, M("note_off", channel=9, note=38))]
    mid = mido.MidiFile(type=1, ticks_per_beat=96)
    mid.tracks.append(mido.MidiTrack(tempo))
    for events in (piano, drums):
        track, now = mido.MidiTrack(), 0
        for tick, msg in events:
            track.append(msg.copy(time=tick - now))
            now = tick
        mid.tracks.append(track)
    if file_type == 0:
        mid = mido.MidiFile(type=0, ticks_per_beat=96, tracks=[mido.merge_tracks(mid.tracks)])
    mid.save(path)
    return path


def test_tonenet_encoding_of_written_midi():
    import numpy as np
    tn = import_script("tonenet/train.py")
    rolls = []
    for file_type in (0, 1):
        mid = tn.open_midi(write_test_midi(TMP / f"enc{file_type}.mid", file_type))
        notes = tn.read_notes(mid)
        roll, vel, step = tn.encode(notes, mid.ticks_per_beat, 4)
        rolls.append((roll, vel))
        C4, E4, G4, A4 = 60 - 21, 64 - 21, 67 - 21, 69 - 21
        assert roll[0, C4].tolist() == [1, 1, 0] and vel[0, C4] == 100  # struck, in the first part
        # held, then released by velocity 0
        assert roll[1, C4].tolist() == [0, 1, 0] and roll[2, C4].tolist() == [0, 0, 0]
        # overlapping strikes
        assert roll[4, E4].tolist() == [1, 1, 0] and roll[5, E4].tolist() == [1, 1, 0] and vel[5, E4] == 70
        # first in, first out: the second note ends at tick 192
        assert roll[7, E4, 1] == 1 and roll[8, E4, 1] == 0
        # pedal holds it to tick 288
        assert roll[8, G4].tolist() == [1, 1, 0] and roll[11, G4, 1] == 1 and roll[12, G4, 1] == 0
        assert vel[12, A4] == 110  # two strikes in one cell: the louder is kept
        # two A4s share a cell; no drum note, nothing below A0
        assert int(roll[..., 0].sum()) == 5 and len(step) == 6
        assert abs(tn.seconds_of(mid, np.array([192]))[0] - 1.0) < 1e-9  # two beats at 120 bpm
        assert abs(tn.seconds_of(mid, np.array([288]))[0] - 1.25) < 1e-9  # then 240 bpm
        no_pedal, _, _ = tn.encode(tn.read_notes(mid, pedal=False), mid.ticks_per_beat, 4)
        assert no_pedal[9, G4, 1] == 0
    assert all((a == b).all() for a, b in zip(*rolls))  # type 0 and type 1 read the same
    # parts: a built-in piece has a melody track and an accompaniment track (track 0 holds no notes)
    import random
    mid = tn.compose(random.Random(0), "lyrical")
    notes = tn.read_notes(mid)
    roll, _, step = tn.encode(notes, mid.ticks_per_beat, 4)
    assert sorted(set(notes["track"].tolist())) == [1, 2]
    part = roll[step, notes["key"], 2]
    assert (part == notes["track"] - 1).mean() > 0.99 and set(part.tolist()) == {0, 1}
    assert (roll[..., 2][roll[..., 0] == 0] == 0).all()  # a part only where a note is struck


def tonenet_checkpoint():
    return trained("tonenet", "tonenet/train.py", "--pieces", 60, "--epochs", 30)


def test_tonenet_learns_builtin_styles():
    ckpt, out = tonenet_checkpoint()
    losses = epoch_losses(out)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], losses
    r = result(out)
    # the style-mean baseline is ~14 MIDI units on these rules; a model that learned them is far below
    assert r["mae"] < 0.6 * r["style_mean_mae"], r
    assert r["lyrical_corr"] > 0.6 and r["groove_corr"] > 0.6, r


def test_tonenet_stylenet_baseline_runs():
    out, _ = run("tonenet/train.py", "--model", "stylenet", "--dry-run", "--out", TMP / "stylenet.pt")
    assert "model: stylenet" in out and "result: model=stylenet" in out


def test_tonenet_sample_changes_only_velocities():
    import mido
    ckpt, _ = tonenet_checkpoint()
    source = write_test_midi(TMP / "perform_me.mid")
    before = source.read_bytes()
    performed = TMP / "performed.mid"
    out, _ = run("tonenet/sample.py", source, "--style", "groove", "--out", performed, "--checkpoint", ckpt)
    assert source.read_bytes() == before and "model time" in out and "loudest" in out
    a, b = mido.MidiFile(source), mido.MidiFile(performed)
    assert (a.type, a.ticks_per_beat, len(a.tracks)) == (b.type, b.ticks_per_beat, len(b.tracks))
    changed = 0
    for ta, tb in zip(a.tracks, b.tracks):
        assert len(ta) == len(tb)
        for ma, mb in zip(ta, tb):
            piano_on = ma.type == "note_on" and ma.velocity > 0 and ma.channel != 9 and 21 <= ma.note <= 108
            if piano_on:
                assert (mb.type == "note_on" and 1 <= mb.velocity <= 127
                        and ma.copy(velocity=mb.velocity) == mb)
                changed += ma.velocity != mb.velocity
            else:
                assert ma == mb, (ma, mb)  # timing, pedal, tempo, program, drums, note-offs: untouched
    assert changed >= 3
    # a built-in piece, every style
    out, _ = run("tonenet/sample.py", "--out", TMP / "builtin.mid", "--checkpoint", ckpt)
    assert (TMP / "builtin_lyrical.mid").is_file() and (TMP / "builtin_groove.mid").is_file()
    assert out.count("-> loudest") == 3 and ("\u2588" in out or "\u2593" in out)  # the input, then each style


def write_long_performance(path, velocity=None, minutes=4):
    """A four-minute piece at 120 bpm: a melody in eighths over chords on the beat, 1,920 notes;
    velocities of a performance (a swell every 8 bars, accents, jitter) or one constant velocity."""
    import mido
    import random
    rng = random.Random(1)
    mid = mido.MidiFile(type=0, ticks_per_beat=96)
    events = []
    for eighth in range(minutes * 60 * 4):
        t = eighth * 48
        swell = 25 * abs(((eighth % 64) - 32) / 32)  # 0 .. 25
        keys = [60 + (eighth * 7) % 17] + ([40 + (eighth // 8) % 12, 47 + (eighth // 8) % 12]
                                           if eighth % 2 == 0 else [])
        for i, key in enumerate(keys):
            v = velocity or int(45 + swell + (10 if i == 0 else 0) + rng.randint(-4, 4))
            events += [(t, 1, key, v), (t + 44, 0, key, 0)]
    events.sort()
    track, now = mido.MidiTrack(), 0
    for tick, on, key, v in events:
        track.append(mido.Message("note_on" if on else "note_off", note=key, velocity=v, time=tick - now))
        now = tick
    mid.tracks.append(track)
    mid.save(path)
    return path


def note_on_velocities(path):
    import mido
    return [m.velocity for m in mido.merge_tracks(mido.MidiFile(path).tracks) if m.type == "note_on"
            and m.velocity > 0]


def test_tonenet_level_sets_the_mean_velocity():
    ckpt, _ = tonenet_checkpoint()
    performance = write_long_performance(TMP / "long_performance.mid")
    given = note_on_velocities(performance)
    for level in (30, 50, 100):
        out_path = TMP / f"level{level}.mid"
        out, _ = run("tonenet/sample.py", performance, "--style", "lyrical", "--level", level, "--out",
                     out_path, "--checkpoint", ckpt)
        v = note_on_velocities(out_path)
        assert len(v) == len(given) > 1800 and abs(sum(v) / len(v) - level) <= 1, (level, sum(v) / len(v))
        assert max(v) - min(v) > 10  # the style's dynamics, not one flat velocity
        assert re.search(r"model time [\d.]+ s for \d+ s of music", out), out[-600:]
    out, _ = run("tonenet/sample.py", performance, "--style", "groove", "--level", "keep", "--out",
                 TMP / "kept.mid", "--checkpoint", ckpt)
    kept = note_on_velocities(TMP / "kept.mid")
    assert "the input's mean velocity" in out and abs(sum(kept) / len(kept) - sum(given) / len(given)) <= 1
    assert kept != given
    # a score at one velocity has no loudness to keep: the style's own level, and the output says so
    score = write_long_performance(TMP / "long_score.mid", velocity=64, minutes=1)
    out, _ = run("tonenet/sample.py", score, "--style", "groove", "--level", "keep", "--out",
                 TMP / "score_kept.mid", "--checkpoint", ckpt)
    _, _ = run("tonenet/sample.py", score, "--style", "groove", "--out", TMP / "score_own.mid",
               "--checkpoint", ckpt)
    assert ("is a score" in out
            and note_on_velocities(TMP / "score_kept.mid") == note_on_velocities(TMP / "score_own.mid"))
    fails_with("tonenet/sample.py", score, "--level", "loud", "--checkpoint", ckpt,
               message=r"--level loud: give a mean velocity from 1 to 127")
    fails_with("tonenet/sample.py", score, "--level", 0, "--checkpoint", ckpt, message=r"--level 0: give")


def test_tonenet_performances_of_one_piece_share_a_split():
    tn = import_script("tonenet/train.py")
    assert tn.piece_of("Bach_Fugue_bwv_889_Giesbrecht01M.mid") == "Bach_Fugue_bwv_889"
    assert tn.piece_of("Bach_Fugue_bwv_889_LiuY01M.mid") == "Bach_Fugue_bwv_889"
    assert tn.piece_of("Beethoven_Piano_Sonatas_32-1_FALIKS01_2004.mid") == "Beethoven_Piano_Sonatas_32-1"
    assert tn.piece_of("Chopin_Etude_op_10_3_Bult-ItoS02M.mid") == "Chopin_Etude_op_10_3"
    for name in ("pop909_001.mid", "Mozart_mz_330_3.mid", "Albeniz_alb_esp1.mid", "piece2.mid"):
        assert tn.piece_of(name) == name[:-4]  # no performer tag: a piece of its own
    performers = ["Giesbrecht01M", "LiuY01M", "KabuliL01M"]
    files = [(f"Chopin_Ballade_{k}_{performers[(k + j) % 3]}.mid", None, None) for k in range(30)
             for j in range(1 + k % 3)]
    for seed in range(20):
        split = tn.split_files({"classical": files}, 0.1, 0.15, seed)
        where = {}
        for name, part in split.items():
            for f, _, _ in part["classical"]:
                where.setdefault(tn.piece_of(f), set()).add(name)
        assert len(where) == 30 and all(len(splits) == 1 for splits in where.values()), where
        assert sum(len(part["classical"]) for part in split.values()) == len(files)
        assert all(part["classical"] for part in split.values())


def test_tonenet_bad_inputs():
    ckpt, _ = tonenet_checkpoint()
    good = write_test_midi(TMP / "good.mid")
    text = TMP / "text.mid"
    text.write_text("this is not MIDI\n")
    truncated = TMP / "truncated.mid"
    truncated.write_bytes(good.read_bytes()[:40])
    silent = TMP / "silent.mid"
    import mido
    mido.MidiFile(tracks=[mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=500000)])]).save(silent)
    blitz_ckpt, _ = blitz_checkpoint()
    before = good.read_bytes()
    all_fail_with(
        ("tonenet/sample.py", text, "--checkpoint", ckpt, r"text.mid is not a readable MIDI file"),
        ("tonenet/sample.py", truncated, "--checkpoint", ckpt, r"truncated.mid is not a readable MIDI file"),
        ("tonenet/sample.py", silent, "--checkpoint", ckpt, r"silent.mid has no piano notes"),
        ("tonenet/sample.py", good, "--style", "jazz", "--checkpoint", ckpt,
         r"unknown style 'jazz'.*lyrical, groove"),
        ("tonenet/sample.py", good, "--style", "groove", "--out", good, "--checkpoint", ckpt,
         r"is the input file"),
        ("tonenet/sample.py", TMP / "nowhere.mid", "--checkpoint", ckpt, r"no such file"),
        ("tonenet/sample.py", good, "--checkpoint", TMP / "none.pt", r"run python tonenet/train.py first"),
        ("tonenet/sample.py", good, "--checkpoint", blitz_ckpt, r"not a tonenet checkpoint"),
        ("tonenet/train.py", "--data", TMP / "no_such_folder", r"is not a folder"))
    assert good.read_bytes() == before
    empty = TMP / "midi_empty"
    empty.mkdir(exist_ok=True)
    fails_with("tonenet/train.py", "--data", empty, message=r"has no style sub-folders")
    (empty / "jazz").mkdir(exist_ok=True)
    fails_with("tonenet/train.py", "--data", empty, message=r"jazz has no readable MIDI file")
    (empty / "jazz" / "junk.mid").write_text("junk")
    _, err = run("tonenet/train.py", "--data", empty, expect_ok=False)
    lines = err.strip().splitlines()  # a warning naming the skipped file, then the error
    assert "Traceback" not in err and "skipping" in lines[0] and "junk.mid" in lines[0], err
    assert re.search(r"error: style folder .*jazz has no readable MIDI file", lines[-1]), err


def test_tonenet_reads_a_folder_of_styles():
    import mido
    data = TMP / "styles"
    for style, velocity in (("soft", 40), ("loud", 100)):
        (data / style).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            mid = mido.MidiFile(type=0, ticks_per_beat=96)
            track = mido.MidiTrack()
            for k in range(40):
                track += [mido.Message("note_on", note=48 + (k * 5 + i) % 24, velocity=velocity + (k % 3),
                                       time=0 if k == 0 else 24),
                          mido.Message("note_off", note=48 + (k * 5 + i) % 24, time=24)]
            mid.tracks.append(track)
            mid.save(data / style / f"piece{i}.mid")
    (data / "loud" / "broken.mid").write_bytes(b"MThd\x00\x00")
    out, err = run("tonenet/train.py", "--data", data, "--epochs", 3, "--window", 64, "--out",
                   TMP / "folder.pt")
    assert ("read 8 MIDI files" in out and "broken.mid" in err
            and "data: soft: train 2 files of 2 pieces" in out), out[:1500]
    assert "result: model=tonenet" in out


# ============================================================================= umtn

UMTN_SMALL = ["--melodies", 12, "--seconds", 2, "--enc-blocks", 1, "--enc-layers", 6, "--dec-layers", 5,
              "--segment", 1024,
              "--batch-size", 6, "--eval-seconds", 0.25, "--log-every", 20]


def test_umtn_mu_law_round_trip():
    import torch
    um = import_script("umtn/train.py")
    q = torch.arange(256)
    assert torch.equal(um.mu_law_encode(um.mu_law_decode(q)), q)  # every class survives decode -> encode
    x = torch.linspace(-1, 1, 20001)
    err = (um.mu_law_decode(um.mu_law_encode(x)) - x).abs()
    # steps of ~0.04 near full scale, 50 times finer near silence
    assert err.max() < 0.022 and err[x.abs() < 0.01].max() < 4e-4
    assert um.mu_law_encode(torch.tensor([0.0])).item() in (127, 128)


def write_wav_kinds(folder):
    """The same 440 Hz tone as every common WAV kind; 24-bit is written by hand (scipy cannot)."""
    import struct
    import numpy as np
    from scipy.io import wavfile
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for rate in (8000, 22050):
        t = np.arange(rate // 2) / rate
        tone = 0.5 * np.sin(2 * np.pi * 440 * t)
        kinds = {"u8": (tone * 127 + 128).astype(np.uint8), "i16": (tone * 32767).astype(np.int16),
                 "i32": (tone * 2 ** 31).astype(np.int32), "f32": tone.astype(np.float32), "f64": tone}
        for name, data in kinds.items():
            for channels in (1, 2):
                path = folder / f"{name}_{rate}_{channels}ch.wav"
                wavfile.write(path, rate, data if channels == 1 else np.stack([data, data], 1))
                files[path] = rate
        pcm = (tone * 2 ** 23).astype(np.int32)
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in pcm)
        path = folder / f"i24_{rate}_1ch.wav"
        fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 3, 3, 24)
        path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(raw)) + b"WAVEfmt " + fmt
                         + b"data" + struct.pack("<I", len(raw)) + raw)
        files[path] = rate
    return files


def test_umtn_reads_every_wav_kind():
    import numpy as np
    um = import_script("umtn/train.py")
    files = write_wav_kinds(TMP / "wavs")
    assert len(files) == 22
    for path in files:
        x = um.read_wav(path, 8000)
        assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 4000) <= 1, (path.name, x.shape)
        peak = np.abs(x[500:-500]).max()
        assert 0.45 < peak < 0.55, (path.name, peak)  # the same amplitude whatever the format
        f0 = um.pitch_track(x, 8000)
        # still 440 Hz (within half a semitone) after resampling
        assert abs(np.median(f0[f0 > 0]) - 440) < 440 * 0.03, path.name


def test_umtn_level_norm_hides_how_loud_a_note_is():
    # With --level-norm the encoder reads its input divided by its loudness: a note played softer, or
    # dying away, gives the same code. Biases zeroed, so that without it the code scales with the input.
    import math
    import torch
    um = import_script("umtn/train.py")
    torch.manual_seed(0)
    norm, plain = um.Encoder(8, 1, 3, 4, 16, level_norm=True), um.Encoder(8, 1, 3, 4, 16)
    for name, p in norm.named_parameters():
        if name.endswith("bias"):
            p.data.zero_()
    plain.load_state_dict(norm.state_dict())
    t = torch.arange(2048) / 4000
    note = 0.5 * torch.sin(2 * math.pi * 220 * t)[None]
    dying = note * torch.exp(-3 * t)  # 27 dB quieter at the end
    diff = lambda a, b: ((a - b).norm() / a.norm()).item()
    with torch.no_grad():
        assert diff(norm(note), norm(0.25 * note)) < 0.03 and diff(norm(note), norm(dying)) < 0.03
        assert diff(plain(note), plain(0.25 * note)) > 0.5 and diff(plain(note), plain(dying)) > 0.3


def test_umtn_pitch_augmentation_resamples_like_interpolate():
    # The batched augmentation must do, for every item, what F.interpolate does to its shifted part.
    import torch
    import torch.nn.functional as F
    um = import_script("umtn/train.py")
    audio = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    out = um.augment(audio, torch.Generator().manual_seed(3))
    u = torch.rand(8, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # the same draws
    n = (1000 * (0.25 + 0.25 * u[:, 0])).long()
    span = (n * 2 ** ((u[:, 1] - 0.5) / 12)).round().long().clamp(max=1000)
    start = (u[:, 2] * (1000 - torch.maximum(n, span) + 1)).long()
    for i in range(8):
        a, k, m = int(start[i]), int(n[i]), int(span[i])
        expected = audio[i].clone()
        expected[a:a + k] = F.interpolate(audio[i, a:a + m].view(1, 1, -1), size=k, mode="linear",
                                          align_corners=False).view(-1)
        # F.interpolate places its samples in float32, ours in float64: they differ by rounding
        assert torch.allclose(out[i], expected, atol=2e-4), (i, (out[i] - expected).abs().max())
        assert m != k or torch.equal(out[i], audio[i])  # a shift is a change, unless it rounds to none
    assert not torch.equal(out, audio)


def test_umtn_pitch_track_reads_every_instrument_in_tune():
    # The pitch tracker on every note the melodies use (C2-C4), played by each built-in instrument:
    # its median must lie within 8 cents of the note's true f0, whatever the timbre, or a perfect
    # translation into one instrument loses part of the 50 cents that raw pitch accuracy allows.
    # Without the window's correction a plucked C2 read 26 cents sharp, an organ's 7.
    import numpy as np
    um = import_script("umtn/train.py")
    rate = 4000
    for d in um.DOMAINS:
        for p in range(36, 61):
            f0 = 440 * 2 ** ((p - 69) / 12)
            if d == "pluck":  # the string's true pitch: its delay loop (n + 1/2 samples at 4x the rate)
                f0 = 4 * rate / (max(2, round(4 * rate / f0 - 0.5)) + 0.5)
            f = um.pitch_track(um.render([(0, 2000, p)], d, 0.5, rate), rate)
            assert (f > 0).mean() > 0.8, (d, p)
            cents = np.median(1200 * np.log2(f[f > 0] / f0))
            assert abs(cents) < 8, (d, p, cents)


def sampled_like(notes, kind, seconds, rate, seed=0):
    """Renderings with the partials that make the pitch of real instruments hard to read: the violin
    (every partial, 1/h), the clarinet (odd partials only), the saxophone (strong upper partials and
    breath noise), the bassoon (a weak fundamental under strong second and third partials); each
    with vibrato and 30 ms attacks and releases. notes: (start, length, MIDI) in samples."""
    import numpy as np
    rng, h = np.random.default_rng(seed), np.arange(1, 13)
    amps = {"violin": 1 / h, "clarinet": np.where(h % 2 == 1, 1 / h, 0.02 / h), "saxophone": 0.85 ** (h - 1),
            "bassoon": np.array([0.25, 1, 0.8, 0.5, 0.35, 0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05])}[kind]
    out = np.zeros(int(seconds * rate))
    for start, length, pitch in notes:
        f0 = 440 * 2 ** ((pitch - 69) / 12)
        t = np.arange(min(length, len(out) - start)) / rate
        vibrato = 0.006 * np.cos(2 * np.pi * 5.5 * t) / (2 * np.pi * 5.5)  # 5.5 Hz, +-10 cents
        phase = 2 * np.pi * f0 * (t - vibrato)
        envelope = np.minimum(1, t / 0.03) * np.minimum(1, (length / rate - t) / 0.03)
        out[start:start + len(t)] += envelope * sum(a * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
                                                    for k, a in zip(h, amps) if k * f0 < rate / 2)
    if kind == "saxophone":
        out += 0.03 * rng.standard_normal(len(out)) * (out != 0)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def test_umtn_pitch_track_reads_real_instrument_spectra():
    # The ruler on the spectra of the sampled violin, clarinet, saxophone and bassoon, at 4 and 8 kHz,
    # in the register of the real-instrument data (D3-F5) and in a real violin's top octave (C5-E6),
    # where at 4 kHz one or two partials lie inside the band and the lower octave's candidates would
    # collect a decoder's noise at their odd harmonics: the truth reads right, and still does with a
    # decoder's sampling noise; the same line an octave away reads wrong.
    import numpy as np
    um = import_script("umtn/train.py")
    rng = np.random.default_rng(1)
    for low_note, high_note in ((50, 78), (72, 89)):  # D3-F5, C5-E6
        for rate in (4000, 8000):
            for kind in ("violin", "clarinet", "saxophone", "bassoon"):
                line = rng.integers(low_note, high_note, 16)
                notes = [(int(i * 0.25 * rate), int(0.25 * rate), int(p)) for i, p in enumerate(line)]
                x = sampled_like(notes, kind, 4.0, rate)
                assert um.raw_pitch_accuracy(x, notes, rate) >= 0.97, (rate, kind, low_note)
                noisy = um.mu_law_noise(x, 4, 0)
                assert um.raw_pitch_accuracy(noisy, notes, rate) >= 0.97, (rate, kind, low_note)
                low = sampled_like([(a, b, p - 12) for a, b, p in notes], kind, 4.0, rate)
                assert um.raw_pitch_accuracy(low, notes, rate) <= 0.05, (rate, kind, low_note)
                # an octave up, where the tracker's range (up to 1.4 kHz) still holds the higher note
                notes = [(a, b, min(p, 77)) for a, b, p in notes]
                high = sampled_like([(a, b, p + 12) for a, b, p in notes], kind, 4.0, rate)
                assert um.raw_pitch_accuracy(high, notes, rate) <= 0.05, (rate, kind, low_note)


def test_umtn_translation_metrics_rank_known_cases():
    # Before a metric judges a model it must rank known answers right: the true rendering, the true
    # rendering with a decoder's sampling noise (+-4 mu-law classes, about 3.2 bits per sample), the
    # untranslated input and silence.
    import random
    import numpy as np
    um = import_script("umtn/train.py")
    rate, rng = 4000, random.Random(7)
    tunes = [um.melody(rng, 2.0, rate) for _ in range(6)]
    audio = {d: [um.render(m, d, 2.0, rate) for m in tunes] for d in um.DOMAINS}
    timbre = um.TimbreClassifier.fit(audio, tunes, rate)
    held_out = [um.melody(rng, 2.0, rate) for _ in range(4)]
    rows = {k: {"pitch": [], "target": [], "mel": []} for k in ("perfect", "noisy", "input", "silence")}
    for s in um.DOMAINS:
        for t in um.DOMAINS:
            if s == t:
                continue
            for i, notes in enumerate(held_out):
                target, source = um.render(notes, t, 2.0, rate), um.render(notes, s, 2.0, rate)
                silence = um.mu_law_noise(np.zeros_like(target), 4, i)
                for kind, x in (("perfect", target), ("noisy", um.mu_law_noise(target, 4, i)),
                                ("input", source), ("silence", silence)):
                    rows[kind]["pitch"].append(um.raw_pitch_accuracy(x, notes, rate))
                    rows[kind]["target"].append(timbre(x, um.written_pitch(notes, len(x), rate)) == t)
                    rows[kind]["mel"].append(um.log_mel_distance(x, target, rate))
    mean = {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in rows.items()}
    assert (mean["perfect"]["mel"] == 0 and mean["perfect"]["pitch"] > 0.95
            and mean["perfect"]["target"] == 1), mean
    # noise costs neither pitch nor timbre
    assert mean["noisy"]["pitch"] >= 0.95 and mean["noisy"]["target"] >= 0.95, mean
    # and the noisy answer beats the input
    assert mean["noisy"]["mel"] < mean["input"]["mel"] < mean["silence"]["mel"], mean
    # the input: right notes, wrong instrument
    assert mean["input"]["pitch"] > 0.95 and mean["input"]["target"] == 0, mean
    assert mean["silence"]["pitch"] < 0.05, mean
    # the median pitch error: near 0 for the true rendering, clean or noisy; +100 cents for the
    # melody played a semitone sharp (every note one step up), -50 for a quarter tone flat. The
    # pluck's own tuning is up to 10 cents off (its delay loop is a whole number of samples).
    for t in um.DOMAINS:
        for i, notes in enumerate(held_out):
            x = um.render(notes, t, 2.0, rate)
            assert abs(um.pitch_offset(x, notes, rate)) < 20
            assert abs(um.pitch_offset(um.mu_law_noise(x, 4, i), notes, rate)) < 20
            for shift in (1, -0.5):
                moved = um.render([(a, b, p + shift) for a, b, p in notes], t, 2.0, rate)
                assert abs(um.pitch_offset(moved, notes, rate) - 100 * shift) < 20, (t, shift)
    assert math.isnan(um.pitch_offset(np.zeros(8000, np.float32), held_out[0], rate))
    lo, mid, hi = um.bootstrap([0, 1] * 6, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    assert mid == 0.5 and 0 < lo <= 0.5 <= hi < 1


def test_umtn_latent_probes_read_what_a_known_code_holds():
    # The probes of the frozen code, on codes whose content is known: a code that carries the
    # domain (one-hot plus noise) is named by the probe with context, pure noise only at chance; a
    # code that carries the note is read by the linear probe, and noise is not.
    import torch
    um = import_script("umtn/train.py")
    g = torch.Generator().manual_seed(0)
    N, L, F, train = 60, 16, 50, 40  # clips, code channels, frames; the first 40 clips train the probes
    domain = (torch.arange(N) % 3)[:, None].expand(N, F)
    note = torch.randint(1, 12, (N, F), generator=g)
    note[:, :4] = -1  # frames outside notes are not scored

    def code(content):
        z = torch.randn(N, L, F, generator=g)
        if content is not None:
            # 5 standard deviations: the right channel stands out from the other eleven in 99.8% of frames
            z[:, :12] += 5 * torch.nn.functional.one_hot(content.clamp(min=0), 12).permute(0, 2, 1)
        return z

    def probe(z, y, context):
        return um.probe_accuracy(z[:train], y[:train], z[train:], y[train:], context)

    assert probe(code(domain), domain, True) > 0.95
    assert 0.15 < probe(code(None), domain, True) < 0.55  # chance: one in three
    assert probe(code(note), note, False) > 0.95
    assert probe(code(None), note, False) < 0.2  # chance: one in eleven


def test_umtn_decoder_is_causal_and_fast_generation_equals_naive():
    import torch
    um = import_script("umtn/train.py")
    torch.manual_seed(0)
    model = um.UMTN(["a", "b", "c"], enc_channels=8, enc_blocks=1, enc_layers=3, latent=4, pool=8,
                    dec_channels=8, skip_channels=8, dec_blocks=2, dec_layers=3).double().eval()
    dec = model.decoders[0]
    prev, z = torch.randint(0, 256, (2, 48)), torch.randn(2, 4, 6, dtype=torch.float64)
    changed = prev.clone()
    changed[:, 30] = (changed[:, 30] + 77) % 256
    a, b = dec(prev, z), dec(changed, z)
    assert torch.equal(a[:, :30], b[:, :30]), "a later sample changed an earlier output"
    assert not torch.equal(a[:, 30:], b[:, 30:])
    z = torch.randn(3, 2, 4, 10, dtype=torch.float64)  # three decoders, two clips each
    fast = um.generate(list(model.decoders), z, 80, 0.8, seed=5)
    plain = um.generate(list(model.decoders), z, 80, 0.8, seed=5, method="plain")  # the paper's queues
    # the whole receptive field each time
    naive = um.generate(list(model.decoders), z, 80, 0.8, seed=5, method="naive")
    assert torch.equal(fast, plain) and torch.equal(fast, naive) and len(set(fast.flatten().tolist())) > 20


def umtn_checkpoint():
    return trained("umtn", "umtn/train.py", *UMTN_SMALL, "--steps", 200)


def test_umtn_training_learns():
    ckpt, out = umtn_checkpoint()
    r = result(out)
    assert r["first_bits"] > 7.5 and r["bits_per_sample"] < 6.3, r  # 8 bits per sample is a uniform guess
    losses = [float(x) for x in re.findall(r"^step .*?\| loss ([\d.]+) bits", out, re.M)]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.5, losses
    assert "log-mel dist" in out and "baseline: code of silence" in out and "topline" in out
    assert r["input_pitch_acc"] > 95 and r["classifier_clean"] > 95 and r["silence_pitch_acc"] < 10, r
    assert "latent probes" in out and all(0 <= r[f"probe_{k}"] <= 100 for k in ("domain", "note_linear")), r


def test_umtn_domain_confusion_hides_the_domain():
    # without confusion the classifier learns to name the domain from the latent; with it, its loss stays near
    # chance. Measured on an encoder that reads the loudness too: with --level-norm a classifier this small
    # does not learn to name the domain in 60 steps even without confusion
    runs = {}
    for lam in (0, 0.1):
        out, _ = run("umtn/train.py", *UMTN_SMALL, "--steps", 60, "--dc-lambda", lam, "--eval-seconds", 0,
                     "--no-level-norm", "--out", TMP / f"dc{lam}.pt")
        losses = [float(x) for x in re.findall(r"domain loss ([\d.]+)", out)]
        runs[lam] = sum(losses[-2:]) / 2
    chance = math.log(3)
    assert runs[0] < 0.8 * chance and runs[0.1] > 0.9 * chance and runs[0.1] > runs[0] + 0.15, runs


def test_umtn_sample_writes_one_wav_per_domain():
    import numpy as np
    from scipy.io import wavfile
    ckpt, _ = umtn_checkpoint()
    source = next(p for p in write_wav_kinds(TMP / "wavs") if p.name == "i16_22050_2ch.wav")
    before = source.read_bytes()
    out, _ = run("umtn/sample.py", source, "--to", "all", "--out", TMP / "translated.wav", "--checkpoint",
                 ckpt, "--chunk", 0.2)
    assert source.read_bytes() == before and "real-time factor" in out
    assert ("listen in this order" in out and out.count("plays the input's note in") == 3
            and out.count("sounds like") == 4)  # the input, then each output
    for domain in ("pluck", "organ", "reed"):
        rate, x = wavfile.read(TMP / f"translated_to_{domain}.wav")
        # 0.5 s at the model's rate
        assert rate == 4000 and x.dtype == np.int16 and abs(len(x) - 2000) <= 1 and np.abs(x).max() > 0
    out, _ = run("umtn/sample.py", "--to", "organ", "--out", TMP / "example_organ.wav", "--checkpoint", ckpt,
                 "--seconds", 0.5)
    assert (TMP / "example_organ.wav").is_file()


def test_umtn_torchrun_two_processes():
    ckpt = TMP / "umtn_ddp.pt"
    p = subprocess.run([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node=2",
                        "umtn/train.py", *UMTN_SMALL, "--steps", 20, "--eval-seconds", 0, "--device", "cpu",
                                         "--out", ckpt]],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = result(p.stdout)
    assert r["world"] == 2 and r["bits_per_sample"] < r["first_bits"], r
    assert p.stdout.count("result:") == 1 and ckpt.is_file()  # only rank 0 reports and saves


def test_umtn_bad_inputs():
    import numpy as np
    from scipy.io import wavfile
    ckpt, _ = umtn_checkpoint()
    text = TMP / "text.wav"
    text.write_text("not audio")
    empty = TMP / "empty.wav"
    wavfile.write(empty, 8000, np.zeros(0, np.int16))
    silent = TMP / "silent.wav"
    wavfile.write(silent, 8000, np.zeros(800, np.int16))
    good = TMP / "good.wav"
    wavfile.write(good, 8000, (3000 * np.sin(np.arange(4000) * 0.3)).astype(np.int16))
    truncated = TMP / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[:30])
    tonenet_ckpt, _ = tonenet_checkpoint()
    before = good.read_bytes()
    all_fail_with(
        ("umtn/sample.py", text, "--checkpoint", ckpt, r"text.wav is not a readable WAV file"),
        ("umtn/sample.py", truncated, "--checkpoint", ckpt, r"truncated.wav is not a readable WAV file"),
        ("umtn/sample.py", empty, "--checkpoint", ckpt, r"empty.wav is empty"),
        ("umtn/sample.py", silent, "--checkpoint", ckpt, r"silent.wav is silent"),
        ("umtn/sample.py", good, "--to", "banjo", "--checkpoint", ckpt,
         r"unknown domain 'banjo'.*pluck, organ, reed"),
        ("umtn/sample.py", good, "--to", "organ", "--out", good, "--checkpoint", ckpt, r"is the input file"),
        ("umtn/sample.py", TMP / "nowhere.wav", "--checkpoint", ckpt, r"no such file"),
        ("umtn/sample.py", good, "--checkpoint", TMP / "none.pt", r"run python umtn/train.py first"),
        ("umtn/sample.py", good, "--checkpoint", tonenet_ckpt, r"not a umtn checkpoint"),
        ("umtn/train.py", "--data", TMP / "no_such_folder", r"is not a folder"),
        ("umtn/train.py", "--anneal", 1, r"--anneal 1.0 is a fraction of training"),
        ("umtn/train.py", "--recipe", "violin", r"invalid choice: 'violin'"),
        ("umtn/train.py", "--recipe", "instruments", "--clip-rms", -1, r"--clip-rms is a level"),
        ("umtn/train.py", "--register", 25, r"--register a number of semitones from 0 to 24"))
    assert good.read_bytes() == before
    one = TMP / "one_domain"
    (one / "violin").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        wavfile.write(one / "violin" / f"{i}.wav", 8000,
                      (3000 * np.sin(np.arange(4000) * 0.2 * (i + 1))).astype(np.int16))
    fails_with("umtn/train.py", "--data", one, message=r"has 1 usable domain\(s\): need at least 2")


def write_instrument_folder(root, kinds, lines, rate=8000, seconds=2.0, notes=True):
    """root/<kind>/<i>.wav (16-bit) for each line of (start_s, length_s, MIDI) notes rendered by
    sampled_like, and beside each its <i>.csv score (onset_s,offset_s,midi) when `notes`."""
    import numpy as np
    from scipy.io import wavfile
    for kind in kinds:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i, line in enumerate(lines):
            in_samples = [(int(a * rate), int(b * rate), p) for a, b, p in line]
            x = sampled_like(in_samples, kind, seconds, rate, seed=i)
            wavfile.write(root / kind / f"{i}.wav", rate, (x * 32767).astype(np.int16))
            if notes:
                (root / kind / f"{i}.csv").write_text(
                    "onset_s,offset_s,midi\n" + "".join(f"{a},{a + b},{p}\n" for a, b, p in line))


def random_lines(n, seed, notes=8, length=0.25):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [[(k * length, length - 0.02, int(p)) for k, p in enumerate(rng.integers(50, 72, notes))]
            for _ in range(n)]


def test_umtn_judge_hears_real_instrument_spectra():
    # The learned instrument judge, trained on renderings of some lines by the four kinds of
    # spectrum, names the instrument of other lines, clean and with a decoder's sampling noise; the
    # untranslated input of one instrument is never heard as another.
    um = import_script("umtn/train.py")
    rate, kinds = 4000, ("violin", "clarinet", "saxophone", "bassoon")
    render = lambda lines: {k: [sampled_like([(int(a * rate), int(b * rate), p) for a, b, p in line], k, 2.0,
                                             rate, seed=i) for i, line in enumerate(lines)] for k in kinds}
    judge = um.InstrumentJudge.fit(render(random_lines(6, 0)), rate)
    held_out = render(random_lines(6, 1))
    for width in (0, 4):
        heard = [judge.hears(um.mu_law_noise(x, width, 0) if width else x) == k
                 for k, clips in held_out.items() for x in clips]
        assert sum(heard) / len(heard) >= 0.95, (width, sum(heard), len(heard))
    # the judge travels in a checkpoint as tensors and comes back the same
    again = um.InstrumentJudge(kinds, rate)
    again.load_state_dict(judge.state_dict())
    assert all(again.hears(x) == judge.hears(x) for clips in held_out.values() for x in clips)


def test_umtn_reads_a_folder_of_domains():
    import numpy as np
    from scipy.io import wavfile
    data = TMP / "instruments"
    t = np.arange(3 * 8000) / 8000
    for name, partials in (("flute", (1,)), ("clarinet", (1, 3, 5))):
        (data / name).mkdir(parents=True, exist_ok=True)
        for i, f0 in enumerate((220, 262, 330)):
            tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in partials) * 0.3
            wavfile.write(data / name / f"{i}.wav", 16000 if i else 8000,
                          np.repeat(tone, 2 if i else 1).astype(np.float32))
    (data / "flute" / "broken.wav").write_bytes(b"RIFF")
    out, err = run("umtn/train.py", "--data", data, *UMTN_SMALL, "--steps", 20, "--out",
                   TMP / "folder_umtn.pt")
    assert ("broken.wav" in err
            and "data: clarinet 2 train / 1 test clips, flute 2 train / 1 test clips" in out), out[:1500]
    # no scores: pitch is judged against each clip's own f0, which the untranslated input keeps
    assert "not parallel" in out and result(out)["input_pitch_acc"] >= 95, out[-2500:]


def test_umtn_scores_held_out_recordings_by_their_notes():
    # Training clips and parallel held-out clips (the same lines in every instrument) with their
    # scores: pitch against the notes, the learned judge validated first, the spectral distance to
    # the true rendering; then sample.py on a held-out recording names what the judge hears.
    kinds = ("clarinet", "bassoon")
    write_instrument_folder(TMP / "rec_train", kinds, random_lines(4, 2))
    write_instrument_folder(TMP / "rec_test", kinds, random_lines(2, 3))
    ckpt = TMP / "rec_umtn.pt"
    out, _ = run("umtn/train.py", "--data", TMP / "rec_train", "--test-data", TMP / "rec_test", *UMTN_SMALL,
                 "--steps", 20, "--eval-seconds", 1.0, "--out", ckpt)
    r = result(out)
    assert "the clips are parallel" in out and "instrument judge" in out, out[-2500:]
    assert r["input_pitch_acc"] >= 95 and r["judge_clean"] >= 90, r  # the ruler and the judge read the truth
    assert r["input_timbre_acc"] == 0 and r["input_mel_dist"] > 0, r  # the input is the other instrument
    out, _ = run("umtn/sample.py", TMP / "rec_test" / "clarinet" / "0.wav", "--to", "bassoon", "--checkpoint",
                 ckpt, "--seconds", 1.0, "--out", TMP / "rec_to_bassoon.wav")
    assert "sounds like" in out and "-> bassoon" in out, out[-1500:]


def test_umtn_pitch_encoder_measures_pitch_and_loudness():
    # The instruments recipe's encoder on known cases: a line of every sampled kind puts its one-hot
    # peak on the written note inside the notes; the same line a fifth up moves it by 7 bins; silence
    # is unvoiced and quietest; the line at half the level reads 0.15 lower (log10 2 / 2).
    import numpy as np
    import torch
    um = import_script("umtn/train.py")
    rate = 4000
    enc = um.PitchEncoder(32, rate)
    notes = [(int(i * 0.25 * rate), int(0.25 * rate), int(p)) for i, p in enumerate([50, 57, 62, 66, 71, 76])]
    written = np.zeros(int(1.5 * rate) // 32)
    for start, length, pitch in notes:  # the frames well inside each note
        written[(start + int(0.05 * rate)) // 32:(start + length - int(0.05 * rate)) // 32] = pitch
    inside = written > 0
    for kind in ("violin", "clarinet", "saxophone", "bassoon"):
        x = sampled_like(notes, kind, 1.5, rate)
        fifth = sampled_like([(a, b, p + 7) for a, b, p in notes], kind, 1.5, rate)
        z, z5, zq = (enc(torch.from_numpy(np.float32(v))[None])[0].numpy() for v in (x, fifth, x / 2))
        assert z.shape == (63, len(written)), z.shape  # 60 notes, log f0, voiced, loudness
        peak = 36 + z[:60].argmax(0)
        assert np.mean(peak[inside] == written[inside]) >= 0.95 and z[61][inside].mean() >= 0.95, kind
        assert np.mean(36 + z5[:60].argmax(0)[inside] == written[inside] + 7) >= 0.95, kind
        assert abs(np.median(z[62][inside] - zq[62][inside]) - math.log10(2) / 2) < 0.01, kind
    silence = enc(torch.zeros(1, 2048))[0]
    assert silence[:62].abs().max() == 0 and silence[62].max() <= -1.99


def test_umtn_register_copies_play_higher_with_their_f0():
    # --register 12: every clip is also played 4, 8 and 12 semitones higher; a copy's stored f0 is
    # what it sounds at, and the clips as recorded are drawn about as often as all their copies.
    import numpy as np
    import torch
    um = import_script("umtn/train.py")
    rate = 4000
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(4 * rate) / rate)).astype(np.float32)
    pool = um.SegmentPool({"a": [tone], "b": [tone]}, 1024, torch.device("cpu"), rate, 32, register=12)
    assert len(pool.clip_len) == 8 and pool.clip_len[3] == 2 * rate, pool.clip_len  # 4 per domain
    audio, f0 = pool.batch(torch.arange(400) % 2, torch.Generator().manual_seed(0))
    semitones = np.rint(12 * np.log2(np.median(f0.numpy(), 1) / 220))
    assert set(semitones) == {0, 4, 8, 12} and 0.4 < np.mean(semitones == 0) < 0.6, np.unique(semitones)
    for k in (0, 4, 8, 12):
        x = audio[int(np.argmax(semitones == k))].numpy()
        heard = um.pitch_track(x, rate)
        assert abs(1200 * np.log2(np.median(heard[heard > 0]) / (220 * 2 ** (k / 12)))) < 10, k
    # the tone's loudness, log10 of its RMS (0.3 / sqrt 2) / 2, at every quantile (a frame of 32 samples
    # holds 1.76 periods, so its RMS wavers a little)
    assert torch.allclose(pool.loudness[0], torch.full((21,), math.log10(0.3 / 2 ** 0.5) / 2), atol=0.02)


def test_umtn_translation_moves_loudness_onto_the_targets():
    # match_loudness: a recording's voiced loudness, whatever its range, comes out with the target
    # decoder's 10th and 90th training percentiles, in the same order (here an even spread of levels
    # lands on the target's even spread); unvoiced frames and the pitch are untouched, and the
    # learned encoder's code passes as it is.
    import torch
    um = import_script("umtn/train.py")
    model = um.UMTN(["a", "b"], encoder="pitch")
    model.loudness[1] = torch.linspace(-0.6, -0.2, 21)
    z = torch.zeros(2, 63, 200)
    z[:, 61, 50:] = 1  # voiced from frame 50
    z[:, 62] = -2.0
    z[:, 62, 50:] = torch.linspace(-1.2, -0.1, 150)  # a wider range than the target knows
    out = model.match_loudness(z, 1)
    assert torch.equal(out[:, :62], z[:, :62]) and torch.equal(out[:, 62, :50], z[:, 62, :50])
    moved = out[0, 62, 50:]
    assert abs(moved.min() + 0.6) < 1e-4 and abs(moved.max() + 0.2) < 1e-4 and (moved.diff() >= 0).all()
    assert abs(moved.median() + 0.4) < 0.01
    learned = um.UMTN(["a", "b"])
    code = torch.randn(2, 16, 10)
    assert torch.equal(learned.match_loudness(code, 1), code)


def test_umtn_instruments_recipe_follows_the_pitch():
    # --recipe instruments: the decoders read the measured pitch, so after a short run on two
    # instruments a translation keeps most of the written pitch, which a decoder given the code of
    # silence (no pitch at all) does not; the settings line shows what the recipe set.
    kinds = ("clarinet", "bassoon")
    write_instrument_folder(TMP / "recipe_train", kinds, random_lines(6, 4), rate=4000)
    write_instrument_folder(TMP / "recipe_test", kinds, random_lines(2, 5), rate=4000)
    ckpt = TMP / "recipe_umtn.pt"
    out, _ = run("umtn/train.py", "--recipe", "instruments", "--data", TMP / "recipe_train", "--test-data",
                 TMP / "recipe_test", *UMTN_SMALL, "--steps", 1200, "--eval-seconds", 1.5, "--out", ckpt)
    r = result(out)
    assert "encoder=pitch" in out and "dc_lambda=0.0" in out and "clip_rms=0.2" in out, out[:1500]
    assert "register=12" in out and "and their copies" in out, out[:1500]  # the judge heard them too
    assert "the pitch-and-loudness encoder, no weights" in out, out[:2500]
    assert r["pitch_acc"] >= 40 and r["silence_pitch_acc"] < 10, r
    out, _ = run("umtn/sample.py", TMP / "recipe_test" / "clarinet" / "0.wav", "--to", "bassoon",
                 "--checkpoint", ckpt, "--out", TMP / "recipe_to_bassoon.wav")
    assert "sounds like" in out and "-> bassoon" in out, out[-1500:]


def test_umtn_notes_csv_bad_inputs():
    import shutil
    cases = {"columns": "onset_s,midi\n0.0,60\n",
             "order": "onset_s,offset_s,midi\n0.0,0.5,60\n0.5,0.4,62\n",
             "numbers": "onset_s,offset_s,midi\n0.0,0.5,C4\n",
             "short": "onset_s,offset_s,midi\n0.0,0.5\n"}
    expected = {"columns": r"0.csv row 1: the header lacks offset_s", "order": r"0.csv row 3: a note needs",
                "numbers": r"0.csv row 2: .*must be numbers", "short": r"0.csv row 2: 2 columns"}
    todo = []
    for name, text in cases.items():
        root = TMP / f"bad_csv_{name}"
        shutil.rmtree(root, ignore_errors=True)
        write_instrument_folder(root, ("clarinet", "bassoon"), random_lines(2, 4), notes=False)
        (root / "bassoon" / "0.csv").write_text(text)
        todo.append(("umtn/train.py", "--data", root, "--dry-run", "--out", TMP / "bad_csv.pt",
                     expected[name]))
    all_fail_with(*todo)
    # a note of no length, as automatic alignments of real recordings write, is read as no note
    um = import_script("umtn/train.py")
    (TMP / "zero_length.csv").write_text("onset_s,offset_s,midi\n0.0,0.5,60\n0.5,0.5,62\n0.5,1.0,64\n")
    assert um.read_notes(TMP / "zero_length.csv", 8000) == [(0, 4000, 60.0), (4000, 4000, 64.0)]


# ============================================================================= GPUs: CUDA and Apple MPS
# Skipped, and counted as skipped, on a machine without the device. `python test_all.py cuda` runs
# this group alone on a GPU machine; `python test_all.py mps` on an Apple laptop.


def train_and_sample_everything(device, amp, tag):
    """Each train.py for a few steps on `device` with --amp `amp`, then each sample.py from its
    checkpoint; returns {folder: train.py's stdout}."""
    d, outs = ["--device", device, "--amp", amp], {}
    ck = lambda name: TMP / f"{tag}_{name}.pt"
    outs["blitz"], _ = run("blitz/train.py", "--epochs", 4, "--train-size", 6000, *d, "--out", ck("blitz"))
    run("blitz/sample.py", "--checkpoint", ck("blitz"), "--device", device, "--out", TMP / f"{tag}_blitz.pt2")
    outs["classifier"], _ = run("classifier/train.py", "--train-size", 8000, "--test-size", 500, "--val-size",
                                200, "--epochs", 4,
                                "--width", 16, *d, "--out", ck("classifier"))
    run("classifier/sample.py", "--checkpoint", ck("classifier"), "--n", 1, "--color", "never", "--device",
        device)
    outs["seq2seq"], _ = run("seq2seq/train.py", "--dry-run", *d, "--out", ck("seq2seq"))
    run("seq2seq/sample.py", "--checkpoint", ck("seq2seq"), "--device", device, "--beam", 3, "il est grand")
    outs["tonenet"], _ = run("tonenet/train.py", "--dry-run", *d, "--out", ck("tonenet"))
    run("tonenet/sample.py", "--checkpoint", ck("tonenet"), "--device", device, "--out",
        TMP / f"{tag}_tonenet.mid")
    outs["umtn"], _ = run("umtn/train.py", *UMTN_SMALL, "--steps", 40, *d, "--out", ck("umtn"))
    run("umtn/sample.py", "--checkpoint", ck("umtn"), "--device", device, "--seconds", 0.5, "--to", "organ",
        "--out", TMP / f"{tag}_umtn.wav")
    for folder, out in outs.items():
        assert "result:" in out, folder
    return outs


def test_cuda_every_script_with_amp_auto_and_fp16():
    import torch
    require("cuda")
    auto = "bfloat16" if torch.cuda.get_device_capability() >= (8, 0) else "float16"
    for amp in ("auto", "fp16"):
        outs = train_and_sample_everything("cuda", amp, f"cuda_{amp}")
        for folder, out in outs.items():
            expected = "float16" if amp == "fp16" else auto
            assert re.search(rf"autocast[ =]{expected}( \+GradScaler)?", out), (folder, out[:1500])
            # fp16 always with the scaler, bf16 never
            assert ("+GradScaler" in out) == (expected == "float16"), folder
        assert (result(outs["classifier"])["test_acc"] > 30
                and result(outs["blitz"])["val_acc"] > 60), outs["classifier"][-500:]
        assert result(outs["umtn"])["bits_per_sample"] < result(outs["umtn"])["first_bits"] - 0.5


def test_cuda_compile_resume_beam_with_two_layers_and_torchrun_nccl():
    require("cuda")
    ckpt = TMP / "cuda_compiled.pt"
    common = ["--train-size", 2000, "--test-size", 500, "--val-size", 200, "--width", 16, "--device", "cuda",
              "--out", ckpt]
    out, _ = run("classifier/train.py", "--epochs", 1, "--compile", *common)
    assert "result:" in out
    out, _ = run("classifier/train.py", "--epochs", 2, "--resume", *common)
    assert "resumed" in out and "epoch 2/2" in out
    for attention in ("general", "bahdanau"):  # a strided hx used to crash cuDNN in beam search with 2 layers
        out, _ = run("seq2seq/train.py", "--pairs", 600, "--epochs", 1, "--hidden", 32, "--layers", 2,
                     "--beam", 3,
                     "--attention", attention, "--device", "cuda", "--out", TMP / "cuda_beam.pt")
        assert "beam 3" in out and "result:" in out
    for script, args in (("classifier/train.py",
                          ["--model", "resnet", "--train-size", 2000, "--test-size", 500, "--val-size", 200,
                                                  "--epochs", 2, "--width", 8]),
                         ("umtn/train.py", [*UMTN_SMALL, "--steps", 20, "--eval-seconds", 0])):
        p = subprocess.run([str(a) for a in [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=1",
                            script, *args, "--device", "cuda", "--out", TMP / "cuda_ddp.pt"]],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert result(p.stdout)["world"] == 1, script


def test_cuda_umtn_fast_generation_agrees_with_the_plain_decoder():
    # In float32 on a GPU the fast path's sums run in another order than the plain decoder's, so the
    # two cannot be compared sample for sample once a near tie goes the other way. Instead: every
    # sample the fast path drew is the one the plain (teacher-forced) decoder would draw there.
    import torch
    um = import_script("umtn/train.py")
    require("cuda")
    torch.manual_seed(0)
    model = um.UMTN(["a", "b", "c"], latent=8, pool=16, dec_channels=32, skip_channels=32, dec_blocks=2,
                    dec_layers=6).cuda().eval()
    K, B, n, temperature = 3, 2, 480, 0.9
    z = torch.randn(K, B, 8, n // 16, device="cuda")
    drawn = um.generate(list(model.decoders), z, n, temperature, seed=4)  # (K, B, n)
    # (n, K, B, 256)
    gumbel = torch.cat(list(um.gumbel_noise((K, B), n, 4, torch.float32, torch.device("cuda"))))
    agree = []
    with torch.inference_mode():
        for k, decoder in enumerate(model.decoders):
            prev = torch.cat([torch.full((B, 1), um.MU // 2 + 1, device="cuda"), drawn[k, :, :-1]], 1)
            score = decoder(prev, z[k]) / temperature + gumbel[:, k].transpose(0, 1)  # (B, n, 256)
            chosen = score.gather(2, drawn[k].unsqueeze(2)).squeeze(2)
            assert (chosen >= score.amax(2) - 1e-3).all(), k  # never more than a rounding error from the best
            agree.append((score.argmax(2) == drawn[k]).float().mean().item())
    assert min(agree) > 0.995, agree


def no_syncs(step, repeats=3):
    """Run step() twice to warm up, then `repeats` times with CUDA's sync debugging on: any
    operation that makes the CPU wait for the GPU is reported with the line that caused it."""
    import torch
    step(), step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(repeats):
                step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught
             if "synchroniz" in str(w.message)]
    assert not syncs, "host syncs in a training step:\n" + "\n".join(syncs[:12])


def test_cuda_training_steps_never_wait_for_the_gpu():
    import torch
    require("cuda")
    dev = torch.device("cuda")
    precisions = [(None, False), (torch.bfloat16, False), (torch.float16, True)]
    bl, ct, s2s, tn, um = (import_script(f"{f}/train.py")
                           for f in ("blitz", "classifier", "seq2seq", "tonenet", "umtn"))
    for dtype, needs_scaler in precisions:
        scaler = lambda: torch.amp.GradScaler("cuda", enabled=needs_scaler)
        # blitz: the lesson's own epoch and optimizer, the one-cycle schedule stepped every batch
        net = bl.Net().to(dev)
        opt, sc = bl.make_optimizer(net, 0.05, dev), scaler()
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=100)
        batches = [(torch.randn(64, 1, 16, 16, device=dev), torch.randint(0, 4, (64,), device=dev))] * 4
        no_syncs(lambda: bl.train_epoch(net, batches, opt, schedule, sc, dev, dtype))
        # classifier: augmentation on the device, airbench, fused SGD with the scaler
        net = ct.AirNet(16).to(dev).to(memory_format=torch.channels_last)
        net.init_whitening(torch.randn(256, 3, 32, 32, device=dev))
        opt, sc = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.85,
                                  nesterov=True, fused=True), scaler()
        images, labels = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8,
                                       device=dev), torch.randint(0, 10, (512,), device=dev)
        def classifier_step():
            idx = torch.randperm(512, device=dev)[:64]
            x = ct.augment(images[idx].float() / 255, 2, torch.rand(64, device=dev) < 0.5,
                           24).contiguous(memory_format=torch.channels_last)
            ct.train_step(net, opt, sc, x, labels[idx], 0.2, dtype)
        no_syncs(classifier_step)
        # seq2seq: lengths on the host, both the batched (Luong) and the step-by-step (Bahdanau) decoder, free
        # running too
        for attention, teacher_forcing in (("general", 1.0), ("bahdanau", 1.0), ("general", 0.0)):
            model = s2s.Seq2Seq(50, 60, hidden=32, layers=2, attention=attention).to(dev)
            model.decoder.fused = attention == "bahdanau"  # the fast step: the one a GPU user would pick
            opt, sc = torch.optim.Adam(model.parameters(), fused=True), scaler()
            src_len, tgt_len = torch.tensor([7, 3, 5, 6]), torch.tensor([4, 6, 2, 5])
            src, tgt = torch.randint(4, 50, (4, 7), device=dev), torch.randint(4, 60, (4, 6), device=dev)
            no_syncs(lambda: s2s.train_step(model, opt, sc, src, src_len, tgt, tgt_len, teacher_forcing, 1.0,
                                            dtype))
        # tonenet: windows routed to their style's decoder by a style tensor on the host
        model = tn.ToneNet(["a", "b"], hidden=32).to(dev)
        opt, sc = torch.optim.Adam(model.parameters(), fused=True), scaler()
        roll, target = (torch.rand(8, 64, 88, 2,
                                   device=dev) < 0.05).float(), torch.rand(8, 64, 88, device=dev)
        no_syncs(lambda: tn.train_step(model, opt, sc, roll, target, torch.tensor([0, 1] * 4), 10.0, dtype))
        # umtn: the batch cut from the device tensor, noise drawn there, pitch augmentation, both updates
        model = um.UMTN(["a", "b", "c"], enc_blocks=1, enc_layers=4, dec_layers=4).to(dev)
        classifier = um.DomainClassifier(16, 32, 3).to(dev)
        opts = torch.optim.Adam(model.parameters(),
                                fused=True), torch.optim.Adam(classifier.parameters(), fused=True)
        sc, pool, g = scaler(), torch.randn(20000, device=dev) * 0.3, torch.Generator().manual_seed(0)
        g_dev, offsets = torch.Generator(device=dev).manual_seed(0), torch.arange(1025, device=dev)
        domain = torch.arange(6) % 3
        def umtn_step():
            start = (torch.rand(6, generator=g) * 18000).long()
            clean = pool[start.to(dev, non_blocking=True)[:, None] + offsets]
            codes = um.mu_law_encode(clean)
            prev = um.mu_law_encode((clean[:, :-1] + 0.05 * torch.randn(6, 1024, generator=g_dev,
                                                                        device=dev)).clamp(-1, 1))
            um.train_step(model, classifier, *opts, sc, um.augment(clean[:, :-1], g), prev, codes[:, 1:],
                          domain, 0.2, dtype)
        no_syncs(umtn_step)


def test_mps_every_script_trains_and_samples():
    import torch
    require("mps")
    ct = import_script("classifier/train.py")
    net = ct.AirNet(8).to("mps")
    # MPS has no float64 and no eigh: computed on the CPU
    net.init_whitening(torch.randn(64, 3, 32, 32, device="mps"))
    assert net.whiten.weight.device.type == "mps"
    outs = train_and_sample_everything("mps", "auto", "mps")
    assert (result(outs["classifier"])["test_acc"] > 30
            and result(outs["umtn"])["bits_per_sample"] < result(outs["umtn"])["first_bits"])


# ============================================================================= runner


def main(words):
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    tests = [(n, f) for n, f in tests if not words or any(w in n for w in words)]
    passed = failed = skipped = 0
    start = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Skipped as e:
            skipped += 1
            print(f"SKIP {name} ({e})", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"total {time.time() - start:.0f}s")
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed or not (passed or skipped) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
