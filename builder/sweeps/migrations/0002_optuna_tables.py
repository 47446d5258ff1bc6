"""Optuna's tables (its RDB storage's schema) in the platform's database, created here rather than on first use: two
workers ticking at once would otherwise race to create them. Optuna upgrades its own schema with ``optuna storage
upgrade`` (alembic) when a new version changes it."""

from typing import Any

from django.db import migrations


def create_optuna_tables(apps: Any, schema_editor: Any) -> None:
    from builder.sweeps.study import close_storage, open_storage

    if schema_editor.connection.alias != "default":
        return
    close_storage(open_storage(skip_table_creation=False))


class Migration(migrations.Migration):
    # Optuna writes through a connection of its own: on SQLite it would wait on this migration's own transaction.
    atomic = False
    dependencies = [("sweeps", "0001_initial")]

    operations = [migrations.RunPython(create_optuna_tables, migrations.RunPython.noop)]
