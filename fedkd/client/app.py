"""The fedkd ClientApp (Flower Message API).

Handlers
- ``train.distill``: one fused KD round: digest the soft targets, revisit the private data,
  answer with logits on the next transfer batch, evaluate when due.
- ``query``: logits on inputs a black-box generator proposes (and seeded perturbations of them);
  nothing is trained or kept.
- ``train`` / ``evaluate``: parameter exchange for Flower's own strategies (FedAvg baseline).
Only logits, weights (for parameter strategies) and metrics leave the client.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.client.fd import fd_round
from fedkd.client.data import ClientData, client_data, partition_id_of
from fedkd.client.node import node_settings
from fedkd.client.report import report_mod
from fedkd.client.settings import ClientSettings
from fedkd.client.state import Student
from fedkd.client.work import digest, evaluate, predict_logits, revisit, round_generator
from fedkd.losses import distill_loss
from fedkd.protocol import (
    CONFIG, LOGITS, METRICS, NEXT, QUERY, TARGETS, TRANSFER, expand_query, rows_from,
)

app = ClientApp(mods=[report_mod])  # deployed nodes report arch, role, compute time
app.train("fd")(fd_round)  # FD / FedDistill: per-class mean logits (fedkd.client.fd)


def _round_of(msg: Message) -> int:
    return int(msg.content[CONFIG].get("server-round", 0))


def _open(msg: Message, context: Context) -> tuple[ClientSettings, int, ClientData, Student]:
    """What every handler starts with: settings, partition id, data, the restored student."""
    torch.set_num_threads(1)
    settings = node_settings(ClientSettings.from_config(msg.content[CONFIG]), context)
    pid = partition_id_of(context)
    data = client_data(context, settings)
    return settings, pid, data, Student.restore(context, settings, pid)


def _eval_due(settings: ClientSettings, server_round: int) -> bool:
    every = settings.train.eval_every
    return server_round % every == 0 or server_round >= settings.num_rounds


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    """One fused KD round."""
    settings, pid, data, student = _open(msg, context)
    train = settings.train
    server_round = _round_of(msg)
    gen = round_generator(settings.seed, pid, server_round)
    transfer = msg.content.array_records.get(TRANSFER, ArrayRecord())
    metrics: dict[str, float | int] = {"partition-id": pid, "num-examples": len(data.x)}

    target_x = rows_from(transfer, TARGETS, data.public_x)
    if target_x is not None and settings.role_of(pid) == "student":  # teachers are never taught
        soft = torch.from_numpy(transfer[f"{TARGETS}.probs"].numpy().astype("float32"))
        if soft.shape != (len(target_x), int(settings.data["num_classes"])):
            raise ValueError(f"soft targets have shape {tuple(soft.shape)}, inputs {len(target_x)}")
        metrics["digest-loss"] = digest(
            student.model, student.optimizer, target_x, soft, data.x, data.y,
            loss=distill_loss(train.alpha, train.temperature), epochs=train.digest_epochs,
            batch_size=train.batch_size, gen=gen,
        )
    metrics["train-loss"] = revisit(
        student.model, student.optimizer, data.x, data.y, batch_size=train.batch_size, gen=gen,
        **train.local_budget(first_round=student.rounds_done == 0),
    )
    student.rounds_done += 1

    content = RecordDict()
    next_x = rows_from(transfer, NEXT, data.public_x)
    if next_x is not None:
        content[LOGITS] = ArrayRecord({LOGITS: Array(predict_logits(student.model, next_x))})
    if _eval_due(settings, server_round):
        metrics["test-accuracy"], metrics["test-loss"] = evaluate(
            student.model, data.test_x, data.test_y
        )
    student.save(context)
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Logits of the current student on the queried inputs and their perturbations."""
    settings, pid, data, student = _open(msg, context)
    config = msg.content[CONFIG]
    inputs = rows_from(msg.content[QUERY], QUERY, data.public_x)
    if inputs is None:
        raise ValueError(f"a query carries no {QUERY}.inputs")
    expanded = expand_query(inputs.numpy(), int(config["query-seed"]),
                            int(config["query-directions"]), float(config["query-mu"]))
    logits = predict_logits(student.model, torch.from_numpy(expanded))
    content = RecordDict({
        LOGITS: ArrayRecord({LOGITS: Array(logits)}),
        METRICS: MetricRecord({"partition-id": pid, "num-examples": len(data.x)}),
    })
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parameter exchange: load the global weights (if any came), train, send them back.

    Without weights in the message (FedDF's first round) the client trains its own model from its
    warm-up budget; with them, the weights replace its model and the optimizer starts afresh.
    """
    settings, pid, data, student = _open(msg, context)
    arrays = msg.content.array_records.get("arrays")
    if arrays:
        student.model.load_state_dict(arrays.to_torch_state_dict())
        student.reset_optimizer(settings)
    budget = settings.train.local_budget(first_round=not arrays and student.rounds_done == 0)
    loss = revisit(
        student.model, student.optimizer, data.x, data.y, batch_size=settings.train.batch_size,
        gen=round_generator(settings.seed, pid, _round_of(msg)), **budget,
    )
    student.rounds_done += 1
    student.save(context)
    content = RecordDict({
        "arrays": ArrayRecord(student.model.state_dict()),
        METRICS: MetricRecord({"partition-id": pid, "num-examples": len(data.x), "train-loss": loss}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on the common test set."""
    _, pid, data, student = _open(msg, context)
    student.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    acc, loss = evaluate(student.model, data.test_x, data.test_y)
    metrics = {"partition-id": pid, "num-examples": len(data.test_y), "test-accuracy": acc,
               "test-loss": loss}
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
