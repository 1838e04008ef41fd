from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from fleet.management.waiting import wait_for_pipeline
from fleet.services import pipeline
from fleet.services.registry import RegistryError


class Command(BaseCommand):
    help = (
        "Import a Hugging Face BERT-family checkpoint (config.json, model.safetensors, tokenizer.json) "
        "as a new draft version with an fp32 ONNX and its tokenizer; --optimize queues the variant pipeline."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--model", required=True, help="the registry model's name; created if new")
        parser.add_argument("--optimize", action="store_true", help="queue the pipeline (int8, int4, fp16)")
        parser.add_argument("--variants", nargs="+", choices=list(pipeline.VARIANT_KINDS), default=None)
        parser.add_argument("--int4-block-size", type=int, default=pipeline.DEFAULT_INT4_BLOCK_SIZE)
        parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the pipeline to finish")

    def handle(self, *args, directory: Path, model: str, optimize: bool, wait: float, **options):
        try:
            version = pipeline.import_hf_checkpoint(directory.expanduser(), model_name=model, actor="system")
            self.stdout.write(f"Imported {version.label} (version id {version.pk}).")
            if not optimize:
                return
            started = pipeline.start_pipeline(
                version, actor="system", variants=options["variants"], int4_block_size=options["int4_block_size"]
            )
        except RegistryError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"Queued pipeline {started.pk}.")
        wait_for_pipeline(self.stdout, started.pk, wait)
