"""Every use of Flower's private API in fedkd, in one package gated on the Flower version (1.42.x).

Public Flower API is what Flower documents and exports from ``flwr.app``, ``flwr.serverapp``,
``flwr.serverapp.strategy``, ``flwr.clientapp``, ``flwr.simulation``, and its command-line tools;
the rest (``flwr.supercore``, ``flwr.supernode`` and ``flwr.common`` internals, private attributes,
keyword defaults) may change in any release and is used only here. Every function below first
calls `require_supported_flower`, which raises `UnsupportedFlowerError` (naming the installed and
the supported version) on a Flower other than `SUPPORTED_FLOWER`; plain ``flower-supernode`` and
the public API keep working. Each patch also checks Flower's shape and fails loudly otherwise.

Still private, because Flower 1.42 has no public option for it:

- `cap_supernode_polls`: the SuperNode loop (``flwr.supernode.start_client_internal``) sleeps 3 s
  between idle pulls and 0.5 s between checks for a reply; its ``time`` gets capped sleeps.
- `shorten_pull_backoff`: object pulls (``pull_objects``, ``pull_and_inflate_object_from_tree`` in
  ``flwr.supercore.inflatable.inflatable_utils``) retry a missing object after 1 s (doubling to
  10 s), and a message's objects arrive after its announcement: their keyword default becomes
  0.05 s (Flower's callers all use the default).
- `set_heartbeat_interval`: ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) in ``flwr.supercore.heartbeat``
  and ``flwr.supernode.fleet_http_connection``, the interval a SuperNode announces and keeps.
- `run_flower_supernode`: ``flower-supernode`` (its console-script entry point) run in this
  process, so that the patches above apply to it.
- `parse_node_config`: ``--node-config`` read as ``flower-supernode`` reads it
  (``flwr.common.config.parse_config_args``), so that ``fedkd-supernode`` checks the node config
  before it starts the SuperNode.
- the persistent ClientApp worker (`fedkd.deploy.worker`): `run_worker_superexec` puts
  `ClientAppExecutor` (Flower's executor interface: ``LaunchResult``, ``TaskType``,
  ``ExecutionSpec``, ``SubprocessExecutor``) in place of ``get_executor`` in Flower's SuperExec
  loop (``flwr.supercore.superexec.run_superexec``); `serve_clientapp_task` does what
  ``flwr-clientapp --token`` does (``RuntimeHttpClient`` with its interceptors, retry and TLS
  helpers, ``HeartbeatSender``, ``pull_task_input``/``push_message``/``push_task_output``,
  ``ErrorCode``/``SubStatus``); `ClientAppCache` (``install_from_fab``, ``get_project_dir``,
  ``get_load_client_app_fn``); `watch_parent` (``start_parent_process_monitor``). Flower 1.42's
  ``flwr-clientapp`` serves one token and exits; its SuperExec executors (``subprocess``,
  ``kubernetes``) start a process per task, and its warm pools serve no ClientApp tasks.

- `one_pass_dispatch`: the simulation's dispatcher (``add_messages_to_queue`` in
  ``flwr.server.superlink.fleet.vce.vce_api``) asks the LinkState for each node's next message
  with a scan of every stored message per node (N x M per 0.1 s sweep); it is replaced by one
  pass per `SWEEP_S` sweep that hands out the same messages in the same order. Within the same
  block the engine's queues (``vce_api.Queue``) are `PromptQueue`: Flower's worker and reply
  threads wait on them 1 s at a time between looks at the stop event, which made every
  simulation's end wait up to 1 s.
- `replace_crashed_actors`: the simulation's Ray actor pool (``BasicActorPool`` in
  ``flwr.simulation.ray_transport.ray_actor``, used by ``RayBackend.process_message``) puts an
  actor whose process died back into the pool, where every later message sent to it fails at
  once (and, failing fast and idle first, it takes most of them): a new actor takes its place
  (``fetch_result_and_return_actor_to_pool``, ``add_actor_back_to_pool``).
- `pipeline_actors`: the same pool hands an actor one message at a time, so the actor idles
  while the driver fetches each reply and sends the next; each actor is put in the pool
  `depth` times instead (``add_actors_to_pool``, ``submit``, ``terminate_all_actors``).
- `capture_simulation_nodes`: the simulation engine's node stores (``_register_node_info_stores``
  in ``flwr.server.superlink.fleet.vce.vce_api``, ``DeprecatedRunInfoStore.retrieve_context``),
  where every simulated node's ``Context`` lives: a checkpoint reads each client's
  ``Context.state`` there, and a resumed run puts it back (`SimulationNodes`). ``run_simulation``
  takes no initial contexts and exposes none.

Flower's own settings instead of patches: the SuperExec's task polls
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``); the ServerApp waits for replies through the public Grid
(``push_messages``/``pull_messages``, `fedkd.wire`), not ``send_and_receive``'s 3 s sleeps.
"""

from fedkd.flower_compat.gate import (
    SUPPORTED_FLOWER, UnsupportedFlowerError, _shape_error, require_supported_flower,
)
from fedkd.flower_compat.supernode import (
    PULL_BACKOFF, CappedSleep, cap_supernode_polls, heartbeat_range, parse_node_config,
    run_flower_supernode, set_heartbeat_interval, shorten_pull_backoff,
)
from fedkd.flower_compat.actors import pipeline_actors, replace_crashed_actors
from fedkd.flower_compat.worker import (
    TASK_FIELDS, ClientAppCache, ClientAppExecutor, TaskHandler, preload_clientapp_runtime,
    run_worker_superexec, serve_clientapp_task, watch_parent,
)
from fedkd.flower_compat.engine import (
    STOP_POLL_S, SWEEP_S, VCE_API, PromptQueue, SimulationNodes, _add_messages_to_queue,
    capture_simulation_nodes, first_undelivered, one_pass_dispatch,
)

__all__ = [
    "SUPPORTED_FLOWER",
    "UnsupportedFlowerError",
    "_shape_error",
    "require_supported_flower",
    "PULL_BACKOFF",
    "CappedSleep",
    "cap_supernode_polls",
    "heartbeat_range",
    "parse_node_config",
    "run_flower_supernode",
    "set_heartbeat_interval",
    "shorten_pull_backoff",
    "pipeline_actors",
    "replace_crashed_actors",
    "TASK_FIELDS",
    "ClientAppCache",
    "ClientAppExecutor",
    "TaskHandler",
    "preload_clientapp_runtime",
    "run_worker_superexec",
    "serve_clientapp_task",
    "watch_parent",
    "STOP_POLL_S",
    "SWEEP_S",
    "VCE_API",
    "PromptQueue",
    "SimulationNodes",
    "_add_messages_to_queue",
    "capture_simulation_nodes",
    "first_undelivered",
    "one_pass_dispatch",
]
