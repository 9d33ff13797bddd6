"""HTTP routes (docs/interface.md §5)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from gateway import views

urlpatterns = [
    path("", include("dashboard.urls")),
    path("admin/", admin.site.urls),
    # Log in, log out, change one's password. Not Django's password-reset views: they would
    # be anonymous entry points sending mail, and the gateway has no mail set up.
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "accounts/password_change/",
        auth_views.PasswordChangeView.as_view(),
        name="password_change",
    ),
    path(
        "accounts/password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("api/alerts/", include("alerts.urls")),
    path("api/", include("devices.urls")),
    path("healthz", views.healthz, name="healthz"),
    path("metrics", views.metrics, name="metrics"),
    path("favicon.ico", views.favicon, name="favicon"),
]
