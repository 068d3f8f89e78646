"""benchmarks.scale: the pure pieces (waves to rounds, set-up share, argv, table), no simulation."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmarks import scale


def _wave(r: int, kind: str, t: float, down: int, up: int, sent: int = 3) -> dict:
    return {"round": r, "type": kind, "sent": sent, "bytes_down": down, "bytes_up": up, "t": t,
            "load": 1.0}


WAVES = [_wave(1, "query.whoami", 4.0, 0, 10, sent=1000), _wave(1, "train.distill", 6.0, 100, 50),
         _wave(2, "train.distill", 7.5, 200, 60), _wave(3, "train.distill", 8.5, 300, 70)]


def test_round_table_sums_the_waves_of_a_round_and_times_its_end() -> None:
    table = scale.round_table(WAVES)
    assert table["wall_s"].tolist() == [6.0, 1.5, 1.0]
    assert table["bytes_down"].tolist() == [100, 200, 300]
    assert table["bytes_up"].tolist() == [60, 60, 70]  # round 1: whoami + distill


def test_summarize_splits_the_first_round_from_the_later_ones() -> None:
    frame = pd.DataFrame(
        [(1, 0, "m", "time-restore-s", 0.25), (1, 0, "m", "time-revisit-s", 0.5),
         (2, 1, "m", "time-restore-s", 0.25), (2, 1, "m", "time-digest-s", 1.0),
         (2, 1, "m", "test-accuracy", 0.9)],
        columns=["round", "client", "model", "metric", "value"])
    out = scale.summarize(WAVES, frame)
    assert out["rounds_done"] == 3 and out["first_round_s"] == 6.0
    assert out["later_round_mean_s"] == pytest.approx(1.25)
    assert out["bytes_down_per_round"] == 250 and out["bytes_up_per_round"] == 65
    assert out["whoami_messages"] == 1000
    assert out["restore_mean_ms"] == 250.0 and out["restore_share"] == 0.25
    assert scale.summarize([], None) == {"rounds_done": 0}


def test_base_overrides_sample_the_active_clients() -> None:
    for clients in (100, 1000, 10000, 50000):
        from fedkd.sampling import sample_size

        fraction = next(o for o in scale.base_overrides(clients, 100, 5)
                        if o.startswith("strategy.flower.fraction_train="))
        assert sample_size(clients, float(fraction.split("=")[1]), 2) == 100


def test_parse_args_keeps_hydra_overrides_and_refuses_unknown_options() -> None:
    args, rest = scale.parse_args(["--clients", "100", "1000", "seed=1", "--rounds", "2"])
    assert args.clients == [100, 1000] and args.rounds == 2 and rest == ["seed=1"]
    with pytest.raises(SystemExit):
        scale.parse_args(["--nope"])


def test_table_relates_memory_to_the_first_run_and_keeps_stopped_runs() -> None:
    done = {"clients": 100, "peak_rss_gib": 2.0, "loadavg_1min": [1.0, 2.0], "loadavg_mean": 1.5}
    stopped = {"clients": 50000, "stopped": "stopped after the 60 s timeout", "stage": "prepare"}
    frame = scale.table([done, {**done, "clients": 1000, "peak_rss_gib": 2.2}, stopped])
    assert frame["RSS vs first"].tolist()[:2] == [1.0, 1.1]
    assert frame["stopped"].tolist()[2].startswith("stopped")
    assert frame["load start/mean"].tolist()[0] == "1.0/1.5"
