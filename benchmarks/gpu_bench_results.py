"""The results file of a GPU benchmark run, ``gpu_bench.json``, and its markdown twin.

Both are rewritten after every case, so a run cut short (deadline, crash, a kill from outside)
keeps everything measured until then. A restarted worker resumes from the file: it skips the
cases already recorded, and the cases that need something an earlier fatal device error broke
(``poisoned``). The supervisor settles what a dead worker left in progress and, at the end, marks
every planned case that never ran. No torch here: the supervisor must not need a GPU to report.

Layout: ``machine``, ``settings``, ``backends``, ``plan`` (case id -> section, parameters and
needs and timeout, in run order), ``results`` (case id -> record: ``status`` -- ok, incomplete, error,
oom, unsupported, skipped, crashed, killed -- and what was measured), ``in_progress`` and
``in_progress_since``, ``poisoned``, ``attempts``, ``finished``, ``stop_reason``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gpu_bench_report import render_markdown

SCHEMA_VERSION = 1


class ResultsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.markdown_path = self.path.with_suffix(".md")
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"schema": SCHEMA_VERSION, "plan": {}, "results": {}, "in_progress": None, "poisoned": [],
                         "attempts": [], "finished": False, "stop_reason": None}

    # ------------------------------------------------------------------ writing
    def save(self) -> None:
        """Write the JSON, then the markdown, each atomically (a reader never sees half a file)."""
        _write_atomically(self.path, json.dumps(self.data, indent=1, default=str))
        try:
            markdown = render_markdown(self.data)
        except Exception as error:  # noqa: BLE001 -- the JSON is what matters; say why the table is missing
            markdown = f"# e3fast GPU benchmark\n\nThe report could not be rendered: {type(error).__name__}: {error}\n"
        _write_atomically(self.markdown_path, markdown)

    def set_plan(self, cases) -> None:
        self.data["plan"] = {case.id: {"section": case.section, "params": case.params, "needs": sorted(case.needs),
                                       "timeout_seconds": case.timeout_seconds} for case in cases}
        self.save()

    def start(self, case_id: str) -> None:
        self.data["in_progress"] = case_id
        self.data["in_progress_since"] = time.time()
        self.save()

    def record(self, case_id: str, outcome: dict) -> None:
        self.data["results"][case_id] = outcome
        if self.data.get("in_progress") == case_id:
            self.data["in_progress"] = None
        self.save()

    def poison(self, needs) -> None:
        self.data["poisoned"] = sorted(set(self.data["poisoned"]) | set(needs))

    def note_attempt(self, exit_code: int | None, seconds: float) -> None:
        self.data["attempts"].append({"exit_code": exit_code, "seconds": round(seconds, 1)})

    # ------------------------------------------------------------------ reading
    def has(self, case_id: str) -> bool:
        return case_id in self.data["results"]

    def poisoned_need(self, needs) -> str | None:
        return next((need for need in sorted(needs) if need in self.data["poisoned"]), None)

    def overdue_case(self, now: float) -> tuple[str, float] | None:
        """``(case id, its timeout)`` if the case in progress has run longer than its timeout."""
        case_id, since = self.data.get("in_progress"), self.data.get("in_progress_since")
        if case_id is None or since is None:
            return None
        timeout = self.data["plan"].get(case_id, {}).get("timeout_seconds")
        return (case_id, timeout) if timeout and now - since > timeout else None

    # ------------------------------------------------------------------ ends of a worker
    def settle_interrupted(self, why: str, status: str = "crashed") -> None:
        """The case a dead (``crashed``) or ``killed`` worker was running gets ``status``; what it
        needs is poisoned."""
        case_id = self.data.get("in_progress")
        if case_id is None:
            return
        self.data["results"][case_id] = {"status": status, "reason": why}
        self.data["in_progress"] = self.data["in_progress_since"] = None
        self.poison(self.data["plan"].get(case_id, {}).get("needs", []))

    def finalize(self, stop_reason: str | None) -> None:
        """Mark every planned case that never ran, and say why the run stopped."""
        if stop_reason and not self.data.get("finished"):
            self.data["stop_reason"] = stop_reason
        for case_id in self.data["plan"]:
            if case_id not in self.data["results"]:
                self.data["results"][case_id] = {"status": "skipped",
                                                 "reason": f"not reached: {self.data.get('stop_reason') or 'unknown'}"}
        self.save()


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
