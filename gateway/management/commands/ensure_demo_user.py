"""`manage.py ensure_demo_user`: a staff login for demos, with a random password.

A new user gets a fresh random password, printed once; an existing one keeps its password
(open sessions stay logged in) unless `--reset-password`. There is never a fixed default
credential. The user is in the group `gateway-viewers`, which may view (not change) every
model of the gateway's apps in the admin: what the README says `/admin/` shows.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandParser

VIEWERS = "gateway-viewers"
#: The apps whose models the viewers group may view in the admin.
VIEWED_APPS = ("devices", "alerts")


def viewers_group() -> Group:
    """The group that may view every model of the gateway's apps (created or completed)."""
    group, _ = Group.objects.get_or_create(name=VIEWERS)
    group.permissions.add(
        *Permission.objects.filter(
            content_type__app_label__in=VIEWED_APPS, codename__startswith="view_"
        )
    )
    return group


class Command(BaseCommand):
    help = (
        "Create a staff user (default 'demo') with a random password printed once; an "
        "existing one keeps its password unless --reset-password."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument(
            "--superuser", action="store_true", help="also make it a superuser (admin access)"
        )
        parser.add_argument(
            "--reset-password", action="store_true", help="give an existing user a new password"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(username=options["username"])
        user.is_staff = True
        user.is_active = True
        if options["superuser"]:
            user.is_superuser = True
        password = None
        if created or options["reset_password"] or not user.has_usable_password():
            password = secrets.token_urlsafe(12)
            user.set_password(password)
        user.save()
        user.groups.add(viewers_group())
        if password is None:
            self.stdout.write(
                f"Dashboard login (unchanged): {user.username} / the password printed when it "
                "was set (--reset-password prints a new one)"
            )
            return
        verb = "created" if created else "updated"
        self.stdout.write(f"Dashboard login ({verb}): {user.username} / {password}")
