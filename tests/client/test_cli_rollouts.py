"""The canary story end to end: `edgefleet rollouts apply --watch` against a live plane, the real broker
and simulated devices, with the exit codes a pipeline acts on."""

from __future__ import annotations

import pytest

from fleet.choices import RolloutState
from fleet.models import Device, Heartbeat, Rollout
from fleet.services import assignments, devices, rollouts
from tests.fleet import helpers
from tests.fleet.simulated import SimulatedDevice
from tests.support import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

WATCH = ["--watch", "--interval", "0.2", "--timeout", "60"]


@pytest.fixture
def lab(plane, broker_port, request):
    """``lab(3, fails={"2"}, running=v1)``: simulated devices tagged "lab", on the real broker."""
    started: list[SimulatedDevice] = []
    prefix = request.node.name[-16:].replace("_", "-").strip("-")

    def start(n: int, *, fails=frozenset(), running=None) -> list[SimulatedDevice]:
        sims = [SimulatedDevice(f"{prefix}-{i}", broker_port, fails=fails).start() for i in range(n)]
        started.extend(sims)
        ids = [s.device_id for s in sims]
        wait_until(lambda: Device.objects.filter(device_id__in=ids).count() == n, timeout=10, what="hellos")
        for device in Device.objects.filter(device_id__in=ids):
            devices.set_tags(device, ["lab"], actor="system")
        if running is not None:
            assignments.assign_version(running, Device.objects.filter(device_id__in=ids), actor="system")
            wait_until(
                lambda: Device.objects.filter(device_id__in=ids, current_version=running).count() == n,
                timeout=10,
                what="the old version active",
            )
        return sims

    yield start
    for sim in started:
        sim.stop()


def _spec(tmp_path, version, canary_gates: str = "failure: {percent: 0}") -> str:
    path = tmp_path / "rollout.yaml"
    path.write_text(
        f"""\
name: {version.label} to the lab
version: {version.label}
selector:
  tags: [lab]
stages:
  - name: canary
    device_count: 1
    gates:
      {canary_gates}
  - name: everyone
    percent: 100
    gates:
      failure: {{percent: 0}}
"""
    )
    return str(path)


def test_it_exits_0_when_a_good_version_completes(lab, run, plane_url, release_token, tmp_path):
    v1 = helpers.make_published_version()
    lab(3)

    result = run("rollouts", "apply", "-f", _spec(tmp_path, v1), *WATCH, url=plane_url, token=release_token)

    assert result.code == 0, result.stderr
    assert Rollout.objects.get().state == RolloutState.COMPLETED
    assert Device.objects.filter(current_version=v1).count() == 3
    assert f"rollout {Rollout.objects.get().pk} completed" in result.stdout
    assert "the rollout completed" in result.stdout


def test_it_exits_1_when_the_canary_fails_and_the_rollout_rolls_back(lab, run, plane_url, release_token, tmp_path):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    lab(3, fails={str(v2.number)}, running=v1)

    result = run("rollouts", "apply", "-f", _spec(tmp_path, v2), *WATCH, url=plane_url, token=release_token)

    assert result.code == 1
    rollout = Rollout.objects.get()
    assert rollout.state == RolloutState.ROLLED_BACK
    assert "the rollout was rolled back" in result.stderr
    assert "failure gate" in result.stderr  # the plane's reason, as the pipeline's log shows it
    assert Device.objects.filter(current_version=v2).count() == 0


def test_it_exits_3_when_a_starved_canary_holds_past_the_hold_timeout(lab, run, plane_url, release_token, tmp_path):
    v1, v2 = helpers.make_published_version(), helpers.make_published_version()
    sims = lab(2, running=v1)
    for sim in sims:
        sim.beat(p95_ms=10, count=100)
    wait_until(lambda: Heartbeat.objects.count() >= 2, timeout=10, what="baseline heartbeats")
    # The canary runs the new version but sends no inference samples: its health gate can never decide.
    gates = "health: {p95_ratio: 1.2, min_samples: 100}"

    result = run(
        "rollouts", "apply", "-f", _spec(tmp_path, v2, gates), *WATCH, "--hold-timeout", "1",
        url=plane_url, token=release_token,
    )  # fmt: skip

    assert result.code == 3, result.stderr
    assert Rollout.objects.get().state == RolloutState.RUNNING
    assert "stage 1 (canary) has been held for" in result.stderr
    assert "health inconclusive" in result.stderr
    assert "running (held: soak over, a gate undecided)" in result.stdout  # the log line a CI job shows


def test_watch_output_json_gives_the_outcome_and_the_last_progress(lab, run, plane_url, release_token, tmp_path):
    v1 = helpers.make_published_version()
    lab(2)
    created = run("-o", "json", "rollouts", "apply", "-f", _spec(tmp_path, v1), "--no-start",
                  url=plane_url, token=release_token)  # fmt: skip
    rollout_id = created.json()["id"]
    assert created.json()["state"] == "draft"

    started = run("rollouts", "resume", str(rollout_id), url=plane_url, token=release_token)
    assert started.code == 1 and "409" in started.stderr  # a draft is started, not resumed: the plane says so

    rollouts.start_rollout(Rollout.objects.get(pk=rollout_id), actor="system")
    result = run("rollouts", "watch", str(rollout_id), "--interval", "0.2", "--output", "json",
                 url=plane_url, token=release_token)  # fmt: skip

    assert result.code == 0
    answer = result.json()
    assert (answer["outcome"], answer["exit_code"], answer["progress"]["state"]) == ("completed", 0, "completed")
    assert [stage["status"] for stage in answer["progress"]["stages"]] == ["passed", "passed"]
