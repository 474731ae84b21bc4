"""Malformed trace rows (NaN, infinities, negatives, garbled cells, mixed time formats) stop the load with an
error that names the file, the line and the column: a simulation never runs on a silently bent trace."""

from __future__ import annotations

import pytest
from tidal.cluster.sim.traces import TraceError, load_inference_trace, load_training_trace

PHILLY_HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"
GOOD_JOB = "2017-09-04 10:30:41,2240.0,8,17920.0,7f04ca\n"
SERVEGEN_HEADER = "model,category,window_start_s,total_rate_rps,active_clients,rate_weighted_cv\n"


def _write(tmp_path, text: str, name: str = "t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("nan,2240.0,8,0,c\n", "timestamp", "nan"),
        ("inf,2240.0,8,0,c\n", "timestamp", "inf"),
        ("2017-09-04 11:00:00,nan,8,0,c\n", "duration", "nan"),
        ("2017-09-04 11:00:00,inf,8,0,c\n", "duration", "inf"),
        ("2017-09-04 11:00:00,-5,8,0,c\n", "duration", "-5"),
        ("2017-09-04 11:00:00,2240.0,inf,0,c\n", "num_gpus", "inf"),
        ("2017-09-04 11:00:00,2240.0,nan,0,c\n", "num_gpus", "nan"),
        ("2017-09-04 11:00:00,2240.0,-8,0,c\n", "num_gpus", "-8"),
        ("2017-09-04 11:00:00,2240.0,8x,0,c\n", "num_gpus", "8x"),
        ("2017-09-04 11:00:00\n", "duration", ""),
        ("3600,2240.0,8,0,c\n", "timestamp", "3600"),  # seconds among ISO date-times
    ],
)
def test_a_bad_philly_row_is_refused_naming_the_file_line_and_column(tmp_path, row, column, value):
    p = _write(tmp_path, PHILLY_HEADER + GOOD_JOB + "\n" + row)  # a blank line: the bad row is line 4
    with pytest.raises(TraceError) as e:
        load_training_trace(p)
    assert f"trace {p}, line 4: {column} = {value!r} is not valid; expected" in str(e.value)


def test_a_training_trace_in_seconds_refuses_a_negative_submit_time(tmp_path):
    p = _write(tmp_path, "timestamp,duration,num_gpus\n0,10,1\n-60,10,1\n")
    with pytest.raises(TraceError, match=r"line 3: timestamp = '-60' is not valid; expected .*seconds >= 0"):
        load_training_trace(p)


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        ("m,language,nan,180.0,40,1.4\n", "window_start_s", "nan"),
        ("m,language,inf,180.0,40,1.4\n", "window_start_s", "inf"),
        ("m,language,-600,180.0,40,1.4\n", "window_start_s", "-600"),
        ("m,language,600,nan,40,1.4\n", "total_rate_rps", "nan"),
        ("m,language,600,inf,40,1.4\n", "total_rate_rps", "inf"),
        ("m,language,600,-1,40,1.4\n", "total_rate_rps", "-1"),
        ("m,language,600,180.0,40,nan\n", "rate_weighted_cv", "nan"),
        ("m,language,600,180.0,40,inf\n", "rate_weighted_cv", "inf"),
        ("m,language,600,180.0,40,-0.5\n", "rate_weighted_cv", "-0.5"),
        ("m,language,600,180.0,40,high\n", "rate_weighted_cv", "high"),
    ],
)
def test_a_bad_servegen_row_is_refused_naming_the_file_line_and_column(tmp_path, row, column, value):
    p = _write(tmp_path, SERVEGEN_HEADER + "m,language,0,212.78,43,2.1\n" + row)
    with pytest.raises(TraceError) as e:
        load_inference_trace(p)
    assert f"trace {p}, line 3: {column} = {value!r} is not valid; expected" in str(e.value)


def test_an_empty_burstiness_cell_means_poisson(tmp_path):
    p = _write(tmp_path, SERVEGEN_HEADER + "m,language,0,212.78,43,2.1\nm,language,600,180.0,40,\n")
    assert load_inference_trace(p).cv == (2.1, 1.0)


@pytest.mark.parametrize(("row", "value"), [("nan\n", "nan"), ("inf\n", "inf"), ("-5\n", "-5"), ("soon\n", "soon")])
def test_a_bad_request_timestamp_is_refused_naming_the_file_line_and_column(tmp_path, row, value):
    p = _write(tmp_path, "TIMESTAMP,ContextTokens\n1.5\n" + row)
    with pytest.raises(TraceError) as e:
        load_inference_trace(p)
    assert f"trace {p}, line 3: TIMESTAMP = {value!r} is not valid; expected" in str(e.value)


def test_a_request_trace_that_mixes_date_times_and_seconds_is_refused(tmp_path):
    p = _write(tmp_path, "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.97,10\n12.5,10\n")
    with pytest.raises(TraceError, match=r"line 3: TIMESTAMP = '12.5' is not valid; expected an ISO date-time"):
        load_inference_trace(p)


def test_the_line_counts_lines_of_the_file_even_with_a_quoted_newline(tmp_path):
    p = _write(tmp_path, PHILLY_HEADER + '2017-09-04 10:30:41,2240.0,8,0,"two\nlines"\n2017-09-04 11:00:00,x,8,0,c\n')
    with pytest.raises(TraceError, match=r"line 4: duration = 'x'"):
        load_training_trace(p)
