"""``manage.py generate_signing_key PATH``: a new Ed25519 key for signing artifact manifests."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from agent.contract import signing
from fleet.signing import write_key_file


class Command(BaseCommand):
    help = (
        "Write a new Ed25519 signing key to PATH (owner-only, never overwritten) and print its public key. "
        "Point SIGNING_KEY_FILE at PATH, and put the public key in each agent's [security] plane_public_key."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", type=Path, help="where to write the private key; must not exist yet")

    def handle(self, *args, path: Path, **options):
        try:
            text = write_key_file(path)
        except FileExistsError:
            raise CommandError(
                f"{path} exists; move it away first (a new key makes every agent's copy stale)"
            ) from None
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror}") from None
        self.stderr.write(f"Wrote the private key to {path}. Set SIGNING_KEY_FILE={path}")
        self.stdout.write(signing.public_key_text(signing.load_private_key(text)))
