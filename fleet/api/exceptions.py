"""Domain errors as HTTP answers, in one place: each ServiceError carries its status (fleet/errors.py)."""

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from fleet.errors import ServiceError
from fleet.mqtt.dynsec import DynSecError

log = logging.getLogger(__name__)


class ServiceRefused(exceptions.APIException):
    """A ServiceError as DRF answers it: its status, and its text (under its field, if it names one)."""

    def __init__(self, error: ServiceError) -> None:
        self.status_code = error.status
        detail = {error.field: [str(error)]} if error.field else str(error)
        super().__init__(detail=detail, code=type(error).__name__)


class BrokerUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The plane cannot administer the MQTT broker right now; try again in a minute. "
        "If it persists, the operator should check that the broker runs, that it loads the "
        "dynamic-security plugin, and MQTT_ADMIN_URL and MQTT_ADMIN_PASSWORD(_FILE)."
    )
    default_code = "broker_unavailable"
    retry_after = 60


def exception_handler(exc, context):
    if isinstance(exc, DynSecError):
        # The broker's reason goes to the log, not to an anonymous caller.
        log.error("broker administration failed: %s", exc)
        exc = BrokerUnavailable()
    elif isinstance(exc, ServiceError):
        exc = ServiceRefused(exc)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    response = drf_exception_handler(exc, context)
    if isinstance(exc, BrokerUnavailable) and response is not None:
        # DRF sets Retry-After only for throttles.
        response["Retry-After"] = str(exc.retry_after)
    return response
