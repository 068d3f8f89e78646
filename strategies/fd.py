"""FD / FedDistill (Jeong et al. 2018): clients exchange per-class mean logits, no transfer set.

Each round every sampled client trains on its private data, regularized toward the global mean
logit vector of each sample's class, and replies with its own per-class mean logits [C, C] and
class counts [C]. The server forms the count-weighted mean per class (`class_weighted_mean`) and
sends it with the next round's message (type ``train.fd``, handled by `fedkd.client.fd.fd_round`).
Only C * (C + 1) numbers per client and round cross the wire, whatever the model.

The round loop, node sampling, the settings message and the reply metrics are `KDStrategy`'s;
FD overrides only `message_type`, `build_transfer` (the class targets) and `aggregate_replies`
(the count-weighted class means).
"""

from __future__ import annotations

import logging
import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedkd import reply_checks
from fedkd.protocol import CLASS_COUNTS, CLASS_LOGITS, FD_MESSAGE_TYPE, LOGITS, TARGETS
from fedkd.records import reply_class_table
from fedkd.reply_checks import MAX_EXAMPLES
from fedkd.settings import ClientSettings
from fedkd.strategies.base import KDStrategy, parse_replies, teacher_facts

log = logging.getLogger(__name__)

TARGET_LOGITS, TARGET_COUNTS = f"{TARGETS}.{CLASS_LOGITS}", f"{TARGETS}.{CLASS_COUNTS}"


def class_weighted_mean(
    class_logits: np.ndarray, class_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted mean logit vector per class over clients.

    Parameters
    ----------
    class_logits : np.ndarray
        [K, C, C]: client k's mean logits over its rows of class c in ``[k, c]``.
    class_counts : np.ndarray
        [K, C]: client k's number of rows of class c (>= 0).

    Returns
    -------
    global_logits : np.ndarray
        float32 [C, C]; row c = ``sum_k n_kc * logits_kc / sum_k n_kc``, zeros where no client
        holds class c.
    total_counts : np.ndarray
        int64 [C]: ``sum_k n_kc``.
    """
    logits = np.asarray(class_logits, dtype=np.float64)
    counts = np.asarray(class_counts, dtype=np.float64)
    total = counts.sum(axis=0)
    sums = np.einsum("kc,kcd->cd", counts, logits)
    mean = np.divide(sums, total[:, None], out=np.zeros_like(sums), where=total[:, None] > 0)
    return mean.astype(np.float32), np.rint(total).astype(np.int64)


def reply_class_logits(reply: Message, num_classes: int,
                       cap: int = MAX_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Validated class logits [C, C] and counts [C] of a reply (`fedkd.reply_checks`).

    Raises ValueError naming what is wrong for a malformed (or malicious) reply: a missing
    record, wrong shapes, non-finite or out-of-bound logits, or counts that are not whole
    numbers >= 0 summing to at most `cap`.
    """
    return reply_class_table(reply, LOGITS, CLASS_LOGITS, CLASS_COUNTS, num_classes, num_classes,
                             cap)


class FD(KDStrategy):
    """FD / FedDistill on Flower's Message API.

    Takes `KDStrategy`'s parameters except `aggregator` and `transfer_size` (there is no
    transfer set); `temperature` is only logged (the clients soften the class logits at
    ``distill.temperature``), `min_replies` keeps the previous class targets when fewer valid
    replies arrive.
    """

    message_type = FD_MESSAGE_TYPE

    def __init__(self, **kwargs) -> None:
        for unused in ("aggregator", "transfer_size"):
            kwargs.pop(unused, None)
        super().__init__(aggregator=None, **kwargs)
        self._num_classes: dict[int, int] = {}  # round -> C

    def summary(self) -> None:
        """Log the strategy's settings."""
        log.info("FD: per-class mean logits, fraction_train=%s min_replies=%d T=%s",
                 self.fraction_train, self.min_replies, self.temperature)

    def build_transfer(
        self, server_round: int, arrays: ArrayRecord, settings: ClientSettings
    ) -> ArrayRecord:
        """Last round's global class logits and counts (nothing in round 1); no transfer set."""
        self._num_classes[server_round] = int(settings.data["num_classes"])
        targets = ArrayRecord()
        if TARGET_LOGITS in arrays:
            targets[TARGET_LOGITS] = arrays[TARGET_LOGITS]
            targets[TARGET_COUNTS] = arrays[TARGET_COUNTS]
        return targets

    def aggregate_replies(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """Validate the replies and combine their class logits, count-weighted, per class."""
        num_classes = self._num_classes.pop(server_round, None)
        if num_classes is None:
            return None
        settings = self.run_settings()

        def parse(reply: Message) -> tuple[np.ndarray, np.ndarray]:
            _, pid = teacher_facts(reply, settings)
            return reply_class_logits(reply, num_classes,
                                      reply_checks.example_cap(settings.data, pid))

        parsed = [pair for _, pair in parse_replies(server_round, replies, parse)]
        if not self.enough(server_round, len(parsed)):
            return None
        logits, counts = zip(*parsed)
        mean, total = class_weighted_mean(np.stack(logits), np.stack(counts))
        log.debug("round %d: class counts %s", server_round, total.tolist())
        return ArrayRecord({TARGET_LOGITS: Array(mean), TARGET_COUNTS: Array(total)})
