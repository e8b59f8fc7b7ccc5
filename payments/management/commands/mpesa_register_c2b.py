"""`python manage.py mpesa_register_c2b`: register the Paybill validation/confirmation URLs with Daraja."""

from django.core.management.base import BaseCommand, CommandError

from core.errors import DomainError
from payments import services


class Command(BaseCommand):
    help = "Register this site's C2B validation and confirmation URLs with Daraja (MPESA_* settings)."

    def handle(self, *args, **options):
        try:
            reply = services.c2b_register_urls()
        except DomainError as error:
            raise CommandError(error.message) from None
        self.stdout.write(f"Registered: {reply.get('ResponseDescription', reply)}")
