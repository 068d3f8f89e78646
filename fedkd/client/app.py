"""The fedkd ClientApp (Flower Message API).

Handlers
- ``train.distill``: one fused KD round: digest the soft targets, revisit the private data,
  answer with logits on the next transfer batch, evaluate when due.
- ``query``: logits on inputs a black-box generator proposes (and seeded perturbations of them);
  nothing is trained or kept.
- ``query.whoami``: the node's partition id, nothing else (the server samples partition ids).
- ``train`` / ``evaluate``: parameter exchange for Flower's own strategies (FedAvg baseline).
Only logits, weights (for parameter strategies) and metrics leave the client.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.client.data import partition_id_of, transfer_inputs
from fedkd.client.dp_round import distill_plan, open_private, train_plan
from fedkd.client.fd import fd_round
from fedkd.client.report import report_mod
from fedkd.client.wire_mod import wire_mod
from fedkd.client.round import open_round, round_of, test_metrics
from fedkd.client.knowledge import knowledge_reply, round_knowledge
from fedkd.losses import build_losses
from fedkd.losses.rounds import revisit_losses
from fedkd.protocol import (
    ARRAYS, CLASS_COUNTS, CONFIG, DIGEST_LOSS, KNOWLEDGE, LOGITS, METRICS, NEXT, NUM_EXAMPLES, PARTITION_ID, QUERY,
    QUERY_DIRECTIONS, QUERY_MU, QUERY_SEED, TARGETS, TRAIN_LOSS,
    TRANSFER, WHOAMI_ACTION, expand_query,
)
from fedkd.records import finite_state, rows_from, soft_targets
from fedkd.timing import PhaseTimer
from fedkd.training import digest, label_counts, predict_logits, revisit, round_generator

# wire_mod: restores what the server left out (held settings and rows), decodes and encodes;
# report_mod: deployed nodes report arch, role, compute time
app = ClientApp(mods=[wire_mod, report_mod])
app.train("fd")(fd_round)  # FD / FedDistill: per-class mean logits (fedkd.client.fd)


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    """One fused KD round (under DP-SGD with ``privacy=dpsgd``: `fedkd.client.dp_round`)."""
    timer = PhaseTimer()
    with timer("restore"):
        settings, pid, data, student = open_round(msg, context)
    train = settings.train
    server_round = round_of(msg)
    gen = round_generator(settings.seed, pid, server_round)
    transfer = msg.content.array_records.get(TRANSFER, ArrayRecord())
    metrics: dict[str, float | int] = {PARTITION_ID: pid, NUM_EXAMPLES: len(data.x)}

    target_x = transfer_inputs(transfer, TARGETS, data)
    next_x = transfer_inputs(transfer, NEXT, data)
    first = student.rounds_done == 0
    taught = settings.role_of(pid) == "student"  # teachers are never taught
    rows = next_x if next_x is not None else target_x  # the transfer rows a round digests
    private = open_private(settings, student, len(data.x), pid, server_round, lambda: distill_plan(
        train, len(data.x), first, digests=target_x is not None and taught,
        transfer_rows=len(rows) if rows is not None and taught else 0))
    digesting = target_x is not None and taught
    loss = build_losses(train.losses, alpha=train.alpha, temperature=train.temperature)
    extras = revisit_losses(train.losses, train.temperature)  # None: plain CE
    knowledge = round_knowledge(settings, pid, student.model, transfer,
                                len(target_x) if target_x is not None else 0, data.x,
                                not first, [loss if digesting else None, extras])
    if digesting:
        with timer("digest"):
            soft = torch.from_numpy(
                soft_targets(transfer, len(target_x), int(settings.data["num_classes"])))
            metrics[DIGEST_LOSS] = (
                private.digest(target_x, soft, data.x, data.y, loss=loss,
                               epochs=train.digest_epochs, batch_size=train.batch_size, gen=gen)
                if private else digest(student.model, student.optimizer, target_x, soft, data.x,
                                       data.y, loss=loss, epochs=train.digest_epochs,
                                       batch_size=train.batch_size, gen=gen,
                                       knowledge=knowledge))
    if train.revisits(first_round=first, digested=DIGEST_LOSS in metrics):
        with timer("revisit"):
            budget = train.local_budget(first_round=first)
            metrics[TRAIN_LOSS] = (
                private.revisit(data.x, data.y, batch_size=train.batch_size, gen=gen, **budget)
                if private else revisit(student.model, student.optimizer, data.x, data.y,
                                        batch_size=train.batch_size, gen=gen, loss=extras,
                                        knowledge=knowledge, **budget))
    if private is not None:
        private.close(student, metrics)
    student.rounds_done += 1

    content = RecordDict()
    if next_x is not None:
        with timer("logits"):
            record = {LOGITS: Array(predict_logits(student.model, next_x))}
            if train.share_class_counts:
                num_classes = int(settings.data["num_classes"])
                record[CLASS_COUNTS] = Array(label_counts(data.y, num_classes))
            content[LOGITS] = ArrayRecord(record)
    shared = knowledge_reply(settings, pid, student.model, next_x, data.x, data.y,
                             knowledge.projection)
    if shared is not None:  # relations on the next rows, prototypes of the private rows
        content[KNOWLEDGE] = shared
    with timer("evaluate"):
        metrics.update(test_metrics(student.model, data, settings, server_round))
    with timer("save"):
        student.save(context)
    if train.profile:
        metrics.update(timer.metrics())
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Logits of the current student on the queried inputs and their perturbations."""
    settings, pid, data, student = open_round(msg, context)
    config = msg.content[CONFIG]
    inputs = rows_from(msg.content[QUERY], QUERY, data.public_x)
    if inputs is None:
        raise ValueError(f"a query carries no {QUERY}.inputs")
    expanded = expand_query(inputs.numpy(), int(config[QUERY_SEED]),
                            int(config[QUERY_DIRECTIONS]), float(config[QUERY_MU]))
    logits = predict_logits(student.model, torch.from_numpy(expanded))
    content = RecordDict({
        LOGITS: ArrayRecord({LOGITS: Array(logits)}),
        METRICS: MetricRecord({PARTITION_ID: pid, NUM_EXAMPLES: len(data.x)}),
    })
    return Message(content, reply_to=msg)


@app.query(WHOAMI_ACTION)
def whoami(msg: Message, context: Context) -> Message:
    """This node's partition id and nothing else: no data is read, no model is built."""
    return Message(RecordDict({METRICS: MetricRecord({PARTITION_ID: partition_id_of(context)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Parameter exchange: load the global weights (if any came), train, send them back.

    Without weights in the message (FedDF's first round) the client trains its own model from its
    warm-up budget; with them, the weights replace its model and the optimizer starts afresh.
    """
    timer = PhaseTimer()
    with timer("restore"):
        settings, pid, data, student = open_round(msg, context)
        arrays = msg.content.array_records.get(ARRAYS)
        if arrays:
            student.model.load_state_dict(finite_state(arrays))
            student.reset_optimizer(settings)
    first = not arrays and student.rounds_done == 0
    budget = settings.train.local_budget(first_round=first)
    gen = round_generator(settings.seed, pid, round_of(msg))
    private = open_private(settings, student, len(data.x), pid, round_of(msg),
                           lambda: train_plan(settings.train, len(data.x), first))
    # self-distillation: the snapshot is the round's starting model (the global one, if sent)
    extras = revisit_losses(settings.train.losses, settings.train.temperature)
    knowledge = round_knowledge(settings, pid, student.model, ArrayRecord(), 0, data.x,
                                student.rounds_done > 0, [extras])
    with timer("revisit"):
        loss = (private.revisit(data.x, data.y, batch_size=settings.train.batch_size, gen=gen,
                                **budget)
                if private else revisit(student.model, student.optimizer, data.x, data.y,
                                        batch_size=settings.train.batch_size, gen=gen,
                                        loss=extras, knowledge=knowledge, **budget))
    metrics = {PARTITION_ID: pid, NUM_EXAMPLES: len(data.x), TRAIN_LOSS: loss}
    if private is not None:
        private.close(student, metrics)
    student.rounds_done += 1
    with timer("save"):
        student.save(context)
    if settings.train.profile:
        metrics.update(timer.metrics())
    content = RecordDict({
        ARRAYS: ArrayRecord(student.model.state_dict()),
        METRICS: MetricRecord(metrics),
    })
    if settings.train.share_class_counts:  # FedDF's class_weighted ensemble
        num_classes = int(settings.data["num_classes"])
        content[LOGITS] = ArrayRecord({CLASS_COUNTS: Array(label_counts(data.y, num_classes))})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received global weights on the test set (and the own-label chunk)."""
    timer = PhaseTimer()
    with timer("restore"):
        settings, pid, data, student = open_round(msg, context)
        student.model.load_state_dict(finite_state(msg.content[ARRAYS]))
    with timer("evaluate"):
        metrics = {PARTITION_ID: pid, NUM_EXAMPLES: len(data.test_y),
                   **test_metrics(student.model, data, settings, round_of(msg))}
    if settings.train.profile:
        metrics.update(timer.metrics())
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
