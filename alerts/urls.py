"""`/api/alerts/` routes (docs/interface.md §8); paths work with or without a trailing slash."""

from django.urls import re_path

from alerts import views

app_name = "alerts"

urlpatterns = [
    re_path(r"^$", views.alert_list, name="alert-list"),
    re_path(r"^rules/?$", views.rules, name="rules"),
    re_path(r"^rules/(?P<rule_id>[^/]+)/?$", views.rule_detail, name="rule"),
    re_path(r"^(?P<alert_id>[0-9]+)/?$", views.alert_detail, name="alert"),
    re_path(r"^(?P<alert_id>[^/]+)/ack/?$", views.acknowledge, name="acknowledge"),
]
