"""Heartbeat retention: daily partitions on PostgreSQL, hourly rollups, old data dropped."""

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from agent.contract import wire
from fleet.lib import partitions
from fleet.models import Device, Heartbeat, HeartbeatRollup
from fleet.services import heartbeat_retention as retention
from fleet.services import telemetry

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 12, 7, 18, 30, tzinfo=UTC)
postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="partitions are PostgreSQL's; make test runs it"
)


def beat(device: Device, seq: int, sent_at: datetime, received_at: datetime | None = None, p95=10.0, requests=5):
    message = wire.Heartbeat(
        device_id=device.device_id, seq=seq, sent_at=sent_at.timestamp(), interval_s=30, uptime_s=1.0,
        cpu_percent=10.0 + seq % 3, mem_rss_bytes=1 << 20, mem_available_bytes=1 << 30, requests=requests, errors=1,
        latency=wire.LatencyStats(count=requests, p50_ms=p95 / 2, p95_ms=p95, p99_ms=p95 * 1.5, max_ms=p95 * 2),
    )  # fmt: skip
    return telemetry.ReceivedHeartbeat(device.pk, message, received_at or sent_at)


def rows_in(table: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT count(*) FROM "{table}"')
        return cursor.fetchone()[0]


@postgresql_only
def test_it_keeps_heartbeats_in_daily_partitions_with_a_default_for_the_rest():
    today = datetime.now(tz=UTC).date()
    assert retention.is_partitioned()
    days = retention.partition_days()
    assert days[0] <= today - timedelta(days=13) and days[-1] >= today + timedelta(days=3)
    device = Device.objects.create(device_id="dev-p")
    now = datetime.now(tz=UTC)
    telemetry.store_heartbeats([beat(device, 1, now), beat(device, 2, now + timedelta(days=300))])
    assert rows_in(partitions.partition_name(now.date())) == 1
    assert rows_in(partitions.DEFAULT) == 1
    assert Heartbeat.objects.count() == 2


@postgresql_only
def test_it_stores_a_resent_heartbeat_once_although_the_table_is_partitioned():
    device = Device.objects.create(device_id="dev-r")
    now = datetime.now(tz=UTC)
    batch = [beat(device, n, now + timedelta(seconds=n)) for n in range(5)] + [
        beat(device, 9, now + timedelta(days=300))
    ]
    assert telemetry.store_heartbeats(batch) == 6
    # The broker delivers the same messages again to another bridge: a later received_at, the same identity.
    again = [telemetry.ReceivedHeartbeat(b.device_pk, b.message, b.received_at + timedelta(seconds=30)) for b in batch]
    assert telemetry.store_heartbeats(again[:3] + [beat(device, 5, now + timedelta(seconds=5))]) == 1
    assert Heartbeat.objects.count() == 7


@postgresql_only
def test_it_makes_a_partition_for_a_day_whose_rows_wait_in_the_default():
    device = Device.objects.create(device_id="dev-f")
    later = (datetime.now(tz=UTC) + timedelta(days=40)).replace(hour=12)
    telemetry.store_heartbeats([beat(device, 1, later), beat(device, 2, later + timedelta(days=1))])
    assert rows_in(partitions.DEFAULT) == 2
    created = retention.ensure_partitions(later.date())
    assert later.date() in created and later.date() + timedelta(days=1) in created
    assert rows_in(partitions.DEFAULT) == 0
    assert rows_in(partitions.partition_name(later.date())) == 1
    assert retention.ensure_partitions(later.date()) == []  # idempotent
    # The moved rows are still the same heartbeats: a resend of one is still skipped.
    assert telemetry.store_heartbeats([beat(device, 1, later)]) == 0


def test_it_drops_heartbeats_sent_before_the_retention(settings):
    settings.HEARTBEAT_RETENTION_DAYS = 3
    device = Device.objects.create(device_id="dev-old")
    now = datetime.now(tz=UTC)
    telemetry.store_heartbeats([beat(device, n, now - timedelta(days=n)) for n in range(8)]
                               + [beat(device, 99, now - timedelta(days=700))])  # fmt: skip
    done = retention.maintain_heartbeats(now)
    first_kept = (now - timedelta(days=3)).date()
    kept = sorted(Heartbeat.objects.values_list("seq", flat=True))
    assert kept == [n for n in range(8) if (now - timedelta(days=n)).date() >= first_kept]
    if connection.vendor == "postgresql":
        assert done.partitions_dropped and max(done.partitions_dropped) < first_kept
        assert min(retention.partition_days()) == first_kept
        assert done.rows_deleted == 1  # the 700-day-old one, from the default partition


def test_it_rolls_up_each_device_hour_by_hour_with_percentiles_of_its_heartbeats():
    a = Device.objects.create(device_id="dev-a")
    b = Device.objects.create(device_id="dev-b")
    hour = datetime(2026, 12, 7, 10, tzinfo=UTC)
    batch = [beat(a, n, hour + timedelta(minutes=n), p95=float(10 * (n + 1))) for n in range(4)]
    batch += [beat(a, 10, hour + timedelta(minutes=70)), beat(b, 1, hour + timedelta(minutes=5), requests=7)]
    telemetry.store_heartbeats(batch)
    assert retention.roll_up(hour, hour + timedelta(hours=2)) == 3
    first = HeartbeatRollup.objects.get(device=a, hour=hour)
    assert (first.heartbeats, first.requests, first.errors, first.latency_count) == (4, 20, 4, 20)
    # p95s 10, 20, 30, 40: percentile_cont(0.95) = 30 + 0.85 * 10
    assert first.p95_ms == pytest.approx(38.5)
    assert first.p50_ms == pytest.approx(12.5)
    assert first.max_ms == 80.0
    assert HeartbeatRollup.objects.get(device=a, hour=hour + timedelta(hours=1)).heartbeats == 1
    assert HeartbeatRollup.objects.get(device=b, hour=hour).requests == 7
    # Rolled up again (a late heartbeat): the hour is replaced, not added to.
    telemetry.store_heartbeats([beat(a, 20, hour + timedelta(minutes=59), p95=50.0)])
    retention.roll_up(hour, hour + timedelta(hours=1))
    assert HeartbeatRollup.objects.get(device=a, hour=hour).heartbeats == 5


def test_it_rolls_up_in_python_what_postgresql_rolls_up_in_sql():
    device = Device.objects.create(device_id="dev-s")
    hour = datetime(2026, 12, 7, 10, tzinfo=UTC)
    telemetry.store_heartbeats(
        [beat(device, n, hour + timedelta(minutes=n * 7), p95=float(n * n + 1)) for n in range(8)]
    )
    retention.roll_up(hour, hour + timedelta(hours=1))
    in_sql = HeartbeatRollup.objects.values(*retention.ROLLUP_FIELDS).get()
    HeartbeatRollup.objects.all().delete()
    retention._roll_up_in_python(hour, hour + timedelta(hours=1))
    in_python = HeartbeatRollup.objects.values(*retention.ROLLUP_FIELDS).get()
    assert in_python == pytest.approx(in_sql)


def test_it_rolls_up_only_the_complete_hours_not_rolled_up_yet():
    device = Device.objects.create(device_id="dev-h")
    telemetry.store_heartbeats([beat(device, n, NOW - timedelta(hours=n)) for n in range(4)])
    assert retention.roll_up_pending(NOW) == [datetime(2026, 12, 7, h, tzinfo=UTC) for h in (15, 16, 17)]
    assert retention.roll_up_pending(NOW) == []
    assert retention.roll_up_pending(NOW + timedelta(hours=1)) == [datetime(2026, 12, 7, 18, tzinfo=UTC)]


def test_it_serves_a_device_history_from_the_rollups(django_user_model):
    device = Device.objects.create(device_id="dev-api")
    now = datetime.now(tz=UTC)
    telemetry.store_heartbeats([beat(device, n, now - timedelta(hours=n)) for n in range(1, 4)])
    retention.roll_up_pending(now)
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("ops", password="x"))
    response = client.get("/api/v1/devices/dev-api/history/?hours=3")
    assert response.status_code == 200, response.content
    hours = [row["hour"] for row in response.json()]
    assert len(hours) == 2 and hours == sorted(hours, reverse=True)
    assert response.json()[0]["heartbeats"] == 1


@pytest.mark.django_db(transaction=True)
@postgresql_only
def test_it_partitions_a_populated_table_and_can_go_back():
    executor = MigrationExecutor(connection)
    executor.migrate([("fleet", "0010_heartbeat_device_index")])
    executor.loader.build_graph()
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table)")
        assert not cursor.fetchone()[0]
    device = Device.objects.create(device_id="dev-m")
    now = datetime.now(tz=UTC)
    # Written with SQL, not the model: the model now knows HeartbeatRollup, which this schema lacks.
    with connection.cursor() as cursor:
        for n, sent in enumerate([now, now - timedelta(days=2), now - timedelta(days=400), now + timedelta(days=90)]):
            cursor.execute(
                "INSERT INTO fleet_heartbeat (device_id, received_at, sent_at, seq, uptime_s, cpu_percent,"
                " mem_rss_bytes, mem_available_bytes, active_sha256, requests, errors, latency_count)"
                " VALUES (%s, %s, %s, %s, 1, 1, 1, 1, '', 0, 0, 0)",
                [device.pk, now, sent, n],
            )
    try:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
        assert retention.is_partitioned()
        assert Heartbeat.objects.count() == 4
        assert rows_in(partitions.DEFAULT) == 2
        assert rows_in(partitions.partition_name((now - timedelta(days=2)).date())) == 1
        # The identity goes on after the copied rows; a resend of a copied row is still skipped.
        assert telemetry.store_heartbeats([beat(device, 0, now), beat(device, 7, now)]) == 1
        assert Heartbeat.objects.order_by("-id").first().seq == 7
        executor = MigrationExecutor(connection)
        executor.migrate([("fleet", "0010_heartbeat_device_index")])
        assert not retention.is_partitioned()
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM fleet_heartbeat")
            assert cursor.fetchone()[0] == 5
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
