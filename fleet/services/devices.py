"""Devices: what they report about themselves, and how operators label them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from agent.contract import wire
from fleet.lib.hardware import hardware_class
from fleet.models import Device, Tag
from fleet.services.audit import Actor, audit_event, record, record_many
from fleet.services.desired import enqueue_desired
from fleet.services.enrollment import NotAccepted, may_speak


def _profile(hello: wire.Hello, now: datetime) -> dict:
    """The device fields a hello sets; the name only if the hello gives one."""
    hw = hello.hardware
    profile = {
        "arch": hw.arch,
        "os": hw.os,
        "os_release": hw.os_release,
        "cpu_model": hw.cpu_model,
        "cpu_count": hw.cpu_count,
        "cpu_flags": hw.cpu_flags,
        "ram_bytes": hw.ram_bytes,
        "disk_free_bytes": hw.disk_free_bytes,
        "providers": hw.providers,
        "agent_version": hw.agent_version,
        "hardware_class": hardware_class(hw.arch, hw.os),
        "online": True,
        "last_seen": now,
    }
    if hello.name:
        profile["name"] = hello.name
    return profile


def record_hello(hello: wire.Hello, *, now: datetime | None = None, answer: bool = True) -> tuple[Device, bool]:
    """Create or refresh a device from its hello; the device is online from now."""
    now = now or timezone.now()
    hw = hello.hardware
    profile = _profile(hello, now)
    with transaction.atomic():
        device, created = Device.objects.update_or_create(device_id=hello.device_id, defaults=profile)
        if created:
            record(f"device:{hello.device_id}", "device.registered", device, after={"arch": hw.arch, "os": hw.os})
        # Answer every hello with the desired state: the agent stops repeating its hello, and a
        # retained message the broker lost, or kept from another database, is put right.
        # A caller that greets many devices at once (the bridge, falling back from
        # record_hellos) passes answer=False and enqueues one batch for all of them.
        if answer:
            transaction.on_commit(lambda: enqueue_desired([device.pk]))
    return device, created


def record_hellos(hellos: Sequence[wire.Hello], *, now: datetime | None = None) -> dict[str, int | NotAccepted]:
    """``record_hello`` for many devices in one transaction: device id -> its pk, or why it was refused.

    Three or four queries whatever the number: who is known (and, under ENROLLMENT_REQUIRED,
    accepted), one upsert per shape of hello (with a name or without), one audit insert for the
    devices that are new. A device's newest hello wins. Nothing is answered: the caller enqueues
    the desired state of the greeted devices after commit.
    """
    now = now or timezone.now()
    newest = {h.device_id: h for h in hellos}
    outcomes: dict[str, int | NotAccepted] = {}
    with transaction.atomic():
        known = dict(Device.objects.filter(device_id__in=list(newest)).values_list("device_id", "enrollment"))
        for device_id, state in [(d, known.get(d)) for d in newest]:
            if not may_speak(state):
                outcomes[device_id] = NotAccepted(f"{device_id} is {state or 'not enrolled'}")
                del newest[device_id]
        # In device id order, so two bridges upserting overlapping batches lock rows in one order.
        rows = [Device(device_id=d, **_profile(newest[d], now)) for d in sorted(newest)]
        for named in (True, False):
            group = [row for row in rows if bool(row.name) == named]
            if not group:
                continue
            fields = [*_profile(newest[group[0].device_id], now)]
            Device.objects.bulk_create(group, update_conflicts=True, unique_fields=["device_id"], update_fields=fields)
        outcomes.update({row.device_id: row.pk for row in rows})
        record_many(
            [
                audit_event(f"device:{row.device_id}", "device.registered", row, after={"arch": row.arch, "os": row.os})
                for row in rows
                if row.device_id not in known
            ]
        )
    return outcomes


def record_presences(online: Mapping[str, bool]) -> tuple[set[str], set[str]]:
    """Apply the latest presence of each device (its last will or goodbye, or an online)
    in one transaction: one UPDATE for the devices coming online, one for those going off.

    A mass disconnect (a broker restart, a site losing its uplink) delivers thousands of
    last wills at once: a transaction each went at 2,767 a second in-process, batches of
    500 at 29,092 (docs/benchmarks.md), and every other message waits behind them.

    Returns the ids applied and the ids refused because the device is not accepted (under
    ENROLLMENT_REQUIRED: a decommissioned device must not show as online); an id in
    neither never said hello.
    """
    with transaction.atomic():
        # Read and locked in device id order, as record_hellos takes them: two bridges
        # applying overlapping batches cannot deadlock.
        known = dict(
            Device.objects.select_for_update()
            .filter(device_id__in=sorted(online))
            .order_by("device_id")
            .values_list("device_id", "enrollment")
        )
        refused = {device_id for device_id, state in known.items() if not may_speak(state)}
        applied = set(known) - refused
        for state in (True, False):
            ids = sorted(device_id for device_id in applied if online[device_id] is state)
            if ids:
                Device.objects.filter(device_id__in=ids).update(online=state)
    return applied, refused


def set_tags(device: Device, names: list[str], *, actor: Actor) -> Device:
    """Replace a device's tags, creating the tags that do not exist yet."""
    names = sorted(set(names))
    # get_or_create skips the field validators; a tag name must stay a short slug.
    problems = [problem for name in names for problem in Tag.name_problems(name)]
    if problems:
        raise ValidationError({"tags": problems})
    with transaction.atomic():
        # Lock the device: two concurrent edits would otherwise audit the same "before".
        Device.objects.select_for_update().filter(pk=device.pk).first()
        before = sorted(device.tags.values_list("name", flat=True))
        tags = [Tag.objects.get_or_create(name=name)[0] for name in names]
        device.tags.set(tags)
        record(actor, "device.tags_set", device, before={"tags": before}, after={"tags": names})
    return device


def mark_offline_devices(*, older_than: timedelta, now: datetime | None = None) -> int:
    """Devices silent for longer than ``older_than`` are offline, whatever their last-will said."""
    cutoff = (now or timezone.now()) - older_than
    return Device.objects.filter(online=True, last_seen__lt=cutoff).update(online=False)
