"""Leave free space in the meter table's pages (PostgreSQL fillfactor 70).

Every batch of reports updates its meters' balance and register. With full pages each update
writes a new row version elsewhere and touches every index of the table; with free space on the
page PostgreSQL can update in place (a HOT update, no index writes), which the ingest worker's
profile showed to be its largest database cost. Existing tables take the setting for new pages;
`VACUUM FULL meters_meter` rewrites the old ones.
"""

from django.db import migrations


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE meters_meter SET (fillfactor = 70)", params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE meters_meter RESET (fillfactor)", params=None)


class Migration(migrations.Migration):
    dependencies = [("meters", "0003_ingest_accounting_and_mirror")]
    operations = [migrations.RunPython(forwards, backwards)]
