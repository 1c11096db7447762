"""The inert pickle reader and its typed interpreter: regression tests for every defect of
issue 13 (crafted files that crashed, leaked memory contents, exhausted memory or escaped as raw
exceptions). Files that once killed the process are loaded in a subprocess."""
import json
import os
import pickle
import struct
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from guide_fast.checkpoints import load_generator, read_torch_file
from guide_fast.checkpoints.pickle_reader import Call, Global, PersistentId, parse_pickle
from guide_fast.cli import main as cli_main
from guide_fast.eg3d.generator import build_generator
from guide_fast.errors import CheckpointError

sys.path.insert(0, os.path.dirname(__file__))
from official_pickle import official_pickle_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _cli(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return _run(f"import sys; from guide_fast.cli import main; sys.exit(main({list(args)!r}))", timeout)


# ------------------------------------------------------------------ the parser itself
def test_parser_makes_records_and_calls_nothing():
    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    rec, end = parse_pickle(pickle.dumps({"a": [1, 2.5, "x", b"raw"], "h": Hostile()}, protocol=4))
    assert isinstance(rec, dict) and rec["a"][:3] == [1, 2.5, "x"] and bytes(rec["a"][3]) == b"raw"
    call = rec["h"]
    assert isinstance(call, Call) and call.func == Global("posix", "system") and call.args == ("echo pwned",)
    for proto in range(6):
        assert parse_pickle(pickle.dumps(OrderedDict(x=(1, {2}, frozenset([3]))), protocol=proto))[0] is not None


def test_memo_index_bomb_costs_nothing():
    # CPython's unpickler sizes its memo array to the index: 16 bytes cost 2.7 GB there
    bomb = b"\x80\x04N" + b"r\xff\xff\xff\xff" + b"0" + b"N."
    assert parse_pickle(bomb)[0] is None
    with pytest.raises(CheckpointError, match="never stored"):
        parse_pickle(b"\x80\x04j\xff\xff\xff\x7f.")


@pytest.mark.parametrize("data, match", [
    (b"\x80\x04", "truncated"),
    (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"x.", "needs"),         # BINBYTES8 length far past the end
    (b"\x80\x04\x8b\xff\xff\xff\x7f.", "too large"),                        # LONG4 of 2 GB
    (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"N.", "frame"),
    (b"\x80\x04R.", "underflow"),
    (b"\x80\x04\x82\x01.", "extension"),
    (b"\x80\x06N.", "protocol"),
    (b"\x80\x04\xffN.", "unknown opcode"),
    (b"\x80\x04}]]s.", "key of type"),                                     # unhashable dict key
])
def test_malformed_streams_are_one_checkpoint_error(data, match):
    with pytest.raises(CheckpointError, match=match):
        parse_pickle(data, source="x.pkl")


# ------------------------------------------------------------------ the regression files
_SCALAR = (b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
           b"(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           b"C\x08AAAAAAAA\x86R")


def _dtype_segfault_pickle() -> bytes:
    """numpy.core.multiarray.scalar(dtype('O8') with BUILD flags=0, 8 attacker bytes): the
    pickle that made numpy read an attacker-chosen object pointer (signal 11)."""
    return b"\x80\x02}X\x05\x00\x00\x00G_ema" + _SCALAR + b"s."


def test_dtype_segfault_pickle_is_refused_everywhere(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"numpy scalar of dtype 'O8' \(only numeric dtypes"):
        _load_records(b"\x80\x02" + _SCALAR + b".")
    # numeric scalars are decoded from their raw bytes (numpy never sees the pickled flags)
    assert _load_records(pickle.dumps(np.float32(0.25), protocol=2)) == 0.25
    assert _load_records(pickle.dumps(np.int16(-3), protocol=4)) == -3
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_dtype_segfault_pickle())
    with pytest.raises(CheckpointError, match="numpy.core.multiarray.scalar, which is not on the allow-list"):
        load_generator(evil)
    # inside a real network record, as the gains of the official pickle are stored
    inner = tmp_path / "inner.pkl"
    inner.write_bytes(_inject(_SCALAR))
    with pytest.raises(CheckpointError, match=r"numpy scalar of dtype 'O8'"):
        load_generator(inner)
    # every CLI path that reads a generator: one line on stderr, exit code 2
    wdir = tmp_path / "weights"
    wdir.mkdir()
    (wdir / "ffhqrebalanced512-128.pkl").write_bytes(inner.read_bytes())
    for args in (["convert", str(inner), str(tmp_path / "o.safetensors")],
                 ["render", "--generator", str(inner), "--out", str(tmp_path / "r.png"), "--device", "cpu"],
                 ["unlearn", "--generator", str(inner), "--seed", "0", "--random-nets", "--out", str(tmp_path / "run"),
                  "--iters", "1", "--device", "cpu"]):
        assert cli_main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "numpy scalar of dtype 'O8'" in err[0], (args, err)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "run").exists()
    cli_main(["weights", "--dir", str(wdir)])
    assert "numpy scalar of dtype 'O8'" in capsys.readouterr().out
    # and in a fresh process (where the old reader died of signal 11)
    proc = _cli("convert", str(inner), str(tmp_path / "o.safetensors"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


_TINY_PICKLE = {}


def _inject(raw: bytes) -> bytes:
    """A valid official pickle of the tiny generator (protocol 2: no frames, whose lengths the
    injection would falsify) whose G_ema attribute `weight_gain` is the object that the raw
    pickle opcodes `raw` build (memo indices >= 2**24 are free for them)."""
    if "data" not in _TINY_PICKLE:
        _TINY_PICKLE["data"] = official_pickle_bytes(build_generator("tiny", seed=0),
                                                     g_attrs={"weight_gain": "MARKER_SCALAR_HERE"}, protocol=2)
    data, marker = _TINY_PICKLE["data"], b"MARKER_SCALAR_HERE"
    at = data.index(marker) - 5  # BINUNICODE <4-byte length> MARKER
    assert data[at:at + 5] == b"X" + struct.pack("<I", len(marker))
    return data[:at] + raw + data[at + 5 + len(marker):]


def _storage_pickle(n_storage: int, size, stride, offset: int = 0) -> bytes:
    class T:
        def __reduce__(self):
            st = torch.arange(n_storage, dtype=torch.float32).untyped_storage()
            typed = torch.storage.TypedStorage(wrap_storage=st, dtype=torch.float32, _internal=True)
            return (torch._utils._rebuild_tensor_v2, (typed, offset, tuple(size), tuple(stride), False, OrderedDict()))

    return pickle.dumps({"t": T()}, protocol=4)


def _load_records(data: bytes, budget: int = 1 << 30):
    from guide_fast.checkpoints.interpret import Interpreter
    from guide_fast.checkpoints.torch_archive import read_storage_bytes

    root, _ = parse_pickle(data, source="t.pkl")
    return Interpreter("t.pkl", budget, embedded_storage=read_storage_bytes).value(root)


def test_tensor_larger_than_its_storage_is_refused_not_filled_with_heap_memory():
    ok = _load_records(_storage_pickle(8, (2, 3), (3, 1), offset=2))["t"]
    assert torch.equal(ok, torch.arange(2, 8, dtype=torch.float32).reshape(2, 3))
    with pytest.raises(CheckpointError, match="reaches element 1,000 of a storage of 4 elements"):
        _load_records(_storage_pickle(4, (1000,), (1,)))
    with pytest.raises(CheckpointError, match="reaches element"):
        _load_records(_storage_pickle(4, (2,), (1,), offset=3))
    # stride-0 repetition: 4 bytes of storage cannot become gigabytes of tensor
    with pytest.raises(CheckpointError, match="would need more than"):
        _load_records(_storage_pickle(1, (1 << 28,), (0,)), budget=1 << 20)


def test_storage_size_lies_are_refused():
    data = _storage_pickle(4, (4,), (1,))
    # the legacy storage bytes start with their element count (8 bytes) after the key list
    start = data.index(b"\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    forged = data[:start] + b"\x00\x01" + data[start + 2:]
    with pytest.raises(CheckpointError, match="storage"):
        _load_records(forged)


def test_deep_nesting_and_cycles_are_errors_not_recursion_errors(tmp_path):
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."
    with pytest.raises(CheckpointError, match="nested more than"):
        _load_records(deep)
    p = tmp_path / "deep.pkl"
    p.write_bytes(_inject(b"]" * 5000 + b"a" * 4999))
    with pytest.raises(CheckpointError, match="nested more than"):
        load_generator(p)
    cyc = b"\x80\x02]q\x00h\x00a."  # a list that contains itself
    with pytest.raises(CheckpointError, match="cycle"):
        _load_records(cyc)


def test_non_tensor_parameters_and_config_defects_name_the_field(tmp_path):
    g = build_generator("tiny", seed=0)
    cases = [
        (dict(g_attrs={"_parameters": OrderedDict(x="not a tensor")}), r"field G_ema._parameters\['x'\] is a str"),
        (dict(init_kwargs={"img_resolution": 64.5}), r"G_ema._init_kwargs.img_resolution is 64.5; expected an "
                                                     r"integer power of two"),
        (dict(g_attrs={"neural_rendering_resolution": "100000"}), r"G_ema.neural_rendering_resolution is '100000'"),
        (dict(g_attrs={"neural_rendering_resolution": 1 << 20}), r"neural_rendering_resolution is 1048576"),
        (dict(init_kwargs={"z_dim": "64"}), r"G_ema._init_kwargs.z_dim is '64'"),
        (dict(init_kwargs={"channel_base": 0}), r"G_ema._init_kwargs.channel_base is 0"),
        (dict(init_kwargs={"c_dim": 0}), r"G_ema._init_kwargs.c_dim is 0"),
        (dict(init_kwargs={"mapping_kwargs": {"num_layers": -1}}), r"num_layers is -1"),
        (dict(rendering_kwargs={"depth_resolution": 10 ** 9}), r"rendering_kwargs.depth_resolution"),
        (dict(rendering_kwargs={"ray_start": "auto"}), r"'auto'"),
        (dict(rendering_kwargs={"ray_end": float("nan")}), r"rendering_kwargs.ray_end"),
        (dict(rendering_kwargs={"superresolution_module": "x.Evil"}), r"unsupported super-resolution module"),
        (dict(init_kwargs={"w_dim": 2048}), r"tensors do not match .*shape mismatch"),
    ]
    for i, (kw, match) in enumerate(cases):
        p = tmp_path / f"c{i}.pkl"
        p.write_bytes(official_pickle_bytes(g, **kw))
        with pytest.raises(CheckpointError, match=match):
            load_generator(p)


def test_complex_and_integer_weights_are_refused_not_cast(tmp_path):
    for dtype, match in ((torch.complex64, "ComplexFloatStorage is not accepted"),
                         (torch.int64, "integer dtype int64"),
                         (torch.float64, None)):
        g = build_generator("tiny", seed=0)
        fc = g.backbone.mapping.fc0
        fc.weight = torch.nn.Parameter(fc.weight.detach().to(dtype), requires_grad=False)
        p = tmp_path / f"{dtype}.pkl"
        p.write_bytes(official_pickle_bytes(g))
        if match is None:  # float64 holding exact float32 values loads unchanged
            assert torch.equal(load_generator(p).backbone.mapping.fc0.weight.double(), fc.weight)
            continue
        with pytest.raises(CheckpointError, match=match):
            load_generator(p)
    g = build_generator("tiny", seed=0)
    fc = g.backbone.mapping.fc0
    fc.weight = torch.nn.Parameter(fc.weight.detach().double() + 1e-12, requires_grad=False)
    (tmp_path / "f64.pkl").write_bytes(official_pickle_bytes(g))
    with pytest.raises(CheckpointError, match="float64 with values float32 cannot hold"):
        load_generator(tmp_path / "f64.pkl")


def test_complex_latents_are_refused(tmp_path):
    from guide_fast.checkpoints import load_latents

    torch.save({"w_source": torch.zeros(1, 14, 512, dtype=torch.complex64)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="ComplexFloatStorage"):
        load_latents(tmp_path / "w.pt")
    torch.save({"w_source": torch.zeros(1, 14, 512, dtype=torch.int64)}, tmp_path / "i.pt")
    with pytest.raises(CheckpointError, match="int64"):
        load_latents(tmp_path / "i.pt")


def test_torch_files_are_read_without_torch_load(tmp_path):
    state = OrderedDict(a=torch.randn(3, 4), b=torch.arange(5), c=torch.randn(2, 3).t(), n=torch.tensor(7))
    for zip_format in (True, False):
        p = tmp_path / f"s{zip_format}.pt"
        torch.save(state, p, _use_new_zipfile_serialization=zip_format)
        got = read_torch_file(p)
        assert list(got) == list(state)
        for k in state:
            assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k]), k
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="class torch.nn.modules.linear.Linear.*other than tensors"):
        read_torch_file(tmp_path / "module.pt")


_RSS = """
import resource, sys, gc
import torch, numpy
from guide_fast.checkpoints import load_generator
from guide_fast.errors import CheckpointError
import guide_fast.eg3d.generator
for path in sys.argv[1:]:
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_generator(path)
        print('loaded', flush=True)
    except CheckpointError as exc:
        print('refused:', str(exc)[:200].replace(chr(10), ' '), flush=True)
    gc.collect()
    print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, flush=True)
"""


def test_memory_bombs_stay_within_a_small_multiple_of_the_file(tmp_path):
    """A memo index (2.7 GB before), a changed w_dim (3.8 GB before), 200k class names (460 MB
    kept before): each is refused and the peak RSS grows by a small multiple of the file at most
    (peak RSS only grows, so the files are ordered from the smallest bound to the largest)."""
    memo = tmp_path / "memo.pkl"
    memo.write_bytes(b"\x80\x04}X\x05\x00\x00\x00G_emaNr\xff\xff\xff\xffs.")
    wdim = tmp_path / "wdim.pkl"
    wdim.write_bytes(official_pickle_bytes(build_generator("tiny", seed=0), init_kwargs={"w_dim": 2048}))
    names = b"".join(b"ctraining.m%d\nC%d\n)\x81" % (i, i) for i in range(200_000))
    many = tmp_path / "names.pkl"
    many.write_bytes(_inject(b"(" + names + b"l"))
    assert many.stat().st_size > 4_000_000
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    # the first file warms up the lazy imports; the 200k records are an ignored attribute there
    proc = subprocess.run([sys.executable, "-c", _RSS, str(wdim), str(memo), str(wdim), str(many)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()[2:]
    outcomes, grew = lines[0::2], [int(ln.split()[-1]) / 1024 for ln in lines[1::2]]
    assert outcomes[0].startswith("refused") and "tensors do not match" in outcomes[1], outcomes
    assert grew[0] < 50 and grew[1] < 200 and grew[2] < 16 * many.stat().st_size / 2 ** 20 + 100, (grew, outcomes)


def test_safetensors_header_lies_are_refused(tmp_path):
    from guide_fast.checkpoints import read_safetensors

    def write(header: dict, body: bytes, name: str):
        raw = json.dumps(header).encode()
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        return p

    ok = write({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, np.arange(2, dtype="<f4").tobytes(), "ok")
    assert torch.equal(read_safetensors(ok)[0]["a"], torch.arange(2.0))
    for name, header, body, match in [
        ("big", {"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8, "needs"),
        ("off", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 40]}}, b"\0" * 8, "outside"),
        ("c64", {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "not accepted"),
        ("ovl", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "overlaps"),
        ("neg", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            read_safetensors(write(header, body, name))
    p = tmp_path / "hlen"
    p.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_safetensors(p)
    p.write_bytes(struct.pack("<Q", 20000) + b"[" * 20000)
    with pytest.raises(CheckpointError, match="not JSON|not a JSON"):
        read_safetensors(p)


def test_persistent_ids_outside_archives_and_unknown_storages_are_refused():
    with pytest.raises(CheckpointError, match="persistent id outside"):
        _load_records(b"\x80\x02N\x51.")
    rec, _ = parse_pickle(b"\x80\x02N\x51.")
    assert isinstance(rec, PersistentId)


def test_overflowing_shapes_and_numbers_are_checkpoint_errors(tmp_path):
    """Found while hardening: sizes whose strides overflow int64 (with a zero dimension the
    storage check passes), JSON integers beyond Python's 4300-digit limit, numbers too big for a
    float, non-0/1 bool bytes."""
    from guide_fast.checkpoints import load_generator, read_safetensors, save_generator
    from guide_fast.eg3d.generator import PRESETS, TriPlaneGenerator

    with pytest.raises(CheckpointError, match="far larger"):
        _load_records(_storage_pickle(4, (0, 1 << 47, 1 << 47), (1, 1, 1)))
    raw = json.dumps({"a": {"dtype": "U8", "shape": [0] + [1 << 47] * 15, "data_offsets": [0, 0]}}).encode()
    (tmp_path / "z.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="far larger"):
        read_safetensors(tmp_path / "z.safetensors")
    path = save_generator(TriPlaneGenerator(PRESETS["tiny"]()), tmp_path / "g.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = load_file(str(path))
    for i, cfg_text in enumerate(['{"z_dim": ' + "9" * 5000 + "}", '{"rendering_kwargs": {"c_scale": 1' + "0" * 400 + "}}",
                                  "[" * 100000]):
        m = dict(meta, config=cfg_text)
        save_file(state, str(tmp_path / f"c{i}.safetensors"), metadata=m)
        with pytest.raises(CheckpointError, match="config"):
            load_generator(tmp_path / f"c{i}.safetensors")

    class B:
        def __reduce__(self):
            st = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).untyped_storage()
            typed = torch.storage.TypedStorage(wrap_storage=st, dtype=torch.bool, _internal=True)
            return (torch._utils._rebuild_tensor_v2, (typed, 0, (4,), (1,), False, OrderedDict()))

    got = _load_records(pickle.dumps({"t": B()}, protocol=4))["t"]
    assert got.tolist() == [False, True, True, True] and got.view(torch.uint8).tolist() == [0, 1, 1, 1]


def test_cli_paths_give_one_line_and_exit_2_for_crafted_files(tmp_path, capsys):
    import pickletools

    def body(obj) -> bytes:  # pickle opcodes of one object, without PROTO/STOP and memo writes
        return pickletools.optimize(pickle.dumps(obj, protocol=2))[2:-1]

    class Oversized:
        def __reduce__(self):
            st = torch.zeros(4).untyped_storage()
            typed = torch.storage.TypedStorage(wrap_storage=st, dtype=torch.float32, _internal=True)
            return (torch._utils._rebuild_tensor_v2, (typed, 0, (4096,), (1,), False, OrderedDict()))

    files = {"oversized": _inject(body(Oversized())), "deep": _inject(b"]" * 3000 + b"a" * 2999),
             "scalar": _inject(_SCALAR), "cycle": _inject(b"]r\x00\x00\x00\x7fj\x00\x00\x00\x7fa"),
             "truncated": _inject(_SCALAR)[:-5000]}
    wdir = tmp_path / "weights"
    wdir.mkdir()
    for name, data in files.items():
        p = tmp_path / f"{name}.pkl"
        p.write_bytes(data)
        for args in (["convert", str(p), str(tmp_path / "o.safetensors")],
                     ["render", "--generator", str(p), "--out", str(tmp_path / "r.png"), "--device", "cpu"]):
            assert cli_main(args) == 2, (name, args)
            err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert len(err) == 1 and err[0].startswith(f"guide-fast {args[0]}: error: "), (name, err)
        (wdir / "ffhqrebalanced512-128.pkl").write_bytes(data)
        cli_main(["weights", "--dir", str(wdir)])
        out = capsys.readouterr()
        assert "Traceback" not in out.err and "invalid" in out.out, (name, out)
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "r.png").exists()


# ------------------------------------------------------------------ second review's crafted files
def _u(s: str) -> bytes:  # BINUNICODE, lone surrogates and control characters included
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def test_a_key_of_shared_tuples_is_refused_at_once_not_hashed_for_ever():
    """Tuples shared through the memo make a 450-byte key whose tree has 10**7 leaves: hashing it
    took 3.7 s (and W**7 in general); the reader counts the leaves first."""
    width, levels = 10, 7
    tuples = b"\x80\x02(" + b"K\x01" * width + b"tr\x00\x00\x00\x000"
    for i in range(1, levels):
        tuples += b"(" + (b"j" + struct.pack("<I", i - 1)) * width + b"tr" + struct.pack("<I", i) + b"0"
    top = b"j" + struct.pack("<I", levels - 1)
    with pytest.raises(CheckpointError, match="dictionary key of type tuple is not allowed"):
        parse_pickle(tuples + b"}" + top + b"Ns.", source="bomb.pkl")
    # a frozenset or set item of such tuples too; small tuple keys still work
    with pytest.raises(CheckpointError, match="unhashable frozenset item"):
        parse_pickle(tuples + b"(" + top + b"\x91.", source="bomb.pkl")
    with pytest.raises(CheckpointError, match="ADDITEMS needs a set and hashable items"):
        parse_pickle(tuples + b"\x8f(" + top + b"\x90.", source="bomb.pkl")
    root, _ = parse_pickle(pickle.dumps({(1, ("a", 2.5, None)): 2}, protocol=2))
    assert root == {(1, ("a", 2.5, None)): 2}


def test_nested_numpy_scalars_are_an_error_not_a_recursion_error(tmp_path):
    def scalar(inner: bytes) -> bytes:
        return b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n" + _u("f4") + b"\x85R" + inner + b"\x86R"

    x = b"C\x04AAAA"
    for _ in range(400):
        x = scalar(x)
    p = tmp_path / "scalars.pkl"
    p.write_bytes(_inject(x))
    with pytest.raises(CheckpointError, match="nested more than"):
        load_generator(p)
    assert _load_records(b"\x80\x02" + scalar(b"C\x04\x00\x00\x80?") + b".") == 1.0  # one scalar is fine


def test_names_from_the_file_cannot_forge_lines_of_output(tmp_path, capsys):
    p = tmp_path / "nl.pkl"
    p.write_bytes(b"\x80\x02}" + _u("G_ema") + _u("training.x\nguide-fast convert: wrote ok\x1b[2K")
                  + _u("TriPlaneGenerator") + b"\x93)\x81s.")
    with pytest.raises(CheckpointError) as err:
        load_generator(p)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    assert "training.x\\nguide-fast convert: wrote ok\\x1b[2K" in str(err.value)  # shown, escaped
    assert cli_main(["convert", str(p), str(tmp_path / "o.safetensors")]) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "\x1b" not in err_text and not (tmp_path / "o.safetensors").exists()


def _zip_of(members: list) -> bytes:
    import io
    import warnings
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate names these tests write on purpose
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name), data)
    return out.getvalue()


def _torch_members(obj) -> list:
    import io
    import zipfile

    buf = io.BytesIO()
    torch.save(obj, buf)
    z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    return [(n, z.read(n)) for n in z.namelist()]


def test_zip_members_must_be_unique_unencrypted_and_where_the_directory_says(tmp_path):
    from guide_fast.checkpoints import load_latents

    zeros = _torch_members({"w_source": torch.zeros(1, 14, 8)})
    ones = dict(_torch_members({"w_source": torch.ones(1, 14, 8)}))
    ok = tmp_path / "ok.pt"
    ok.write_bytes(_zip_of(zeros))
    assert torch.equal(load_latents(ok), torch.zeros(1, 14, 8))
    # the same storage name twice: torch.load and a naive reader would take different copies
    dup = tmp_path / "dup.pt"
    dup.write_bytes(_zip_of(zeros + [("archive/data/0", ones["archive/data/0"])]))
    with pytest.raises(CheckpointError, match="'archive/data/0' occurs twice"):
        load_latents(dup)
    # a central-directory offset that points at another member's local header
    data = bytearray(_zip_of(zeros))
    import io
    import zipfile

    infos = {i.filename: i for i in zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()}
    entry = data.index(b"archive/data/0", data.index(b"PK\x01\x02")) - 46  # its central directory record
    assert data[entry:entry + 4] == b"PK\x01\x02"
    data[entry + 42:entry + 46] = struct.pack("<I", infos["archive/data.pkl"].header_offset)
    moved = tmp_path / "moved.pt"
    moved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="local header does not match the central directory"):
        load_latents(moved)
    # the encryption flag: the stored bytes would be ciphertext
    enc = bytearray(_zip_of(zeros))
    entry = enc.index(b"archive/data/0", enc.index(b"PK\x01\x02")) - 46
    enc[entry + 8] |= 0x1
    encrypted = tmp_path / "enc.pt"
    encrypted.write_bytes(bytes(enc))
    with pytest.raises(CheckpointError, match="encrypted"):
        load_latents(encrypted)


def test_safetensors_metadata_must_be_a_map_and_names_unique_unicode(tmp_path):
    from guide_fast.checkpoints import read_safetensors

    body = struct.pack("<4f", 1, 2, 3, 4)

    def write(header_json: str, name: str):
        h = header_json.encode()
        p = tmp_path / name
        p.write_bytes(struct.pack("<Q", len(h)) + h + body)
        return p

    entry = '{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    tensors, meta = read_safetensors(write('{"w": %s, "__metadata__": {"a": "b"}}' % entry, "ok.safetensors"))
    assert meta == {"a": "b"} and tensors["w"].tolist() == [1, 2, 3, 4]
    for meta_json in ("[]", "0", '""', "false"):
        with pytest.raises(CheckpointError, match="__metadata__ is not a map"):
            read_safetensors(write('{"w": %s, "__metadata__": %s}' % (entry, meta_json), "m.safetensors"))
    with pytest.raises(CheckpointError, match="occurs twice"):
        read_safetensors(write('{"w": %s, "w": %s}' % (entry, entry), "dup.safetensors"))
    with pytest.raises(CheckpointError, match="not valid Unicode"):
        read_safetensors(write('{"w\\ud800": %s}' % entry, "sur.safetensors"))
