"""Prepare the broker's dynamic-security plugin for the plane; docker/compose.yaml runs it at start."""

import time

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from fleet.mqtt.broker_admin import prepare_broker
from fleet.mqtt.dynsec import BRIDGE_ROLE, DynSecError


class Command(BaseCommand):
    help = "Deny by default on the broker, create the bridge's role and the plane's login (MQTT_URL). Idempotent."

    def add_arguments(self, parser):
        parser.add_argument("--wait", type=float, default=60.0, help="Seconds to retry while the broker starts.")

    def handle(self, *args, wait, **options):
        if not settings.MQTT_DYNSEC:
            raise CommandError("MQTT_DYNSEC is off: there is no dynamic-security plugin to set up")
        deadline = time.monotonic() + wait
        while True:
            try:
                username = prepare_broker()
                break
            except ImproperlyConfigured as exc:
                raise CommandError(str(exc)) from None
            except (OSError, DynSecError) as exc:
                # Refused or unreachable: the broker may still be starting; a bad setting fails at the deadline.
                if time.monotonic() >= deadline:
                    raise CommandError(f"cannot set up the broker: {exc}") from None
                time.sleep(1.0)
        self.stdout.write(f"broker ready: the plane logs in as {username} with the role {BRIDGE_ROLE}")
