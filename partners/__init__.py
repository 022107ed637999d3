"""Partner SDK: pseudonymise on the partner's side, then talk to the hub over gRPC."""

from entremise.partners.client import (
    Client,
    EntremiseRPCError,
    PreparedUpload,
    TLSConfig,
    UploadResult,
    aggregate,
    query,
    where_in,
    where_range,
)
from entremise.partners.keys import (
    MatchingKeyError,
    generate_private_key,
    load_private_key,
    public_bytes,
    save_private_key,
)
from entremise.partners.prepare import PlaceholderReport
from entremise.partners.pseudonymise import Pseudonymiser
from entremise.partners.schema import Categorical, Consent, Numeric, Text, UploadSchema

__all__ = [
    "Categorical",
    "Client",
    "Consent",
    "EntremiseRPCError",
    "MatchingKeyError",
    "Numeric",
    "PlaceholderReport",
    "PreparedUpload",
    "Pseudonymiser",
    "TLSConfig",
    "Text",
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
