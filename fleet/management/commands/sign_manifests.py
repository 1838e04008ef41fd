"""``manage.py sign_manifests (--model NAME | --all) [--dry-run]``: sign what was published unsigned."""

from django.core.management.base import BaseCommand, CommandError

from fleet.models import Model
from fleet.services import manifests


class Command(BaseCommand):
    help = (
        "Sign the manifests of published artifacts that have no signature (versions published before "
        "the plane signed). Idempotent: signed artifacts are left as they are. Writes an audit record per version."
    )

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--model", help="only this model's published versions")
        which.add_argument("--all", action="store_true", help="every model's published versions")
        parser.add_argument("--dry-run", action="store_true", help="list what would be signed; change nothing")

    def handle(self, *args, model: str | None, all: bool, dry_run: bool, **options):
        if model is not None and not Model.objects.filter(name=model).exists():
            raise CommandError(f"no model named {model!r}")
        verb = "would sign" if dry_run else "signed"
        versions = artifacts = 0
        for done in manifests.sign_unsigned_manifests(actor="system:sign_manifests", model=model, dry_run=dry_run):
            if not done.artifact_ids:
                continue
            versions += 1
            artifacts += len(done.artifact_ids)
            ids = ", ".join(str(pk) for pk in done.artifact_ids)
            self.stdout.write(f"{done.version.label}: {verb} {len(done.artifact_ids)} artifact(s) ({ids})")
        self.stdout.write(f"{verb.capitalize()} {artifacts} artifact(s) of {versions} version(s).")
