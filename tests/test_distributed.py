"""Identities sharded over processes with torch.distributed (gloo on the CPU, loopback only).

* a 2-process run inside a process group the test makes itself (a service's own launcher)
  gives the one-process generator of the same run seed: the draws are keyed by identity;
* a rank whose step fails ends every rank with one line and no output folder (torchrun);
* the CLI under torchrun writes the single-process folder layout, with world_size in report.json.

Every process has a bounded life: the process group's timeout, a join/subprocess timeout and
pytest's timeout."""
import datetime
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from guide_fast.errors import InputError
from guide_fast.unlearn.distributed import gradient_bytes, shard
from guide_fast.unlearn.report import OUTPUT_FILES

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SEEDS = [11, 12, 13]  # N = 3 on K = 2: ranks hold 2 and 1 identities
STEPS = 2
LR = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_run():
    """The run both sides make: tiny preset, small identity net, random backbone noise."""
    from small_nets import SmallFaceNet

    from guide_fast.eg3d.generator import build_generator
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen = build_generator("tiny", seed=0)
    with torch.no_grad():  # noise strengths are zero at init: make the per-identity noise matter
        for name, p in gen.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.1)
    cfg = UnlearnConfig(iterations=STEPS, lr=LR, seed=7, eval_views=1, noise_mode="random", identities_per_pass=0)
    first_grads = {}

    def keep_first_gradients(step, session):
        if step == 1:  # the summed gradients of step 1 (all-reduced when sharded)
            first_grads.update({k: p.grad.clone() for k, p in session.g_u.trainable_synthesis_parameters()})

    result = Unlearner(gen, IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval(), cfg).unlearn(
        seeds=SEEDS, render=False, callback=keep_first_gradients)
    return {"weights": {k: p.detach().clone() for k, p in result.generator.trainable_synthesis_parameters()},
            "grads": first_grads,
            "source": {k: p.detach().clone() for k, p in gen.trainable_synthesis_parameters()},
            "losses": result.losses, "identity_losses": result.identity_losses, "timings": result.timings}


def _service_worker(rank: int, world: int, port: int, out: str) -> None:
    """A spawned rank: its own init_process_group, then the Unlearner picks the group up."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = _engine_run()
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, args: tuple, timeout_s: float = 150.0) -> None:
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} spawned ranks did not finish within {timeout_s} s")


def test_shard_balances_identities_and_refuses_idle_ranks():
    for n, k in [(3, 2), (5, 3), (8, 8), (16, 3), (1, 1)]:
        parts = [shard(n, k, r) for r in range(k)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(InputError, match="2 identities for 4 ranks"):
        shard(2, 4, 0)
    # FFHQ 512/128 layout: 4 losses + N identities + K status slots ride along with the gradients
    assert gradient_bytes(1000, 16, 8) == 4 * (1000 + 4 + 16 + 8)


def test_identity_draws_do_not_depend_on_the_batch():
    """Identity 1's draws are the same whether it shares the batch with identity 0 or not."""
    from guide_fast.eg3d.generator import build_generator
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.steps import Layout, sample_draws
    from guide_fast.unlearn.streams import IdentityNoise, IdentityStreams

    g = build_generator("tiny", seed=0)
    cfg = UnlearnConfig()
    rays = g.neural_rendering_resolution ** 2
    both = Layout(2, True, cfg.k_adj, cfg.k_glob)
    alone = Layout(1, True, cfg.k_adj, cfg.k_glob)
    d2 = sample_draws(cfg, both, 8, "cpu", streams=IdentityStreams(3, [0, 1], "cpu"), render=(rays, g.render_options))
    s1 = IdentityStreams(3, [1], "cpu")
    d1 = sample_draws(cfg, alone, 8, "cpu", streams=s1, render=(rays, g.render_options))
    # the renderer's uniforms are drawn late, per pass (~63 MB per identity at FFHQ settings)
    assert d2.render_u is None and d2.render_spec is not None
    d2, d1 = d2.with_render(both), d1.with_render(alone)
    assert d2.with_render(both) is d2  # nothing left to draw
    for name in ("yaw", "adj_z", "adj_alpha", "glob_z"):
        torch.testing.assert_close(getattr(d1, name)[0], getattr(d2, name)[1], rtol=0, atol=0)
    idx = both.entry_indices(1, 2)
    for key in ("u", "s"):
        a, b = getattr(d1, f"render_{key}"), getattr(d2, f"render_{key}")
        torch.testing.assert_close(a["stratified"], b["stratified"][idx], rtol=0, atol=0)
        imp = b["importance"].reshape(both.total, rays, -1)[idx].flatten(0, 1)
        torch.testing.assert_close(a["importance"], imp, rtol=0, atol=0)
    n2 = IdentityNoise(d2.generators, both, "cpu").randn_rows([both.total, 1, 4, 4], "cpu")
    n1 = IdentityNoise(d1.generators, alone, "cpu").randn_rows([alone.total, 1, 4, 4], "cpu")
    torch.testing.assert_close(n1, n2[idx], rtol=0, atol=0)


def test_an_initialised_group_of_one_changes_nothing():
    """The Unlearner inside a process group this process made (world size 1, gloo): the sharded
    engine (flat gradient buffer, all-reduce, agreement) gives bit-identical weights and losses.
    (The reference path shares the step's gradient hook; the fast path is the one timed here.)"""
    import torch.distributed as dist
    from small_nets import SmallFaceNet

    from guide_fast.eg3d.generator import build_generator
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn.config import UnlearnConfig
    from guide_fast.unlearn.engine import Unlearner

    gen = build_generator("tiny", seed=0)
    nets = IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval()
    cfg = UnlearnConfig(iterations=2, lr=LR, seed=3, eval_views=1, adjacency_samples=1, global_samples=1)
    alone = Unlearner(gen, *nets, cfg).unlearn(seeds=[5], render=False)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        grouped = Unlearner(gen, *nets, cfg).unlearn(seeds=[5], render=False)
    finally:
        dist.destroy_process_group()
    assert grouped.timings["distributed"]["world_size"] == 1 and "distributed" not in alone.timings
    assert grouped.losses == alone.losses
    for (name, a), (_, b) in zip(alone.generator.named_parameters(), grouped.generator.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_two_ranks_give_the_one_process_generator(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same CPU kernels, so only the summation order differs
    try:
        one = _engine_run()  # this process: torch.distributed is not initialised here
    finally:
        torch.set_num_threads(threads)
    assert one["timings"]["world_size"] == 1
    _spawn(_service_worker, 2, (_free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    two = ranks[0]
    info = two["timings"]["distributed"]
    assert info["world_size"] == 2 and info["identities"] == [0, 2] and info["ranks_agree"] is True
    assert ranks[1]["timings"]["distributed"]["identities"] == [2, 3]
    # Both sides see bit-identical draws (identity-keyed streams) and the same starting weights;
    # they differ only in the order of fp32 sums: conv batches of 3 identities vs 2 + 1, and the
    # gradient summed inside one backward vs two partial sums plus an all-reduce. Step 1 shows
    # that directly: losses agree to rounding (measured ~1e-7 relative) and the summed gradients
    # to ~1e-5 of each tensor's largest entry (the same as splitting the 3 identities into passes
    # of 2 + 1 in one process); a noise strength's gradient is a single sum over every pixel of
    # its layer and carries more (measured 3e-4 relative). Stated: 1e-5 relative on losses;
    # gradients within 1e-3 of each tensor's max |g| and 1e-4 in L2 over all of them.
    a, b = one["losses"][0], two["losses"][0]
    for key in ("total", "local", "adjacency", "global"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a, b)
    torch.testing.assert_close(torch.tensor(two["identity_losses"][0]), torch.tensor(one["identity_losses"][0]),
                               rtol=1e-5, atol=1e-7)
    g_diff, g_norm = 0.0, 0.0
    for name, g1 in one["grads"].items():
        g2 = two["grads"][name]
        err = float((g2 - g1).abs().max()) / max(float(g1.abs().max()), 1e-30)
        assert err < 1e-3, f"{name}: step-1 gradients differ by {err:.2g} of max |g|"
        g_diff += float((g2 - g1).square().sum())
        g_norm += float(g1.square().sum())
    assert (g_diff / g_norm) ** 0.5 < 1e-4, (g_diff / g_norm) ** 0.5
    # After Adam, rounding no longer stays small: Adam's first step moves a weight by
    # lr*g/(|g|+eps), so a gradient entry that is a cancelling sum (its sign set by rounding)
    # moves by up to 2 lr either way (measured: the same 1.65 lr worst case with passes 2 + 1 in
    # ONE process), and step 2's losses then see slightly different weights (measured ~1.5e-4
    # relative). Stated: later losses to 2e-3 relative, the weight change from the source to 5%
    # in L2. Different draws (a K-dependent stream) change step 1's losses by O(10%) and the
    # weight change by O(1). The two ranks' weights are identical bit for bit.
    for a, b in zip(one["losses"][1:], two["losses"][1:]):
        assert b["total"] == pytest.approx(a["total"], rel=2e-3), (a, b)
    diffs, norms = 0.0, 0.0
    for name, w1 in one["weights"].items():
        w2, src = two["weights"][name], one["source"][name]
        torch.testing.assert_close(ranks[1]["weights"][name], w2, rtol=0, atol=0)
        diffs += float((w2 - w1).square().sum())
        norms += float((w1 - src).square().sum())
    assert norms > 0, "the run did not move the weights"
    assert (diffs / norms) ** 0.5 < 5e-2, f"the weight change differs by {(diffs / norms) ** 0.5:.3g} in L2"


# ---------------------------------------------------------------- the CLI under torchrun
LAUNCHER = textwrap.dedent("""
    # Test-only launcher: the guide-fast CLI with the small identity net and random LPIPS in
    # place of IR-SE50/VGG16 (seconds instead of a minute on a CPU); GF_TEST_FAIL_RANK makes
    # that rank's second step raise.
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from small_nets import SmallFaceNet
    import guide_fast.commands.unlearn as cmd
    from guide_fast.identity import IdentityLoss
    from guide_fast.perceptual import LPIPS
    from guide_fast.unlearn import steps

    cmd.build_loss_networks = lambda args, device, random_nets: (IdentityLoss(SmallFaceNet()), LPIPS.random(0))
    if os.environ.get("GF_TEST_FAIL_RANK") == os.environ["RANK"]:
        original, calls = steps.FastStep.forward_backward, []
        def failing(self, draws):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected failure")
            return original(self, draws)
        steps.FastStep.forward_backward = failing
    from guide_fast.cli import main
    sys.exit(main())
""")


def _torchrun(tmp_path, out, extra_env=None, timeout_s=150):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(TESTS)))
    # guide_fast.launch is what the Makefile installs as .venv/bin/torchrun
    cmd = [sys.executable, "-m", "guide_fast.launch", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(launcher),
           "unlearn", "--generator", "tiny", "--random-nets", "--seed", "1", "2", "--iters", "2", "--lr", "1e-3",
           "--out", str(out), "--no-progress", "--device", "cpu", "--dist-timeout", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_cli_under_torchrun_writes_the_single_process_layout(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # the single-process layout: the files report.json lists (OUTPUT_FILES and the pictures)
    assert {p.name for p in out.iterdir()} == set(report["files"]) >= set(OUTPUT_FILES)
    assert report["world_size"] == 2 and report["distributed"]["world_size"] == 2
    assert report["identities"] == 2 and len(report["losses"]) == 2
    assert len(report["identity_losses"][0]) == 2  # both identities' losses, from both ranks
    assert proc.stdout.count("wrote ") == 1, proc.stdout  # rank 0 alone writes and reports


def test_a_failing_rank_ends_the_job_with_one_line_and_no_output(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, out, {"GF_TEST_FAIL_RANK": "1"})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "guide-fast unlearn: error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "rank 1 of 2 failed while running step 2: RuntimeError: injected failure" in lines[0]
    assert "no output was written" in lines[0]
    assert not out.exists(), "a failed distributed run must leave no output folder"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")], "no staging folder may stay"
    # the launcher (guide_fast.launch, installed as .venv/bin/torchrun) adds one line, not a traceback
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    summary = [line for line in proc.stderr.splitlines() if line.startswith("torchrun: ")]
    assert len(summary) == 1 and "rank 0 (exit code 2)" in summary[0], proc.stderr[-3000:]
    # rank 1 exits 2 as well, unless it is still shutting down when the launcher, seeing rank 0
    # fail, terminates the job (a timing race on a loaded machine): then SIGTERM stopped it
    assert any(f"rank 1 ({how})" in summary[0] for how in ("exit code 2", "stopped by SIGTERM", "exit code 143")), \
        proc.stderr[-3000:]


def test_distributed_flag_outside_torchrun_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from guide_fast.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    rc = main(["unlearn", "--generator", "tiny", "--random-nets", "--seed", "1", "--iters", "1",
               "--out", str(tmp_path / "run"), "--distributed", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--distributed needs torchrun's environment" in err[0] and "RANK" in err[0]
    assert not (tmp_path / "run").exists()
