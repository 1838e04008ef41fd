"""Issue a new API token for a user and print it once: "Generated token <key> for user <username>".

Use this, not DRF's drf_create_token: that one stores a key in the clear, which the plane's
authentication (fleet.api.authentication, hashed keys) never accepts.
"""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from fleet.auth import create_api_token


class Command(BaseCommand):
    help = "Issue a new API token for a user (retiring the last), and print it once."

    def add_arguments(self, parser):
        parser.add_argument("username")

    def handle(self, *args, username: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user {username!r}")
        secret = create_api_token(user, reason="manage.py create_api_token")
        self.stdout.write(f"Generated token {secret} for user {username}")
