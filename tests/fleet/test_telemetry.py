"""Storing heartbeats on the real PostgreSQL: a resent heartbeat is stored once, a restarted agent's is not lost."""

import msgspec
import pytest
from django.utils import timezone

from fleet.models import Heartbeat
from fleet.services import telemetry
from fleet.services.telemetry import ReceivedHeartbeat
from tests.fleet.helpers import heartbeat, make_device

pytestmark = pytest.mark.django_db


def received(device, beat) -> ReceivedHeartbeat:
    return ReceivedHeartbeat(device.pk, beat, timezone.now())


def test_it_stores_a_resent_heartbeat_once():
    device = make_device()
    beat = heartbeat(device.device_id, seq=7)

    first = telemetry.store_heartbeats([received(device, beat)])
    again = telemetry.store_heartbeats([received(device, beat)])  # QoS 1 redelivery, or the outbox after an outage

    assert (first, again) == (1, 0)
    assert list(Heartbeat.objects.values_list("seq", flat=True)) == [7]


def test_it_stores_a_heartbeat_once_when_a_batch_holds_it_twice():
    device = make_device()
    beats = [heartbeat(device.device_id, seq=1), heartbeat(device.device_id, seq=2)]

    stored = telemetry.store_heartbeats([received(device, b) for b in [*beats, beats[0]]])

    assert stored == 2
    assert sorted(Heartbeat.objects.values_list("seq", flat=True)) == [1, 2]


def test_it_keeps_the_heartbeats_of_a_restarted_agent_that_counts_from_one_again():
    device = make_device()
    before_restart = heartbeat(device.device_id, seq=1)
    after_restart = msgspec.structs.replace(before_restart, sent_at=before_restart.sent_at + 90, uptime_s=1.0)

    telemetry.store_heartbeats([received(device, before_restart)])
    stored = telemetry.store_heartbeats([received(device, after_restart)])

    assert stored == 1
    assert Heartbeat.objects.filter(seq=1).count() == 2


def test_it_tells_the_same_seq_of_two_devices_apart():
    one, two = make_device("dev-1"), make_device("dev-2")
    beat = heartbeat("dev-1", seq=3)

    stored = telemetry.store_heartbeats([received(one, beat), received(two, beat)])

    assert stored == 2
    assert Heartbeat.objects.count() == 2
