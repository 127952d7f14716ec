import os
import socket

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource


def exporter():
    """Yours: here OTLP to a collector (pip install opentelemetry-exporter-otlp)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def provider():
    # Called once in each process: each exports its own series.
    return MeterProvider(
        metric_readers=[PeriodicExportingMetricReader(exporter())],
        resource=Resource.create({
            "service.name": "celery-worker",
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
        }),
    )


def turn_on(app):
    app.conf.unique_metrics = provider
