"""The one formatting module and its template library: the texts every page shows for the same figures."""

from __future__ import annotations

import math
from typing import Any

import pytest
from django.template import Context, Template

from builder.core import formatting as f


@pytest.mark.parametrize(
    ("function", "value", "text"),
    [
        (f.human_bytes, 512, "512 B"),
        (f.human_bytes, 1536, "1.5 KiB"),
        (f.human_bytes, 3.3 * 2**30, "3.3 GiB"),
        (f.human_bytes, 7 * 2**40, "7.0 TiB"),
        (f.human_count, 950, "950"),
        (f.human_count, 12_345_678, "12.3M"),
        (f.human_count, 1.9e9, "1.9B"),
        (f.human_flops, 48.8e6, "48.8 MFLOP"),
        (f.human_flops, 3.1e15, "3.1 PFLOP"),
        (f.approx_duration, 0.85, "850 ms"),
        (f.approx_duration, 42, "42.0 s"),
        (f.approx_duration, 720, "12 min"),
        (f.approx_duration, 3.4 * 3600, "3.4 h"),
        (f.approx_duration, 2.1 * 86400 * 2, "4.2 days"),
        (f.duration, 42.4, "42 s"),
        (f.duration, 59.6, "1 min 00 s"),  # whole seconds: rounded first
        (f.duration, 250, "4 min 10 s"),
        (f.duration, 7500, "2 h 05 min"),
        (f.percent, 0.4567, "45.7%"),
        (f.num, 2.34567, "2.346"),
        (f.num, 0.000123, "1.230e-04"),
        (f.num, 123456, "123,456"),
        (f.num, 0, "0"),
        (f.fixed, 0.12345, "0.12"),
        (f.thousands, 12345678, "12,345,678"),
        (f.thousands, "n/a", "n/a"),  # shown as it is
        (f.spaced, "exact_duplicate", "exact duplicate"),
        (f.json_value, [0.9, 0.95], "[0.9, 0.95]"),
        (f.json_value, None, "null"),
    ],
)
def test_each_figure_reads_as_people_expect(function: Any, value: Any, text: str) -> None:
    assert function(value) == text


def test_a_parameter_keeps_each_page_s_precision() -> None:
    # The report's timings keep a tenth of a second under a minute; the jobs pages show whole seconds.
    assert (f.duration(42.35, 1), f.duration(42.35)) == ("42.4 s", "42 s")
    assert f.duration(75.4, 1) == "1 min 15 s"  # above a minute, the same text
    # The estimate shows the share of memory used in whole percents; datasets, jobs and reports to a tenth.
    assert (f.percent(0.4567, 0), f.percent(0.0388), f.percent(0.25, 2)) == ("46%", "3.9%", "25.00%")
    assert (f.num(2.34567, 2), f.fixed(0.12345, 3)) == ("2.3", "0.123")


@pytest.mark.parametrize("missing", [None, "", "x", True, math.nan, math.inf])
def test_a_missing_or_unreadable_number_is_a_dash_and_never_an_error(missing: Any) -> None:
    for function in (f.human_bytes, f.human_count, f.human_flops, f.approx_duration, f.duration, f.percent, f.num):
        assert function(missing) == f.DASH
    assert f.fixed(missing) == f.DASH
    assert f.share(missing, 10) == f.share(5, missing) == f.share(5, 0) == "0"


def test_share_is_a_clamped_css_width() -> None:
    assert (f.share(1, 4), f.share(-1, 4), f.share(9, 4)) == ("25.00", "0.00", "100.00")


def test_lookup_reads_mappings_lists_and_forms_and_misses_quietly() -> None:
    assert (f.lookup({"a": 1}, "a"), f.lookup([5, 6], 1)) == (1, 6)
    assert f.lookup({}, "a") is None and f.lookup([1], 5) is None and f.lookup(None, "a") is None


def test_the_template_library_has_every_filter() -> None:
    template = Template(
        "{% load formatting %}{{ b|human_bytes }}|{{ n|human_count }}|{{ fl|human_flops }}|{{ s|duration }}|"
        "{{ s|approx_duration }}|{{ p|percent }}|{{ p|percent:0 }}|{{ b|share:total }}|{{ x|num }}|{{ x|fixed:3 }}|"
        "{{ n|thousands }}|{{ code|spaced }}|{{ v|json_value }}|{{ svg|svg }}|{{ m|get:'k' }}"
    )
    context = Context(
        {
            "b": 1536, "n": 12345, "fl": 2e9, "s": 250, "p": 0.4567, "total": 3072, "x": 2.34567,
            "code": "near_duplicate", "v": [1, True], "svg": "<svg></svg>", "m": {"k": "v"},
        }
    )  # fmt: skip
    assert template.render(context) == (
        "1.5 KiB|12.3k|2.0 GFLOP|4 min 10 s|4 min|45.7%|46%|50.00|2.346|2.346|12,345|near duplicate|[1, true]|"
        "<svg></svg>|v"
    )
