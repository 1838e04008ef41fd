"""Devices: what they report about themselves, and how operators label them."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from agent import wire
from fleet.lib.hardware import hardware_class
from fleet.models import Device, Tag
from fleet.services.audit import Actor, record
from fleet.services.deployments import enqueue_desired


def record_hello(hello: wire.Hello, *, now: datetime | None = None, answer: bool = True) -> tuple[Device, bool]:
    """Create or refresh a device from its hello; the device is online from now."""
    now = now or timezone.now()
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
    with transaction.atomic():
        device, created = Device.objects.update_or_create(device_id=hello.device_id, defaults=profile)
        if created:
            record(f"device:{hello.device_id}", "device.registered", device, after={"arch": hw.arch, "os": hw.os})
        # Answer every hello with the desired state: the agent stops repeating its hello, and a
        # retained message the broker lost, or kept from another database, is put right.
        # A caller that greets many devices at once (the bridge) passes answer=False and
        # enqueues one batch for all of them after their commits.
        if answer:
            transaction.on_commit(lambda: enqueue_desired([device.pk]))
    return device, created


def record_presence(device_id: str, presence: wire.Presence) -> bool:
    """Mark a device offline on its last-will or clean goodbye; True if it was known."""
    return bool(Device.objects.filter(device_id=device_id).update(online=presence.online))


def set_tags(device: Device, names: list[str], *, actor: Actor) -> Device:
    """Replace a device's tags, creating the tags that do not exist yet."""
    names = sorted(set(names))
    for name in names:
        # get_or_create skips the field validators; a tag name must stay a slug.
        Tag(name=name).clean_fields()
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
