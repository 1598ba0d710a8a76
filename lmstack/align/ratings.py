"""The rating store: comparisons, raters, assignments and ratings in one SQLite file.

Every write is one transaction (WAL journal), so a crash or a refused rating never leaves a
half-written row and never touches what is already stored. Raters authenticate with a
random token; only its SHA-256 is stored. A rater reads and writes only their own ratings:
every query that returns or changes a rating is keyed by the rater the token resolves to,
and a comparison can only be rated by a rater it is assigned to.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lmstack.errors import InputError, LmstackError

CHOICES = ("A", "B", "tie", "neither")
CRITERIA = [  # shown to raters; weights sum to 100
    ("Appropriateness of tone", 40, "Does the reply match the tone the situation calls for?"),
    ("Specificity", 30, "Does it address this request concretely, not generically?"),
    ("Conciseness", 20, "Is it as short as it can be while complete?"),
    ("Professionalism", 10, "Would you send it as is, under your company's name?"),
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS raters (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT UNIQUE,
    kind TEXT NOT NULL DEFAULT 'human'      -- human | ai | admin
);
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    split TEXT NOT NULL,
    messages TEXT NOT NULL,                 -- JSON chat messages
    a_text TEXT NOT NULL,
    b_text TEXT NOT NULL,
    a_label TEXT NOT NULL,                  -- which of the 4 responses is shown as A
    b_label TEXT NOT NULL,
    kind TEXT NOT NULL,                     -- main | repeat | gold
    repeat_of TEXT,                         -- for repeats: the main comparison, order flipped
    gold TEXT                               -- for gold: the known answer (A or B)
);
CREATE TABLE IF NOT EXISTS assignments (
    comparison_id TEXT NOT NULL REFERENCES comparisons(id),
    rater TEXT NOT NULL REFERENCES raters(name),
    role TEXT NOT NULL,                     -- primary | tiebreak
    PRIMARY KEY (comparison_id, rater)
);
CREATE TABLE IF NOT EXISTS ratings (
    comparison_id TEXT NOT NULL REFERENCES comparisons(id),
    rater TEXT NOT NULL REFERENCES raters(name),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'neither')),
    note TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (comparison_id, rater)
);
"""


class AuthError(LmstackError):
    """A rater token that is missing or unknown."""


class NotFoundError(InputError):
    """A comparison id that does not exist (or is not this rater's)."""


@dataclass
class Comparison:
    id: str
    prompt_id: str
    split: str
    messages: list[dict]
    a_text: str
    b_text: str
    a_label: str
    b_label: str
    kind: str
    repeat_of: str | None = None
    gold: str | None = None

    def for_rater(self) -> dict:
        """What a rater sees: no labels, no gold answer, no repeat marker."""
        return {"id": self.id, "messages": self.messages, "a": self.a_text, "b": self.b_text}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RatingStore:
    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise InputError(f"no ratings database at {self.path} (run `align collect plan`)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.conn:
            self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # ----------------------------------------------------------------- raters

    def add_rater(self, name: str, kind: str = "human", token: str | None = None) -> str:
        """Create a rater (or give an existing one a new token); returns the token."""
        token = token or secrets.token_urlsafe(18)
        with self._lock, self.conn:
            self.conn.execute(
                "INSERT INTO raters(name, token_sha256, kind) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
                (name, hash_token(token), kind),
            )
        return token

    def ensure_rater(self, name: str, kind: str) -> None:
        with self._lock, self.conn:
            self.conn.execute(
                "INSERT OR IGNORE INTO raters(name, token_sha256, kind) VALUES (?, NULL, ?)",
                (name, kind),
            )

    def rater_for_token(self, token: str | None) -> tuple[str, str]:
        """(name, kind) of the token's rater; AuthError for a missing or unknown token."""
        if not token:
            raise AuthError("missing rater token")
        row = self.conn.execute(
            "SELECT name, kind FROM raters WHERE token_sha256 = ?", (hash_token(token),)
        ).fetchone()
        if row is None:
            raise AuthError("unknown rater token")
        return row["name"], row["kind"]

    def raters(self, kind: str | None = None) -> list[str]:
        sql = "SELECT name FROM raters" + (" WHERE kind = ?" if kind else "") + " ORDER BY name"
        return [r["name"] for r in self.conn.execute(sql, (kind,) if kind else ())]

    def rater_kinds(self) -> dict[str, str]:
        return {r["name"]: r["kind"] for r in self.conn.execute("SELECT name, kind FROM raters")}

    # ----------------------------------------------------------------- comparisons

    def add_comparisons(self, comparisons: list[Comparison]) -> None:
        with self._lock, self.conn:
            self.conn.executemany(
                "INSERT INTO comparisons VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        c.id,
                        c.prompt_id,
                        c.split,
                        json.dumps(c.messages, ensure_ascii=False),
                        c.a_text,
                        c.b_text,
                        c.a_label,
                        c.b_label,
                        c.kind,
                        c.repeat_of,
                        c.gold,
                    )
                    for c in comparisons
                ],
            )

    def assign(self, rows: list[tuple[str, str, str]]) -> None:
        """(comparison_id, rater, role) rows."""
        with self._lock, self.conn:
            self.conn.executemany("INSERT OR IGNORE INTO assignments VALUES (?,?,?)", rows)

    @staticmethod
    def _comparison(row) -> Comparison:
        data = dict(row)
        data["messages"] = json.loads(data["messages"])
        return Comparison(**data)

    def comparisons(self, kind: str | None = None) -> list[Comparison]:
        sql = "SELECT * FROM comparisons" + (" WHERE kind = ?" if kind else "") + " ORDER BY rowid"
        return [self._comparison(r) for r in self.conn.execute(sql, (kind,) if kind else ())]

    def comparison(self, comparison_id: str) -> Comparison:
        row = self.conn.execute(
            "SELECT * FROM comparisons WHERE id = ?", (comparison_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"unknown comparison {comparison_id!r}")
        return self._comparison(row)

    def assigned(self, rater: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT a.comparison_id FROM assignments a JOIN comparisons c "
            "ON c.id = a.comparison_id WHERE a.rater = ? ORDER BY c.rowid",
            (rater,),
        )
        return [r["comparison_id"] for r in rows]

    def next_for(self, rater: str) -> Comparison | None:
        """The rater's first assigned comparison they have not rated yet."""
        row = self.conn.execute(
            "SELECT c.* FROM assignments a JOIN comparisons c ON c.id = a.comparison_id "
            "WHERE a.rater = ? AND NOT EXISTS (SELECT 1 FROM ratings r WHERE "
            "r.comparison_id = a.comparison_id AND r.rater = a.rater) ORDER BY c.rowid LIMIT 1",
            (rater,),
        ).fetchone()
        return None if row is None else self._comparison(row)

    # ----------------------------------------------------------------- ratings

    def rate(
        self,
        rater: str,
        comparison_id: str,
        choice: str,
        note: str | None = None,
        require_assignment: bool = True,
    ) -> None:
        """Store (or replace) this rater's own rating, in one transaction.

        Refused, with nothing changed: an unknown comparison, a choice outside A/B/tie/
        neither, a comparison not assigned to this rater. When the two primary ratings
        disagree a tie-break is assigned to a third rater in the same transaction.
        """
        if choice not in CHOICES:
            raise InputError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self._lock, self.conn:
            if not self.conn.execute(
                "SELECT 1 FROM comparisons WHERE id = ?", (comparison_id,)
            ).fetchone():
                raise NotFoundError(f"unknown comparison {comparison_id!r}")
            if (
                require_assignment
                and not self.conn.execute(
                    "SELECT 1 FROM assignments WHERE comparison_id = ? AND rater = ?",
                    (comparison_id, rater),
                ).fetchone()
            ):
                raise NotFoundError(f"comparison {comparison_id!r} is not assigned to {rater}")
            self.conn.execute(
                "INSERT INTO ratings VALUES (?,?,?,?,?) ON CONFLICT(comparison_id, rater) "
                "DO UPDATE SET choice = excluded.choice, note = excluded.note, "
                "created_at = excluded.created_at",
                (comparison_id, rater, choice, note, time.time()),
            )
            self._assign_tiebreak(comparison_id)

    def _assign_tiebreak(self, comparison_id: str) -> None:
        primary = self.conn.execute(
            "SELECT r.rater, r.choice FROM ratings r JOIN assignments a ON "
            "a.comparison_id = r.comparison_id AND a.rater = r.rater "
            "WHERE r.comparison_id = ? AND a.role = 'primary'",
            (comparison_id,),
        ).fetchall()
        if len(primary) < 2 or primary[0]["choice"] == primary[1]["choice"]:
            return
        if self.conn.execute(
            "SELECT 1 FROM assignments WHERE comparison_id = ? AND role = 'tiebreak'",
            (comparison_id,),
        ).fetchone():
            return
        taken = {r["rater"] for r in primary}
        load = {
            r["name"]: r["n"]
            for r in self.conn.execute(
                "SELECT rt.name, COUNT(a.rater) AS n FROM raters rt LEFT JOIN assignments a "
                "ON a.rater = rt.name WHERE rt.kind = 'human' GROUP BY rt.name"
            )
        }
        candidates = sorted((n, name) for name, n in load.items() if name not in taken)
        if candidates:  # the least-loaded other human rater breaks the tie
            self.conn.execute(
                "INSERT INTO assignments VALUES (?,?, 'tiebreak')",
                (comparison_id, candidates[0][1]),
            )

    def ratings_of(self, rater: str) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT comparison_id, choice FROM ratings WHERE rater = ?", (rater,)
        )
        return {r["comparison_id"]: r["choice"] for r in rows}

    def all_ratings(self) -> list[dict]:
        """Every rating with its rater's kind and assignment role (for QC and export)."""
        rows = self.conn.execute(
            "SELECT r.comparison_id, r.rater, r.choice, rt.kind, "
            "COALESCE(a.role, 'unassigned') AS role FROM ratings r "
            "JOIN raters rt ON rt.name = r.rater LEFT JOIN assignments a ON "
            "a.comparison_id = r.comparison_id AND a.rater = r.rater ORDER BY r.created_at"
        )
        return [dict(r) for r in rows]

    def pending_tiebreaks(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT a.comparison_id, a.rater FROM assignments a WHERE a.role = 'tiebreak' "
            "AND NOT EXISTS (SELECT 1 FROM ratings r WHERE r.comparison_id = a.comparison_id "
            "AND r.rater = a.rater) ORDER BY a.comparison_id"
        )
        return [dict(r) for r in rows]
