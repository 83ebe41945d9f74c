"""Property-based tests of the tar scanner and shard reader on damaged shards (hypothesis).

Good shards in three layouts are cut, bit-flipped, given garbage header fields (with and
without a fixed checksum) and garbage PAX records, plain and gzipped. Every case must end
within a second, raise nothing but a ShardError, and account for every sample before the
damage (``tests/tarfuzz.py`` says exactly what is checked). ``benchmarks/fuzz_tar.py`` runs
the same cases by the tens of thousands.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, given, settings

from tarfuzz import check, damaged_gzips, damaged_tars, time_limit

FUZZ = settings(max_examples=600, deadline=timedelta(seconds=1), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(damaged_tars())
def test_damaged_tar_ends_and_accounts_for_samples_before_the_damage(case):
    good, data, how = case
    with time_limit(5):  # a hang fails here instead of stalling the suite (the deadline is 1 s)
        check(good, data, how)


@settings(FUZZ, max_examples=200)
@given(damaged_gzips())
def test_damaged_gzip_ends_and_accounts_for_samples_before_the_damage(case):
    good, data, how = case
    with time_limit(5):
        check(good, data, how)
