"""`python -m portal.web …`: daphne (same arguments) with its access log masked.

daphne writes each request's path to its access log, and an M-Pesa callback's path carries the
callback secret; its command line builds the log from `daphne.cli.AccessLogGenerator`, which is
replaced here by one that masks secrets (portal.logsafety) before writing.
"""

from daphne import cli
from daphne.access import AccessLogGenerator

from portal.logsafety import mask_secrets


class MaskedAccessLog(AccessLogGenerator):
    def write_entry(self, host, date, request, *args, **kwargs):
        super().write_entry(host, date, mask_secrets(request), *args, **kwargs)


def main() -> None:
    cli.AccessLogGenerator = MaskedAccessLog
    cli.CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
