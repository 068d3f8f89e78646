"""The simulation's ClientApp actors: crashed ones replaced, each holding `depth` messages
(`fedkd.flower_compat`)."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

from fedkd.flower_compat.gate import _shape_error, require_supported_flower

log = logging.getLogger("fedkd.flower_compat")


def replace_crashed_actors() -> None:
    """Make Flower's simulation replace a ClientApp actor whose worker process died.

    ``RayBackend.process_message`` fetches a reply with
    ``BasicActorPool.fetch_result_and_return_actor_to_pool(future)`` and, when that raises, hands
    the future's actor back with ``add_actor_back_to_pool(future)``, dead or alive. On Ray's
    ``RayActorError`` (the actor's process ended: a crash, ``os._exit``, the OOM killer) the
    future's actor becomes a fresh one before that happens, once per dead actor, and so do its
    idle slots (`pipeline_actors`); the message that crashed it still gets its error reply. A
    message that only waited behind it on the same actor (submitted later) runs again on the
    fresh one, once. Idempotent.
    """
    require_supported_flower()
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    fetch = BasicActorPool.fetch_result_and_return_actor_to_pool
    if getattr(fetch, "replaces_crashed_actors", False):
        return
    calls = set(RayBackend.process_message.__code__.co_names)
    assigned = set(BasicActorPool.__init__.__code__.co_names)
    add_back = set(BasicActorPool.add_actor_back_to_pool.__code__.co_names)
    if not ({"fetch_result_and_return_actor_to_pool", "add_actor_back_to_pool"} <= calls
            and {"create_actor_fn", "_future_to_actor"} <= assigned
            and {"_future_to_actor", "pool", "append"} <= add_back):
        raise _shape_error("Flower's RayBackend no longer hands actors back to its "
                           "BasicActorPool by future")

    @functools.wraps(fetch)
    def fetch_or_replace(self: Any, future: Any) -> Any:
        import ray

        actor = self._future_to_actor.get(future)
        try:
            result = fetch(self, future)
        except ray.exceptions.RayActorError as err:
            job = _jobs(self).pop(future, None)
            if actor is None:
                raise
            fresh, waited = _replace_dead(self, actor, err), _waited_behind(self, actor, future)
            self._future_to_actor[future] = fresh  # Flower hands it back after the error
            if waited and job is not None:
                return _run_again(self, future, fresh, job)
            raise
        _settle(self, actor, future)
        return result

    fetch_or_replace.replaces_crashed_actors = True  # type: ignore[attr-defined]
    BasicActorPool.fetch_result_and_return_actor_to_pool = fetch_or_replace
    BasicActorPool.add_actor_back_to_pool = _add_back


def pipeline_actors(depth: int) -> None:
    """Let each ClientApp actor of Flower's simulation hold `depth` messages at once.

    Flower's ``BasicActorPool`` hands an actor one message and takes it back with the reply, so
    every actor waits, between two messages, for the driver to fetch the reply and submit the
    next (about 5 ms: 7 % of a 1,000-client MNIST round). Here every actor is in the pool
    `depth` times (slots) and Flower starts one worker thread per slot: the next message
    already waits in the actor's queue (Ray runs an actor's tasks in order) when one ends.
    Nothing changes what a client computes. A crash (`replace_crashed_actors`) runs the
    messages that waited behind the crashing one again; a message that hangs holds up the one
    behind it. ``depth=1`` is Flower's own behaviour.
    """
    require_supported_flower()
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"pipeline depth must be an int >= 1, got {depth!r}")
    replace_crashed_actors()  # crashes of actors with slots are handled there
    if not getattr(BasicActorPool.submit, "pipelined", False):
        submit = set(BasicActorPool.submit.__code__.co_names)
        adds = set(BasicActorPool.add_actors_to_pool.__code__.co_names)
        if not ({"pool", "pop", "_future_to_actor"} <= submit
                and {"create_actor_fn", "pool", "num_actors"} <= adds):
            raise _shape_error("Flower's BasicActorPool no longer keeps idle actors in `pool`")
        BasicActorPool.add_actors_to_pool = _add_slots
        BasicActorPool.submit = _submit
        BasicActorPool.terminate_all_actors = _terminate_each_once
    BasicActorPool.fedkd_depth = depth


def _lines(pool: Any) -> dict[int, list[Any]]:
    """Actor (by id) -> its futures in flight, in the order they were submitted."""
    return pool.__dict__.setdefault("fedkd_lines", {})


def _jobs(pool: Any) -> dict[Any, tuple[Any, tuple]]:
    """Future in flight -> how it was submitted (to run it again after a crash)."""
    return pool.__dict__.setdefault("fedkd_jobs", {})


def _add_slots(self: Any, num_actors: int) -> None:
    """`BasicActorPool.add_actors_to_pool` with `pipeline_actors`' depth: each actor in the pool
    that many times, in turns (the first `num_actors` messages go to different actors)."""
    depth = int(getattr(type(self), "fedkd_depth", 1))
    actors = [self.create_actor_fn() for _ in range(num_actors)]
    self.pool.extend(actors * depth)
    self.num_actors += num_actors * depth  # RayBackend.num_workers: one worker thread per slot


def _submit(self: Any, actor_fn: Any, job: tuple) -> Any:
    """`BasicActorPool.submit`, noting each actor's futures in order, and the job."""
    actor = self.pool.pop()
    future = actor_fn(actor, *job)
    self._future_to_actor[future] = actor
    _lines(self).setdefault(id(actor), []).append(future)
    _jobs(self)[future] = (actor_fn, job)
    return future


_submit.pipelined = True  # type: ignore[attr-defined]


def _settle(pool: Any, actor: Any, future: Any) -> None:
    """`future` is done: off its actor's line, its job forgotten."""
    line = _lines(pool).get(id(actor), [])
    if future in line:
        line.remove(future)
    _jobs(pool).pop(future, None)


def _waited_behind(pool: Any, actor: Any, future: Any) -> bool:
    """Whether `future` was not the first of `actor`'s futures in flight when it died (the
    first one ran; the others waited behind it). Settles `future`."""
    died_with = pool.__dict__.get("fedkd_died_with", {}).get(id(actor), [])
    _settle(pool, actor, future)
    return future in died_with and died_with[0] is not future


_REPLACING = threading.Lock()
"""Held while a dead actor is replaced: the threads of its failed messages see one replacement
(two would wait for one CPU, the second forever)."""


def _replace_dead(pool: Any, dead: Any, err: BaseException) -> Any:
    """The fresh actor that replaces `dead` (created at its first failure; its idle slots swapped),
    with the futures that were in flight on it then."""
    import ray

    with _REPLACING:
        replaced = pool.__dict__.setdefault("fedkd_replaced", {})
        if id(dead) in replaced:
            return replaced[id(dead)][1]
        fresh = pool.create_actor_fn()
        replaced[id(dead)] = (dead, fresh)  # `dead` is kept: its id stays its own
        pool.__dict__.setdefault("fedkd_died_with", {})[id(dead)] = list(
            _lines(pool).get(id(dead), []))
        pool.pool[:] = [fresh if actor is dead else actor for actor in pool.pool]
    try:
        ray.kill(dead, no_restart=True)  # gone already, or unreachable: make sure
    except Exception:  # noqa: BLE001 - a dead actor may refuse even this
        pass
    log.warning("a ClientApp worker died (%s); a new one takes its place",
                str(err).splitlines()[0] if str(err) else type(err).__name__)
    return fresh


def _run_again(pool: Any, future: Any, fresh: Any, job: tuple) -> Any:
    """Run the job of `future`, which waited behind a crash, on `fresh`; its slot goes back."""
    import ray

    actor_fn, args = job
    again = actor_fn(fresh, *args)
    _lines(pool).setdefault(id(fresh), []).append(again)
    try:
        _, message, context = ray.get(again)
    except ray.exceptions.RayActorError as err:  # it crashed the fresh actor too
        pool._future_to_actor[future] = _replace_dead(pool, fresh, err)
        raise
    finally:
        _settle(pool, fresh, again)
    pool.add_actor_back_to_pool(future)
    return message, context


def _add_back(self: Any, future: Any) -> None:
    """`BasicActorPool.add_actor_back_to_pool`; an actor replaced meanwhile goes back as its
    replacement."""
    actor = self._future_to_actor.pop(future)
    replaced = self.__dict__.get("fedkd_replaced", {})
    while id(actor) in replaced and replaced[id(actor)][0] is actor:
        actor = replaced[id(actor)][1]
    self.pool.append(actor)


def _terminate_each_once(self: Any) -> None:
    """`BasicActorPool.terminate_all_actors`, once per actor (not once per slot)."""
    seen: set[int] = set()
    for actor in self.pool:
        if id(actor) not in seen:
            seen.add(id(actor))
            actor.terminate.remote()
