"""A request's `Constraint` as an xgrammar grammar, shared by the engines that constrain with it
(transformers masks with it directly; vLLM is handed its EBNF text).

JSON is generated compact (`, ` and `: `, no free whitespace): small models otherwise loop on
whitespace. A tool call is the Hermes frame around the call's JSON.
"""

from __future__ import annotations

import xgrammar as xgr

from ensemble.structured import Constraint

_SEPARATORS = (", ", ": ")


def grammar_of(constraint: Constraint) -> xgr.Grammar:
    if constraint.kind == "json":  # any object, any keys
        return xgr.Grammar.from_json_schema(
            {"type": "object"}, any_whitespace=False, separators=_SEPARATORS, strict_mode=False
        )
    body = xgr.Grammar.from_json_schema(
        constraint.schema or {}, any_whitespace=False, separators=_SEPARATORS
    )
    if constraint.kind == "schema":
        return body
    return xgr.Grammar.concat(_literal(constraint.prefix), body, _literal(constraint.suffix))


def _literal(text: str) -> xgr.Grammar:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return xgr.Grammar.from_ebnf(f'root ::= "{escaped}"')
