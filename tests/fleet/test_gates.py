"""Stage sizes and gate arithmetic, by property: no database here."""

import dataclasses
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fleet.lib import gates
from fleet.lib.gates import Inference, StageCounts, StageSize, Verdict

percents = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100"), places=2)
sizes = st.one_of(
    percents.map(lambda p: StageSize(percent=p)),
    st.integers(min_value=1, max_value=10_000).map(lambda n: StageSize(device_count=n)),
)
fleets = st.integers(min_value=0, max_value=100_000)


@given(fleet=fleets, stages=st.lists(sizes, min_size=1, max_size=8))
def test_it_never_reaches_past_the_fleet_and_never_goes_back(fleet, stages):
    targets = gates.cumulative_targets(fleet, stages)

    assert all(0 <= t <= fleet for t in targets)
    assert targets == sorted(targets)


@given(fleet=st.integers(min_value=1, max_value=100_000), stages=st.lists(sizes, min_size=1, max_size=8))
def test_it_never_makes_an_empty_stage_while_devices_remain(fleet, stages):
    targets = gates.cumulative_targets(fleet, stages)

    before = 0
    for target in targets:
        assert target > before or target == fleet
        before = target
    assert targets[0] >= 1


@given(percent=percents)
def test_a_percentage_that_rounds_to_zero_still_reaches_one_device(percent):
    assert gates.cumulative_targets(1, [StageSize(percent=percent)]) == [1]


@given(stages=st.lists(sizes, min_size=1, max_size=8))
def test_an_empty_fleet_has_empty_stages(stages):
    assert gates.cumulative_targets(0, stages) == [0] * len(stages)


def test_the_canary_then_a_quarter_then_everyone():
    stages = [StageSize(device_count=1), StageSize(percent=25), StageSize(percent=100)]

    assert gates.cumulative_targets(8, stages) == [1, 2, 8]
    assert gates.cumulative_targets(1, stages) == [1, 1, 1]
    assert gates.cumulative_targets(100, stages) == [1, 25, 100]


@pytest.mark.parametrize(
    "size", [{}, {"percent": 0}, {"percent": 101}, {"device_count": 0}, {"percent": 5, "device_count": 1}]
)
def test_it_refuses_a_size_that_means_nothing(size):
    with pytest.raises(ValueError):
        StageSize(**size)


@given(rollout=st.integers(min_value=1), ids=st.lists(st.text(min_size=1, max_size=8), unique=True, max_size=30))
def test_cohorts_are_deterministic_and_keep_their_order_as_devices_join(rollout, ids):
    order = gates.cohort_order(rollout, ids)

    assert gates.cohort_order(rollout, list(reversed(ids))) == order
    assert [d for d in gates.cohort_order(rollout, [*ids, "newcomer"]) if d != "newcomer"] == [
        d for d in order if d != "newcomer"
    ]


# --- Success and failure -------------------------------------------------------------

counts = st.builds(
    lambda active, failed, rolled_back, ineligible, waiting: StageCounts(
        targeted=active + failed + rolled_back + ineligible + waiting,
        pending=waiting,
        active=active,
        failed=failed,
        rolled_back=rolled_back,
        ineligible=ineligible,
    ),
    *[st.integers(min_value=0, max_value=200)] * 5,
)


@given(eligible=st.integers(min_value=1, max_value=1000), data=st.data())
def test_the_success_gate_passes_exactly_at_its_threshold(eligible, data):
    active = data.draw(st.integers(min_value=0, max_value=eligible))
    threshold = Fraction(100 * active, eligible)
    stage = StageCounts(targeted=eligible, active=active, pending=eligible - active)

    assert gates.success_gate(stage, threshold).verdict == Verdict.PASS
    if active < eligible:
        assert gates.success_gate(stage, threshold + Fraction(1, 10**6)).verdict == Verdict.WAITING


@given(stage=counts, percent=percents)
def test_ineligible_devices_never_count_against_the_success_gate(stage, percent):
    fewer = dataclasses.replace(stage, targeted=stage.targeted - stage.ineligible, ineligible=0)

    assert gates.success_gate(stage, percent).verdict == gates.success_gate(fewer, percent).verdict


@given(finished=st.integers(min_value=1, max_value=1000), data=st.data())
def test_the_failure_gate_trips_only_above_its_threshold(finished, data):
    failures = data.draw(st.integers(min_value=0, max_value=finished))
    stage = StageCounts(targeted=finished, active=finished - failures, failed=failures)
    at = Fraction(100 * failures, finished)

    assert gates.failure_gate(stage, at, min_finished=1).verdict == Verdict.PASS
    if failures:
        assert gates.failure_gate(stage, at - Fraction(1, 10**6), min_finished=1).verdict == Verdict.FAIL


@given(stage=counts, percent=percents, minimum=st.integers(min_value=1, max_value=500))
def test_the_failure_gate_waits_for_its_minimum_of_finished_devices(stage, percent, minimum):
    verdict = gates.failure_gate(stage, percent, minimum).verdict

    if stage.finished < min(minimum, stage.eligible) or stage.eligible == 0:
        assert verdict == Verdict.WAITING
    else:
        assert verdict in (Verdict.PASS, Verdict.FAIL)


@given(stage=counts, percent=percents)
def test_ineligible_devices_are_never_failures(stage, percent):
    assume(stage.failed == stage.rolled_back == 0)

    assert gates.failure_gate(stage, percent, 1).verdict != Verdict.FAIL


def test_a_stage_of_no_devices_passes_and_never_fails():
    assert gates.success_gate(StageCounts(), 100).verdict == Verdict.PASS
    assert gates.failure_gate(StageCounts(), 0, 1).verdict == Verdict.WAITING
    only_ineligible = StageCounts(targeted=1, ineligible=1)
    assert gates.success_gate(only_ineligible, 100).verdict == Verdict.PASS
    assert gates.failure_gate(only_ineligible, 0, 1).verdict == Verdict.WAITING


def test_one_failed_canary_trips_a_zero_threshold():
    assert gates.failure_gate(StageCounts(targeted=1, failed=1), 0, 5).verdict == Verdict.FAIL


# --- Health --------------------------------------------------------------------------

latency = st.fractions(min_value=Fraction(1, 10), max_value=10_000, max_denominator=1000)


def inference(p95, samples=1000, errors=0, requests=None):
    return Inference(requests=requests or samples, errors=errors, samples=samples, p95_weighted_sum=p95 * samples)


@given(base=latency, ratio=st.decimals(min_value=Decimal("1"), max_value=Decimal("5"), places=3))
def test_the_health_gate_passes_at_exactly_its_latency_ratio(base, ratio):
    at = base * Fraction(str(ratio))
    result = gates.health_gate(
        inference(at), inference(base), max_p95_ratio=ratio, max_error_rate_points=1, min_samples=100
    )
    over = gates.health_gate(
        inference(at + Fraction(1, 10**6)),
        inference(base),
        max_p95_ratio=ratio,
        max_error_rate_points=1,
        min_samples=100,
    )

    assert result.verdict == Verdict.PASS
    assert over.verdict == Verdict.FAIL


@given(base_errors=st.integers(min_value=0, max_value=50), points=st.integers(min_value=0, max_value=10))
def test_the_health_gate_passes_at_exactly_its_error_rate_tolerance(base_errors, points):
    # 1000 requests each side: one point is 10 errors.
    at = base_errors + 10 * points
    ok = gates.health_gate(
        inference(10, errors=at), inference(10, errors=base_errors), max_p95_ratio=1.2,
        max_error_rate_points=points, min_samples=100,
    )  # fmt: skip
    worse = gates.health_gate(
        inference(10, errors=at + 1), inference(10, errors=base_errors), max_p95_ratio=1.2,
        max_error_rate_points=points, min_samples=100,
    )  # fmt: skip

    assert ok.verdict == Verdict.PASS
    assert worse.verdict == Verdict.FAIL


@given(
    candidate=st.integers(min_value=0, max_value=300),
    baseline=st.integers(min_value=0, max_value=300),
    minimum=st.integers(min_value=1, max_value=300),
    p95=latency,
)
def test_too_few_samples_is_inconclusive_and_never_passes(candidate, baseline, minimum, p95):
    assume(candidate < minimum or baseline < minimum)
    result = gates.health_gate(
        inference(p95, samples=candidate),
        inference(p95, samples=baseline),
        max_p95_ratio=100,
        max_error_rate_points=100,
        min_samples=minimum,
    )

    assert result.verdict == Verdict.INCONCLUSIVE


def test_a_doubled_latency_fails_a_twenty_percent_tolerance():
    result = gates.health_gate(inference(20), inference(10), max_p95_ratio=1.2, max_error_rate_points=1, min_samples=1)

    assert result.verdict == Verdict.FAIL
    assert result.value == 2.0


def test_it_holds_a_generation_gate_below_the_minimum_of_completions():
    from fleet.lib.gates import Generation, Verdict, generation_gate

    result = generation_gate(
        Generation(requests=5, ttft_p95_weighted_sum=5 * 40, tps_weighted_sum=5 * 80),
        Generation(requests=500, ttft_p95_weighted_sum=500 * 40, tps_weighted_sum=500 * 80),
        max_ttft_ratio=1.5,
        min_tps_ratio=0.8,
        min_samples=50,
    )

    assert result.verdict == Verdict.INCONCLUSIVE
    assert "5 completions on the new version" in result.detail


@pytest.mark.parametrize(
    "ttft, tps, verdict",
    [(40, 80, "pass"), (59, 65, "pass"), (61, 80, "fail"), (40, 63, "fail")],
)
def test_it_judges_time_to_first_token_and_decode_rate_against_the_baseline(ttft, tps, verdict):
    from fleet.lib.gates import Generation, generation_gate

    result = generation_gate(
        Generation(requests=100, ttft_p95_weighted_sum=100 * ttft, tps_weighted_sum=100 * tps),
        Generation(requests=100, ttft_p95_weighted_sum=100 * 40, tps_weighted_sum=100 * 80),
        max_ttft_ratio=1.5,
        min_tps_ratio=0.8,
        min_samples=50,
    )

    assert result.verdict == verdict
