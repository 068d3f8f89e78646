"""benchmarks.plain_loop under partial participation: only sampled clients are built, lazily."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from benchmarks import plain_loop
from fedkd.client.state import Student
from fedkd.sampling import sample_partitions
from fedkd.server import PreparedRun, compose_config, prepare_run

CLIENTS, ROUNDS = 8, 3
PARTIAL = [f"num_clients={CLIENTS}", f"num_rounds={ROUNDS}", "model=mlp", "distill.warmup_epochs=2",
           "distill.digest_epochs=1", "strategy.flower.fraction_train=0.25"]


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory) -> PreparedRun:
    cache = tmp_path_factory.mktemp("cache")
    return prepare_run(compose_config([*PARTIAL, f"simulation.cache_dir={cache}"]))


def _sampled(round_: int) -> list[int]:
    return sample_partitions(CLIENTS, 0.25, 2, 0, round_)


def test_only_sampled_clients_are_built_and_loaded_once_each(partial_run, monkeypatch) -> None:
    built, loaded = [], []
    build, load = plain_loop.build_model, plain_loop.load_client
    monkeypatch.setattr(plain_loop, "build_model",
                        lambda *a, **k: built.append(a[0]) or build(*a, **k))
    monkeypatch.setattr(plain_loop, "load_client",
                        lambda d, pid: loaded.append(pid) or load(d, pid))
    clients = plain_loop.LazyClients(partial_run)

    history = plain_loop.run_plain(partial_run, clients=clients)

    sampled = {p for r in range(1, ROUNDS + 1) for p in _sampled(r)}
    assert len(sampled) < CLIENTS  # the test means something: some clients never train
    assert {r: sorted(a) for r, a in history.items()} == {r: _sampled(r) for r in history}
    assert sorted(clients.built) == sorted(loaded) == sorted(sampled)
    assert len(built) == len(sampled)
    assert {p: c.rounds_done for p, c in clients.built.items()} == {
        p: sum(p in _sampled(r) for r in range(1, ROUNDS + 1)) for p in sampled}


def test_a_client_starts_from_the_weights_the_simulation_creates(partial_run) -> None:
    """At first use, seeded with seed + partition id, as `Student.restore` on an empty state."""
    for pid in (0, CLIENTS - 1):
        context = Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid},
                          state=RecordDict(), run_config={})
        torch.manual_seed(123)  # whatever the global RNG held before
        expected = Student.restore(context, partial_run.settings, pid).model.state_dict()
        got = plain_loop.fresh_model(partial_run, pid).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)


def test_lazy_clients_give_the_accuracies_of_clients_built_up_front(partial_run) -> None:
    eager = plain_loop.LazyClients(partial_run)
    for pid in range(CLIENTS):  # the old loop: every client built and loaded first, in order
        eager[pid]
    assert plain_loop.run_plain(partial_run, clients=eager) == plain_loop.run_plain(partial_run)
