"""``neurotwin export-session [SESSION] --journal URL``: a journaled closed-loop session as NWB or HDF5.

Reads the journal that ``neurotwin serve closed-loop`` writes (a SQLite file, ``sqlite:///path``, or a
``postgresql://`` URL; default ``$NEUROTWIN_CLOSED_LOOP_JOURNAL``, else ``closed_loop_journal.sqlite3``
as ``serve`` uses), directly: no server needs to run, and a running one is not disturbed (reads only).
Subject, device and session metadata given here replace the session's in the file written.
``--report DIR`` also writes the static HTML report.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
from typing import Any

from neurotwin.commands._options import add_metadata_flags, metadata_from_args
from neurotwin.errors import InvalidInput, NotFound

HELP = "export a journaled closed-loop session to NWB or HDF5, and a static report"
JOURNAL_ENV = "NEUROTWIN_CLOSED_LOOP_JOURNAL"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "session", nargs="?", default=None, metavar="SESSION", help="session id (default: the only one)"
    )
    parser.add_argument(
        "--journal",
        default=None,
        metavar="URL",
        help="SQLite path, sqlite:///path or postgresql:// URL (default: $NEUROTWIN_CLOSED_LOOP_JOURNAL, "
        "else closed_loop_journal.sqlite3, as 'serve' uses)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="file to write (default: SESSION.nwb)")
    parser.add_argument(
        "--format", choices=("nwb", "hdf5"), default=None, help="default: from --out's suffix (.h5: hdf5)"
    )
    parser.add_argument("--omit-images", action="store_true", help="leave the pixels out (a small file)")
    parser.add_argument("--report", default=None, metavar="DIR", help="also write the static HTML report")
    parser.add_argument("--list", action="store_true", help="list the journal's sessions and stop")
    add_metadata_flags(parser, "replace the session's in this file only")
    parser.add_argument(
        "--presentation-duration",
        dest="meta_presentation_duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="presentation time per repeat, for stop times where the rig gave none",
    )


def open_reader(url: str | None) -> Any:
    """The journal at ``url``, refusing a SQLite path that does not exist (opening would create it)."""
    from neurotwin.engines.journal import DEFAULT_JOURNAL, open_journal

    text = url or os.environ.get(JOURNAL_ENV) or DEFAULT_JOURNAL
    if not text.startswith(("postgresql://", "postgres://")):
        path = Path(text.removeprefix("sqlite:///"))
        if not path.is_file():
            raise NotFound(f"journal {path} does not exist (give --journal PATH or a postgresql:// URL)")
    return open_journal(text)


def _choose(journal: Any, wanted: str | None) -> str:
    sessions = journal.list_sessions()
    if wanted:
        journal.get_session(wanted)  # NotFound names it
        return wanted
    if len(sessions) == 1:
        return str(sessions[0].session_id)
    if not sessions:
        raise NotFound(f"journal {journal.url} holds no sessions")
    ids = ", ".join(s.session_id for s in sessions[:10]) + (" ..." if len(sessions) > 10 else "")
    raise InvalidInput(f"journal {journal.url} holds {len(sessions)} sessions ({ids}); name one")


def _listing(journal: Any) -> None:
    for record in journal.list_sessions():
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        print(
            f"{record.session_id}  {record.status:8s}  {record.generation} generations  "
            f"{record.presentations_told} presentations  created {created.isoformat(timespec='seconds')}"
        )


def run(args: argparse.Namespace) -> int:
    from neurotwin.engines.session_export import collect, export_session

    journal = open_reader(args.journal)
    try:
        if args.list:
            _listing(journal)
            return 0
        session_id = _choose(journal, args.session)
        out = Path(args.out or f"{session_id}.nwb")
        fmt = args.format or ("hdf5" if out.suffix.lower() in (".h5", ".hdf5") else "nwb")
        metadata = metadata_from_args(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed, so a failed export never leaves half a file.
        partial = out.with_name(f".{out.stem}.part{out.suffix}")
        try:
            export_session(journal, session_id, partial, fmt, not args.omit_images, metadata)
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
        print(f"exported session {session_id} to {out} ({fmt})")
        if args.report:
            from neurotwin.reports.session_report import write_session_report

            data = collect(journal, session_id, True, metadata)
            page = write_session_report(data, args.report, exports=[out])
            print(f"report {page}")
    finally:
        journal.close()
    return 0
