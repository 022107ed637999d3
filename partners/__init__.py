"""Partner SDK: pseudonymise on the partner's side, then talk to the hub over gRPC."""

from entremise.partners.client import (
    Client,
    EntremiseRPCError,
    UploadResult,
    aggregate,
    query,
    where_in,
    where_range,
)
from entremise.partners.pseudonymise import Pseudonymiser, load_key, new_key, save_key
from entremise.partners.schema import Categorical, Numeric, UploadSchema

__all__ = [
    "Categorical",
    "Client",
    "EntremiseRPCError",
    "Numeric",
    "Pseudonymiser",
    "UploadResult",
    "UploadSchema",
    "aggregate",
    "load_key",
    "new_key",
    "query",
    "save_key",
    "where_in",
    "where_range",
]
