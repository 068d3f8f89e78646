"""`fedkd-audit <run dir>`, and ``audit=true`` on a run: the membership-inference audit.

The attack and its numbers are `fedkd.audit` (Yeom et al.'s loss threshold; AUC, TPR at 1%
FPR). Here: what a run keeps for it, and what is attacked.

- At the end of a simulation, ``students.pt`` keeps every client's final student (the
  ``state_dict`` in its ``Context.state``) and, for a parameter-exchange strategy (FedAvg), the
  final global model: tensors and plain values only, read back with ``weights_only=True``
  (`save_final_models`).
- Targets: each client's student (``student``), and the final global model (``global``) where
  one crossed the wire, attacked on every client's rows. Members are a client's private rows,
  non-members the test split's rows, matched class by class (as many of each); the test rows
  left over calibrate the attack's threshold.
- ``audit.json`` in the run folder holds every number; ``summary.json`` gets the ``audit_*``
  keys that `fedkd-compare` shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from fedkd.atomic import save_atomic
from fedkd.audit import DEFAULT_FPR, AttackResult, audit_model, summarise
from fedkd.data import load_client, load_test
from fedkd.errors import ConfigError, error_line, require_int, require_number
from fedkd.models import build_model
from fedkd.server import PreparedRun, prepare_run
from fedkd.simulations.summary_maths import write_text

log = logging.getLogger(__name__)

STUDENTS = "students.pt"
"""The final models of a run, in its folder."""
AUDIT = "audit.json"
"""The audit's results, in the run folder."""
FORMAT = 1
ATTACK = "loss threshold (Yeom et al. 2018), -cross-entropy of the true label"
WIRE = {  # what an attacker on the wire can query, by what a strategy sends
    "weights": "weights: a client's last upload is its student (target `student`); the final "
               "global model went to every client (target `global`)",
    "logits": "logits on public transfer rows only: no private row is ever queried, and the "
              "logits are the student's outputs (post-processing), so the `student` target "
              "bounds what they leak about membership",
    "class-means": "per-class mean logits over the private rows (FD): aggregates of members; "
                   "the `student` target bounds them",
    "queries": "the server queries each student on inputs it chooses (black-box generator): "
               "the same access as the `student` target",
    "nothing": "metrics only (local training): the `student` target is the released model, if "
               "a client releases it",
}


class AuditError(ConfigError):
    """A run folder the audit cannot read (no students saved, other data)."""


# --- what a run keeps ---------------------------------------------------------------------
def save_final_models(out_dir: Path, run: PreparedRun, states: Mapping[int, Any] | None,
                      result: Any = None) -> Path | None:
    """Write ``students.pt``: each client's final student from its ``Context.state`` (`states`,
    partition id -> RecordDict) and the final global model of a homogeneous strategy (the
    ArrayRecord of Flower's `Result`). Returns the file, or None when there was nothing."""
    from fedkd.client.state import STUDENT

    students = {int(p): {"arch": run.settings.arch_of(int(p))[0],
                         "state": dict(s[STUDENT].to_torch_state_dict())}
                for p, s in (states or {}).items() if STUDENT in s}
    arrays = getattr(result, "arrays", None)
    glob = None
    if run.cfg.strategy.get("homogeneous", False) and arrays is not None and len(arrays):
        glob = {"arch": run.settings.arch_of(0)[0], "state": dict(arrays.to_torch_state_dict())}
    if not students and glob is None:
        return None
    path = Path(out_dir) / STUDENTS
    save_atomic({"format": FORMAT, "partition_hash": run.data.partition_hash,
                 "students": students, "global": glob}, path)
    log.info("final models: %d students%s -> %s", len(students),
             " and the global model" if glob else "", path)
    return path


def final_models_saver(out_dir: Path, run: PreparedRun, states: Any) -> Any:
    """A callback for `fedkd.server.run_strategy`'s `on_result`: `save_final_models` with the
    clients' states (`states()`) once the last round is over; a failure is logged, never raised
    (the run's results matter more)."""
    def save(result: Any) -> None:
        try:
            save_final_models(out_dir, run, states(), result)
        except Exception:  # noqa: BLE001 - the run's own results come first
            log.exception("the final models were not saved (no audit possible)")
    return save


def load_final_models(run_dir: Path) -> dict[str, Any]:
    """``students.pt`` of a run folder (tensors and plain values only)."""
    path = Path(run_dir) / STUDENTS
    if not path.is_file():
        raise AuditError(f"{run_dir} has no {STUDENTS}: the run saved no final models (runs "
                         "under the simulation engine save them; the pooled baseline has none)")
    saved = torch.load(path, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise AuditError(f"{path} is not a fedkd {STUDENTS} of format {FORMAT}")
    return saved


# --- the audit ----------------------------------------------------------------------------
def wire_kind(cfg: Any) -> str:
    """What crossed the wire that an attacker could query (a key of `WIRE`)."""
    name = str(cfg.strategy.name)
    if cfg.strategy.get("homogeneous", False) or name == "feddf":
        return "weights"
    if name == "local":
        return "nothing"
    if name == "fd":
        return "class-means"
    transfer = str(OmegaConf.select(cfg, "transfer._target_", default="") or "")
    return "queries" if transfer.endswith("BlackBoxGenerator") else "logits"


def _model(run: PreparedRun, entry: Mapping[str, Any]) -> torch.nn.Module:
    spec = run.settings.archs[str(entry["arch"])]
    model = build_model(spec, tuple(run.data.input_shape), run.data.num_classes)
    model.load_state_dict(entry["state"])
    return model


def audit_run(run_dir: str | Path, seed: int = 0, limit: int | None = None,
              fpr: float = DEFAULT_FPR) -> dict[str, Any]:
    """Attack every target of the run in `run_dir`; write ``audit.json`` and the ``audit_*``
    keys of ``summary.json``; return the audit.

    Parameters
    ----------
    run_dir
        A run folder (``config.yaml``, ``students.pt``).
    seed
        Seeds the choice of matched rows (client ``i`` draws with ``seed + i``).
    limit
        At most this many members (and as many non-members) per client; None: all matched.
    fpr
        The false-positive rate of the reported TPR and of the calibrated threshold.

    Raises
    ------
    AuditError
        No config or final models, or data other than the run's (partition hash).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise AuditError(f"{run_dir} is no run folder (no config.yaml)")
    saved = load_final_models(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if cfg.dataset.get("on_nodes", False):
        raise AuditError("the nodes hold the private rows (dataset=nodes): audit on each node")
    run = prepare_run(cfg)  # the run's data: from its cache, or cut again the same way
    if run.data.partition_hash != saved["partition_hash"]:
        raise AuditError(f"the data prepared now (partition {run.data.partition_hash}) is not the "
                         f"run's ({saved['partition_hash']})")
    pool = load_test(run.data.cache_dir)
    members = {int(p): load_client(run.data.cache_dir, int(p)) for p in saved["students"]}
    targets: dict[str, dict[int, AttackResult]] = {"student": {}}
    for p, entry in sorted(saved["students"].items()):
        targets["student"][int(p)] = audit_model(_model(run, entry), members[int(p)], pool,
                                                 seed + int(p), limit, fpr)
    if saved.get("global") is not None:
        model = _model(run, saved["global"])
        targets["global"] = {p: audit_model(model, rows, pool, seed + p, limit, fpr)
                             for p, rows in sorted(members.items())}
    audit = {
        "attack": ATTACK, "fpr": fpr, "seed": seed, "limit": limit,
        "members": "each client's private rows, matched by class with the non-members",
        "nonmembers": "rows of the test split (never trained on), as many as the members",
        "partition_hash": saved["partition_hash"], "wire": WIRE[wire_kind(cfg)],
        "targets": {name: {"by_client": {str(p): r.to_dict() for p, r in results.items()},
                           **summarise(results)} for name, results in targets.items()},
    }
    write_text(json.dumps(audit, indent=2), run_dir / AUDIT)
    _update_summary(run_dir, summary_keys(audit))
    for name, numbers in audit["targets"].items():
        log.info("audit %s: AUC mean %.3f | TPR@%g%%FPR mean %.3f | %d clients", name,
                 numbers["auc_mean"], 100 * fpr, numbers["tpr_at_fpr_mean"],
                 len(numbers["by_client"]))
    return audit


def summary_keys(audit: Mapping[str, Any]) -> dict[str, Any]:
    """The ``audit_*`` keys of ``summary.json``: the students' means and per-client values, the
    global model's means where there is one."""
    student = audit["targets"]["student"]
    keys: dict[str, Any] = {
        "audit_fpr": audit["fpr"], "audit_error": None,
        "audit_auc_mean": student["auc_mean"], "audit_tpr_at_fpr_mean": student["tpr_at_fpr_mean"],
        "audit_advantage_mean": student["advantage_mean"],
        "audit_auc_by_client": {c: r["auc"] for c, r in student["by_client"].items()},
        "audit_tpr_at_fpr_by_client": {c: r["tpr_at_fpr"] for c, r in student["by_client"].items()},
    }
    if "global" in audit["targets"]:
        keys["audit_global_auc_mean"] = audit["targets"]["global"]["auc_mean"]
        keys["audit_global_tpr_at_fpr_mean"] = audit["targets"]["global"]["tpr_at_fpr_mean"]
    return keys


def _update_summary(run_dir: Path, keys: Mapping[str, Any]) -> dict[str, Any]:
    file = run_dir / "summary.json"
    summary = json.loads(file.read_text()) if file.is_file() else {}
    summary.update(keys)
    write_text(json.dumps(summary, indent=2), file)
    return summary


def audit_after_run(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``audit=true``: audit the finished run; a failure is logged and recorded as
    ``audit_error`` in ``summary.json``, never raised (the run's results stay as they are)."""
    try:
        audit_run(run_dir)
    except Exception as err:  # noqa: BLE001 - the run's results must survive its audit
        reason = error_line(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
        log.error("the membership-inference audit failed: %s", reason)
        return {**summary, **_update_summary(run_dir, {"audit_error": reason})}
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """`fedkd-audit RUN_DIR`: exit 0, or 2 with one line when the folder cannot be audited."""
    parser = argparse.ArgumentParser(prog="fedkd-audit", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (config.yaml, students.pt)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the matched rows")
    parser.add_argument("--limit", type=int, default=None, help="members per client at most")
    parser.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="false-positive rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    try:
        require_number("--fpr", args.fpr, 0.0, 1.0, high_open=True)
        require_int("--limit", args.limit, 1, null=True)
        require_int("--seed", args.seed, 0)
        audit = audit_run(args.run_dir, args.seed, args.limit, args.fpr)
    except ConfigError as err:
        log.error("%s", error_line(err))
        return 2
    for name, numbers in audit["targets"].items():
        for client, r in numbers["by_client"].items():
            log.info("%s %s: AUC %.3f TPR@FPR<=%g %.3f (%d members)", name, client, r["auc"],
                     args.fpr, r["tpr_at_fpr"], r["members"])
    log.info("wrote %s", Path(args.run_dir) / AUDIT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
