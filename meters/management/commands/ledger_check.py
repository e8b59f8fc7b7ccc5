"""`python manage.py ledger_check`: recompute every balance from the ledger.

Exits non-zero, naming each meter, when a cached balance differs from the sum of its entries.
"""

from django.core.management.base import BaseCommand, CommandError

from meters.models import Meter
from meters.selectors import ledger_mismatches


class Command(BaseCommand):
    help = "Recompute every meter's balance from its ledger entries and report mismatches."

    def handle(self, *args, **options):
        mismatches = ledger_mismatches()
        for meter_no, cached, total in mismatches:
            self.stderr.write(f"MISMATCH meter {meter_no}: cached balance {cached} != ledger sum {total}")
        if mismatches:
            raise CommandError(f"{len(mismatches)} meter(s) out of balance")
        self.stdout.write(f"ledger_check: {Meter.objects.count()} meters, all balances equal their ledger")
