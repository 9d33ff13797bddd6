"""HTTP routes of the dashboard (docs/interface.md §5: `/` is the live dashboard)."""

from django.urls import path

from dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.index, name="index"),
    path("devices/<str:device_id>/", views.device, name="device"),
]
