from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from builder.accounts.models import visible_events
from builder.accounts.signin import refusal_message, wait_before_signin

ACTIVITY_LIMIT = 200


def signup(request: HttpRequest) -> HttpResponse:
    """Create an account and sign in; 404 when ``SIGNUP_ENABLED`` is off."""
    if not settings.SIGNUP_ENABLED:
        raise Http404("sign-up is disabled on this platform")
    form: UserCreationForm[Any] = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(settings.LOGIN_REDIRECT_URL)
    return render(request, "accounts/signup.html", {"form": form}, status=400 if form.errors else 200)


class SignInView(auth_views.LoginView):
    """Django's sign-in form, refusing (429, ``Retry-After``) a username that failed too often from this address
    (``builder.accounts.signin``) before any password is checked."""

    template_name = "accounts/login.html"

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = request.POST.get("username", "")
        wait = wait_before_signin(request, username)
        if wait is None:
            return super().post(request, *args, **kwargs)
        # An unbound form: a bound one would authenticate as soon as the template reads its errors.
        form = self.get_form_class()(request, initial={"username": username})
        response = self.render_to_response(self.get_context_data(form=form, refusal=refusal_message(wait)), status=429)
        response["Retry-After"] = str(wait)
        return response


@login_required
def activity(request: HttpRequest) -> HttpResponse:
    """The signed-in user's audit log: what they did, and what was done to their account and objects."""
    events = visible_events(request.user).select_related("actor", "owner")[:ACTIVITY_LIMIT]
    return render(request, "accounts/activity.html", {"events": events, "limit": ACTIVITY_LIMIT})
