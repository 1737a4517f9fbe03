"""Check documents against event-model's JSON schemas, compiled once with fastjsonschema.

Why not event-model's own validators: they interpret the schema with ``jsonschema`` on
every call (~2,100 events/s), far below what one process decodes (~90,000 messages/s).
fastjsonschema generates Python code per schema once; calling it costs microseconds.

Two adaptations make that possible without weakening the checks:

* event-model 1.24's schemas are written for draft 2020-12 (``$defs``,
  ``unevaluatedProperties``, ``prefixItems``, ``$ref`` with sibling keywords) while
  fastjsonschema implements drafts 4, 6 and 7. It compiles them without complaint but
  silently *ignores* what draft 7 does not know, so e.g. an event with an unknown
  top-level field would pass. :func:`to_draft07` rewrites those constructs into their
  draft-7 equivalents (see its docstring) and refuses any other post-draft-7 keyword, so
  a future event-model cannot weaken validation unnoticed.
* Documents arrive decoded by msgpack-numpy: numbers may be numpy scalars (``np.int64``
  is not an ``int``, ``np.bool_`` is not a ``bool``) and data values may be big arrays.
  Validation therefore runs on a cheap *schema view* of the document (see ``_views``):
  numpy scalars become Python scalars where the schema types them, and arrays whose
  items the schema does not constrain are replaced by an empty placeholder instead of
  being converted to lists (which would cost more than everything else for an image).
"""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Callable
from typing import Any

import event_model
import fastjsonschema
import numpy as np

from bluestream.documents import DOCUMENT_NAMES
from bluestream.errors import Reason, SchemaViolation, ValidationError

__all__ = ["draft07_schema", "to_draft07", "validate", "warm_up"]


_Check = Callable[[Any], Any]

#: Keywords that only annotate; ``$ref`` may keep them as siblings without rewriting.
_ANNOTATIONS = frozenset({"title", "description", "default", "$comment", "examples"})
#: Post-draft-7 keywords :func:`to_draft07` does not translate: refuse rather than ignore.
_UNSUPPORTED = frozenset({
    "unevaluatedItems", "dependentRequired", "dependentSchemas", "$dynamicRef",
    "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$anchor", "minContains",
    "maxContains", "$vocabulary",
})
_MAX_MESSAGE = 1000


def validate(name: str, doc: dict[str, Any], *, plain: bool = False) -> None:
    """Raise unless ``doc`` is a valid event-model document of kind ``name``.

    Raises :class:`ValidationError` (reason ``unknown-document``) for a kind that is not
    in :data:`DOCUMENT_NAMES`, and :class:`SchemaViolation` naming the kind, the document's uid,
    the failing path and the rule otherwise; a non-finite ``time`` (NaN, inf, which
    JSON schema lets through as a number) is a ValidationError (``bad-time``). Pure and
    safe to call from any thread. ``plain``: the caller knows ``doc`` holds no numpy
    values (decoded from JSON, or from msgpack without msgpack-numpy values), so they
    need no conversion before the schema check.
    """
    check = _VALIDATORS.get(name) or _compile(name)
    if not isinstance(doc, dict):
        raise SchemaViolation(f"{name} document must be a mapping, got {type(doc).__name__}")
    try:
        view = _VIEWS.get(name)
        check(view(doc) if view is not None else doc if plain else _plain(doc))
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SchemaViolation(_message(name, doc, exc)) from None
    except RecursionError:
        raise SchemaViolation(f"{name} {_ident(doc)} is nested too deeply") from None
    when = doc.get("time")
    if isinstance(when, float) and not math.isfinite(when):  # np.float64 is a float
        raise ValidationError(f"{name} {_ident(doc)} has time {when!r}: a time must be a "
                              "finite number (it orders runs and answers TimeRange)",
                              reason=Reason.BAD_TIME)


def draft07_schema(name: str) -> dict[str, Any]:
    """event-model's schema for ``name`` as bluestream compiles it (for tests and docs)."""
    if name not in DOCUMENT_NAMES:
        raise ValidationError(_unknown(name), reason=Reason.UNKNOWN_DOCUMENT)
    return to_draft07(event_model.schemas[event_model.DocumentNames[name]])


# -- schema translation -------------------------------------------------------------------
def to_draft07(schema: dict[str, Any]) -> dict[str, Any]:
    """A draft-7 schema that accepts exactly what the draft 2020-12 ``schema`` accepts.

    Rewrites, each equivalent for the shapes event-model uses:

    * ``unevaluatedProperties`` next to ``allOf: [{"$ref": ...}]`` (event, event_page,
      resource): the referenced ``properties``/``required`` are inlined and the keyword
      becomes ``additionalProperties``. Refused if a referenced schema uses anything
      else, because then "evaluated" would mean more than "listed in properties".
    * ``prefixItems`` (structured ``dtype_numpy``) becomes draft 7's array form of
      ``items``; a 2020-12 ``items`` next to it becomes ``additionalItems``.
    * ``$ref`` with validating siblings (start's ``hints``): draft 7 ignores the
      siblings, 2020-12 applies them, so they move into ``allOf`` next to the ``$ref``.
    * ``$defs`` needs nothing: refs are plain JSON pointers, which fastjsonschema
      resolves wherever they point.
    """
    root = copy.deepcopy(schema)
    root.pop("$schema", None)
    _inline_unevaluated(root, root)
    out: dict[str, Any] = _rewrite(root)
    out["$schema"] = "http://json-schema.org/draft-07/schema#"
    return out


def _inline_unevaluated(node: dict[str, Any], root: dict[str, Any]) -> None:
    if "unevaluatedProperties" not in node:
        return
    merged_props = dict(node.get("properties", {}))
    required = list(node.get("required", []))
    for part in node.pop("allOf", []):
        target = _resolve(root, part.get("$ref", "")) if set(part) == {"$ref"} else None
        if target is None or not set(target) <= {
            "title", "description", "type", "properties", "required",
        }:
            raise RuntimeError(f"cannot translate unevaluatedProperties over {part!r}")
        merged_props.update(target.get("properties", {}))
        required += [r for r in target.get("required", []) if r not in required]
    if node.get("patternProperties") or node.get("additionalProperties") is not None:
        raise RuntimeError("cannot translate unevaluatedProperties next to other keywords")
    node["properties"] = merged_props
    node["required"] = required
    node["additionalProperties"] = node.pop("unevaluatedProperties")


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any] | None:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _rewrite(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    if not isinstance(node, dict):
        return node
    bad = _UNSUPPORTED & node.keys()
    if "unevaluatedProperties" in node:
        bad = bad | {"unevaluatedProperties"}
    if bad:
        raise RuntimeError(f"event-model schema uses {sorted(bad)}, unknown to draft 7")
    out = {key: _rewrite_child(key, value) for key, value in node.items()}
    if "prefixItems" in out:
        if "items" in out:
            out["additionalItems"] = out.pop("items")
        out["items"] = out.pop("prefixItems")
    siblings = {k: v for k, v in out.items() if k not in _ANNOTATIONS and k != "$ref"}
    if "$ref" in out and siblings:
        kept = {k: v for k, v in out.items() if k in _ANNOTATIONS}
        out = {**kept, "allOf": [{"$ref": out["$ref"]}, siblings]}
    return out


def _rewrite_child(key: str, value: Any) -> Any:
    # Under these keywords the dict's keys are names (properties, $defs), not keywords.
    if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(
        value, dict
    ):
        return {name: _rewrite(sub) for name, sub in value.items()}
    if key in ("default", "const", "enum", "examples"):
        return value
    return _rewrite(value)


def _compile(name: str) -> _Check:
    if name not in DOCUMENT_NAMES:
        raise ValidationError(_unknown(name), reason=Reason.UNKNOWN_DOCUMENT)
    # use_default=False: fastjsonschema would otherwise *insert* schema defaults into the
    # document it validates; validation must not change what is stored.
    check: _Check = fastjsonschema.compile(draft07_schema(name), use_default=False)
    _VALIDATORS[name] = check
    return check


_VALIDATORS: dict[str, _Check] = {}


def _unknown(name: object) -> str:
    return f"unknown document kind {name!r}; expected one of {', '.join(DOCUMENT_NAMES)}"


# -- error messages -----------------------------------------------------------------------
def _message(name: str, doc: dict[str, Any], exc: fastjsonschema.JsonSchemaValueException) -> str:
    # fastjsonschema names the root "data"; an event's own "data" field then reads
    # "data.data", so strip the root and call it "top level".
    where = str(exc.name or "data")
    path = where[4:].lstrip(".") if where.startswith("data") else where
    what = str(exc.message or "is invalid")
    if what.startswith(where):
        what = what[len(where):].strip()
    definition = exc.definition if isinstance(exc.definition, dict) else {}
    if exc.rule == "anyOf":
        what = "must be " + " or ".join(_describe(s) for s in definition.get("anyOf", []))
    if exc.rule in ("type", "anyOf", "enum", "const", "pattern"):
        what += f" (got {type(exc.value).__name__} {reprlib.repr(exc.value)})"
    text = f"{name} {_ident(doc)} violates event-model's schema at {path or 'top level'}: {what}"
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _describe(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "valid"
    if "$ref" in schema:
        return "a " + str(schema["$ref"]).rsplit("/", 1)[-1]
    return str(schema.get("type", "valid"))


def _ident(doc: dict[str, Any]) -> str:
    for key in ("uid", "datum_id"):
        value = doc.get(key)
        if isinstance(value, str):
            return f"{key} {value!r}"
        if isinstance(value, list | tuple | np.ndarray) and len(value) and isinstance(
            value[0], str
        ):
            return f"{key}[0] {str(value[0])!r} (of {len(value)})"
    return "(no uid)"


# -- schema views ---------------------------------------------------------------------------
# A view must be accepted by the compiled schema exactly when event-model would accept the
# document if its numpy values were the equivalent Python values. Views never mutate the
# document and copy only what they change.
_EMPTY: tuple[()] = ()  # stands for an array whose items the schema does not constrain


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _plain(obj: Any) -> Any:
    """Python equivalents of numpy values, anywhere; ``obj`` itself if there are none."""
    if isinstance(obj, dict):
        items = {k: _plain(v) for k, v in obj.items()}
        return obj if all(items[k] is v for k, v in obj.items()) else items
    if isinstance(obj, list | tuple):
        seq = [_plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(seq, obj, strict=True)) else seq
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    return _py(obj)


def _items(value: Any, kinds: str) -> Any:
    """An array whose items the schema types: numpy arrays of a fitting kind pass as
    an empty placeholder; lists get their numpy scalars converted."""
    if isinstance(value, np.ndarray):
        return _EMPTY if value.ndim == 1 and value.dtype.kind in kinds else _plain(value)
    if isinstance(value, list | tuple):
        return [_py(v) for v in value]
    return value


def _arrays(value: Any) -> Any:
    """A mapping of arrays whose items the schema leaves free (``items: {}``)."""
    if not isinstance(value, dict):
        return value
    return {k: _EMPTY if isinstance(v, list | tuple | np.ndarray) else v
            for k, v in value.items()}


def _event_view(doc: dict[str, Any]) -> dict[str, Any]:
    # data and timestamps values are unconstrained ("additionalProperties": true), so
    # they are validated as they are, without looking at them.
    time, seq_num, filled = doc.get("time"), doc.get("seq_num"), doc.get("filled")
    flags = filled if isinstance(filled, dict) and any(
        isinstance(v, np.generic) for v in filled.values()) else None
    if flags is None and type(time) in (float, int) and type(seq_num) is int:
        return doc
    view = dict(doc)
    for key in ("time", "seq_num"):
        if key in view:
            view[key] = _py(view[key])
    if flags is not None:
        view["filled"] = {k: _py(v) for k, v in flags.items()}
    return view


def _event_page_view(doc: dict[str, Any]) -> dict[str, Any]:
    view = dict(doc)
    for key, kinds in (("time", "iuf"), ("seq_num", "iu"), ("uid", "UT")):
        if key in view:
            view[key] = _items(view[key], kinds)
    for key in ("data", "timestamps"):
        if key in view:
            view[key] = _arrays(view[key])
    filled = view.get("filled")
    if isinstance(filled, dict):
        view["filled"] = {k: _items(v, "bUT") for k, v in filled.items()}
    return view


def _datum_page_view(doc: dict[str, Any]) -> dict[str, Any]:
    view = dict(doc)
    if "datum_id" in view:
        view["datum_id"] = _items(view["datum_id"], "UT")
    if "datum_kwargs" in view:
        view["datum_kwargs"] = _arrays(view["datum_kwargs"])
    plain: dict[str, Any] = _plain(view)
    return plain


_VIEWS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "event": _event_view,
    "event_page": _event_page_view,
    "datum_page": _datum_page_view,
}


def warm_up() -> None:
    """Compile every schema now, so a daemon fails at start rather than on a document."""
    for name in DOCUMENT_NAMES:
        if name not in _VALIDATORS:
            _compile(name)
