"""The server side of a run: prepare it from a resolved config, then let the strategy drive it.

`prepare_run` turns a Hydra config into what a run needs (data on disk, architectures, client
settings). `run_strategy` wraps the Grid in a `WireGrid` and calls the strategy's `start(...)`:
the round loop is Flower's. The app layer builds the ServerApps around it: the simulation
harness with `make_server_app`, `flwr run` with `fedkd.simulations.serverapp.app`.
"""

from __future__ import annotations

import importlib.resources
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import hydra.utils
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedkd.checks import check_privacy, check_run, codec_spec
from fedkd.compact import brief
from fedkd.dpsgd import dp_archs
from fedkd.settings import ClientSettings
from fedkd.data import DataInfo, prepare_data
from fedkd.models import assign_models, assign_roles, build_model, model_cost, resolve_model
from fedkd.reply_guard import ReplyGuard
from fedkd.strategies.checkpointed import CheckpointPlan, Checkpointed
from fedkd.wire import ReplyObserver, WireGrid
from fedkd.wire_codec import WireCodec

log = logging.getLogger(__name__)

CONF_DIR = Path(str(importlib.resources.files("fedkd.conf")))
"""fedkd's Hydra configs (the package ``fedkd.conf``: ``conf/`` in the repository)."""

ServerMetricSink = Callable[[int, Mapping[str, float]], None]


@dataclass
class PreparedRun:
    """A resolved config plus what was derived from it once, on the server."""

    cfg: DictConfig
    data: DataInfo
    settings: ClientSettings
    param_counts: dict[str, int]

    @property
    def archs(self) -> list[str]:
        """Architecture name per partition id."""
        return list(self.settings.assignment)


def prepare_run(cfg: DictConfig) -> PreparedRun:
    """Check every value of `cfg` (`fedkd.checks.check_run`), then prepare the data, assign
    architectures and build the client settings of a run."""
    train = check_run(cfg)
    dp = check_privacy(cfg, train)  # privacy=dpsgd (None otherwise)
    if cfg.dataset.get("on_nodes", False):  # deployment: nodes hold the data, we the public set
        data, node_data = prepare_public_set(cfg)
    else:
        data, node_data = prepare_data(
            OmegaConf.to_container(cfg.dataset, resolve=True),
            OmegaConf.to_container(cfg.partition.partitioner, resolve=True),
            num_clients=int(cfg.num_clients),
            partition_seed=int(cfg.partition_seed),
            cache_root=str(cfg.simulation.cache_dir),
        ), {}
    model_cfg = resolve_model(OmegaConf.to_container(cfg.model, resolve=True),  # auto: by input
                              data.input_shape, data.num_classes)
    homogeneous = bool(cfg.strategy.get("homogeneous", False))
    assignment = assign_models(model_cfg, int(cfg.num_clients), homogeneous=homogeneous)
    archs = {name: dict(spec) for name, spec in assignment}
    if cfg.dataset.get("on_nodes", False):  # a node may choose any catalogued arch (node config)
        archs = {name: dict(spec) for name, spec in model_cfg["archs"].items()}
    archs = dp_archs(dp, archs)  # DP-SGD: BatchNorm -> GroupNorm wherever an arch is built
    counts = {}
    for name, spec in archs.items():
        model = build_model(spec, tuple(data.input_shape), data.num_classes)
        counts[name], flops = model_cost(model, data.input_shape)
        users = [i for i, (n, _) in enumerate(assignment) if n == name]
        log.info("architecture %s: %s parameters, %s FLOPs/example, clients %s", name,
                 f"{counts[name]:,}", f"{flops:,}", brief(users))
    roles = assign_roles(model_cfg, int(cfg.num_clients))
    if "teacher" in roles:
        log.info("teachers (never taught): clients %s",
                 brief([i for i, r in enumerate(roles) if r == "teacher"]))
    settings = ClientSettings(
        data={**data.to_dict(), **node_data}, archs=archs,
        assignment=[name for name, _ in assignment], train=train, seed=int(cfg.seed),
        num_rounds=int(cfg.num_rounds), roles=roles, dpsgd=dp,
    )
    return PreparedRun(cfg=cfg, data=data, settings=settings, param_counts=counts)


def prepare_public_set(cfg: DictConfig) -> tuple[DataInfo, dict[str, Any]]:
    """Deployment (``dataset=nodes``): the public set alone; each node reads its own files.

    ``dataset.public`` is a file, or an embedded name cut as ``dataset=<name>`` cuts it in
    simulation (same ``partition_seed``). Returns the DataInfo and what nodes need to rebuild
    and normalise the same public set.
    """
    from fedkd.data.public import embedded_recipe, is_embedded, prepare_public

    public = str(cfg.dataset.public)
    recipe = None
    if is_embedded(public):
        named = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "dataset" / f"{public}.yaml"))
        recipe = embedded_recipe(public, named, int(cfg.partition_seed))
    return prepare_public(public, str(cfg.dataset.normalize), cfg.dataset.num_classes,
                          str(cfg.simulation.cache_dir), recipe)


def initial_arrays(run: PreparedRun) -> ArrayRecord:
    """Global initial weights for parameter-exchange strategies (one architecture), else empty."""
    if not run.cfg.strategy.get("homogeneous", False):
        return ArrayRecord()
    name, spec = run.settings.arch_of(0)
    torch.manual_seed(run.settings.seed)
    model = build_model(spec, tuple(run.data.input_shape), run.data.num_classes)
    return ArrayRecord(model.state_dict())


def run_strategy(
    grid: Grid,
    run: PreparedRun,
    observers: list[ReplyObserver],
    on_server_metrics: ServerMetricSink | None = None,
    out_dir: Path | None = None,
    checkpoints: CheckpointPlan | None = None,
    on_result: Callable[[Any], None] | None = None,
    engine_partitions: Callable[[], dict[int, int]] | None = None,
) -> WireGrid:
    """Instantiate the configured strategy and run all rounds on `grid`; return the wire.

    Every reply is checked (`fedkd.reply_guard.ReplyGuard`) before the wire sorts it, `observers`
    see it or the strategy reads it. `observers` see every wave on the wire; `on_server_metrics` receives what a strategy computes
    on the server each round (e.g. the privacy spent by a noisy aggregator), if it reports any;
    `out_dir` is where the strategy may keep artefacts (a generator's checkpoints and samples).
    With `checkpoints` the strategy runs under `Checkpointed`: the run checkpoints every
    ``checkpoints.every`` rounds (the reply guard's bindings and what the wire knows each node
    holds too) and resumes from
    ``checkpoints.resume``. `on_result` gets what ``strategy.start`` returns (Flower's `Result`:
    the final arrays) once the last round is over. `engine_partitions` (simulation: node id ->
    partition id as the engine assigned them) spares the strategy its ``query.whoami`` wave.
    """
    cfg = run.cfg
    torch.set_num_threads(1)  # server maths (FedDF, generators): the same numbers on any machine
    guard = ReplyGuard(run.settings, connected=grid.get_node_ids)
    codec = WireCodec.of(codec_spec(cfg), int(run.settings.data["num_classes"]))
    wire = WireGrid(grid, poll_interval=float(cfg.simulation.poll_interval), check=guard,
                    codec=codec)
    log.info("wire: %s wrapped in WireGrid (poll every %.3f s, round timeout %.0f s)",
             type(grid).__name__, wire.poll_interval, float(cfg.simulation.round_timeout))
    wire.observers.extend(observers)
    strategy = hydra.utils.instantiate(cfg.strategy.flower)
    if on_server_metrics is not None and hasattr(strategy, "server_metric_sinks"):
        strategy.server_metric_sinks.append(on_server_metrics)
    if out_dir is not None and hasattr(strategy, "set_output_dir"):
        strategy.set_output_dir(out_dir)
    if hasattr(strategy, "bind"):  # fedkd's strategies learn the run from the typed settings
        strategy.bind(run.settings)
    if engine_partitions is not None and hasattr(strategy, "engine_partitions"):
        strategy.engine_partitions = engine_partitions
    if checkpoints is not None:
        strategy = Checkpointed(strategy, replace(
            checkpoints, parts={**checkpoints.parts, "reply-guard": guard, "wire": wire.held}))
    random.seed(int(cfg.seed))  # Flower's own strategies sample nodes with the global RNG
    result = strategy.start(
        grid=wire,
        initial_arrays=initial_arrays(run),
        num_rounds=int(cfg.num_rounds),
        timeout=float(cfg.simulation.round_timeout),
        train_config=ConfigRecord(run.settings.to_config()),
        evaluate_config=ConfigRecord(run.settings.to_config()),
    )
    if on_result is not None:
        on_result(result)
    return wire


def make_server_app(
    run: PreparedRun, observers: list[ReplyObserver], on_server_metrics: ServerMetricSink | None = None,
    out_dir: Path | None = None, checkpoints: CheckpointPlan | None = None,
    on_result: Callable[[Any], None] | None = None,
    engine_partitions: Callable[[], dict[int, int]] | None = None,
) -> ServerApp:
    """A ServerApp that runs the prepared run and reports every reply to `observers` (the
    other arguments: `run_strategy`'s)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001
        run_strategy(grid, run, observers, on_server_metrics, out_dir, checkpoints, on_result,
                     engine_partitions)

    return app


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose fedkd's Hydra config from `conf/` with command-line style overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))



def describe(run: PreparedRun) -> dict[str, Any]:
    """Facts about a run for its summary.

    With ``dataset=nodes`` the nodes bring their own data: no partition was made here, so
    ``partition`` is ``on-nodes`` and ``partition_seed`` is None (as ``partition_hash``).
    """
    on_nodes = bool(run.cfg.dataset.get("on_nodes", False))
    return {
        "partition": "on-nodes" if on_nodes else str(run.cfg.partition.name),
        "partition_seed": None if on_nodes else int(run.cfg.partition_seed),
        "partition_hash": run.data.partition_hash,
        "public_fingerprint": run.data.public_fingerprint,
        "param_counts": run.param_counts,
        "archs": run.archs,
        "roles": list(run.settings.roles),
    }
