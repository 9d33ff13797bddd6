"""Readings: one covering series index (device, metric, ts, value) instead of two indexes.

The history query then reads one series from the index alone (docs/performance.md, "History
at 10 million rows"); the ForeignKey's own device_id index is dropped, the series index's
leading column serves it. On PostgreSQL, autovacuum visits the append-only table after 1 % new
rows (not 20 %) so the visibility map, which index-only scans need, stays current.

On a large PostgreSQL table, build the index first without blocking the gateway (then this
migration finds it): CREATE INDEX CONCURRENTLY reading_series_covering ON devices_reading
(device_id, metric, ts, value); docs/deploy.md, "Upgrades".
"""

import django.db.models.deletion
from django.db import migrations, models


def fk_index_names(schema_editor) -> list[str]:
    """The plain index on device_id alone that Django made for the ForeignKey."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "devices_reading")
    return [
        name
        for name, info in constraints.items()
        if info["index"]
        and not info["unique"]
        and not info["primary_key"]
        and info["columns"] == ["device_id"]
    ]


def drop_fk_index(apps, schema_editor) -> None:
    for name in fk_index_names(schema_editor):
        schema_editor.execute(f"DROP INDEX {schema_editor.quote_name(name)}")


def create_fk_index(apps, schema_editor) -> None:
    if not fk_index_names(schema_editor):
        schema_editor.execute(
            "CREATE INDEX devices_reading_device_id_idx ON devices_reading (device_id)"
        )


def create_series_index(apps, schema_editor) -> None:
    """IF NOT EXISTS: an operator may have built it CONCURRENTLY beforehand."""
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS reading_series_covering "
        "ON devices_reading (device_id, metric, ts, value)"
    )


def drop_series_index(apps, schema_editor) -> None:
    schema_editor.execute("DROP INDEX IF EXISTS reading_series_covering")


def tune_autovacuum(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "ALTER TABLE devices_reading SET (autovacuum_vacuum_insert_scale_factor = 0.01)"
        )


def reset_autovacuum(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            "ALTER TABLE devices_reading RESET (autovacuum_vacuum_insert_scale_factor)"
        )


class Migration(migrations.Migration):
    dependencies = [
        ("devices", "0002_command"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddIndex(
                    model_name="reading",
                    index=models.Index(
                        fields=["device", "metric", "ts", "value"],
                        name="reading_series_covering",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunPython(create_series_index, drop_series_index, elidable=False),
            ],
        ),
        migrations.RemoveIndex(model_name="reading", name="reading_dev_metric_ts"),
        # Only the FK index goes; altering the field would make SQLite copy the whole table.
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="reading",
                    name="device",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="readings",
                        to="devices.device",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop_fk_index, create_fk_index)],
        ),
        migrations.RunPython(tune_autovacuum, reset_autovacuum),
    ]
