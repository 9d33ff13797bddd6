"""Readings: one per (device, metric, ts), enforced by a unique constraint.

A retained message is replayed by the broker on every subscribe, and a QoS 1 message may be
redelivered, to any bridge: the database, not a bridge's memory, is where "stored once" holds
(docs/retained-and-presence.md). Copies stored before this migration are removed first,
keeping the oldest row of each (device, metric, ts).

On a large table the duplicate scan and the unique index build read the whole table once and
hold writes meanwhile: plan a short pause of the gateway (docs/deploy.md, "Upgrades").
"""

from django.db import migrations, models


def remove_copies(apps, schema_editor) -> None:
    """Delete every reading that repeats an earlier one's (device, metric, ts)."""
    schema_editor.execute(
        "DELETE FROM devices_reading WHERE id NOT IN "
        "(SELECT MIN(id) FROM devices_reading GROUP BY device_id, metric, ts)"
    )


class Migration(migrations.Migration):
    dependencies = [
        ("devices", "0003_reading_covering_index"),
    ]

    operations = [
        migrations.RunPython(remove_copies, migrations.RunPython.noop, elidable=False),
        migrations.AddConstraint(
            model_name="reading",
            constraint=models.UniqueConstraint(
                fields=("device", "metric", "ts"), name="reading_once"
            ),
        ),
    ]
