"""Staged rollouts against a real Mosquitto and PostgreSQL, with simulated devices speaking the protocol.

The bridge runs in this process on a real paho client; Celery is eager, so each
device report that settles a deployment evaluates its rollout in the bridge's thread,
as a worker would. Tests call the evaluator directly where the beat would.
"""

from __future__ import annotations

import pytest

from fleet.choices import DeploymentState, RolloutState
from fleet.models import Deployment, Device, Heartbeat, Rollout
from fleet.services import assignments, devices, registry, rollouts
from tests.fleet import helpers
from tests.fleet.simulated import SimulatedDevice
from tests.support import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CANARY_THEN_ALL = [{"device_count": 1}, {"percent": 100}]


@pytest.fixture
def fleet(plane, broker_port, request):
    """Start simulated devices tagged "lab": ``fleet(4, fails={"2"}, running=v1)``."""
    started: list[SimulatedDevice] = []
    prefix = request.node.name[-20:].replace("_", "-").strip("-")

    def start(n: int, *, fails=frozenset(), running=None, first=0) -> list[SimulatedDevice]:
        sims = [SimulatedDevice(f"{prefix}-{i}", broker_port, fails=fails).start() for i in range(first, first + n)]
        started.extend(sims)
        ids = [s.device_id for s in sims]
        wait_until(lambda: Device.objects.filter(device_id__in=ids).count() == n, timeout=10, what="hellos")
        for device in Device.objects.filter(device_id__in=ids):
            devices.set_tags(device, ["lab"], actor="system")
        if running is not None:
            assignments.assign_version(running, Device.objects.filter(device_id__in=ids), actor="system")
            wait_until(lambda: all(_runs(s, running) for s in sims), timeout=10, what="the old version active")
        return sims

    yield start
    for sim in started:
        sim.stop()


def _runs(sim: SimulatedDevice, version) -> bool:
    return Device.objects.filter(device_id=sim.device_id, current_version=version).exists()


def _rollout(version, stages, **fields) -> Rollout:
    stages = [{"failure_percent": 0, **stage} for stage in stages]
    return rollouts.create_rollout(version, stages=stages, tags=["lab"], actor="system", **fields)


def _state(rollout: Rollout) -> str:
    return Rollout.objects.get(pk=rollout.pk).state


def _canary(rollout: Rollout) -> str:
    return rollout.members.get(stage_index=0).device.device_id


def _stored(sims: list[SimulatedDevice], beats: int) -> bool:
    return Heartbeat.objects.filter(device__device_id__in=[s.device_id for s in sims]).count() >= beats


def test_it_takes_a_good_version_from_canary_to_a_quarter_to_everyone(fleet):
    v1 = helpers.make_published_version()
    sims = fleet(4)
    rollout = _rollout(v1, [{"device_count": 1}, {"percent": 25}, {"percent": 100}])

    rollouts.start_rollout(rollout, actor="system")

    wait_until(lambda: _state(rollout) == RolloutState.COMPLETED, timeout=15, what="the rollout completed")
    assert sorted(rollout.members.values_list("stage_index", flat=True)) == [0, 1, 2, 2]
    assert Device.objects.filter(current_version=v1).count() == 4
    assert all(sim.versions_received() == [str(v1.number)] for sim in sims)
    passed = rollout.stages.exclude(passed_at=None).count()
    assert passed == 3


def test_it_rolls_back_a_version_that_fails_on_the_canary_and_no_one_else_receives_it(fleet):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = fleet(4, fails={str(v2.number)}, running=v1)
    rollout = _rollout(v2, CANARY_THEN_ALL)

    rollouts.start_rollout(rollout, actor="system")

    wait_until(lambda: _state(rollout) == RolloutState.ROLLED_BACK, timeout=15, what="the rollout rolled back")
    canary = _canary(rollout)
    wait_until(lambda: all(_runs(s, v1) for s in sims), timeout=10, what="every device on the old version")
    rollout.refresh_from_db()
    assert "failure gate" in rollout.reason
    assert rollout.gates["failure"]["verdict"] == "fail"
    # Only the canary ever heard of v2: in its deployments and in the retained desired messages.
    assert list(Deployment.objects.filter(version=v2).values_list("device__device_id", flat=True)) == [canary]
    for sim in sims:
        expected = [str(v1.number), str(v2.number), str(v1.number)] if sim.device_id == canary else [str(v1.number)]
        assert sim.versions_received() == expected, sim.device_id


def test_it_rolls_back_when_canary_latency_regresses(fleet):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = fleet(3, running=v1)
    for sim in sims:
        sim.beat(p95_ms=10, count=100)
    wait_until(lambda: _stored(sims, 3), timeout=10, what="baseline heartbeats")
    rollout = _rollout(
        v2, [{"device_count": 1, "health_p95_ratio": "1.2", "health_min_samples": 100}, {"percent": 100}]
    )

    rollouts.start_rollout(rollout, actor="system")
    canary = next(s for s in sims if s.device_id == _canary(rollout))
    wait_until(lambda: _runs(canary, v2), timeout=10, what="the canary on the new version")
    canary.beat(p95_ms=20, count=200)
    wait_until(lambda: _stored(sims, 4), timeout=10, what="the canary's heartbeat")
    rollouts.evaluate_rollout(rollout.pk)

    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLED_BACK
    assert "health gate" in rollout.reason
    assert rollout.gates["health"]["value"] == 2.0
    wait_until(lambda: _runs(canary, v1), timeout=10, what="the canary back on the old version")
    assert Deployment.objects.filter(version=v2).count() == 1


def test_too_few_samples_holds_the_stage(fleet):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = fleet(2, running=v1)
    for sim in sims:
        sim.beat(p95_ms=10, count=100)
    wait_until(lambda: _stored(sims, 2), timeout=10, what="baseline heartbeats")
    rollout = _rollout(
        v2, [{"device_count": 1, "health_p95_ratio": "1.2", "health_min_samples": 100}, {"percent": 100}]
    )

    rollouts.start_rollout(rollout, actor="system")
    canary = next(s for s in sims if s.device_id == _canary(rollout))
    wait_until(lambda: _runs(canary, v2), timeout=10, what="the canary on the new version")
    canary.beat(p95_ms=10, count=5)
    wait_until(lambda: _stored(sims, 3), timeout=10, what="the canary's heartbeat")
    with pytest.raises(rollouts.RolloutError, match="health gate inconclusive: 5 samples"):
        rollouts.promote_rollout(rollout, actor="system")  # held, not merely soaking: refused
    rollouts.evaluate_rollout(rollout.pk)

    rollout.refresh_from_db()
    assert (rollout.state, rollout.current_stage) == (RolloutState.RUNNING, 0)
    health = rollouts.rollout_progress(rollout)["stages"][0]["progress"].gates[2]
    assert health.verdict == "inconclusive"
    assert Deployment.objects.filter(version=v2).count() == 1

    canary.beat(p95_ms=11, count=100)
    wait_until(lambda: _stored(sims, 4), timeout=10, what="enough samples")
    rollouts.evaluate_rollout(rollout.pk)
    wait_until(lambda: _state(rollout) == RolloutState.COMPLETED, timeout=10, what="the held stage passed")


def test_it_picks_up_a_device_that_joins_mid_rollout(fleet):
    v1 = helpers.make_published_version()
    fleet(2)
    rollout = _rollout(v1, [{"device_count": 1}, {"percent": 100, "min_soak_seconds": 3600}])
    rollouts.start_rollout(rollout, actor="system")
    wait_until(lambda: Device.objects.filter(current_version=v1).count() == 2, timeout=10, what="both devices")
    assert Rollout.objects.get(pk=rollout.pk).current_stage == 1

    (newcomer,) = fleet(1, first=2)
    rollouts.evaluate_rollout(rollout.pk)

    wait_until(lambda: _runs(newcomer, v1), timeout=10, what="the newcomer on the new version")
    assert rollout.members.get(device__device_id=newcomer.device_id).stage_index == 1
    rollouts.promote_rollout(rollout, actor="system")
    assert _state(rollout) == RolloutState.COMPLETED


def test_it_marks_ineligible_devices_without_failing_the_stage(fleet):
    v1 = helpers.make_published_version()
    v2 = helpers.make_version(v1.model)
    helpers.add_ready_artifact(v2, hardware_class="linux-aarch64")
    v2 = registry.publish_version(v2, actor="system")
    fleet(2)
    rollout = _rollout(v2, [{"device_count": 1}, {"percent": 100}])

    rollouts.start_rollout(rollout, actor="system")

    rollout.refresh_from_db()
    assert rollout.state == RolloutState.COMPLETED
    counts = rollouts.stage_counts(rollout)
    assert counts[0].ineligible == 1 and counts[0].failures == 0
    assert not Deployment.objects.filter(version=v2).exclude(state=DeploymentState.PENDING).exists()


def test_it_credits_a_heartbeat_only_to_the_senders_own_deployment(fleet):
    # Issue #13, item 3: a device that names another device's deployment in its heartbeats
    # used to decide that deployment's health gate, and rolled a rollout back.
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = fleet(3, running=v1)
    for sim in sims:
        sim.beat(p95_ms=10, count=100)
    wait_until(lambda: _stored(sims, 3), timeout=10, what="baseline heartbeats")
    rollout = _rollout(
        v2, [{"device_count": 1, "health_p95_ratio": "1.2", "health_min_samples": 100}, {"percent": 100}]
    )
    rollouts.start_rollout(rollout, actor="system")
    canary = next(s for s in sims if s.device_id == _canary(rollout))
    forger = next(s for s in sims if s is not canary)
    wait_until(lambda: _runs(canary, v2), timeout=10, what="the canary on the new version")

    forger.active = canary.active  # claims to run the canary's deployment
    forger.beat(p95_ms=500, count=1000)
    canary.beat(p95_ms=10, count=200)
    wait_until(lambda: _stored(sims, 5), timeout=10, what="the forged and the real heartbeat")
    rollouts.evaluate_rollout(rollout.pk)

    rollout.refresh_from_db()
    assert rollout.state != RolloutState.ROLLED_BACK, rollout.reason
    assert rollout.current_stage == 1


def _chat(ttft_ms: float, tps: float, requests: int):
    from agent.contract import wire

    return wire.GenerationStats(
        requests=requests, tokens=requests * 64, ttft_p50_ms=ttft_ms / 2, ttft_p95_ms=ttft_ms, decode_tps_p50=tps
    )


def test_it_rolls_back_a_generative_model_whose_canary_answers_slower(fleet):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = fleet(3, running=v1)
    for sim in sims:
        sim.beat(p95_ms=10, count=0, generation=_chat(ttft_ms=40, tps=80, requests=50))
    wait_until(lambda: _stored(sims, 3), timeout=10, what="baseline heartbeats")
    rollout = _rollout(
        v2,
        [
            {"device_count": 1, "health_ttft_ratio": "1.5", "health_tps_ratio": "0.8", "health_min_samples": 50},
            {"percent": 100},
        ],
    )
    rollouts.start_rollout(rollout, actor="system")
    canary = next(s for s in sims if s.device_id == _canary(rollout))
    wait_until(lambda: _runs(canary, v2), timeout=10, what="the canary on the new version")

    canary.beat(p95_ms=10, count=0, generation=_chat(ttft_ms=41, tps=30, requests=60))  # decodes at 3/8 the rate
    wait_until(lambda: _stored(sims, 4), timeout=10, what="the canary's heartbeat")
    rollouts.evaluate_rollout(rollout.pk)

    rollout.refresh_from_db()
    assert rollout.state == RolloutState.ROLLED_BACK
    assert "generation gate" in rollout.reason
    assert "decode 30.0 tok/s vs 80.0" in rollout.reason
