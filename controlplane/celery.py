import os

from celery import Celery

from fleet import worker_metrics

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Task counts and durations for Prometheus (served only where WORKER_METRICS_PORT is set).
worker_metrics.connect()
