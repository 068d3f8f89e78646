"""fedkd.codecs: golden values, error bounds, byte counts, hostile parts, specs and conf/codec."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedkd.codecs import (
    CODECS, applies_to_weights, check_codec, codec_from_json, codec_to_json, decode_array,
    decode_logits, decode_probs, encode_array, encode_logits, encode_probs, encoded_nbytes,
)
from fedkd.errors import ConfigError

CODEC_DIR = Path(__file__).resolve().parents[1] / "conf" / "codec"
SPECS = {
    "none": {"name": "none"},
    "float16": {"name": "float16"},
    "int8": {"name": "int8"},
    "topk": {"name": "topk", "k": 2, "temperature": 3.0},
    "hard_label": {"name": "hard_label", "temperature": 3.0},
}
PAYLOADS = {"logits": (encode_logits, decode_logits), "probs": (encode_probs, decode_probs)}


def softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def clear_logits(rows: int = 400, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Logits whose argmax leads by a clear margin (no ties after any rounding)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, classes))
    z[np.arange(rows), rng.integers(classes, size=rows)] += 6.0
    return z.astype(np.float32)


# --- golden values ---------------------------------------------------------------------------------
def test_int8_golden() -> None:
    x = np.array([[1.0, -2.54, 0.0], [0.0, 0.0, 0.0]], dtype=np.float32)

    parts = encode_logits({"name": "int8"}, x)

    np.testing.assert_allclose(parts["scale"], [0.02, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(parts["values"], [[50, -127, 0], [0, 0, 0]])
    np.testing.assert_allclose(decode_logits({"name": "int8"}, parts, 2, 3), [[1.0, -2.54, 0], [0, 0, 0]],
                               rtol=1e-6)


def test_hard_label_golden() -> None:
    spec = {"name": "hard_label", "temperature": 2.0}
    parts = {"labels": np.array([2, 0, 1], np.uint8), "confidence": np.array([204, 0, 255], np.uint8)}

    q = decode_probs(spec, parts, 3, 4)
    z = decode_logits(spec, parts, 3, 4)

    o = 0.2 / 3
    np.testing.assert_allclose(q, [[o, o, 0.8, o], [0.25] * 4, [0, 1, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(z, 2.0 * np.log(np.maximum(q, 1e-6)), rtol=1e-6)
    encoded = encode_probs(spec, np.array([[0.1, 0.1, 0.8, 0.0]]))
    assert encoded["labels"].tolist() == [2] and encoded["confidence"].tolist() == [204]


def test_topk_golden() -> None:
    spec = {"name": "topk", "k": 2}
    parts = {"values": np.array([[0.5, 0.25], [0.75, 0.75]], np.float16),
             "indices": np.array([[3, 0], [1, 4]], np.uint8)}

    q = decode_probs(spec, parts, 2, 5)

    r = 0.25 / 3  # the rest mass, spread over the 3 classes not kept
    np.testing.assert_allclose(q, [[0.25, r, r, 0.5, r], [0, 0.5, 0, 0, 0.5]], atol=1e-7)
    encoded = encode_probs(spec, np.array([[0.1, 0.6, 0.3]]))
    assert encoded["indices"].tolist() == [[1, 2]]
    np.testing.assert_array_equal(encoded["values"], np.array([[0.6, 0.3]], np.float16))


def test_topk_k_at_least_classes_sends_all() -> None:
    spec = {"name": "topk", "k": 5}
    p = np.array([[0.2, 0.5, 0.3]])

    parts = encode_probs(spec, p)

    assert parts["values"].shape == (1, 3)
    np.testing.assert_allclose(decode_probs(spec, parts, 1, 3), p, atol=1e-3)


def test_topk_and_hard_label_logits_decode_to_their_distribution() -> None:
    z = clear_logits(50, 6)
    for name in ("topk", "hard_label"):
        spec = SPECS[name]

        logits = decode_logits(spec, encode_logits(spec, z), 50, 6)
        probs = decode_probs(spec, encode_probs(spec, softmax(z, 3.0)), 50, 6)

        np.testing.assert_allclose(softmax(logits.astype(np.float64), 3.0), probs, atol=1e-5)


# --- round trips, bytes, argmax --------------------------------------------------------------------
def test_float16_relative_error() -> None:
    z = clear_logits() * 3

    back = decode_logits({"name": "float16"}, encode_logits({"name": "float16"}, z), *z.shape)

    assert np.all(np.abs(back - z) <= 2.0**-11 * np.abs(z) + 2.0**-24)


def test_int8_error_at_most_half_a_step() -> None:
    z = clear_logits() * np.linspace(0.01, 100, 400, dtype=np.float32)[:, None]

    parts = encode_logits({"name": "int8"}, z)
    back = decode_logits({"name": "int8"}, parts, *z.shape)

    assert np.all(np.abs(back - z) <= parts["scale"][:, None] * (0.5 + 1e-5))


@pytest.mark.parametrize(("name", "nbytes"), [("none", 16000), ("float16", 8000), ("int8", 5600),
                                              ("topk", 2400), ("hard_label", 800)])
def test_bytes_of_400_rows_of_10_classes(name: str, nbytes: int) -> None:
    z = clear_logits()

    assert encoded_nbytes(encode_logits(SPECS[name], z)) == nbytes
    assert encoded_nbytes(encode_probs(SPECS[name], softmax(z))) == nbytes


def test_indices_widen_past_256_classes() -> None:
    z = clear_logits(4, 300)

    assert encode_logits(SPECS["topk"], z)["indices"].dtype == np.uint16
    assert encoded_nbytes(encode_logits(SPECS["hard_label"], z)) == 4 * 3


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_argmax_kept_and_probs_sum_to_one(name: str, payload: str) -> None:
    z = clear_logits()
    x = z if payload == "logits" else softmax(z)
    encode, decode = PAYLOADS[payload]

    out = decode(SPECS[name], encode(SPECS[name], x), *x.shape)

    assert out.dtype == np.float32 and out.shape == x.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out.argmax(axis=1), z.argmax(axis=1))
    if payload == "probs":
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)
        assert (out >= 0).all()


def test_probs_zero_row_becomes_uniform_and_negatives_clip() -> None:
    parts = {"values": np.array([[0, 0, 0], [-1, 1, 3]], np.float32)}

    q = decode_probs({"name": "none"}, parts, 2, 3)

    np.testing.assert_allclose(q, [[1 / 3] * 3, [0, 0.25, 0.75]], atol=1e-7)


def test_empty_batch() -> None:
    for name, spec in SPECS.items():
        out = decode_logits(spec, encode_logits(spec, np.zeros((0, 4), np.float32)), 0, 4)
        assert out.shape == (0, 4), name


# --- non-finite input is refused, never laundered --------------------------------------------------
@pytest.mark.parametrize("name", ["none", "float16", "int8", "topk"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e5])
def test_non_finite_logits_are_refused_on_decode(name: str, bad: float) -> None:
    z = clear_logits(3, 5)
    z[1, 2] = bad
    parts = encode_logits(SPECS[name], z)

    if bad == 1e5 and name != "float16":  # large but finite: carried
        assert np.isfinite(decode_logits(SPECS[name], parts, 3, 5)).all()
        return
    with pytest.raises(ValueError, match=r"logits\.(values|scale) must be finite"):
        decode_logits(SPECS[name], parts, 3, 5)


def test_hard_label_refuses_non_finite_input() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        encode_logits(SPECS["hard_label"], np.array([[0.0, np.nan]], np.float32))


# --- hostile parts ---------------------------------------------------------------------------------
ROWS, CLASSES = 3, 5


def valid(name: str, payload: str) -> dict[str, np.ndarray]:
    z = clear_logits(ROWS, CLASSES)
    encode = PAYLOADS[payload][0]
    return encode(SPECS[name], z if payload == "logits" else softmax(z))


Mutation = Callable[[dict], dict]


def replaced(key: str, value: object) -> Mutation:
    return lambda parts: {**parts, key: value(parts[key]) if callable(value) else value}


def set_at(key: str, row: int, col: int | None, value: float) -> Mutation:
    def mutate(parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = parts[key].copy()
        a[(row,) if col is None else (row, col)] = value
        return {**parts, key: a}
    return mutate


HOSTILE = [
    # (codecs, mutation, message with {what} for the payload)
    (sorted(CODECS), lambda p: list(p.values()), "{what} parts must be a mapping"),
    (sorted(CODECS), lambda p: {**p, "extra": np.zeros(1, np.float32)}, "{what} parts must be exactly"),
    (sorted(CODECS), lambda p: dict(list(p.items())[1:]), "{what} parts must be exactly"),
    (sorted(CODECS), lambda p: {k.upper(): v for k, v in p.items()}, "{what} parts must be exactly"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a.tolist()),
     "{what}.values must be a numpy array"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: np.ma.masked_array(a)),
     "{what}.values must be a numpy array"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a.astype(np.float64)),
     "{what}.values must have dtype"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a.astype(object)),
     "{what}.values must have dtype"),
    (["none", "float16", "topk"], replaced("values", lambda a: a.astype(a.dtype.newbyteorder())),
     "{what}.values must have dtype"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a.ravel()),
     "{what}.values must have shape"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a[:-1]),
     "{what}.values must have shape"),
    (["none", "float16", "int8", "topk"], replaced("values", lambda a: a[..., None]),
     "{what}.values must have shape"),
    (["none", "float16", "topk"], set_at("values", 1, 0, np.nan), "{what}.values must be finite"),
    (["none", "float16", "topk"], set_at("values", 0, 1, -np.inf), "{what}.values must be finite"),
    (["int8"], set_at("values", 2, 3, -128), r"{what}.values must be in \[-127, 127\]"),
    (["int8"], set_at("scale", 1, None, np.nan), "{what}.scale must be finite"),
    (["int8"], set_at("scale", 1, None, np.inf), "{what}.scale must be finite"),
    (["int8"], set_at("scale", 0, None, -0.5), "{what}.scale must be >= 0"),
    (["int8"], replaced("scale", lambda a: a.astype(np.float16)), "{what}.scale must have dtype"),
    (["int8"], replaced("scale", lambda a: a[:, None]), "{what}.scale must have shape"),
    (["topk"], set_at("indices", 0, 1, CLASSES), "{what}.indices must be < 5"),
    (["topk"], set_at("indices", 2, 0, 255), "{what}.indices must be < 5"),
    (["topk"], lambda p: {**p, "indices": np.array([[1, 1], [0, 2], [3, 4]], np.uint8)},
     "{what}.indices must not repeat"),
    (["topk"], replaced("indices", lambda a: a.astype(np.uint16)), "{what}.indices must have dtype"),
    (["topk"], replaced("indices", lambda a: a.astype(np.int64)), "{what}.indices must have dtype"),
    (["hard_label"], set_at("labels", 1, None, CLASSES), "{what}.labels must be < 5"),
    (["hard_label"], replaced("labels", lambda a: a.astype(np.int8)), "{what}.labels must have dtype"),
    (["hard_label"], replaced("confidence", lambda a: a.astype(np.float32)),
     "{what}.confidence must have dtype"),
    (["hard_label"], replaced("confidence", lambda a: a[:2]), "{what}.confidence must have shape"),
    (["hard_label"], replaced("labels", lambda a: np.array(a[0])), "{what}.labels must have shape"),
]
HOSTILE_CASES = [pytest.param(name, mutate, message, id=f"{name}-{i}")
                 for i, (names, mutate, message) in enumerate(HOSTILE) for name in names]


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize(("name", "mutate", "message"), HOSTILE_CASES)
def test_hostile_parts_are_refused(payload: str, name: str, mutate: Mutation, message: str) -> None:
    parts = mutate(valid(name, payload))

    with pytest.raises(ValueError, match=message.format(what=payload)):
        PAYLOADS[payload][1](SPECS[name], parts, ROWS, CLASSES)


def test_huge_int8_scale_is_refused() -> None:
    parts = valid("int8", "logits")
    parts["scale"] = np.full(ROWS, 3e38, np.float32)

    with pytest.raises(ValueError, match=r"logits\.scale is too large"):
        decode_logits(SPECS["int8"], parts, ROWS, CLASSES)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_garbage_raises_only_value_error(name: str) -> None:
    rng = np.random.default_rng(1)
    dtypes = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.uint16, np.int64, bool, object, "<U2"]
    keys = list(valid(name, "logits"))
    for _ in range(200):
        parts = {}
        for key in keys:
            shape = [(ROWS, CLASSES), (ROWS, 2), (ROWS,), (), (0, CLASSES)][rng.integers(5)]
            dtype = dtypes[rng.integers(len(dtypes))]
            with np.errstate(invalid="ignore", over="ignore"):
                parts[key] = (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 40)).astype(dtype)
        for payload in PAYLOADS:
            try:
                out = PAYLOADS[payload][1](SPECS[name], parts, ROWS, CLASSES)
            except ValueError:
                continue
            assert out.dtype == np.float32 and np.isfinite(out).all()


# --- weights ---------------------------------------------------------------------------------------
WEIGHTS = {
    "conv": np.random.default_rng(2).normal(size=(3, 4, 2)).astype(np.float32),
    "bias": np.array([0.5, -1.0, 0.0], np.float32),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
    "num_batches_tracked": np.array(7, np.int64),
    "mask": np.array([True, False]),
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_weights_round_trip(name: str) -> None:
    spec = SPECS[name]
    for key, a in WEIGHTS.items():
        parts = encode_array(spec, a)

        back = decode_array(spec, parts, a.shape, a.dtype)

        assert back.shape == a.shape and back.dtype == a.dtype, key
        if a.dtype.kind != "f" or name in ("none", "topk", "hard_label"):
            np.testing.assert_array_equal(back, a)
            assert encoded_nbytes(parts) == a.nbytes
        elif name == "float16":
            np.testing.assert_allclose(back, a, rtol=2.0**-11)
            assert encoded_nbytes(parts) == a.nbytes // 2
        else:
            grid = (a.shape[0], int(np.prod(a.shape[1:]))) if a.ndim > 1 else (1, a.size)
            assert parts["scale"].shape == grid[:1]
            error = np.abs(back - a).reshape(grid)
            assert np.all(error <= parts["scale"][:, None] * (0.5 + 1e-5)), key
    assert applies_to_weights(spec) == (name in ("none", "float16", "int8"))


@pytest.mark.parametrize(("name", "parts", "message"), [
    ("none", {"values": np.array([1.0, np.nan], np.float16)}, r"array\.values must be finite"),
    ("int8", {"values": np.zeros(2, np.int8), "scale": np.zeros(2, np.float32)},
     r"array\.scale must have shape"),
    ("int8", {"values": np.full(2, 127, np.int8), "scale": np.full(1, 1e3, np.float32)},
     r"array\.scale is too large"),
    ("float16", {"values": np.zeros(2, np.float32)}, r"array\.values must have dtype"),
])
def test_hostile_weights_are_refused(name: str, parts: dict, message: str) -> None:  # into float16
    with pytest.raises(ValueError, match=message):
        decode_array(SPECS[name], parts, (2,), np.float16)


def test_integer_weights_must_keep_their_dtype() -> None:
    with pytest.raises(ValueError, match=r"w\.values must have dtype int64"):
        decode_array(SPECS["int8"], {"values": np.array(7, np.int32)}, (), np.int64, what="w")


# --- specs -----------------------------------------------------------------------------------------
def test_check_codec_normalises() -> None:
    assert check_codec({"name": "none"}) == {"name": "none", "temperature": 1.0}
    assert check_codec(OmegaConf.create({"name": "topk", "k": 3, "temperature": 2})) == {
        "name": "topk", "k": 3, "temperature": 2.0}
    assert check_codec({"name": "topk", "k": 1000}) == {"name": "topk", "k": 1000, "temperature": 1.0}


@pytest.mark.parametrize(("spec", "key"), [
    ("topk", "codec="),
    ({}, "codec.name=null"),
    ({"name": "gzip"}, "codec.name='gzip'"),
    ({"name": "topk"}, "codec.k=null"),
    ({"name": "topk", "k": 0}, "codec.k=0"),
    ({"name": "topk", "k": 2.0}, "codec.k=2.0"),
    ({"name": "topk", "k": True}, "codec.k=true"),
    ({"name": "none", "k": 2}, "codec.k=2: is not an option of codec 'none'"),
    ({"name": "int8", "levels": 16}, "codec.levels=16"),
    ({"name": "int8", "temperature": 0}, "codec.temperature=0"),
    ({"name": "int8", "temperature": -1.0}, "codec.temperature=-1.0"),
    ({"name": "int8", "temperature": float("nan")}, "codec.temperature=nan"),
    ({"name": "int8", "temperature": float("inf")}, "codec.temperature=inf"),
    ({"name": "int8", "temperature": "3"}, "codec.temperature='3'"),
])
def test_check_codec_refuses(spec: object, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_codec(spec)

    assert str(err.value).startswith(key)


def test_json_round_trip() -> None:
    text = codec_to_json({"temperature": 3, "k": 2, "name": "topk"})

    assert text == '{"k":2,"name":"topk","temperature":3.0}'
    assert codec_from_json(text) == {"name": "topk", "k": 2, "temperature": 3.0}


@pytest.mark.parametrize("text", [
    '{"name": "none", "temperature": NaN}', '{"name": "none", "temperature": Infinity}',
    '{"name": "none", "temperature": -Infinity}', '{"name": "none", "temperature": 1e400}',
    "", "{", "[1, 2]", '"none"', "null", '{"name": "topk", "k": 2', "[" * 100000,
    b'{"name": "none"}', None,
])
def test_codec_from_json_refuses(text: object) -> None:
    with pytest.raises(ConfigError, match="^codec"):
        codec_from_json(text)


# --- conf/codec ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CODEC_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_codec_config_checks(path: Path) -> None:
    cfg = OmegaConf.merge({"distill": {"temperature": 3.0}}, {"codec": OmegaConf.load(path)})

    spec = check_codec(OmegaConf.to_container(cfg.codec, resolve=True))

    assert spec["name"] == path.stem and "_target_" not in cfg.codec
    assert spec["temperature"] == (3.0 if "temperature" in cfg.codec else 1.0)
    assert spec.get("k") == (2 if path.stem == "topk" else None)


def test_every_codec_has_a_config() -> None:
    assert sorted(p.stem for p in CODEC_DIR.glob("*.yaml")) == sorted(CODECS)
