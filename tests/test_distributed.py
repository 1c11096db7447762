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
    result = Unlearner(gen, IdentityLoss(SmallFaceNet()).eval(), LPIPS.random(0).eval(), cfg).unlearn(
        seeds=SEEDS, render=False)
    return {"weights": {k: p.detach().clone() for k, p in result.generator.trainable_synthesis_parameters()},
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


def test_two_ranks_give_the_one_process_generator(tmp_path):
    one = _engine_run()  # this process: torch.distributed is not initialised here
    assert one["timings"]["world_size"] == 1
    _spawn(_service_worker, 2, (_free_port(), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    two = ranks[0]
    info = two["timings"]["distributed"]
    assert info["world_size"] == 2 and info["identities"] == [0, 2] and info["ranks_agree"] is True
    assert ranks[1]["timings"]["distributed"]["identities"] == [2, 3]
    # Tolerances: both sides see bit-identical draws; they differ only in how fp32 sums are
    # ordered (conv batches of 3 vs 2+1 identities, the gradient sum inside one conv backward
    # vs two partial sums plus an all-reduce): relative rounding ~1e-6 on losses and gradients.
    for a, b in zip(one["losses"], two["losses"]):
        for key in ("total", "local", "adjacency", "global"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    torch.testing.assert_close(torch.tensor(two["identity_losses"]), torch.tensor(one["identity_losses"]),
                               rtol=1e-4, atol=1e-5)
    # Weights: each Adam step moves a weight by about lr*m/sqrt(v), i.e. up to ~lr, so a wrong
    # draw anywhere moves weights by O(lr). Rounding-order differences of the gradients pass
    # through Adam's normalisation as relative errors; a gradient entry that is itself a
    # cancelling sum can carry a larger relative error. Measured (this CPU, 2-3 steps): the
    # largest weight difference is ~0.013 lr, 99.98% of the weights agree to 1e-3 lr. Stated
    # bounds: every weight within 0.1 lr, the change from the source equal to 1% in L2.
    diffs, norms, worst = 0.0, 0.0, 0.0
    for name, w1 in one["weights"].items():
        w2, src = two["weights"][name], one["source"][name]
        torch.testing.assert_close(ranks[1]["weights"][name], w2, rtol=0, atol=0)  # ranks identical
        diffs += float(((w2 - src) - (w1 - src)).square().sum())
        norms += float((w1 - src).square().sum())
        worst = max(worst, float((w2 - w1).abs().max()) / LR)
    assert norms > 0, "the run did not move the weights"
    assert (diffs / norms) ** 0.5 < 1e-2, (diffs / norms) ** 0.5
    assert worst < 0.1, f"a weight differs by {worst:.3g} lr"


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
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
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
