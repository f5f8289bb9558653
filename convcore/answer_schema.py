"""How a model the service answers with is documented.

OpenAPI documents answers with their serialization schema. A field with a
default is optional there unless said otherwise, so a client generated from
the document types it as maybe absent even when every answer carries it.
A model sent whole takes :data:`SENT_WHOLE` into its config; one that
leaves some fields out when they say nothing lists those it always sends
with :func:`sent_always`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

__all__ = ["SENT_WHOLE", "sent_always"]

# Every field is in every answer: each is required in the serialization schema.
SENT_WHOLE = ConfigDict(json_schema_serialization_defaults_required=True)


def sent_always(*names: str) -> Any:
    """A ``__get_pydantic_json_schema__`` for a model the service answers
    with: ``names``, fields with a default that every answer still carries,
    are required in its serialization schema. Fields an answer leaves out
    when they say nothing stay optional."""

    def schema(
        cls: type[BaseModel], core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        found = handler(core_schema)
        if handler.mode == "serialization":
            target = handler.resolve_ref_schema(found)
            required = {*target.get("required", ()), *names}
            target["required"] = [n for n in target["properties"] if n in required]
        return found

    return classmethod(schema)
