"""`manage.py ensure_demo_user`: a staff login for demos, with a fresh random password.

Creates the user or resets its password on every run and prints the password once; there is
never a fixed default credential.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Create or update a staff user (default 'demo'); print its new random password once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument(
            "--superuser", action="store_true", help="also make it a superuser (admin access)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        password = secrets.token_urlsafe(12)
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(username=options["username"])
        user.is_staff = True
        user.is_active = True
        if options["superuser"]:
            user.is_superuser = True
        user.set_password(password)
        user.save()
        verb = "created" if created else "updated"
        self.stdout.write(f"Dashboard login ({verb}): {user.username} / {password}")
