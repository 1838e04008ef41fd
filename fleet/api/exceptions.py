"""Domain errors as HTTP answers, in one place: each ServiceError carries its status (fleet/errors.py)."""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from fleet.errors import ServiceError


class ServiceRefused(exceptions.APIException):
    """A ServiceError as DRF answers it: its status, and its text (under its field, if it names one)."""

    def __init__(self, error: ServiceError) -> None:
        self.status_code = error.status
        detail = {error.field: [str(error)]} if error.field else str(error)
        super().__init__(detail=detail, code=type(error).__name__)


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        exc = ServiceRefused(exc)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    return drf_exception_handler(exc, context)
