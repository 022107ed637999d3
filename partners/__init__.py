"""Partner-side tools: schemas, key pairs, pseudonymisation, file preparation, synthetic data.

Everything here runs on the partner's machine; nothing identifying leaves it. The client
that talks to the hub is the SDK, `entremise.sdk`; `Client`, `EntremiseRPCError` and the
query helpers are also importable from here, as they always were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from entremise.partners.identity import PartnerKeys, TrustStore
from entremise.partners.keys import (
    MatchingKeyError,
    generate_private_key,
    load_private_key,
    public_bytes,
    save_private_key,
)
from entremise.partners.prepare import PlaceholderReport
from entremise.partners.pseudonymise import Pseudonymiser
from entremise.partners.schema import Categorical, Consent, Date, Numeric, Text, UploadSchema

if TYPE_CHECKING:
    from entremise.sdk.client import Client, PreparedUpload, TLSConfig, UploadResult
    from entremise.sdk.errors import EntremiseRPCError
    from entremise.sdk.query import aggregate, query, where_in, where_range

#: Names re-exported from the SDK, by the SDK module that defines them. They are imported
#: on first use: the SDK itself imports this package's modules.
_FROM_SDK = {
    "Client": "client",
    "PreparedUpload": "client",
    "TLSConfig": "client",
    "UploadResult": "client",
    "EntremiseRPCError": "errors",
    "aggregate": "query",
    "query": "query",
    "where_in": "query",
    "where_range": "query",
}

__all__ = [
    "Categorical",
    "Client",
    "Consent",
    "Date",
    "EntremiseRPCError",
    "MatchingKeyError",
    "Numeric",
    "PartnerKeys",
    "PlaceholderReport",
    "PreparedUpload",
    "Pseudonymiser",
    "TLSConfig",
    "Text",
    "TrustStore",
    "UploadResult",
    "UploadSchema",
    "aggregate",
    "generate_private_key",
    "load_private_key",
    "public_bytes",
    "query",
    "save_private_key",
    "where_in",
    "where_range",
]


def __getattr__(name: str) -> Any:
    """The SDK's names, imported when first asked for."""
    module = _FROM_SDK.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"entremise.sdk.{module}"), name)
    globals()[name] = value
    return value
