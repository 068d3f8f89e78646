"""Time a fedkd run in Flower's Ray simulation against the same work in plain PyTorch.

    python -m benchmarks.sim_vs_plain [--json PATH] [hydra overrides...]

Prepares the run once (not timed in either arm), runs `benchmarks.plain_loop.run_plain`, then
`fedkd.simulations.run.run` in this process, samples the memory of the whole process tree in both
arms, and splits the simulation's extra wall time into start-up, per-round overhead, teardown.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd

import ray  # pinned by flwr[simulation]; importing it puts its vendored psutil on sys.path
import psutil  # noqa: E402  (not a direct dependency of fedkd)

import fedkd.simulations.run as sim_run
from benchmarks.flower_dispatch import flower_own_dispatch
from benchmarks.plain_loop import run_plain
from fedkd.protocol import PHASES, phase_key
from fedkd.server import compose_config, prepare_run
from fedkd.timing import PhaseTimer
from fedkd.simulations.results import WIRE, Recorder

GIB = 1024**3
RAY_MARKERS = ("ray::", "raylet", "gcs_server")
TOKEN = "FEDKD_BENCH_TOKEN"  # inherited by every process this one starts


class TreeMemory:
    """Peak memory of this process, its descendants and Ray processes created since `since`.

    Ray processes outside the tree (re-parented) count only if they inherited this process's
    `TOKEN` environment variable, so other people's Ray runs on the machine are left out.
    RSS is sampled every `interval` s, PSS and USS (`memory_full_info`, slower) every `full_every`,
    when the list of processes is also refreshed: walking every process on the machine at each
    RSS sample cost the simulation arm (10 processes) about 2 CPU s of a 30 s run, the plain arm
    (1 process) next to nothing. Summed RSS counts shared pages once per process; PSS splits
    them, USS leaves them out.
    """

    def __init__(self, since: float | None = None, interval: float = 0.2,
                 full_every: float = 1.0) -> None:
        self.root, self.token = psutil.Process(), os.environ.setdefault(TOKEN, uuid.uuid4().hex)
        self.since = time.time() if since is None else since
        self.interval, self.full_every = interval, full_every
        self.peak: dict[str, float] = dict.fromkeys(("rss", "main_rss", "pss", "uss"), 0)
        self.max_processes = self.samples = 0
        self._ours: dict[tuple[int, float], bool] = {}
        self._procs: list[psutil.Process] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def processes(self) -> list[psutil.Process]:
        """This process, its descendants, and re-parented Ray processes that carry our token."""
        procs = {p.pid: p for p in [self.root, *self.root.children(recursive=True)]}
        for p in psutil.process_iter(["create_time", "cmdline"]):
            key = (p.pid, p.info["create_time"] or 0.0)
            if p.pid in procs or key[1] < self.since:
                continue
            if any(m in " ".join(p.info["cmdline"] or ()) for m in RAY_MARKERS):
                if key not in self._ours:
                    try:
                        self._ours[key] = p.environ().get(TOKEN) == self.token
                    except psutil.Error:
                        continue
                if self._ours[key]:
                    procs[p.pid] = p
        return list(procs.values())

    def sample(self, full: bool = False) -> None:
        """One sample; update the peaks."""
        if full or not self._procs:
            self._procs = self.processes()
        total, procs = dict.fromkeys(self.peak, 0), self._procs
        for p in procs:
            try:
                m = p.memory_full_info() if full else p.memory_info()
            except psutil.Error:
                continue
            for k in ("rss", "pss", "uss"):
                total[k] += getattr(m, k, 0)
            if p is self.root:
                total["main_rss"] = m.rss
        self.peak = {k: max(v, total[k]) for k, v in self.peak.items()}
        self.max_processes, self.samples = max(self.max_processes, len(procs)), self.samples + 1

    def _loop(self) -> None:
        next_full = 0.0
        while not self._stop.is_set():
            full, now = time.monotonic() >= next_full, time.monotonic()
            next_full = now + self.full_every if full else next_full
            self.sample(full)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, Any]:
        """Peaks in GiB (PSS/USS None when never sampled), samples and max process count."""
        out = {f"peak_{k}_gib": round(v / GIB, 3) if v else None for k, v in self.peak.items()}
        return {**out, "samples": self.samples, "max_processes": self.max_processes}


def breakdown(elapsed: dict[int, float], plain_marks: dict[int, float], *, sim_wall: float,
              recorder_at: float, finish_at: float) -> dict[str, float]:
    """Where the simulation's extra time goes.

    `elapsed`: round -> s since the Recorder started (metrics.parquet `elapsed_s`); `plain_marks`:
    round -> s since `run_plain` started, at each round's end; `recorder_at`, `finish_at`: s since
    `run()` started when the Recorder was created and when `finish()` was called.
    """
    first, last = min(elapsed), max(elapsed)
    later = max(last - first, 1)
    sim_later = (elapsed[last] - elapsed[first]) / later
    plain_later = (plain_marks[last] - plain_marks[first]) / later
    extra = {
        "prepare_in_run_s": recorder_at,
        "startup_extra_s": elapsed[first] - plain_marks[first],
        "rounds_extra_s": (sim_later - plain_later) * (last - first),
        "teardown_s": finish_at - recorder_at - elapsed[last],
        "write_results_s": sim_wall - finish_at,
    }
    out = {"sim_first_round_s": elapsed[first], "plain_first_round_s": plain_marks[first],
           "sim_later_round_mean_s": sim_later, "plain_later_round_mean_s": plain_later,
           "per_round_extra_s": sim_later - plain_later, **extra,
           "extra_total_s": sum(extra.values())}
    return {k: round(v, 4) for k, v in out.items()}


def elapsed_rounds(frame: pd.DataFrame) -> dict[int, float]:
    """round -> `elapsed_s` from a metrics.parquet frame."""
    rows = frame[(frame["client"] == WIRE) & (frame["metric"] == "elapsed_s")]
    return {int(r): float(v) for r, v in zip(rows["round"], rows["value"])}


def accuracy_history(frame: pd.DataFrame) -> dict[int, dict[int, float]]:
    """round -> client -> test accuracy from a metrics.parquet frame (as `run_plain` returns)."""
    rows, out = frame[frame["metric"] == "test-accuracy"], {}
    for r, c, v in zip(rows["round"], rows["client"], rows["value"]):
        out.setdefault(int(r), {})[int(c)] = float(v)
    return out


def last_accuracies(history: dict[int, dict[int, float]]) -> dict[int, float]:
    """Each client's last reported accuracy (with fraction_train < 1 the last round holds only
    the clients sampled in it), as the summary's ``final_accuracy_by_client``."""
    last: dict[int, float] = {}
    for server_round in sorted(history):
        last.update(history[server_round])
    return dict(sorted(last.items()))


@contextmanager
def timed_hooks(marks: dict[str, float]) -> Iterator[None]:
    """Within the block note when `run()`'s Recorder starts and `finish()` is called (monotonic
    times), and how long `ray.init` and `ray.shutdown` take."""

    class Timed(Recorder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            marks["recorder"] = time.monotonic()

        def finish(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            marks["finish"] = time.monotonic()
            return super().finish(*args, **kwargs)

    def timed(fn: Any, key: str) -> Any:
        @functools.wraps(fn)  # keeps ray.init's signature: `fedkd.checks` reads its options
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.monotonic()
            out = fn(*args, **kwargs)
            marks[key] = marks.get(key, 0.0) + time.monotonic() - t
            return out
        return wrapper

    with mock.patch.object(sim_run, "Recorder", Timed), \
            mock.patch.object(ray, "init", timed(ray.init, "ray_init_s")), \
            mock.patch.object(ray, "shutdown", timed(ray.shutdown, "ray_shutdown_s")):
        yield


def phase_totals(frame: pd.DataFrame) -> dict[str, float]:
    """Seconds per client phase, summed over every client and round of a profiled run."""
    keys = {phase_key(p): p for p in PHASES}
    rows = frame[frame["metric"].isin(list(keys))]
    sums = rows.groupby("metric")["value"].sum()
    return {p: round(float(sums.get(k, 0.0)), 3) for k, p in keys.items()}


def workers(cfg: Any) -> int:
    """Clients the simulation runs at once: Ray's CPUs over each client's CPUs."""
    cpus = cfg.simulation.ray_init.get("num_cpus") or os.cpu_count() or 1
    return max(1, int(cpus // max(float(cfg.simulation.client_resources.num_cpus), 1e-9)))


def phase_table(r: dict[str, Any]) -> list[str]:
    """Where a round's time goes, per client phase, in both arms."""
    plain, sim = r["phases"]["plain"], r["phases"]["simulation"]
    lines = [f"client phases, s summed over clients and rounds ({r['workers']} simulated "
             f"clients run at once):", f"  {'phase':<12}{'plain':>10}{'simulation':>12}"]
    lines += [f"  {p:<12}{plain[p]:>10.2f}{sim[p]:>12.2f}" for p in PHASES]
    plain_sum, sim_sum = sum(plain.values()), sum(sim.values())
    lines.append(f"  {'sum':<12}{plain_sum:>10.2f}{sim_sum:>12.2f}")
    outside_plain = r["plain_wall_s"] - plain_sum
    outside_sim = r["sim_wall_s"] - sim_sum / r["workers"]
    lines.append(f"  {'outside':<12}{outside_plain:>10.2f}{outside_sim:>12.2f}   (wall minus "
                 f"client phases [/ parallel clients]: server, Flower, Ray, start-up)")
    return lines


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split argv into options (`--json PATH` or `--json=PATH`, `--repeat K`; the flag
    `--flower-dispatch`) and Hydra overrides."""
    opts, overrides, it = {}, [], iter(argv)
    for arg in it:
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--"):
            overrides.append(arg)
        elif key == "flower-dispatch" and not eq:
            opts[key] = "1"
        elif key not in ("json", "repeat"):
            raise SystemExit(f"unknown option --{key}; usage: [--json PATH] [--repeat K] "
                             "[--flower-dispatch] [overrides...]")
        else:
            opts[key] = value if eq else next(it, "")
    return opts, overrides


def benchmark(overrides: list[str], flower_dispatch: bool = False) -> dict[str, Any]:
    """Run both arms (plain first) and return all measurements (`flower_dispatch`: the
    simulation with Flower's own message dispatcher instead of fedkd's one-pass one)."""
    start, load_start = time.time(), os.getloadavg()[0]
    cfg = compose_config([*overrides, "distill.profile=true"])  # clients report their phases
    t = time.monotonic()
    prepared = prepare_run(cfg)
    prepare_s = time.monotonic() - t
    marks: dict[int, float] = {}
    plain_timer = PhaseTimer()
    with TreeMemory(since=start) as plain_mem:
        t = time.monotonic()
        history = run_plain(prepared, on_round=lambda r: marks.__setitem__(r, time.monotonic() - t),
                            timer=plain_timer)
        plain_wall = time.monotonic() - t
    sim_marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, timed_hooks(sim_marks), \
            TreeMemory(since=start) as sim_mem, \
            flower_own_dispatch() if flower_dispatch else nullcontext():
        t = time.monotonic()
        summary = sim_run.run(cfg, tmp)
        sim_wall = time.monotonic() - t
        frame = pd.read_parquet(Path(tmp) / "metrics.parquet")
        sim_phases = phase_totals(frame)
    parts = breakdown(elapsed_rounds(frame), marks, sim_wall=sim_wall,
                      recorder_at=sim_marks["recorder"] - t, finish_at=sim_marks["finish"] - t)
    sim_final = {int(k): v for k, v in summary["final_accuracy_by_client"].items()
                 if v is not None}  # null: never evaluated (fraction_train < 1)
    history = {r: accs for r, accs in history.items() if accs}  # rounds without evaluation
    return {
        "overrides": overrides, "num_clients": int(cfg.num_clients),
        "dispatch": "flower" if flower_dispatch else "one-pass",
        "num_rounds": int(cfg.num_rounds), "prepare_s": round(prepare_s, 3),
        "plain_wall_s": round(plain_wall, 3), "sim_wall_s": round(sim_wall, 3),
        "ratio": round(sim_wall / plain_wall, 3), **parts,
        **{k: round(sim_marks.get(k, float("nan")), 3) for k in ("ray_init_s", "ray_shutdown_s")},
        "final_accuracies_identical": last_accuracies(history) == sim_final,
        "all_rounds_identical": history == accuracy_history(frame),
        "final_mean_accuracy": summary["final_mean_accuracy"],
        "phases": {"plain": {p: round(plain_timer.seconds.get(p, 0.0), 3) for p in PHASES},
                   "simulation": sim_phases},
        "workers": workers(cfg),
        "plain_memory": plain_mem.result(), "sim_memory": sim_mem.result(),
        "loadavg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }


def table(r: dict[str, Any]) -> str:
    """The measurements as a small text table."""
    pm, sm = r["plain_memory"], r["sim_memory"]
    rows = [("", "plain", "simulation"),
            ("wall s", r["plain_wall_s"], r["sim_wall_s"]),
            ("first round s", r["plain_first_round_s"], r["sim_first_round_s"]),
            ("later rounds mean s", r["plain_later_round_mean_s"], r["sim_later_round_mean_s"])]
    rows += [(f"peak {k} GiB", pm[f"peak_{k}_gib"], sm[f"peak_{k}_gib"])
             for k in ("rss", "main_rss", "pss", "uss")]
    rows.append(("processes (max)", pm["max_processes"], sm["max_processes"]))
    lines = [f"{r['num_clients']} clients, {r['num_rounds']} rounds, {r['dispatch']} dispatch; "
             f"prepare (once, not timed) {r['prepare_s']} s; simulation / plain = {r['ratio']}"]
    lines += [f"{a:<22}{b!s:>12}{c!s:>12}" for a, b, c in rows]
    lines.append("extra time of the simulation:")
    for key, label in [("prepare_in_run_s", "prepare again in run()"),
                       ("startup_extra_s", "Ray + actor start (round 1)"),
                       ("ray_init_s", "  of which ray.init"),
                       ("rounds_extra_s", f"later rounds ({r['per_round_extra_s']:+.3f} s each)"),
                       ("teardown_s", "teardown (Flower + Ray)"),
                       ("ray_shutdown_s", "  of which ray.shutdown"),
                       ("write_results_s", "summary + plot"),
                       ("extra_total_s", "total")]:
        lines.append(f"  {label:<32}{r[key]:>10.3f} s")
    lines += phase_table(r)
    lines.append(f"accuracies identical: final {r['final_accuracies_identical']}, every round "
                 f"{r['all_rounds_identical']}; 1-min load average {r['loadavg_1min'][0]} at "
                 f"start, {r['loadavg_1min'][1]} at end ({r['cpus']} CPUs)")
    return "\n".join(lines)


def repeated(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios over repeated measurements on a shared machine: each repeat's, the median, and
    best plain wall over best simulation wall (the least disturbed run of each arm)."""
    ratios = sorted(r["ratio"] for r in results)
    best_plain, best_sim = min(r["plain_wall_s"] for r in results), min(
        r["sim_wall_s"] for r in results)
    return {"ratios": [r["ratio"] for r in results], "median_ratio": ratios[len(ratios) // 2],
            "best_plain_wall_s": best_plain, "best_sim_wall_s": best_sim,
            "best_ratio": round(best_sim / best_plain, 3),
            "loadavg_1min": [r["loadavg_1min"] for r in results]}


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    opts, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("fedkd", "benchmarks", "simulations"):
        logging.getLogger(name).setLevel(logging.INFO)
    results = []
    for _ in range(int(opts.get("repeat") or 1)):
        results.append(benchmark(overrides, flower_dispatch=bool(opts.get("flower-dispatch"))))
        print(table(results[-1]), flush=True)
    out: dict[str, Any] = results[0]
    if len(results) > 1:
        out = {**repeated(results), "runs": results}
        print(f"{len(results)} repeats: ratios {out['ratios']}, median {out['median_ratio']}, "
              f"best sim / best plain = {out['best_sim_wall_s']} / {out['best_plain_wall_s']} "
              f"= {out['best_ratio']}")
    if opts.get("json"):
        Path(opts["json"]).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
