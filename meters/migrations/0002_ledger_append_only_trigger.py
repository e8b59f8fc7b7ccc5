"""On PostgreSQL, the database itself refuses UPDATE and DELETE of ledger rows.

The model refuses too, but raw SQL, a shell session or a future bug would not go through the
model; the trigger is the backstop that makes "append-only" a property of the data.
"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION meters_ledger_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'meters_ledgerentry is append-only (% refused)', TG_OP;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS meters_ledger_append_only ON meters_ledgerentry;
CREATE TRIGGER meters_ledger_append_only BEFORE UPDATE OR DELETE ON meters_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION meters_ledger_append_only();
"""
DROP = """
DROP TRIGGER IF EXISTS meters_ledger_append_only ON meters_ledgerentry;
DROP FUNCTION IF EXISTS meters_ledger_append_only();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE, params=None)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP, params=None)


class Migration(migrations.Migration):
    dependencies = [("meters", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
