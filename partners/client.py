"""Deprecated: the SDK is now `entremise.sdk`; this module re-exports it for old imports.

Import `Client`, `RPCError` (formerly `EntremiseRPCError`, whose `status` is now an
`entremise.sdk.Status`) and the query helpers from `entremise.sdk` instead.
"""

from __future__ import annotations

import warnings

from entremise.sdk.client import (
    BUDGET_KINDS,
    MAX_MESSAGE_BYTES,
    ROLES,
    SENDING,
    Client,
    MatchingKey,
    PreparedUpload,
    TLSConfig,
    UploadResult,
)
from entremise.sdk.errors import EntremiseError, EntremiseRPCError, RPCError, Status
from entremise.sdk.query import AGGREGATES, Query, aggregate, query, where_in, where_range

warnings.warn(
    "entremise.partners.client is deprecated: import the SDK from entremise.sdk",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AGGREGATES",
    "BUDGET_KINDS",
    "MAX_MESSAGE_BYTES",
    "ROLES",
    "SENDING",
    "Client",
    "EntremiseError",
    "EntremiseRPCError",
    "MatchingKey",
    "PreparedUpload",
    "Query",
    "RPCError",
    "Status",
    "TLSConfig",
    "UploadResult",
    "aggregate",
    "query",
    "where_in",
    "where_range",
]
