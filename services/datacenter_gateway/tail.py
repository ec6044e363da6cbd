"""Tail mode: follow a file of sacct output that a cron job appends to.

Each round reads the complete lines added since the saved position, maps them
like ``POST /v1/usage/slurm`` and stores the records in the outbox, then saves
the position (inode, byte offset, header line) in the outbox database. A
restart resumes there; a crash between storing and saving re-reads a few lines,
whose records have the same ``record_id`` and body and so are duplicates, not
new records. A rotated (new inode) or truncated file is read from its start.

The cron job may append ``sacct --parsable2`` output with its header each time
and overlapping time windows: repeated header lines are skipped, repeated jobs
are duplicates, and a job skipped as unfinished is taken when it reappears
finished. Lines that cannot be read are logged with their number and passed
over (nobody is there to answer a 400), the rest of the file is taken.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from services.datacenter_gateway import domain
from services.datacenter_gateway.background import BackgroundLoop
from services.datacenter_gateway.outbox import Conflict, Outbox
from services.datacenter_gateway.parsers import ParseResult

log = logging.getLogger("computenet.datacenter_gateway.tail")

Parse = Callable[[str, list[str] | None], ParseResult]
MAX_READ = 8 * 1024 * 1024


class SacctTail(BackgroundLoop):
    thread_name = "tail"

    def __init__(
        self,
        path: str,
        outbox: Outbox,
        datacenter_id: str,
        parse: Parse,
        gpu_models: list[str] | None = None,
        delimiter: str = "|",
        interval_s: float = 10.0,
    ):
        self.path = os.path.abspath(path)
        self.outbox = outbox
        self.datacenter_id = datacenter_id
        self.parse = parse
        self.gpu_models = list(gpu_models or [])
        self.delimiter = delimiter
        self.interval_s = interval_s
        super().__init__()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.read_once() and not self._stop.is_set():
                    pass
            except Exception as exc:  # noqa: BLE001 - keep following
                log.warning("tail %s: %s: %s", self.path, type(exc).__name__, exc)
            self._stop.wait(self.interval_s)

    def read_once(self) -> int:
        """Take what was appended since the saved position; returns bytes read."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return 0
        saved = self.outbox.tail_position(self.path)
        inode, offset, header = saved if saved else (stat.st_ino, 0, None)
        if inode != stat.st_ino or stat.st_size < offset:
            log.info("tail %s: rotated or truncated, reading from the start", self.path)
            inode, offset, header = stat.st_ino, 0, None
        if stat.st_size == offset:
            return 0
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(MAX_READ)
        end = chunk.rfind(b"\n")
        if end < 0:
            return 0  # a line still being written
        chunk = chunk[: end + 1]
        lines = chunk.decode("utf-8", errors="replace").splitlines()
        body: list[str] = []
        for line in lines:
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split(self.delimiter)]
            if header is None:
                header = line
                continue
            if fields == [f.strip() for f in header.split(self.delimiter)]:
                continue  # the header again, from the next cron run
            body.append(line)
        columns = [f.strip() for f in header.split(self.delimiter)] if header else None
        if body and columns:
            self._store(self.parse("\n".join(body), columns), offset)
        self.outbox.save_tail_position(self.path, inode, offset + len(chunk), header)
        return len(chunk)

    def _store(self, result: ParseResult, offset: int) -> None:
        for error in result.errors:
            log.warning(
                "tail %s (from byte %d) line %d: %s",
                self.path,
                offset,
                error["line"],
                error["error"],
            )
        records, errors = domain.prepare_batch(
            result.records, self.datacenter_id, self.gpu_models
        )
        for index, problem in errors.items():
            log.warning("tail %s: record %s refused: %s", self.path, index, problem)
        if records:
            outcome = self.outbox.ingest(records, self.datacenter_id)
            if isinstance(outcome, Conflict):
                log.warning("tail %s: conflicting records %s", self.path, outcome)
            else:
                log.info(
                    "tail %s: %d new records, %d duplicates",
                    self.path,
                    outcome.accepted,
                    outcome.duplicates,
                )
