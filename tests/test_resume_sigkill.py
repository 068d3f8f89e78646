"""SIGKILL, then ``resume=``, on Flower's Ray simulation: bit for bit like a run never stopped.

Each case runs `fedkd-sim` three times in subprocesses: through; killed with SIGKILL (the whole
process group, Ray's processes included) as soon as it logs the checkpoint of round k; resumed
with the same overrides plus ``resume=<its folder>``. metrics.parquet (wall times aside) and
summary.json (timing aside) must be equal. Slow: three Ray start-ups per case.

The measured case of issue 11 is `test_sigkill_at_round_10_of_20_resumes_bit_for_bit` (the
default config: digits, 10 clients, 20 rounds, a checkpoint every 5 rounds). By hand::

    fedkd-sim hydra.run.dir=outputs/whole
    fedkd-sim hydra.run.dir=outputs/killed   # kill -9 -<pgid> after "checkpoint: round 10"
    fedkd-sim resume=outputs/killed
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.test_resume import assert_same_checkpoints, assert_same_results

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 1500.0  # Ray start-up and 20 rounds on a busy two-core machine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _start(args: list[str], cache: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """`fedkd-sim args` from this checkout, in its own session; its output is collected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env.update(FEDKD_CACHE_DIR=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen([sys.executable, "-m", "fedkd.simulations.main", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _run(args: list[str], cache: Path) -> str:
    proc, lines = _start(args, cache)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        _kill_session(proc)
    output = "".join(lines)
    assert code == 0, output
    return output


def _kill_session(proc: subprocess.Popen[str]) -> None:
    """SIGKILL every process of `proc`'s session (Ray's too) and wait until they are gone."""
    found = []
    for other in psutil.process_iter():
        try:
            if os.getsid(other.pid) == proc.pid:
                found.append(other)
        except (OSError, psutil.Error):
            pass
    for other in found:
        try:
            other.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def _kill_after_checkpoint(args: list[str], cache: Path, server_round: int) -> str:
    """Start `fedkd-sim args`, SIGKILL its whole session once it logs round `server_round`'s
    checkpoint (the run is in the next round then)."""
    proc, lines = _start(args, cache)
    mark = f"checkpoint: round {server_round} ->"
    end = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not any(mark in line for line in list(lines)):
            if proc.poll() is not None or time.monotonic() > end:
                pytest.fail(f"no {mark!r} (exit {proc.returncode}):\n{''.join(lines)}")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _kill_session(proc)
    return "".join(lines)


def _killed_and_resumed(tmp: Path, cache: Path, args: list[str], kill_after: int) -> tuple[Path, Path]:
    whole, killed = tmp / "whole", tmp / "killed"
    _run([*args, f"hydra.run.dir={whole}"], cache)
    _kill_after_checkpoint([*args, f"hydra.run.dir={killed}"], cache, kill_after)
    assert not (killed / "summary.json").exists()  # SIGKILL: no last words
    output = _run([*args, f"resume={killed}", f"hydra.run.dir={tmp / 'resume'}"], cache)
    assert f"resuming after round {kill_after} of" in output, output
    return whole, killed


def test_sigkill_at_round_10_of_20_resumes_bit_for_bit(tmp_path, cache):
    whole, killed = _killed_and_resumed(tmp_path, cache, [], kill_after=10)
    assert_same_results(whole, killed)
    assert_same_checkpoints(whole, killed)  # round 15's: models, clients' states
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["num_rounds"] == 20 and summary["resumed_from_round"] == 10
    assert summary["status"] == "ok"


@pytest.mark.parametrize("args", [
    pytest.param(["strategy=feddf", "strategy.flower.server_epochs=1"], id="feddf"),
    pytest.param(["strategy=fedavg", "strategy.flower.fraction_train=0.5"], id="fedavg-partial"),
    pytest.param(["strategy.flower.fraction_train=0.5"], id="fedmd-partial"),
])
def test_sigkill_after_a_checkpoint_resumes_bit_for_bit(tmp_path, cache, args):
    base = ["num_clients=4", "num_rounds=6", "model=hetero", "distill.warmup_epochs=2",
            "simulation.checkpoint_every=2"]
    whole, killed = _killed_and_resumed(tmp_path, cache, [*base, *args], kill_after=2)
    assert_same_results(whole, killed)
    assert_same_checkpoints(whole, killed)  # round 4's: models, clients' states
