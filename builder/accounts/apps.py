from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Sign-in, sign-out, sign-up and API tokens."""

    name = "builder.accounts"
    label = "accounts"
