"""Console pages for signed-in operators. A page reads through console.pages; a button calls one service."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from fleet.console import pages
from fleet.models import Device, Rollout
from fleet.services import rollouts

SERVICES = {
    "pause": rollouts.pause_rollout,
    "resume": rollouts.resume_rollout,
    "promote": rollouts.promote_rollout,
    "abort": rollouts.abort_rollout,
    "rollback": rollouts.rollback_rollout,
}
# Seconds between refreshes of a page's live part.
REFRESH_S = 5


def _viewer(view):
    """Signed in (else the admin's sign-in page), with the fleet's view permissions (else 403)."""
    perms = ("fleet.view_device", "fleet.view_rollout", "fleet.view_deployment")
    return login_required(permission_required(perms, raise_exception=True)(view))


@_viewer
def overview(request: HttpRequest) -> HttpResponse:
    context = {"page": pages.overview(now=timezone.now()), "refresh_s": REFRESH_S}
    return render(request, "console/overview.html", context)


@_viewer
def rollout(request: HttpRequest, pk: int) -> HttpResponse:
    found = get_object_or_404(Rollout.objects.select_related("version__model", "alias__model", "created_by"), pk=pk)
    context = {
        "rollout": found,
        "page": pages.rollout_page(found, now=timezone.now()),
        "refresh_s": REFRESH_S,
        "can_release": request.user.has_perm("fleet.release_rollout"),
    }
    return render(request, "console/rollout.html", context)


@_viewer
def device(request: HttpRequest, device_id: str) -> HttpResponse:
    found = get_object_or_404(Device.objects.select_related("current_version__model"), device_id=device_id)
    context = {"device": found, "page": pages.device_page(found, now=timezone.now()), "refresh_s": REFRESH_S}
    return render(request, "console/device.html", context)


@require_POST
@login_required
@permission_required("fleet.release_rollout", raise_exception=True)
def act(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    found = get_object_or_404(Rollout, pk=pk)
    service = SERVICES.get(action)
    if service is None:
        return HttpResponse(status=404)
    reason = request.POST.get("reason", "").strip()[:2000]
    try:
        done = service(found, actor=request.user, reason=reason)
    except (rollouts.RolloutError, ValidationError) as exc:
        messages.error(request, f"{action.capitalize()} refused: {exc}")
    else:
        messages.success(
            request, f"{action.capitalize()}: rollout {done.pk} is now {done.get_state_display().lower()}."
        )
    return redirect("console:rollout", pk=pk)
