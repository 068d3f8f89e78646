"""What every ClientApp handler starts with: the round, the settings, the data, the student."""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from fedkd.client.data import ClientData, client_data, partition_id_of
from fedkd.client.node import node_settings
from fedkd.client.state import Student
from fedkd.protocol import CONFIG, OWN_ACCURACY, SERVER_ROUND, TEST_ACCURACY, TEST_LOSS
from fedkd.settings import ClientSettings
from fedkd.training import evaluate, own_accuracy


def round_of(msg: Message) -> int:
    """The server round a message belongs to (0 if it names none)."""
    return int(msg.content[CONFIG].get(SERVER_ROUND, 0))


def open_round(msg: Message, context: Context) -> tuple[ClientSettings, int, ClientData, Student]:
    """Settings, partition id, data and the restored student of this node for `msg`."""
    torch.set_num_threads(1)
    settings = node_settings(ClientSettings.from_config(msg.content[CONFIG]), context)
    pid = partition_id_of(context)
    data = client_data(context, settings)
    return settings, pid, data, Student.restore(context, settings, pid)


def eval_due(settings: ClientSettings, server_round: int) -> bool:
    """Whether the student is evaluated this round (every `eval_every`, and in the last)."""
    every = settings.train.eval_every
    return server_round % every == 0 or server_round >= settings.num_rounds


def test_metrics(model: torch.nn.Module, data: ClientData, settings: ClientSettings,
                 server_round: int) -> dict[str, float]:
    """Accuracy on the own-label chunk (every round, when there is one) and, when due, accuracy
    and loss on the whole test set."""
    metrics: dict[str, float] = {}
    own = own_accuracy(model, data.test_x, data.test_y, data.own_test)
    if own is not None:
        metrics[OWN_ACCURACY] = own
    if eval_due(settings, server_round):
        metrics[TEST_ACCURACY], metrics[TEST_LOSS] = evaluate(model, data.test_x, data.test_y)
    return metrics
