"""Subject, device and session metadata of a closed-loop session, checked where it enters.

A rig gives it when it creates a session (``CreateSessionRequest.metadata``) and may complete it when
it exports (``ExportSessionRequest.metadata``). Values are checked against the forms NWB's best
practices ask for (species as a Latin binomial or NCBI taxonomy URL, age as an ISO 8601 duration,
sex as one letter), so that a session accepted here never exports a file validators reject.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from neurotwin.errors import InvalidInput

SEXES = ("M", "F", "U", "O")
# Genus and species ("Macaca mulatta"), or an NCBI taxonomy term IRI.
_SPECIES = re.compile(r"[A-Z][a-z]+ [a-z]+|http://purl\.obolibrary\.org/obo/NCBITaxon_\d+")
_NUMBER = r"\d+(?:\.\d+)?"
# ISO 8601 duration: P, then years, months, weeks, days, and after T hours, minutes, seconds; at
# least one part, and T only when a time part follows.
_DURATION = re.compile(
    rf"P(?=[\dT])(?:{_NUMBER}Y)?(?:{_NUMBER}M)?(?:{_NUMBER}W)?(?:{_NUMBER}D)?"
    rf"(?:T(?=\d)(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?"
)
MAX_TEXT = 4096

# What an export writes for a subject nobody described: honest placeholders that NWB accepts.
UNKNOWN_SUBJECT_ID = "unknown"
UNKNOWN_SEX = "U"
# "Zero days or older": any age; the range form lets a file say it does not know.
UNKNOWN_AGE = "P0D/"
DEFAULT_RESPONSE_UNITS = "responses as told by the rig"


@dataclass(frozen=True)
class RecordingMetadata:
    """Field names and meanings as in ``neurotwin.v1.RecordingMetadata``; empty means not given."""

    subject_id: str = ""
    species: str = ""
    sex: str = ""
    age: str = ""
    subject_description: str = ""
    session_description: str = ""
    experimenter: tuple[str, ...] = ()
    lab: str = ""
    institution: str = ""
    experiment_description: str = ""
    protocol: str = ""
    device_name: str = ""
    device_description: str = ""
    device_manufacturer: str = ""
    brain_area: str = ""
    response_units: str = ""
    # Seconds per presentation (one repeat); 0: not given.
    presentation_duration: float = 0.0
    # Unix seconds on the rig's clock; 0: the session's creation time.
    session_start_time: float = 0.0
    # Names of the fields that were given (so a merge can tell "empty" from "not given").
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RecordingMetadata:
        """From a journaled or caller-given dict; unknown keys are refused, values checked."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)} - {"given"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown metadata field(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name == "experimenter":
                people = [value] if isinstance(value, str) else list(value or ())
                values[name] = tuple(str(p).strip() for p in people if str(p).strip())
            elif name in ("presentation_duration", "session_start_time"):
                try:
                    values[name] = float(value or 0.0)
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"metadata {name} {value!r}: expected seconds") from exc
            else:
                values[name] = "" if value is None else str(value).strip()
        given = frozenset(k for k, v in values.items() if v)
        return cls(**values, given=given).checked()

    def to_dict(self) -> dict[str, Any]:
        """The fields that were given (JSON-ready): what the journal stores."""
        data = asdict(self)
        data.pop("given")
        data["experimenter"] = list(self.experimenter)
        return {k: v for k, v in data.items() if v}

    def merged(self, override: RecordingMetadata) -> RecordingMetadata:
        """These values with every field ``override`` gives replaced."""
        changes = {name: getattr(override, name) for name in override.given}
        return replace(self, **changes, given=self.given | override.given)

    def checked(self) -> RecordingMetadata:
        for f in fields(self):
            value = getattr(self, f.name)
            texts = value if isinstance(value, tuple) else (value,) if isinstance(value, str) else ()
            if any(len(t) > MAX_TEXT for t in texts):
                raise InvalidInput(f"metadata {f.name}: at most {MAX_TEXT} characters")
        if "/" in self.subject_id:
            raise InvalidInput(f"metadata subject_id {self.subject_id!r}: no '/' (a separator in NWB)")
        if self.species and not _SPECIES.fullmatch(self.species):
            raise InvalidInput(
                f"metadata species {self.species!r}: give the Latin binomial (e.g. 'Macaca mulatta') or an "
                "NCBI taxonomy URL (http://purl.obolibrary.org/obo/NCBITaxon_<id>)"
            )
        if self.sex and self.sex not in SEXES:
            raise InvalidInput(f"metadata sex {self.sex!r}: one of {', '.join(SEXES)} (U: unknown, O: other)")
        if self.age and not _valid_age(self.age):
            raise InvalidInput(
                f"metadata age {self.age!r}: an ISO 8601 duration such as 'P7Y' (7 years) or 'P30W', or a "
                "range 'P7Y/P8Y' ('P7Y/': 7 years or older)"
            )
        for name in ("presentation_duration", "session_start_time"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"metadata {name} {value}: must be a finite number >= 0")
        return self


def _valid_age(text: str) -> bool:
    if _DURATION.fullmatch(text):
        return True
    low, sep, high = text.partition("/")
    return bool(sep) and (low or high) != "" and all(not p or _DURATION.fullmatch(p) for p in (low, high))
