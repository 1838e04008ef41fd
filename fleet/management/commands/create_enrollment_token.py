"""Create an enrollment token and print its secret, which is shown this once."""

from datetime import timedelta

from django.core.management.base import BaseCommand

from fleet.services import enrollment


class Command(BaseCommand):
    help = "Create an enrollment token for agents to join the fleet; prints the secret once."

    def add_arguments(self, parser):
        parser.add_argument("name", help="What the token is for, e.g. 'lab shelf 3'.")
        parser.add_argument("--hours", type=int, default=24, help="Hours until it expires (default 24).")
        parser.add_argument("--auto-approve", action="store_true", help="Accept devices at once, no operator.")
        parser.add_argument("--max-devices", type=int, default=None, help="How many devices it may enroll.")

    def handle(self, *args, name, hours, auto_approve, max_devices, **options):
        token, secret = enrollment.create_token(
            name=name,
            expires_in=timedelta(hours=hours),
            auto_approve=auto_approve,
            max_devices=max_devices,
            actor="system:manage.py",
        )
        self.stderr.write(f"Token {token.prefix}… expires {token.expires_at:%Y-%m-%d %H:%M} UTC.")
        # The secret alone on stdout, so a script can capture it: TOKEN=$(manage.py create_enrollment_token x)
        self.stdout.write(secret)
