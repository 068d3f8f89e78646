"""The node's half of constant-size messages (`fedkd.wire_cache`) and of the codec
(`fedkd.wire_codec`): a Flower mod that runs before every handler.

On the way in it

- keeps the settings document when one comes (checked against its digest) and puts the kept one
  back when only ``fedkd.settings-digest`` comes;
- puts back ``targets.<rows>`` when ``fedkd.targets-rows`` names the rows this node last answered
  on, and keeps this message's ``next.<rows>`` for the next time;
- decodes encoded arrays (``fedkd.codec``);

and on the way out encodes the reply's logits and weights with the same codec. What it keeps
lives in ``Context.state`` (transactional: a handler that raises keeps nothing, and its error
reply makes the server send everything again).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fedkd.errors import ConfigError
from fedkd.protocol import (
    CONFIG, NEXT, ROW_KINDS, SETTINGS_DIGEST, SETTINGS_KEY, TARGETS, TARGETS_HELD, TRANSFER,
    text_digest,
)
from fedkd.settings import parse_settings
from fedkd.wire_codec import decode_request, encode_reply
from fedkd.records import rows_digest

SETTINGS_STATE = "fedkd.held-settings"
"""``Context.state`` ConfigRecord: ``digest`` and ``text`` of the settings this node holds."""
ROWS_STATE = "fedkd.held-rows"
"""``Context.state`` ArrayRecord: the ``next.<rows>`` array this node last answered on."""
ROWS_DIGEST_STATE = "fedkd.held-rows-digest"
"""``Context.state`` ConfigRecord: ``digest`` of `ROWS_STATE`'s array."""


class NotHeld(ConfigError):
    """The message names a value (settings, rows) by digest that this node does not hold."""


def wire_mod(msg: Message, context: Context,
             call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod: restore what the server left out, decode, run the handler, encode."""
    if msg.has_content() and CONFIG in msg.content.config_records:
        restore(msg, context)
    codec = decode_request(msg)
    reply = call_next(msg, context)
    if codec is not None and not reply.has_error():
        encode_reply(reply, codec)
    return reply


def restore(msg: Message, context: Context) -> None:
    """Put the held settings and rows back into `msg` (in place) and keep the new ones."""
    config = msg.content.config_records[CONFIG]
    state = context.state
    digest = config.get(SETTINGS_DIGEST)
    if isinstance(config.get(SETTINGS_KEY), str):
        text = config[SETTINGS_KEY]
        if digest is not None and text_digest(text) != digest:
            raise NotHeld(f"{SETTINGS_DIGEST}={digest!r} is not the digest of the settings sent")
        held = state.config_records.get(SETTINGS_STATE)
        if held is None or held.get("digest") != text_digest(text):
            parse_settings(text)  # a document the node refuses is never held
            state[SETTINGS_STATE] = ConfigRecord({"digest": text_digest(text), "text": text})
    elif digest is not None:
        held = state.config_records.get(SETTINGS_STATE)
        if held is None or held.get("digest") != digest:
            raise NotHeld(f"{SETTINGS_DIGEST}={digest!r}: this node holds no such settings; the "
                          "server sends them again")
        config[SETTINGS_KEY] = held["text"]
    transfer = msg.content.array_records.get(TRANSFER)
    if TARGETS_HELD in config:
        _put_back_rows(config[TARGETS_HELD], transfer, state)
    if transfer is not None:
        for kind in ROW_KINDS:
            key = f"{NEXT}.{kind}"
            if key in transfer:
                state[ROWS_STATE] = ArrayRecord(array_dict={kind: transfer[key]})
                state[ROWS_DIGEST_STATE] = ConfigRecord({"digest": rows_digest(key, transfer[key])})


def _put_back_rows(digest: object, transfer: ArrayRecord | None, state) -> None:
    held = state.array_records.get(ROWS_STATE)
    held_digest = state.config_records.get(ROWS_DIGEST_STATE, {}).get("digest")
    if transfer is None or held is None or held_digest != digest:
        raise NotHeld(f"{TARGETS_HELD}={digest!r}: this node holds no such rows; the server "
                      "sends them again")
    kind, array = next(iter(held.items()))
    if rows_digest(f"{TARGETS}.{kind}", array) != digest:
        raise NotHeld(f"{TARGETS_HELD}={digest!r} does not match the rows this node holds")
    transfer[f"{TARGETS}.{kind}"] = array
