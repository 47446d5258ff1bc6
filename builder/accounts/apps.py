from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Sign-in, sign-out, sign-up, API tokens, the rate limit on sign-in and the audit log."""

    name = "builder.accounts"
    label = "accounts"

    def ready(self) -> None:
        # Connects the receivers that count failed sign-ins and audit every attempt.
        from builder.accounts import signin  # noqa: F401
