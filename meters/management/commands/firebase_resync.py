"""`python manage.py firebase_resync [--meter M]`: rewrite the Firebase mirror from the database.

Marks every meter (or one) in the mirror's outbox and pushes them now, until none is pending;
for a mirror that was wiped, edited by hand, or written while the outbox was lost. The database
stays the truth (PROTOCOL.md rule 2): this only copies it again.
"""

from django.core.management.base import BaseCommand, CommandError
from django.db.models import F

from core.errors import DomainError
from meters import firebase, selectors, services
from meters.models import FirebaseMirror, Meter

BATCH = 5000


class Command(BaseCommand):
    help = "Rewrite the Firebase mirror of every meter (or --meter M) from the database."

    def add_arguments(self, parser):
        parser.add_argument("--meter", help="only this meter number")

    def handle(self, *args, meter=None, **options):
        if not firebase.mirror_enabled():
            raise CommandError("The Firebase mirror is disabled (FIREBASE_DATABASE_URL is empty)")
        if meter:
            try:
                ids = [selectors.meter_get(meter_no=meter).pk]
            except DomainError as error:
                raise CommandError(error.message) from None
        else:
            ids = list(Meter.objects.order_by("id").values_list("id", flat=True))
        for start in range(0, len(ids), BATCH):
            services.firebase_mirror_mark(meter_ids=ids[start:start + BATCH])
        written = 0
        while True:
            count = firebase.firebase_mirror_sync(force=True)
            written += count
            if count == 0:
                break
        pending = FirebaseMirror.objects.filter(meter_id__in=ids, version__gt=F("synced_version")).count()
        if pending:
            raise CommandError(f"{pending} meter(s) could not be written (see the log); run it again")
        self.stdout.write(f"Firebase mirror rewritten: {written} meter document(s)")


