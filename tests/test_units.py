"""Human units are parsed once, at the boundary, and anything ambiguous is refused."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.units import format_bytes, format_count, format_duration, parse_bytes, parse_count, parse_hours


@pytest.mark.parametrize("text, expected", [
    ("100M", 100_000_000), ("0.1B", 100_000_000), ("2.5k", 2_500), ("12_207", 12_207), ("1,602", 1_602),
    ("400k", 400_000), ("1e6", 1_000_000), (5000, 5000), (3.0, 3), ("1T", 10**12),
])
def test_counts_accept_suffixes_and_plain_numbers(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("bad", ["100MM", "-5", "1.5", "ten", "", "M", True, -1, 2.5, None, [1]])
def test_counts_refuse_ambiguous_input(bad):
    with pytest.raises(ValueError):
        parse_count(bad)


@pytest.mark.parametrize("text, hours", [("24h", 24), ("90m", 1.5), ("2d", 48), ("600s", 1 / 6), (1.5, 1.5), ("3", 3)])
def test_durations_are_hours(text, hours):
    assert parse_hours(text) == pytest.approx(hours)


@pytest.mark.parametrize("bad", ["0h", "-1h", "soon", 0, True])
def test_durations_must_be_positive_and_written_plainly(bad):
    with pytest.raises(ValueError):
        parse_hours(bad)


@pytest.mark.parametrize("text, nbytes", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512MiB", 512 * 2**20), (1024, 1024)])
def test_sizes_distinguish_binary_and_decimal_units(text, nbytes):
    assert parse_bytes(text) == nbytes


def test_formatters_are_short_and_readable():
    assert format_count(100_000_000) == "100M"
    assert format_bytes(24 * 2**30) == "24.0 GiB"
    assert format_duration(5400) == "1h30m"
    assert format_duration(42) == "42s"


@given(st.integers(min_value=0, max_value=10**15))
def test_any_integer_written_plainly_parses_to_itself(n):
    assert parse_count(str(n)) == n
    assert parse_count(f"{n:_}") == n


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from([("k", 10**3), ("M", 10**6), ("B", 10**9)]))
def test_suffixes_multiply(n, suffix):
    letter, scale = suffix
    assert parse_count(f"{n}{letter}") == n * scale


@given(st.text(max_size=12))
def test_count_parsing_never_fails_with_anything_but_value_error(text):
    try:
        assert parse_count(text) >= 0
    except ValueError:
        pass
