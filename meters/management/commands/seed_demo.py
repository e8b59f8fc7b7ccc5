"""`python manage.py seed_demo`: a staff user, a demo customer with meters, a tariff and credit.

Idempotent: running it again changes nothing and prints the same sign-in details.
"""

import os
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from meters import services
from meters.models import Customer, Meter, Tariff

DEMO_METERS = ["METER001", "METER002", "METER003"]


class Command(BaseCommand):
    help = "Create the demo staff user, customer, tariff and meters (safe to run twice)."

    def handle(self, *args, **options):
        password = os.environ.get("DEMO_PASSWORD", "demo-pass-2024")
        User = get_user_model()
        with transaction.atomic():
            if not User.objects.filter(username="staff").exists():
                User.objects.create_superuser("staff", "staff@example.com", password)
            tariff = Tariff.objects.filter(name="Domestic").first() or services.tariff_create(
                name="Domestic", kes_per_kwh=Decimal("25.0000")
            )
            customer = Customer.objects.filter(user__username="demo").first() or services.customer_create(
                username="demo", password=password, name="Demo Customer", phone="0708374149",
                email="demo@example.com",
            )
            for meter_no in DEMO_METERS:
                if not Meter.objects.filter(meter_no=meter_no).exists():
                    services.meter_provision(meter_no=meter_no, owner=customer, tariff=tariff)
                    services.ledger_credit(
                        meter_no=meter_no, units_kwh=Decimal("10.500000"), amount_kes=Decimal("262.50"),
                        idempotency_key=f"demo-opening:{meter_no}", actor="seed_demo", reason="Demo opening credit",
                    )
        self.stdout.write(
            "Demo data ready.\n"
            f"  Customer portal: http://127.0.0.1:8000/        user: demo   password: {password}\n"
            f"  Staff admin:     http://127.0.0.1:8000/admin/  user: staff  password: {password}\n"
            f"  Demo meters: {', '.join(DEMO_METERS)}"
        )
