"""Lossy codecs for what crosses the wire: logits up, soft targets down, FedAvg's weights.

A codec spec is a plain dict (``{"name": "topk", "k": 2, "temperature": 3.0}``) sent as JSON in a
config entry and held to an allowlist (`CODECS`, `check_codec`). ``encode_*`` returns *parts*, small
named arrays in compact dtypes (one Flower ``Array`` each: `encoded_nbytes` is the honest size);
``decode_*`` reads parts as hostile (exact keys, dtypes, shapes; indices in range and unrepeated;
floats finite; scales >= 0), raises ValueError naming the part (``logits.scale must be finite``)
and returns finite floats.

Bytes per row of C classes (``i`` = 1 when C <= 256 else 2; ``k' = min(k, C)``):

codec       bytes per row  parts
----------  -------------  -------------------------------------------------------------
none        4 C            values float32 [N, C]
float16     2 C            values float16 [N, C]
int8        C + 4          values int8 [N, C], scale float32 [N]  (scale = max|x| / 127)
topk        k' (2 + i)     values float16 [N, k'], indices uint8/uint16 [N, k']
hard_label  i + 1          labels uint8/uint16 [N], confidence uint8 [N]  (round(p * 255))

*Logits* (up): none/float16/int8 quantise the logits; topk/hard_label code ``p = softmax(z / T)``
at the codec's temperature T, decode a distribution q and return ``z' = T log(max(q, 1e-6))``, so
that ``softmax(z' / T) ~= q``. *Probabilities* (soft targets, down) are coded as they are; decoded
rows are clipped at 0 and renormalised (a zero row becomes uniform). topk decodes to its k' values
(their mass kept, above 1 scaled down) plus the rest, ``1 - sum(kept)``, spread evenly over the
other C - k' classes; hard_label to ``c = confidence / 255``, clipped into [1/C, 1], on the label
and ``(1 - c) / (C - 1)`` elsewhere. *Weights*: float arrays go as float16, or int8 with one scale
per row of the array reshaped to ``[shape[0], -1]`` (0-d, 1-d: one scale); integer and bool
arrays, codec none and topk/hard_label (`applies_to_weights` is false) send arrays unchanged.
Non-finite input is never laundered into a valid message: none/float16 carry it (float16 turns
|x| > 65504 into inf), int8/topk mark the row (NaN scale/values), so decoding refuses it;
hard_label, with no float part, raises ValueError when encoding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np

from fedkd.errors import ConfigError, is_int, require_choice, require_int, require_keys, require_number

Parts = dict[str, np.ndarray]  # an encoded payload: part name -> array in its compact dtype
_COMMON = {"temperature": partial(require_number, low=0.0, low_open=True)}  # > 0
CODECS: dict[str, dict[str, Callable[[str, Any], Any]]] = {
    "none": _COMMON, "float16": _COMMON, "int8": _COMMON, "hard_label": _COMMON,
    "topk": {"k": partial(require_int, low=1), **_COMMON},
}
"""Codec name -> its parameters and their checks, ``check(key, value) -> value`` (ConfigError)."""
DEFAULTS: dict[str, Any] = {"temperature": 1.0}
"""Parameters a spec may leave out, with their values; the others (topk's ``k``) are required."""
MIN_PROB = 1e-6  # floor of q before the log when topk/hard_label decode logits
MAX_CLASSES = 65536  # most classes the uint16 indices of topk/hard_label can name
_DENSE = ("none", "float16", "int8")  # codecs that quantise values in place (and apply to weights)
_COMPRESS_WEIGHTS = ("float16", "int8")  # the others send weights unchanged
_F16, _F32, _I8, _U8, _U16 = map(np.dtype, (np.float16, np.float32, np.int8, np.uint8, np.uint16))


# --- the spec --------------------------------------------------------------------------------------
def check_codec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as a normalised plain dict (every parameter, defaults filled in), else ConfigError."""
    if not isinstance(spec, Mapping):
        raise ConfigError("codec", spec, "must be a mapping with a 'name', e.g. {name: topk, k: 2}")
    name = require_choice("codec.name", spec.get("name"), CODECS)
    require_keys("codec", spec, ["name", *CODECS[name]], owner=f"codec {name!r}")
    out: dict[str, Any] = {"name": name}
    for param, check in CODECS[name].items():
        out[param] = check(f"codec.{param}", spec.get(param, DEFAULTS.get(param)))
    return out


def codec_to_json(spec: Mapping[str, Any]) -> str:
    """The checked spec as compact JSON with sorted keys (a config entry's value)."""
    return json.dumps(check_codec(spec), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _no_constant(name: str) -> None:  # json.loads calls it for NaN, Infinity, -Infinity
    raise ValueError(f"{name} is not allowed")


def codec_from_json(text: str) -> dict[str, Any]:
    """The spec `codec_to_json` wrote, checked (`check_codec`); ConfigError if malformed."""
    if not isinstance(text, str):
        raise ConfigError("codec", text, "must be the text of a JSON object")
    try:
        spec = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise ConfigError("codec", text, f"must be a JSON object of finite values ({err})") from None
    return check_codec(spec)


def applies_to_weights(spec: Mapping[str, Any]) -> bool:
    """Whether the codec compresses FedAvg's weights (none/float16/int8; topk/hard_label do not)."""
    return check_codec(spec)["name"] in _DENSE


def encoded_nbytes(parts: Mapping[str, np.ndarray]) -> int:
    """Bytes of the encoded payload: the sum of its parts' ``nbytes``."""
    return sum(int(a.nbytes) for a in parts.values())


# --- validation of hostile parts -------------------------------------------------------------------
def _count(name: str, value: Any, low: int) -> int:
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _parts(parts: Any, what: str, expected: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> Parts:
    """`parts` if it holds exactly the expected arrays (dtype, shape), float ones finite."""
    if not isinstance(parts, Mapping):
        raise ValueError(f"{what} parts must be a mapping of named arrays, got {type(parts).__name__}")
    if set(parts) != set(expected):
        got = sorted(repr(key) for key in parts)
        raise ValueError(f"{what} parts must be exactly {sorted(expected)}, got [{', '.join(got)}]")
    for key, (dtype, shape) in expected.items():
        a, name = parts[key], f"{what}.{key}"
        if type(a) is not np.ndarray:
            raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {a.dtype}")
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
        if dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite")
    return dict(parts)


def _finite(name: str, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} is too large: the decoded values are not finite")
    return out


def _matrix(what: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1 or x.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be a numeric [N, C] array with C >= 1, got {x.dtype} {x.shape}")
    return x


# --- dense codecs: none, float16, int8 -------------------------------------------------------------
def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-d view int8 scales rows of: ``[shape[0], -1]``; 0-d and 1-d arrays are one row."""
    return (shape[0], int(np.prod(shape[1:]))) if len(shape) > 1 else (1, int(np.prod(shape)))


def _dense_encode(name: str, x: np.ndarray) -> Parts:
    if name == "none":
        return {"values": x.astype(_F32)}
    if name == "float16":
        with np.errstate(over="ignore"):
            return {"values": x.astype(_F16)}
    x2 = x.astype(np.float64).reshape(_grid(x.shape))
    finite = np.isfinite(x2).all(axis=1)
    x2[~finite] = 0.0
    scale = (np.max(np.abs(x2), axis=1, initial=0.0) / 127).astype(_F32)
    safe = np.where(scale > 0, scale, 1).astype(np.float64)
    values = np.clip(np.rint(x2 / safe[:, None]), -127, 127).astype(_I8)
    scale[~finite] = np.nan
    return {"values": values.reshape(x.shape), "scale": scale}


def _dense_decode(name: str, parts: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:  # float64
    if name != "int8":
        dtype = _F32 if name == "none" else _F16
        return _parts(parts, what, {"values": (dtype, shape)})["values"].astype(np.float64)
    rows, cols = _grid(shape)
    got = _parts(parts, what, {"values": (_I8, shape), "scale": (_F32, (rows,))})
    if (got["values"] == -128).any():
        raise ValueError(f"{what}.values must be in [-127, 127]")
    if (got["scale"] < 0).any():
        raise ValueError(f"{what}.scale must be >= 0")
    x = got["values"].reshape(rows, cols) * got["scale"].astype(np.float64)[:, None]
    return x.reshape(shape)


# --- sparse codecs: topk, hard_label (rows of probabilities) ---------------------------------------
def _sparse_encode(spec: dict[str, Any], p: np.ndarray) -> Parts:
    rows, num_classes = p.shape
    if num_classes > MAX_CLASSES:
        raise ValueError(f"codec {spec['name']} indexes at most {MAX_CLASSES} classes, got {num_classes}")
    bad = ~np.isfinite(p).all(axis=1)
    index = _U8 if num_classes <= 256 else _U16  # topk's indices, hard_label's labels
    if spec["name"] == "hard_label":
        if bad.any():
            raise ValueError(f"hard_label cannot carry non-finite values (row {int(np.argmax(bad))})")
        labels = p.argmax(axis=1)
        confidence = np.rint(np.clip(p[np.arange(rows), labels], 0, 1) * 255).astype(_U8)
        return {"labels": labels.astype(index), "confidence": confidence}
    k = min(spec["k"], num_classes)
    indices = np.argsort(-np.where(bad[:, None], 0, p), axis=1, kind="stable")[:, :k]
    with np.errstate(over="ignore"):
        values = np.take_along_axis(p, indices, axis=1).astype(_F16)
    values[bad] = np.nan
    return {"values": values, "indices": indices.astype(index)}


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; a row summing to 0 becomes uniform."""
    total = x.sum(axis=1, keepdims=True)
    return np.divide(x, total, out=np.full_like(x, 1.0 / max(x.shape[1], 1)), where=total > 0)


def _sparse_decode(spec: dict[str, Any], parts: Any, what: str, rows: int, num_classes: int) -> np.ndarray:
    """Float64 distributions [rows, num_classes], checked."""
    index = _U8 if num_classes <= 256 else _U16  # topk's indices, hard_label's labels
    if spec["name"] == "hard_label":
        got = _parts(parts, what, {"labels": (index, (rows,)), "confidence": (_U8, (rows,))})
        labels = got["labels"].astype(np.int64)
        if (labels >= num_classes).any():
            raise ValueError(f"{what}.labels must be < {num_classes} (the number of classes)")
        c = np.clip(got["confidence"] / 255.0, 1.0 / num_classes, 1.0)
        q = np.repeat(((1 - c) / max(num_classes - 1, 1))[:, None], num_classes, axis=1)
        q[np.arange(rows), labels] = c
        return q
    k = min(spec["k"], num_classes)
    got = _parts(parts, what, {"values": (_F16, (rows, k)), "indices": (index, (rows, k))})
    indices = got["indices"].astype(np.int64)
    if (indices >= num_classes).any():
        raise ValueError(f"{what}.indices must be < {num_classes} (the number of classes)")
    if (np.diff(np.sort(indices, axis=1), axis=1) == 0).any():
        raise ValueError(f"{what}.indices must not repeat within a row")
    kept = np.clip(got["values"].astype(np.float64), 0, None)
    rest = np.clip(1 - kept.sum(axis=1), 0, None) / max(num_classes - k, 1)  # k = C: all kept
    q = np.repeat(rest[:, None], num_classes, axis=1)
    np.put_along_axis(q, indices, kept, axis=1)
    return _normalise(q)


def layout(spec: Mapping[str, Any], shape: tuple[int, ...], dtype: Any = None
           ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Part name -> (dtype, shape) of what encodes an array of `shape`: a [N, C] matrix of logits
    or probabilities (`dtype` None), or a model array of `dtype` (weights)."""
    name, shape = check_codec(spec)["name"], tuple(int(d) for d in shape)
    if dtype is not None and (np.dtype(dtype).kind != "f" or name not in _COMPRESS_WEIGHTS):
        return {"values": (np.dtype(dtype), shape)}
    if name in _DENSE:
        kept = {"none": _F32, "float16": _F16, "int8": _I8}[name]
        return {"values": (kept, shape), **({"scale": (_F32, (_grid(shape)[0],))} if name == "int8" else {})}
    rows, num_classes = shape
    index = _U8 if num_classes <= 256 else _U16
    if name == "hard_label":
        return {"labels": (index, (rows,)), "confidence": (_U8, (rows,))}
    k = min(spec["k"], num_classes)
    return {"values": (_F16, (rows, k)), "indices": (index, (rows, k))}


# --- the three payloads ----------------------------------------------------------------------------
def encode_logits(spec: Mapping[str, Any], logits: np.ndarray) -> Parts:
    """Parts of float [N, C] logits (client -> server)."""
    spec = check_codec(spec)
    z = _matrix("logits", logits)
    if spec["name"] in _DENSE:
        return _dense_encode(spec["name"], z)
    with np.errstate(invalid="ignore", over="ignore"):
        s = z.astype(np.float64) / spec["temperature"]
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return _sparse_encode(spec, e / e.sum(axis=1, keepdims=True))


def decode_logits(spec: Mapping[str, Any], parts: Mapping[str, np.ndarray], rows: int,
                  num_classes: int, *, what: str = "logits") -> np.ndarray:
    """Float32 [rows, num_classes] logits from (hostile) parts; ValueError naming the bad part."""
    spec = check_codec(spec)
    rows, num_classes = _count("rows", rows, 0), _count("num_classes", num_classes, 1)
    if spec["name"] in _DENSE:
        x = _dense_decode(spec["name"], parts, what, (rows, num_classes))
        return _finite(f"{what}.scale", x, _F32)  # only int8 (scale * 127) can overflow float32
    q = _sparse_decode(spec, parts, what, rows, num_classes)
    return _finite("codec.temperature", spec["temperature"] * np.log(np.maximum(q, MIN_PROB)), _F32)


def encode_probs(spec: Mapping[str, Any], probs: np.ndarray) -> Parts:
    """Parts of float [N, C] probabilities (server -> client soft targets), coded as they are."""
    spec = check_codec(spec)
    p = _matrix("probs", probs)
    if spec["name"] in _DENSE:
        return _dense_encode(spec["name"], p)
    return _sparse_encode(spec, p.astype(np.float64))


def decode_probs(spec: Mapping[str, Any], parts: Mapping[str, np.ndarray], rows: int,
                 num_classes: int, *, what: str = "probs") -> np.ndarray:
    """Float32 [rows, num_classes] rows summing to 1 from (hostile) parts."""
    spec = check_codec(spec)
    rows, num_classes = _count("rows", rows, 0), _count("num_classes", num_classes, 1)
    if spec["name"] in _DENSE:
        x = _dense_decode(spec["name"], parts, what, (rows, num_classes))
        return _normalise(np.clip(x, 0, None)).astype(_F32)
    return _sparse_decode(spec, parts, what, rows, num_classes).astype(_F32)


def encode_array(spec: Mapping[str, Any], a: np.ndarray) -> Parts:
    """Parts of one model array (any shape); only float arrays under float16/int8 are compressed."""
    name = check_codec(spec)["name"]
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise ValueError(f"array must be numeric, got dtype {a.dtype}")
    if a.dtype.kind != "f" or name not in _COMPRESS_WEIGHTS:
        return {"values": a}
    return _dense_encode(name, a)


def decode_array(spec: Mapping[str, Any], parts: Mapping[str, np.ndarray], shape: tuple[int, ...],
                 dtype: Any, *, what: str = "array") -> np.ndarray:
    """The array of `shape` and `dtype` (the receiver's own model's) from (hostile) parts."""
    name = check_codec(spec)["name"]
    shape, dtype = tuple(_count(f"{what} shape", d, 0) for d in shape), np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise ValueError(f"{what}: dtype must be numeric, got {dtype}")
    if dtype.kind != "f" or name not in _COMPRESS_WEIGHTS:
        return _parts(parts, what, {"values": (dtype, shape)})["values"]
    return _finite(f"{what}.scale", _dense_decode(name, parts, what, shape), dtype)
