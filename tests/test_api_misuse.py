"""Misuse of the library's entry points, its launcher and its environment variables: each is one
InputError (CheckpointError for files) or one line from the launcher, naming the argument, field
or variable; never a raw TypeError / ValueError / AttributeError from deep inside a run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from guide_fast.errors import InputError
from guide_fast.unlearn.config import UnlearnConfig

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ 1. UnlearnConfig.validate
@pytest.mark.parametrize("kw, match", [
    ({"lr": "1e-4"}, "lr must be a finite number"), ({"lr": None}, "lr must be"), ({"lr": True}, "lr must be"),
    ({"global_samples": "2"}, "global_samples must be an integer"),
    ({"identities_per_pass": "4"}, "identities_per_pass must be an integer"),
    ({"lookat": "abc"}, "lookat must be 3 numbers"), ({"lookat": None}, "lookat must be 3 numbers"),
    ({"lookat": (0, 0, "x")}, r"lookat\[2\]"),
    ({"betas": (1.5, 0.999)}, "betas must be 2 numbers in"), ({"betas": (0.9,)}, "betas"), ({"betas": 0.9}, "betas"),
    ({"eps": -1.0}, "eps must be > 0"), ({"eps": "1e-8"}, "eps"),
    ({"adjacency_samples": 1.5}, "adjacency_samples must be an integer"),
    ({"eval_views": 1.5}, "eval_views must be an integer"),
    ({"seed": 2 ** 70}, r"seed must be None or an integer with 0 <= seed < 2\*\*63"), ({"seed": -1}, "seed"),
    ({"seed": "7"}, "seed"), ({"seed": True}, "seed"),
    ({"warmup_steps": -5}, "warmup_steps"), ({"log_every": 2.5}, "log_every must be an integer"),
    ({"extra": [1]}, "extra must be a dict"), ({"use_local": "no"}, "use_local must be True or False"),
    ({"use_global": 1}, "use_global"), ({"local_id_weight": None}, "local_id_weight"),
    ({"adjacency_weight": -1.0}, "adjacency_weight must be >= 0"), ({"truncation_psi": "1"}, "truncation_psi"),
    ({"target_distance": None}, "target_distance"), ({"adjacency_alpha_max": "15"}, "adjacency_alpha_max"),
])
def test_config_fields_are_type_and_range_checked(kw, match):
    with pytest.raises(InputError, match=match):
        UnlearnConfig(**kw)


def test_config_still_takes_what_it_took():
    c = UnlearnConfig(lr=np.float32(1e-4), seed=np.int64(3), iterations=np.int64(5), betas=[0.9, 0.99],
                      lookat=torch.zeros(3), warmup_steps=0, identities_per_pass=0)
    assert c.betas == (0.9, 0.99) and c.lookat == (0.0, 0.0, 0.0)
    assert UnlearnConfig(seed=None).seed is None and UnlearnConfig(seed=2 ** 63 - 1).seed == 2 ** 63 - 1
    assert UnlearnConfig.from_dict(UnlearnConfig().to_dict()) == UnlearnConfig()
    assert UnlearnConfig.baseline().use_adjacency is False


# ------------------------------------------------------------------ 2. Unlearner arguments
@pytest.fixture(scope="module")
def gen():
    from guide_fast.eg3d.generator import build_generator

    return build_generator("tiny", seed=0)


def test_unlearner_checks_its_arguments(gen):
    from guide_fast.unlearn.engine import Unlearner

    net = nn.Identity()  # only the type is checked at construction
    with pytest.raises(InputError, match="id_loss must be a torch.nn.Module .* got NoneType"):
        Unlearner(gen, None, net, UnlearnConfig())
    with pytest.raises(InputError, match="lpips must be a torch.nn.Module .* got str"):
        Unlearner(gen, net, "vgg", UnlearnConfig())
    with pytest.raises(InputError, match="config must be an UnlearnConfig .* got dict"):
        Unlearner(gen, net, net, {"iterations": 1})
    with pytest.raises(InputError, match="config must be an UnlearnConfig"):
        Unlearner(gen, net, net, {})  # not silently the default config
    assert Unlearner(gen, net, net).config == UnlearnConfig()


# ------------------------------------------------------------------ 3. ExecutionPlan.resolve
def test_plan_refuses_an_unparsable_device():
    from guide_fast.plan import ExecutionPlan

    for bad in ("bogus", 1.5):
        with pytest.raises(InputError, match="device must be a torch device"):
            ExecutionPlan.resolve(bad)
    # kept on purpose: a CUDA plan resolves on any machine (inspection; tests/test_unlearn.py)
    assert ExecutionPlan.resolve("cuda").device.type == "cuda"


# ------------------------------------------------------------------ 4. load_generator
def test_load_generator_refuses_a_non_path():
    from guide_fast.checkpoints.format import load_generator, read_generator_metadata

    for bad in (None, 3, b"x.pt"):
        with pytest.raises(InputError, match="path must be a file path"):
            load_generator(bad)
    with pytest.raises(InputError, match="path must be a file path"):
        read_generator_metadata(None)


# ------------------------------------------------------------------ 5. renderer variables
@pytest.mark.parametrize("var, value", [
    ("GUIDE_FAST_RENDER_BLOCK", "abc"), ("GUIDE_FAST_RENDER_BLOCK", "17"), ("GUIDE_FAST_RENDER_BLOCK", "8"),
    ("GUIDE_FAST_RENDER_WARPS", "abc"), ("GUIDE_FAST_RENDER_WARPS", "3"), ("GUIDE_FAST_RENDER_STAGES", "0"),
    ("GUIDE_FAST_RENDER_STAGES", "1.5"), ("GUIDE_FAST_RENDER_MAXNREG", "x"),
])
def test_render_variables_are_parsed_by_name(monkeypatch, var, value):
    from guide_fast.kernels import triplane_render as k

    monkeypatch.setenv(var, value)
    with pytest.raises(InputError, match=f"environment variable {var} must be .* got '{value}'"):
        k._launch_config(64)


def test_render_variables_good_values(monkeypatch):
    from guide_fast.kernels import triplane_render as k

    monkeypatch.setenv("GUIDE_FAST_RENDER_BLOCK", "32")
    monkeypatch.setenv("GUIDE_FAST_RENDER_WARPS", "2")
    monkeypatch.setenv("GUIDE_FAST_RENDER_MAXNREG", "")  # a sweep's "unset"
    cfg = k._launch_config(64)
    assert cfg["BLOCK_R"] == 32 and cfg["num_warps"] == 2 and cfg["num_stages"] == 1
    monkeypatch.setenv("GUIDE_FAST_RENDER_AUTOTUNE", "off")
    with pytest.raises(InputError, match="GUIDE_FAST_RENDER_AUTOTUNE must be 0 or 1"):
        k.autotune_enabled()


# ------------------------------------------------------------------ 6. compile backend variable
def test_compile_backend_variable_is_read_only_when_compiling(gen, monkeypatch):
    from guide_fast import compiled
    from guide_fast.plan import ExecutionPlan

    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", None)
    monkeypatch.setenv("GUIDE_FAST_COMPILE_BACKEND", "bogus")
    off = ExecutionPlan.resolve("cpu", compile="off")
    report = compiled.compile_step(gen, gen, nn.Identity(), nn.Identity(), off)
    assert report.modules == []
    with pytest.raises(InputError, match="environment variable GUIDE_FAST_COMPILE_BACKEND must be one of"):
        compiled.compile_step(gen, gen, nn.Identity(), nn.Identity(), ExecutionPlan.resolve("cpu", compile="on"))
    with pytest.raises(InputError, match="GUIDE_FAST_COMPILE_BACKEND"):
        compiled.compile_generators([gen])


# ------------------------------------------------------------------ 7. the torchrun launcher
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PET_NPROC_PER_NODE", "PET_NNODES"):
        env.pop(var, None)
    return env


@pytest.mark.parametrize("args, match", [
    (["--nproc_per_node", "0"], "--nproc-per-node must be an integer >= 1"),
    (["--nproc-per-node", "abc"], "--nproc-per-node must be"),
    (["--nnodes", "2:1"], "--nnodes must be"),
])
def test_launcher_refuses_bad_arguments_in_one_line(tmp_path, args, match):
    script = tmp_path / "rank.py"
    script.write_text("raise SystemExit(0)\n")
    proc = subprocess.run([sys.executable, "-m", "guide_fast.launch", *args, str(script)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("torchrun: ") and match in lines[0]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
def test_launcher_interrupted_exits_130_in_one_line(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text("import sys, time\nprint('ready', flush=True)\ntry:\n    time.sleep(120)\n"
                      "except KeyboardInterrupt:\n    print('rank interrupted', file=sys.stderr)\n    sys.exit(130)\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a session of its own: the SIGINT goes to the launcher and its ranks, as a terminal's Ctrl-C does
    proc = subprocess.Popen([sys.executable, "-m", "guide_fast.launch", "--nproc-per-node", "2", "--master-addr",
                             "127.0.0.1", "--master-port", str(port), str(script)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        ready = 0
        deadline = time.monotonic() + 90
        while ready < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            ready += line.strip() == "ready"
        assert ready == 2, proc.stderr.read() if proc.poll() is not None else "ranks did not start"
        time.sleep(1.0)  # the ranks are inside their sleep
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    # one launcher line: the agent's signal handler's, or (Ctrl-C in the instant before the agent
    # installed it) the plain interruption's; which one depends on timing on a loaded machine
    assert [line for line in err.splitlines() if line.startswith("torchrun: ")] in (
        ["torchrun: stopped by SIGINT; the ranks were shut down"], ["torchrun: interrupted"])


# ------------------------------------------------------------------ 8. torchrun's environment
@pytest.mark.parametrize("env, match", [
    ({"RANK": "0", "WORLD_SIZE": "-1"}, "WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 WORLD_SIZE=2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
])
def test_torchrun_environment_is_range_checked(monkeypatch, env, match):
    import torch.distributed as dist

    from guide_fast.unlearn.distributed import init_from_env

    base = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    for var, value in {**base, **env}.items():
        monkeypatch.setenv(var, value)
    try:
        with pytest.raises(InputError, match=match):
            init_from_env(torch.device("cpu"), timeout_s=5)
    finally:
        if dist.is_initialized():  # only without the check: never leave a group behind
            dist.destroy_process_group()
