"""Make sure a local account exists and print how to sign in.

The first run creates a superuser with a random password and writes the credentials to
``VAR_DIR/local-credentials.txt`` (mode 0600; ``var/`` is git-ignored). Later runs only print where they are.
No password is ever fixed in the repository.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Create the local account on first run and print how to sign in."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="admin")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        creds = Path(settings.VAR_DIR) / "local-credentials.txt"
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None or not creds.exists():
            password = secrets.token_urlsafe(12)
            if user is None:
                user = User.objects.create_superuser(username=username, email="", password=password)
            else:
                # The credentials file was deleted: issue a new password rather than leave none known.
                user.set_password(password)
                user.save(update_fields=["password"])
            creds.parent.mkdir(parents=True, exist_ok=True)
            creds.write_text(f"username: {username}\npassword: {password}\n")
            creds.chmod(0o600)
            self.stdout.write(f"Created the local account '{username}'.")
        self.stdout.write(f"Sign in as '{username}' with the password in {creds}")
