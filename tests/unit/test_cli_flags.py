"""Every numeric flag of the `tidal` command refuses NaN, infinities and out-of-range values at parse time,
through the real parsers, with a message naming the flag, the value and what is valid."""

from __future__ import annotations

import pytest
from tidal.cluster.cli import build_parser, main


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


SIM = ["simulate", "--out", "o"]


@pytest.mark.parametrize(
    ("argv", "flag", "value", "valid"),
    [
        (["arbiter", "start", "--tick-interval", "-1"], "--tick-interval", "-1", "seconds > 0 and <= 60"),
        (["arbiter", "start", "--tick-interval", "0"], "--tick-interval", "0", "seconds > 0 and <= 60"),
        (["arbiter", "start", "--tick-interval", "nan"], "--tick-interval", "nan", "seconds > 0 and <= 60"),
        (["arbiter", "start", "--tick-interval", "inf"], "--tick-interval", "inf", "seconds > 0 and <= 60"),
        (["arbiter", "start", "--metrics-port", "-5"], "--metrics-port", "-5", "a port >= 0 and <= 65535"),
        (["arbiter", "start", "--metrics-port", "70000"], "--metrics-port", "70000", "a port >= 0 and <= 65535"),
        ([*SIM, "--days", "nan"], "--days", "nan", "days > 0"),
        ([*SIM, "--days", "0"], "--days", "0", "days > 0"),
        ([*SIM, "--start-day", "-1"], "--start-day", "-1", "days >= 0"),
        ([*SIM, "--drain-s", "inf"], "--drain-s", "inf", "seconds >= 0"),
        ([*SIM, "--max-jobs", "0"], "--max-jobs", "0", "a whole number >= 1"),
        ([*SIM, "--training-load", "-2"], "--training-load", "-2", "a number > 0"),
        ([*SIM, "--rate-multiplier", "inf"], "--rate-multiplier", "inf", "a number > 0"),
        ([*SIM, "--inference-peak-share", "1.5"], "--inference-peak-share", "1.5", "a share > 0 and <= 1"),
        ([*SIM, "--request-window-s", "0"], "--request-window-s", "0", "seconds > 0"),
        ([*SIM, "--tick-s", "-1"], "--tick-s", "-1", "seconds > 0"),
        ([*SIM, "--tick-s", "nan"], "--tick-s", "nan", "seconds > 0"),
        ([*SIM, "--event-tick-delay-s", "-1"], "--event-tick-delay-s", "-1", "seconds >= 0"),
        ([*SIM, "--event-tick-min-gap-s", "inf"], "--event-tick-min-gap-s", "inf", "seconds >= 0"),
        ([*SIM, "--max-scale", "0.5"], "--max-scale", "0.5", "a number >= 1"),
        ([*SIM, "--min-fraction", "nan"], "--min-fraction", "nan", "a fraction > 0 and <= 1"),
        ([*SIM, "--node-failure-rate", "-1"], "--node-failure-rate", "-1", "failures per node-day >= 0"),
        ([*SIM, "--processes", "0"], "--processes", "0", "a whole number >= 1"),
        ([*SIM, "--seed", "-1"], "--seed", "-1", "a whole number >= 0"),
        ([*SIM, "--seed", "x"], "--seed", "x", "a whole number >= 0"),
        ([*SIM, "--job-types", "nan:H100"], "--job-types", "nan:H100", "a finite SHARE > 0"),
        ([*SIM, "--job-types", "inf:H100"], "--job-types", "inf:H100", "a finite SHARE > 0"),
        (["serve", "deploy", "--http-port", "0"], "--http-port", "0", "a port >= 1 and <= 65535"),
        (["serve", "promote", "ckpt", "--timeout-s", "-1"], "--timeout-s", "-1", "seconds > 0"),
        (["serve", "promote", "ckpt", "--timeout-s", "nan"], "--timeout-s", "nan", "seconds > 0"),
    ],
)
def test_a_bad_numeric_flag_stops_the_command_naming_the_flag_the_value_and_what_is_valid(
    argv, flag, value, valid, capsys
):
    err = _refused(argv, capsys)
    assert f"argument {flag}:" in err
    assert repr(value) in err
    assert valid in err


def test_good_numeric_flags_parse_to_numbers():
    args = build_parser().parse_args(
        ["arbiter", "start", "--tick-interval", "0.5", "--metrics-port", "9108", "--metrics-host", "0.0.0.0"]
    )
    assert (args.tick_interval, args.metrics_port, args.metrics_host) == (0.5, 9108, "0.0.0.0")
    args = build_parser().parse_args([*SIM, "--days", "2", "--inference-peak-share", "1", "--seed", "3"])
    assert (args.days, args.inference_peak_share, args.seed) == (2.0, 1.0, 3)


def test_a_bad_metrics_host_is_refused_before_the_cluster_is_touched(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAL_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = main(["arbiter", "start", "--metrics-host", "not a host!"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "arbiter.metrics_host: metrics_host 'not a host!' is not an IP address or host name" in err
    assert "nothing was changed" in err
