"""Pagination for every API list that can grow: limit/offset, at most 200 items a page.

Limit/offset rather than a cursor because the ledger statement's running balance is a window
over all of a meter's entries, which LIMIT/OFFSET leaves intact and a keyset filter would not.
"""

from rest_framework.pagination import LimitOffsetPagination


class ApiPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 200
