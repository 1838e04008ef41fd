"""Scale-out that runs: several bridges share the load, and losing a process loses nothing.

- Three named bridges share the broker's subscription; one is killed with SIGKILL in the middle
  of the load and restarted under its name, as a supervisor would. Every heartbeat sent is
  stored exactly once: the bridges acknowledge a message only once it is stored, the broker
  keeps the killed bridge's unacknowledged messages in its persistent session and hands them
  to it again, and the unique constraint (device, seq, sent_at) absorbs those it had stored.
- A Celery worker is killed with SIGKILL while it holds a fan-out's task (its publish waiting
  on a broker it cannot reach); Redis gives the unacknowledged task back after the visibility
  timeout (acks_late), the other worker runs it, and the rollout completes.
"""

import os
import re
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from django.db.models import Count

from agent.contract import wire
from fleet.models import Device, Heartbeat
from tests.e2e.helpers import Process, database_url
from tests.support import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
DEVICES = 40
BEATS = 60  # a device: 2,400 heartbeats in all
RATE = 600.0  # heartbeats a second, all devices together
# A worker's log line for a fan-out task it took.
TAKEN = re.compile(r"Task fleet\.publish_desired\[([0-9a-f-]+)\] received")


def heartbeat(device_id: str, seq: int) -> bytes:
    # sent_at is fixed by (device, seq): a message resent is the same message.
    return wire.encode(wire.Heartbeat(
        device_id=device_id, seq=seq, sent_at=1_800_000_000.0 + seq, interval_s=1.0, uptime_s=float(seq),
        cpu_percent=5.0, mem_rss_bytes=1 << 20, mem_available_bytes=1 << 30,
    ))  # fmt: skip


def publish_all(port: int, device_ids: list[str], halfway: threading.Event) -> None:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"test-load-{time.monotonic_ns()}")  # fmt: skip
    client.max_inflight_messages_set(200)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    started = time.monotonic()
    total = len(device_ids) * BEATS
    for n in range(total):
        device_id, seq = device_ids[n % len(device_ids)], n // len(device_ids) + 1
        infos.append(client.publish(wire.topic(device_id, wire.Channel.HEARTBEAT), heartbeat(device_id, seq), qos=1))
        if n == total // 2:
            halfway.set()
        time.sleep(max(0.0, started + n / RATE - time.monotonic()))
    for info in infos:
        info.wait_for_publish(timeout=30)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def broker_port(tmp_path):
    """A broker of this test's own: a killed bridge's session must not outlive the test on a shared one."""
    from tests.support import broker

    with broker(tmp_path / "mosquitto") as running:
        yield running.port


def test_it_stores_every_heartbeat_exactly_once_when_a_bridge_is_killed_mid_load(settings, broker_port, tmp_path):
    device_ids = [f"scale-{n:03d}" for n in range(DEVICES)]
    Device.objects.bulk_create([Device(device_id=d) for d in device_ids])
    env = {**os.environ, "DATABASE_URL": database_url(), "MQTT_URL": f"mqtt://127.0.0.1:{broker_port}",
           "ARTIFACT_ROOT": str(tmp_path / "artifacts"), "BRIDGE_FLUSH_MS": "100"}  # fmt: skip

    def bridge(n: int, run: int = 0) -> Process:
        cmd = [sys.executable, "manage.py", "run_bridge", "--name", f"scale-test-{n}", "--stats-every", "1"]
        return Process(f"bridge-{n}-{run}", cmd, env, tmp_path)

    bridges = [bridge(n) for n in range(3)]
    try:
        for proc in bridges:
            wait_until(lambda p=proc: "subscribed" in p.output(), timeout=60, what=f"{proc.name} subscribed")
        halfway = threading.Event()
        load = threading.Thread(target=publish_all, args=(broker_port, device_ids, halfway))
        load.start()
        halfway.wait(timeout=60)
        victim = bridges[1]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=10)
        time.sleep(1.0)
        bridges.append(bridge(1, run=1))  # a supervisor restarts it under its name
        load.join(timeout=120)
        total = DEVICES * BEATS
        wait_until(lambda: Heartbeat.objects.count() >= total, timeout=60,
                   what=f"{total} heartbeats stored (have {Heartbeat.objects.count()})")  # fmt: skip
        time.sleep(1.0)  # anything delivered twice would land now
        assert Heartbeat.objects.count() == total
        per_device = dict(Heartbeat.objects.values_list("device__device_id").annotate(n=Count("id")))
        assert per_device == dict.fromkeys(device_ids, BEATS)
        assert "heartbeats_stored" in victim.output(), "the killed bridge should have stored some before it died"
    except Exception:
        for proc in bridges:
            print(f"--- {proc.name} ---\n{proc.output()[-2500:]}")
        raise
    finally:
        for proc in bridges:
            if proc.proc.poll() is None:
                proc.stop()


def test_it_completes_a_rollout_when_the_worker_holding_its_fan_out_is_killed(settings, tmp_path):
    from fleet.choices import RolloutState
    from fleet.models import Rollout
    from fleet.services import devices, rollouts
    from tests.fleet import helpers
    from tests.fleet.simulated import SimulatedDevice
    from tests.support import REDIS_URL, TcpProxy, broker, celery_on_redis

    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    # Made before the workers exist, its artifact checked in this process and ready before they start
    # (a worker given the same artifact would now find it claimed and leave it: process_artifact's lease).
    version = helpers.make_published_version()
    with broker(tmp_path / "mosquitto") as mosquitto, celery_on_redis():
        env = {**os.environ, "DATABASE_URL": database_url(), "MQTT_URL": f"mqtt://127.0.0.1:{mosquitto.port}",
               "ARTIFACT_ROOT": str(settings.ARTIFACT_ROOT), "REDIS_URL": REDIS_URL, "BRIDGE_FLUSH_MS": "50",
               "CELERY_VISIBILITY_TIMEOUT": "5"}  # fmt: skip
        settings.MQTT_BROKER = wire.parse_broker_url(env["MQTT_URL"])
        bridge = Process("bridge", [sys.executable, "manage.py", "run_bridge", "--name", "fanout-test"], env, tmp_path)
        # The workers reach the broker through a proxy the test can cut: a worker's publish then waits.
        proxy = TcpProxy(mosquitto.port)
        worker_env = {**env, "MQTT_URL": f"mqtt://127.0.0.1:{proxy.port}"}
        worker = [sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--pool", "solo", "-l", "info"]
        workers = [Process(f"worker-{n}", [*worker, "-n", f"fanout-{n}@%h"], worker_env, tmp_path) for n in range(2)]
        sims = []
        try:
            for worker in workers:
                wait_until(lambda w=worker: "ready." in w.output(), timeout=60, what=f"{worker.name} ready")
            sims = [SimulatedDevice(f"fan-{n}", mosquitto.port).start() for n in range(6)]
            wait_until(lambda: Device.objects.filter(device_id__startswith="fan-").count() == 6, timeout=20,
                       what="hellos")  # fmt: skip
            # The hellos' fan-outs delivered: the first publish_desired a worker takes below is the canary's.
            wait_until(lambda: all(sim.received for sim in sims), timeout=30, what="the hellos answered")
            for device in Device.objects.filter(device_id__startswith="fan-"):
                devices.set_tags(device, ["lab"], actor="system")
            stages = [{"device_count": 1, "failure_percent": 0}, {"percent": 100, "failure_percent": 0}]
            rollout = rollouts.create_rollout(version, stages=stages, tags=["lab"], actor="system")
            # The workers lose the broker: whichever takes the canary's fan-out task waits in it, unpublished.
            seen = {w.name: len(w.output()) for w in workers}  # the hellos' own fan-outs are before this

            def taken() -> tuple[Process, str] | None:
                for w in workers:
                    if match := TAKEN.search(w.output()[seen[w.name] :]):
                        return w, match.group(1)
                return None

            proxy.cut()
            try:
                rollouts.start_rollout(rollout, actor="system")
                holder, task_id = wait_until(taken, timeout=30, what="a worker taking the fan-out")
                time.sleep(0.5)
                holder.proc.send_signal(signal.SIGKILL)
                holder.proc.wait(timeout=10)
            finally:
                proxy.mend()
            survivor = next(w for w in workers if w is not holder)
            # Redis hands the killed worker's task on only when a worker restores unacknowledged
            # messages, not at the visibility timeout itself: the whole test took 97-99 s in four runs.
            wait_until(lambda: Rollout.objects.get(pk=rollout.pk).state == RolloutState.COMPLETED, timeout=150,
                       what="the rollout completed")  # fmt: skip
            assert Device.objects.filter(device_id__startswith="fan-", current_version=version).count() == 6
            done = f"Task fleet.publish_desired[{task_id}] succeeded"
            assert done in survivor.output() and done not in holder.output(), (
                "the other worker ran the killed one's task"
            )
            assert all(sim.versions_received() == [str(version.number)] for sim in sims)
        except Exception:
            for proc in [bridge, *workers]:
                print(f"--- {proc.name} ---\n{proc.output()[-3000:]}")
            raise
        finally:
            for sim in sims:
                sim.stop()
            proxy.close()
            for proc in [bridge, *workers]:
                if proc.proc.poll() is None:
                    proc.stop()


def test_it_leaves_no_session_behind_when_a_named_bridge_is_stopped_for_good(broker_port, tmp_path):
    device_ids = [f"leave-{n:02d}" for n in range(10)]
    Device.objects.bulk_create([Device(device_id=d) for d in device_ids])
    env = {**os.environ, "DATABASE_URL": database_url(), "MQTT_URL": f"mqtt://127.0.0.1:{broker_port}",
           "ARTIFACT_ROOT": str(tmp_path / "artifacts"), "BRIDGE_FLUSH_MS": "50"}  # fmt: skip
    bridges = [
        Process(f"bridge-{n}", [sys.executable, "manage.py", "run_bridge", "--name", f"leave-{n}"], env, tmp_path)
        for n in range(2)
    ]
    try:
        for proc in bridges:
            wait_until(lambda p=proc: "subscribed" in p.output(), timeout=60, what=f"{proc.name} subscribed")
        assert bridges[1].stop() == 0  # SIGTERM: scaled down, not crashed
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker_port)
        client.loop_start()
        infos = [
            client.publish(wire.topic(d, wire.Channel.HEARTBEAT), heartbeat(d, seq), qos=1)
            for seq in range(1, 11)
            for d in device_ids
        ]
        for info in infos:
            info.wait_for_publish(timeout=10)
        client.disconnect()
        client.loop_stop()
        # Had the stopped bridge kept its session, the broker would hold about half of these for it.
        wait_until(lambda: Heartbeat.objects.count() == 100, timeout=20,
                   what=f"100 heartbeats stored by the bridge left (have {Heartbeat.objects.count()})")  # fmt: skip
    finally:
        for proc in bridges:
            if proc.proc.poll() is None:
                proc.stop()
