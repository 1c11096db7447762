"""Mutation fuzzer over the file readers (issue 13): truncations, byte flips, opcode swaps and
oversized length fields applied to valid small files — an official-format network pickle, torch
zip and legacy files, a safetensors state dict and a guide-fast generator file. Every case must
end in success or a GuideFastError subclass: any other exception fails, and so does a crash,
because the cases run in child processes (many per child, each announced before it runs so a
signal names the case). Children run under an address-space limit, so an unbounded
allocation is a MemoryError, i.e. a failure. GUIDE_FAST_FUZZ_SEED picks other cases."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("GUIDE_FAST_FUZZ_SEED", "0"))

CHILD = r'''
import io, json, os, pickle, pickletools, random, resource, struct, sys, traceback
from collections import OrderedDict
sys.path.insert(0, os.path.join(ROOT, "tests"))
import numpy as np
import torch
from guide_fast.checkpoints import load_generator, load_latents, read_safetensors, read_torch_file, save_generator
from guide_fast.checkpoints.eg3d_pickle import config_from_official, read_official_pickle
from guide_fast.errors import GuideFastError
from guide_fast.eg3d.generator import TriPlaneGenerator, PRESETS

target, n_cases, seed, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rng = random.Random(f"{target}-{seed}")
torch.manual_seed(0)


def small_network_pickle():
    from official_pickle import Persistent, fake_modules
    with fake_modules() as mods:
        easy = mods["dnnlib.util"].EasyDict
        dec = mods["training.triplane"].OSGDecoder()
        dec.__dict__.update({"_parameters": OrderedDict(w=torch.nn.Parameter(torch.randn(3, 4), requires_grad=False)),
                             "_buffers": OrderedDict(f=torch.randn(4)[1:3]), "_modules": OrderedDict(),
                             "_non_persistent_buffers_set": set()})
        child = Persistent("training.networks_stylegan2", "FullyConnectedLayer",
                           {"_parameters": OrderedDict(weight=torch.nn.Parameter(torch.randn(2, 5), requires_grad=False),
                                                       bias=None),
                            "_buffers": OrderedDict(), "_modules": OrderedDict(), "weight_gain": np.float32(0.5),
                            "bias_gain": np.float64(1.0)})
        g = Persistent("training.triplane", "TriPlaneGenerator",
                       {"_parameters": OrderedDict(), "_buffers": OrderedDict(s=torch.ones(25)),
                        "_modules": OrderedDict(decoder=dec, fc=child),
                        "_init_kwargs": easy(z_dim=8, w_dim=8, mapping_kwargs=easy(num_layers=2), img_resolution=64),
                        "rendering_kwargs": easy(PRESETS["tiny"]().rendering_kwargs),
                        "neural_rendering_resolution": 32})
        return pickle.dumps({"G": g, "G_ema": g, "augment_pipe": None}, protocol=4)


def load_network(path):
    obj, state = read_official_pickle(path)
    try:  # this small network is no full generator: its config is refused, but only ever that way
        config_from_official(obj, state, str(path))
    except GuideFastError:
        pass


state = OrderedDict(a=torch.randn(3, 4), b=torch.arange(6).reshape(2, 3), c=torch.randn(4, 2).t(),
                    w_source=torch.randn(1, 5, 8))
if target == "pickle":
    valid, load = small_network_pickle(), load_network
elif target in ("torch-zip", "torch-legacy"):
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": [1, "x", (2.5,)]}, buf, _use_new_zipfile_serialization=target == "torch-zip")
    valid, load = buf.getvalue(), read_torch_file
elif target == "safetensors":
    from safetensors.torch import save
    valid = save({k: v.contiguous() for k, v in state.items()}, metadata={"format": "x"})
    load = lambda p: load_latents(p, key=None)
elif target == "generator":
    p = os.path.join(tmp, "g.safetensors")
    save_generator(TriPlaneGenerator(PRESETS["tiny"]()).eval(), p)
    valid, load = open(p, "rb").read(), load_generator
else:
    raise SystemExit(f"unknown target {target}")

suffix = {"pickle": ".pkl", "safetensors": ".safetensors", "generator": ".safetensors"}.get(target, ".pt")
path = os.path.join(tmp, "case" + suffix)
open(path, "wb").write(valid)
load(path)  # the valid file loads

ops = []  # (position, opcode byte, argument length) of the pickle opcodes
if target in ("pickle", "torch-legacy"):
    try:
        for op, arg, pos in pickletools.genops(valid):
            ops.append((pos, op.code.encode("latin1")[0], op.name))
    except Exception:
        pass
elif target == "torch-zip":
    import zipfile
    z = zipfile.ZipFile(io.BytesIO(valid))
    name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    start = valid.index(z.read(name))
    for op, arg, pos in pickletools.genops(z.read(name)):
        ops.append((start + pos, op.code.encode("latin1")[0], op.name))
OPCODES = b"(.012FIJKLMNPQRSTUVXabcdeghijlopqrstu}])G\x80\x81\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95B"
LEN_OPS = {"BINUNICODE": 4, "BINBYTES": 4, "BINSTRING": 4, "LONG4": 4, "LONG_BINPUT": 4, "LONG_BINGET": 4,
           "BINUNICODE8": 8, "BINBYTES8": 8, "FRAME": 8, "SHORT_BINBYTES": 1, "SHORT_BINUNICODE": 1, "BININT": 4,
           "BINPUT": 1, "BINGET": 1, "BININT1": 1, "BININT2": 2, "LONG1": 1}


def mutate(data: bytes) -> bytes:
    kind = rng.choice(["truncate", "flip", "flip", "opcode", "opcode", "length", "length", "splice"])
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:rng.randrange(len(b))])
    if kind == "flip" or (kind in ("opcode", "length") and not ops and target not in ("safetensors", "generator")):
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(len(b)) if rng.random() < 0.5 else rng.randrange(min(len(b), 4096))
            b[i] = rng.randrange(256)
        return bytes(b)
    if kind == "splice":
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        k = rng.randrange(len(b))
        return bytes(b[:k] + b[i:j] + b[k:])
    if target in ("safetensors", "generator"):
        hlen = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + hlen])
        if kind == "length":
            choice = rng.random()
            if choice < 0.3:
                return struct.pack("<Q", rng.choice([hlen + 1, hlen * 4, 1 << 40, (1 << 64) - 1])) + data[8:]
            name = rng.choice([k for k in header if k != "__metadata__"])
            if choice < 0.65:
                header[name]["shape"] = [rng.choice([1 << 31, 1 << 20, 0, 7])] + header[name]["shape"][1:]
            else:
                header[name]["data_offsets"] = [0, rng.choice([1 << 40, len(data), 3])]
        else:
            name = rng.choice([k for k in header if k != "__metadata__"])
            header[name]["dtype"] = rng.choice(["C64", "F64", "I64", "BOOL", "U8", "F8_E4M3", "X"])
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + hlen:]
    pos, code, name = rng.choice(ops)
    if kind == "opcode":
        b[pos] = rng.choice(OPCODES)
        return bytes(b)
    cands = [(p, c, n) for p, c, n in ops if n in LEN_OPS]
    pos, code, name = rng.choice(cands or ops)
    width = LEN_OPS.get(name, 1)
    big = rng.choice([(1 << (8 * width)) - 1, (1 << (8 * width - 1)) - 1, 1 << (8 * width - 2)])
    b[pos + 1:pos + 1 + width] = big.to_bytes(width, "little")
    return bytes(b)


soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))
bad = []
kinds = {"ok": 0, "refused": 0}
for case in range(n_cases):
    data = mutate(valid)
    with open(path, "wb") as f:
        f.write(data)
    print(f"CASE {case}", flush=True)
    try:
        load(path)
        kinds["ok"] += 1
    except GuideFastError as exc:
        kinds["refused"] += 1
        if "\n" in str(exc):
            bad.append((case, "multi-line message", str(exc)[:300]))
    except BaseException as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        name = os.path.join(tmp, f"escape-{case}{suffix}")
        open(name, "wb").write(data)
        bad.append((case, type(exc).__name__, str(exc)[:300] + " | " + traceback.format_exc(limit=-3)[-600:], name))
print("RESULT " + json.dumps({"bad": bad, "kinds": kinds}), flush=True)
'''

TARGETS = [("pickle", 160), ("torch-zip", 70), ("torch-legacy", 70), ("safetensors", 70), ("generator", 30)]


def _run_child(target: str, n: int, tmp_path) -> dict:
    tmp = tmp_path / target
    tmp.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    code = f"ROOT = {ROOT!r}\n" + CHILD
    proc = subprocess.run([sys.executable, "-c", code, target, str(n), str(SEED), str(tmp)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    cases = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE ")]
    last = cases[-1] if cases else "before the first case"
    result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and result, (
        f"{target}: child died (exit {proc.returncode}) at {last} (seed {SEED}); the input is {tmp}/case*\n"
        f"{proc.stderr[-3000:]}")
    return json.loads(result[0][len("RESULT "):])


def test_mutated_files_raise_only_guide_fast_errors(tmp_path):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip([t for t, _ in TARGETS],
                           pool.map(lambda tn: _run_child(tn[0], tn[1], tmp_path), TARGETS)))
    escapes = {t: r["bad"] for t, r in results.items() if r["bad"]}
    assert not escapes, json.dumps(escapes, indent=1)[:6000]
    for target, r in results.items():  # the mutations must reach past the first check now and then
        assert r["kinds"]["refused"] > 0, (target, r)


@pytest.mark.parametrize("target", ["pickle"])
def test_fuzzer_notices_an_escape(tmp_path, target, monkeypatch):
    """The harness itself: a reader that lets a raw exception out is reported as a failure."""
    env_code = CHILD.replace("except GuideFastError as exc:", "except (KeyError,) as exc:")
    monkeypatch.setattr(sys.modules[__name__], "CHILD", env_code)
    with pytest.raises(AssertionError):
        r = _run_child(target, 20, tmp_path)
        assert not r["bad"]
