"""`fedkd-sim` as users run it: bad values stop before Ray starts, with one clear message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("fedkd-sim")
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "fedkd.simulations.main"]


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]
    expected: tuple[str, ...]
    """Substrings of the output (the error line for configuration errors)."""
    config_error: bool = True
    """Caught by `fedkd-sim`: exit 2 and one 'configuration error: ...' line."""
    fast: bool = False
    """Found before any data is prepared: the process ends within `FAST_S` seconds of CPU."""
    exit_code: int = 2
    """A multirun goes on past a bad arm, records it and exits 1 at the end, naming it."""
    ci: bool = False
    """In the default suite; the other cases run with ``-m slow`` (each is a ~5 s process; the
    same values are checked in process, in tests/test_checks.py)."""


CASES = {
    "negative alpha": Case(("partition.partitioner.alpha=-1",), ("alpha", "-1")),
    "more clients than samples": Case(("num_clients=5000",), ("num_clients=5000", "private samples")),
    "unknown dataset": Case(("dataset=nosuch",), ("nosuch",), config_error=False),
    "missing file": Case(("dataset=files", "dataset.path=/nonexistent/x.npz"),
                         ("/nonexistent/x.npz", "not found"), ci=True),
    "alpha above 1": Case(("distill.alpha=1.5",), ("distill.alpha", "1.5")),
    "zero temperature": Case(("distill.temperature=0",), ("distill.temperature", "> 0")),
    "white-box generator without models": Case(
        ("transfer=generator_whitebox",), ("WhiteBoxGenerator", "strategy=feddf")),
    "black-box generator without directions": Case(
        ("transfer=generator_blackbox", "transfer.directions=0"), ("transfer.directions", ">= 1")),
    "files without path": Case(("dataset=files",), ("dataset.path", "Missing mandatory value")),
    # issue 11's "found late" values (all of them, in process: tests/test_checks.py)
    "negative learning rate": Case(
        ("distill.optimizer.lr=-1",), ("distill.optimizer.lr=-1: must be a number >= 0",),
        fast=True),
    "trimmed mean fraction": Case(
        ("aggregator=trimmed_mean", "aggregator.fraction=0.7"),
        ("aggregator.fraction=0.7: must be a number in [0, 0.5)",), fast=True),
    "no CPU per client": Case(
        ("simulation.client_resources.num_cpus=0",),
        ("simulation.client_resources.num_cpus=0: must be a number in (0, ",), fast=True),
    "num_clients as text": Case(("num_clients=abc",), ("num_clients='abc': must be an int >= 1",),
                                fast=True),
    "a sweep with a bad arm": Case(("-m", "seed=-1"), ("seed=-1: must be an int in [0, ",),
                                   fast=True, exit_code=1, ci=True),
}
FAST_S = 10.0
"""CPU seconds a `fast` case may take (imports included; the wall time on an idle machine is
about the same, on a loaded one several times more: it is printed, not asserted)."""


REPO = Path(__file__).resolve().parents[1]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "RAY_"))}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),  # this checkout
        FEDKD_CACHE_DIR=str(root / "cache"),
        RAY_TMPDIR=str(root / "ray"),  # a Ray start would create it
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    root: Path
    cpu_seconds: float = 0.0
    """User + system time of the process and the children it waited for."""


CASE_TIMEOUT = 600.0
"""Seconds one case may take: each needs ~5 s of CPU (imports), but a loaded machine stretches
that many times; the limit only matters if a case hangs."""


def _run_case(case: Case, root: Path) -> Result:
    """`fedkd-sim` with the case's overrides, in its own process group (killed whole on timeout)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*COMMAND, *case.overrides, f"hydra.run.dir={root / 'out'}",
         f"hydra.sweep.dir={root / 'sweep'}"],
        cwd=root, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    timer = threading.Timer(CASE_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
    timer.start()
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the process's own CPU time
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode == -signal.SIGKILL:
        output += f"\n[killed after {CASE_TIMEOUT:.0f} s]"
    return Result(proc.returncode, output, time.monotonic() - t0, root,
                  usage.ru_utime + usage.ru_stime)


def _params(names: list[str]) -> list:
    """The cases as parameters: those not `Case.ci` behind ``-m slow``."""
    return [pytest.param(name, marks=() if CASES[name].ci else pytest.mark.slow) for name in names]


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Run every case this session collected, at most one per CPU at a time (each is CPU-bound
    while it imports)."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec")}
    cases = {name: case for name, case in CASES.items() if name in wanted}
    roots = {name: tmp_path_factory.mktemp(name.replace(" ", "_")) for name in cases}
    workers = max(1, min(len(cases), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {name: pool.submit(_run_case, case, roots[name]) for name, case in cases.items()}
        return {name: future.result() for name, future in running.items()}


@pytest.mark.parametrize("name", _params(list(CASES)))
def test_bad_value_exits_with_one_clear_message(results: dict[str, Result], name: str) -> None:
    case, result = CASES[name], results[name]
    output = result.output

    assert result.returncode != 0, output
    assert not (result.root / "ray").exists(), f"Ray was started:\n{output}"
    if not case.config_error:
        assert all(text in output for text in case.expected), output
        return
    assert result.returncode == case.exit_code, output
    assert "Traceback" not in output, output
    errors = [i for i, line in enumerate(output.splitlines()) if "configuration error:" in line]
    assert len(errors) == 1, output
    line = output.splitlines()[errors[0]]
    assert all(text in line for text in case.expected), line
    last = len(output.rstrip().splitlines()) - 1
    if case.exit_code == 1:  # the multirun's closing line names the failed arm's folder
        assert errors[0] == last - 1 and "arm(s) of the multirun failed" in output.splitlines()[last]
    elif name != "files without path":  # OmegaConf adds full_key/object_type lines to its message
        assert errors[0] == last, f"message is not one line:\n{output}"


@pytest.mark.parametrize("name", _params([name for name, case in CASES.items() if case.fast]))
def test_a_bad_value_stops_the_process_fast(results: dict[str, Result], name: str) -> None:
    result = results[name]
    print(f"{name}: {result.seconds:.1f} s wall, {result.cpu_seconds:.1f} s CPU")  # noqa: T201

    assert result.returncode == CASES[name].exit_code, result.output
    assert "Reusing prepared data" not in result.output
    assert not (result.root / "cache").exists(), "data was prepared before the check"
    assert result.cpu_seconds < FAST_S, f"{result.cpu_seconds:.1f} s of CPU\n{result.output}"


RESULT_FILES = ("summary.json", "metrics.parquet", "accuracy.png", "config.yaml")


@pytest.mark.slow
def test_multirun_sweep_writes_every_result(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = _env(tmp_path)
    env.pop("RAY_TMPDIR")  # a deep pytest path can exceed the unix socket path limit

    proc = subprocess.run(
        [*COMMAND, "-m", "strategy=fedmd,fedavg,local", "seed=0,1", "num_clients=3", "num_rounds=2",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 6, [p.name for p in runs]
    for run in runs:
        missing = [name for name in RESULT_FILES if not (run / name).is_file()]
        assert not missing, f"{run.name} lacks {missing}"
    assert {p.name for p in runs} == {
        f"num_clients=3,num_rounds=2,seed={seed},strategy={strategy}"
        for seed in (0, 1) for strategy in ("fedmd", "fedavg", "local")
    }
