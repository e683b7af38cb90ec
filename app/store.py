"""The generations kept for the views (scale slider, galleries, attention, the Edit tab's slider), all sessions
within one memory budget; a session's record goes when its page closes."""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

from .work.settings import UserError


def record_bytes(record) -> int:
    """Memory held by a generation's or an edit's record: maps, previews, final images and captured attention."""
    total = 0
    for run in record.runs.values():
        total += sum(t.nbytes for t in run.f_hats) + sum(i.nbytes for i in run.finals)
        total += sum(i.nbytes for images in run.previews.values() for i in images)
        total += sum(w.nbytes for scales in run.attention.values() for scale in scales for w in scale.values())
    return total


class GenerationStore:
    """The generations kept for the views (scale slider, gallery, attention), within a memory budget.

    The page holds only a token (in ``gr.State``); the record stays here. Each session keeps one record (a
    new generation replaces its last one); past ``budget_bytes`` the least recently used records go (the
    newest is always kept); a session's record goes when its page closes (Gradio's unload event).
    ``on_forget(token)`` runs for every record that goes (its download files are deleted there).
    ``refresh(token)`` re-measures a record that grew (a sample decoded or captured later).
    """

    def __init__(self, budget_bytes: int, on_forget=None):
        self.budget_bytes = budget_bytes
        self.on_forget = on_forget
        self._records: OrderedDict[str, tuple[str | None, object, int]] = OrderedDict()
        self._latest: dict[str, str] = {}  # session -> its token
        self._lock = threading.Lock()

    def put(self, session: str | None, record) -> str:
        token = uuid.uuid4().hex
        forgotten = []
        with self._lock:
            if session is not None:
                old = self._latest.pop(session, None)
                if old in self._records:
                    forgotten.append(self._forget(old))
                self._latest[session] = token
            self._records[token] = (session, record, record_bytes(record))
            forgotten += self._trim()
        self._notify(forgotten)
        return token

    def get(self, token: str | None):
        """The record behind a token; None for no token; a message if it was dropped."""
        if token is None:
            return None
        with self._lock:
            if token not in self._records:
                raise UserError("this generation is no longer kept on the server (memory budget, or the page "
                                "was closed): generate again")
            self._records.move_to_end(token)
            return self._records[token][1]

    def refresh(self, token: str | None) -> None:
        with self._lock:
            if token not in self._records:
                return
            session, record, _ = self._records[token]
            self._records[token] = (session, record, record_bytes(record))
            forgotten = self._trim()
        self._notify(forgotten)

    def drop_session(self, session: str | None) -> None:
        with self._lock:
            token = self._latest.get(session)
            forgotten = [self._forget(token)] if token in self._records else []
        self._notify(forgotten)

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def _trim(self) -> list[str]:
        forgotten = []
        while self.nbytes > self.budget_bytes and len(self._records) > 1:
            forgotten.append(self._forget(next(iter(self._records))))
        return forgotten

    def _forget(self, token: str) -> str:
        session, _, _ = self._records.pop(token)
        if self._latest.get(session) == token:
            del self._latest[session]
        return token

    def _notify(self, tokens: list[str]) -> None:
        if self.on_forget is not None:
            for token in tokens:
                self.on_forget(token)
