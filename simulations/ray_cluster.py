"""Ray for the simulation: started on this machine, or an existing cluster (docs/scale.md).

`init_ray` starts Ray as Flower's RayBackend would. With ``simulation.ray_init.address`` it
connects to a running cluster (``ray start``) instead. Before anything starts, `check_cluster_config` refuses
what ``ray.init`` refuses with an address (``num_cpus`` and the like: the nodes declare their
own) and an address where no cluster answers; ``auto`` is resolved as Ray documents it
(``RAY_ADDRESS``, else the last ``ray start`` on this machine) but never to some other Ray
instance that happens to run here. Once connected, `attach` checks that the clients' resources
fit the cluster's nodes (as Flower counts them: per node) and ships the prepared data through
Ray's object store (`fedkd.data.ship`), so no node needs the driver's disk.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from fedkd.errors import ConfigError, is_number

log = logging.getLogger("fedkd.simulations.launch")

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Ray's per-task event records (its task timeline, ``ray list tasks``, the dashboard's task
    # view): a simulation sends hundreds of tasks a round, and recording them cost the driver
    # about 0.5 CPU s in a 35 s run of 1,000 clients. Set it in the environment to have them.
    "RAY_task_events_report_interval_ms": "0",
}

LOCAL_ENV = {
    # Replies up to this size (a client's Context comes back with every reply: its student and
    # optimizer state, 600 KB for MNIST's MLP) travel inline with the task's answer instead of
    # through the object store (Ray: 100 KB). At 1,000 clients that cut a 33.7 s run to 29.9 s:
    # less raylet, driver and worker CPU per message. Only when Ray starts here: a cluster
    # keeps its own settings.
    "RAY_max_direct_call_object_size": str(4 * 2**20),
}
"""Environment of a Ray started by fedkd (set unless already set)."""

KEY = "simulation.ray_init.address"
LOCAL = (None, "", "local")
"""Addresses that mean: start Ray on this machine."""
NODE_OWNED = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory",
              "_system_config")
"""`ray.init` options a cluster's nodes set themselves (``ray start``): ``ray.init`` refuses
them with an address."""
START_ONLY = ("include_dashboard",)
"""`ray.init` options that only apply when Ray starts here: dropped with an address."""
REACH_TIMEOUT_S = 3.0  # how long the check waits for a cluster to accept a connection


def backend_config(sim: Any) -> dict[str, Any]:
    """Ray backend settings from the `simulation` config group."""
    init_args = {k: v for k, v in OmegaConf.to_container(sim.ray_init, resolve=True).items()
                 if v is not None}
    return {
        "client_resources": OmegaConf.to_container(sim.client_resources, resolve=True),
        "init_args": init_args,
    }


def init_ray(init_args: dict[str, Any]) -> None:
    """Start Ray as Flower's RayBackend would (it skips ``ray.init`` when Ray is up), or
    connect to the cluster at ``init_args["address"]``.

    Workers get the driver's ``sys.path`` as ``PYTHONPATH`` and `QUIET_ENV`: started here, by
    inheriting this process's environment (a job ``runtime_env`` would make Ray start fresh
    workers for the actors instead of using the ones it prestarts: 1 to 2 s); on a cluster, on
    every node through the job's runtime environment, a node's own environment
    (``FEDKD_NODE_CACHE_DIR``) staying as ``ray start`` found it.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)  # Ray workers get the driver's sys.path
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env = {"PYTHONPATH": pythonpath, **{k: os.environ[k] for k in QUIET_ENV if k in os.environ}}
    if cluster_address(init_args) is None:  # its processes inherit this environment
        os.environ.update(env)  # no job runtime_env: Ray's prestarted workers stay usable
        for key, value in LOCAL_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(**{"include_dashboard": False, **init_args})
        return
    args = connect_args(init_args)
    log.info("connecting to the Ray cluster at %s", args["address"])
    ray.init(runtime_env={"env_vars": env}, **args)


def cluster_address(init: Mapping[str, Any]) -> str | None:
    """The configured cluster address (`simulation.ray_init`), or None: start Ray here."""
    address = init.get("address")
    return None if address in LOCAL else str(address)


def check_cluster_config(init: Mapping[str, Any], resources: Mapping[str, Any]) -> str:
    """Check `simulation.ray_init` and `simulation.client_resources` for a cluster run; return
    the address to connect to (``auto`` resolved). The resources are checked against the
    cluster's nodes once connected (`attach`)."""
    address = str(init["address"])
    for key in NODE_OWNED:
        if init.get(key) is not None:
            raise ConfigError(f"simulation.ray_init.{key}", init[key],
                              f"must be null with {KEY}: a cluster's nodes declare their own "
                              f"(`ray start --num-cpus/--num-gpus`)")
    num_cpus, num_gpus = resources.get("num_cpus"), resources.get("num_gpus", 0.0)
    if not (is_number(num_cpus) and num_cpus > 0):
        raise ConfigError("simulation.client_resources.num_cpus", num_cpus,
                          "must be a number > 0 (and fit one node of the cluster)")
    if not (is_number(num_gpus) and num_gpus >= 0):
        raise ConfigError("simulation.client_resources.num_gpus", num_gpus,
                          "must be a number >= 0 (and fit one node of the cluster)")
    resolved = resolve_address(address)
    check_reachable(address, resolved)
    return resolved


def resolve_address(address: str) -> str:
    """``auto``: ``RAY_ADDRESS``, else the cluster the last ``ray start`` on this machine
    started (Ray's own record); anything else as given."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address
    except ImportError:  # Ray moved it: let ray.init resolve it
        return address
    found = read_ray_address()
    if not found:
        raise ConfigError(KEY, address, "found no Ray cluster: RAY_ADDRESS is unset and no "
                          "`ray start --head` ran on this machine (docs/scale.md); give "
                          "host:port, or null to start Ray here")
    return found


def check_reachable(address: str, resolved: str) -> None:
    """Refuse an address where nothing accepts a connection (``host:port``, ``ray://...``)."""
    if resolved == "auto" or ("://" in resolved and not resolved.startswith("ray://")):
        return  # left to ray.init
    host, _, port = resolved.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(KEY, address, "must be auto, host:port or ray://host:port (or null: "
                          "start Ray on this machine)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        where = "" if resolved == address else f" (resolved to {resolved})"
        raise ConfigError(KEY, address, f"no Ray cluster answers at {host}:{port}{where}: "
                          f"{err.strerror or err}; start one with `ray start --head` "
                          f"(docs/scale.md), or null to start Ray here") from None


def connect_args(init_args: Mapping[str, Any]) -> dict[str, Any]:
    """`ray.init` arguments for a cluster: the address resolved, start-only options dropped."""
    args = {k: v for k, v in init_args.items() if k not in START_ONLY}
    args["address"] = resolve_address(str(args["address"]))
    return args


def actors_on(node: Mapping[str, float], resources: Mapping[str, float]) -> int:
    """How many clients Flower runs at once on a node with `node` resources (as Flower counts)."""
    actors = int(node.get("CPU", 0) / resources["num_cpus"])
    if resources.get("num_gpus", 0) > 0:
        gpus = node.get("GPU", 0)
        actors = min(actors, int(gpus / resources["num_gpus"])) if gpus else 0
    return actors


def check_cluster(resources: Mapping[str, float], address: str) -> int:
    """The clients Flower will run at once on the connected cluster; `ConfigError` if none fit
    a node (Flower would stop, and the server would wait out the round timeout)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    fits = [actors_on(node, resources) for node in nodes]
    cpus = [node.get("CPU", 0) for node in nodes]
    gpus = [node.get("GPU", 0) for node in nodes]
    log.info("Ray cluster at %s: %d node(s), CPUs %s, GPUs %s: %d client(s) at once",
             address, len(nodes), cpus, gpus, sum(fits))
    if sum(fits) == 0:
        cpu_fits = any(c >= resources["num_cpus"] for c in cpus)
        key = "num_gpus" if cpu_fits else "num_cpus"
        raise ConfigError(f"simulation.client_resources.{key}", resources.get(key, 0.0),
                          f"must fit one node of the Ray cluster at {address} (its nodes: "
                          f"CPUs {cpus}, GPUs {gpus})")
    return sum(fits)


def attach(run: Any, config: Mapping[str, Any]) -> Any:
    """On a cluster (connected): check the resources and ship the prepared data. Returns the
    handle to keep while the simulation runs (None on a local run)."""
    address = config["init_args"].get("address")
    if address in LOCAL:
        return None
    check_cluster(config["client_resources"], str(address))
    if run.cfg.dataset.get("on_nodes", False):
        return None  # the nodes hold their own data
    from fedkd.data.ship import publish

    return publish(run.data.cache_dir)
