"""The one place a report run writes: `--out`, kept whole, locked, and consistent with the exit status.

Everything a run produces (reports, traces) is written into a staging folder beside `--out` and published
only when the run has a verdict: a new `--out` appears by one rename, an existing one has its previous
products replaced (report.json last, the file CI reads). Bad input (exit 2) and an interrupt (130) leave
`--out` as it was; a failed implementation (exit 3) leaves only `parity-error.log` there, never a stale
report beside it. A lock beside `--out` refuses a second run writing the same folder. Names inside come
from `inside()`, which keeps every path under the folder whatever an adapter calls itself.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from parity.capture.paths import inside
from parity.errors import ParityInputError
from parity.report.html import to_html
from parity.report.render import to_json, to_markdown

PRODUCTS = ("report.json", "report.md", "report.html", "traces", "parity-error.log")  # what a run may leave in OUT
class OutDir:
    """`--out`: checked, locked and staged before any work (`open`); published or cleaned on the way out."""

    def __init__(self, out: str) -> None:
        if not str(out).strip():
            raise ParityInputError("{option} is empty; give a directory, e.g. reports/latest", option="out")
        self.final = Path(out)
        self.staging: Path | None = None
        self._created: list[Path] = []
        self._lock_fd: int | None = None
        self._lock_path = self.final.parent / f".{self.final.name}.parity-lock"

    # ------------------------------------------------------------------ before any work
    def open(self) -> "OutDir":
        """Make the parent folders, take the lock, make the staging folder: any failure is bad input."""
        if self.final.exists() and not self.final.is_dir():
            raise ParityInputError(f"{{option}} {str(self.final)!r} is a file; give a directory", option="out")
        self._created = [d for d in [self.final.parent, *self.final.parent.parents] if not d.exists()]
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self.staging = Path(self._mkdtemp())
        except OSError as e:
            self.discard()
            raise ParityInputError(f"{{option}} {str(self.final)!r} cannot be written ({e.strerror}); choose a "
                                   "writable directory", option="out") from None
        return self

    def _mkdtemp(self) -> str:
        import tempfile

        return tempfile.mkdtemp(prefix=f".{self.final.name}.parity-", dir=self.final.parent)

    def _lock(self) -> None:
        import fcntl

        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                self._lock_path = None  # not ours: never unlinked by this run
                raise ParityInputError(f"{{option}} {str(self.final)!r} is being written by another parity run "
                                       f"(pid {holder}); wait for it or choose another directory",
                                       option="out") from None
            # the holder before us may have unlinked the file after we opened it: lock the file that is there
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)

    # ------------------------------------------------------------------ during the run
    def path(self, *parts: str) -> Path:
        """Where a product goes while the run lasts (inside the staging folder)."""
        assert self.staging is not None, "OutDir.open() first"
        return inside(self.staging, *parts)

    @property
    def traces(self) -> Path:
        return self.path("traces")

    # ------------------------------------------------------------------ on the way out
    def publish(self) -> list[Path]:
        """Move the staged products into `--out` (report.json last) and return their final paths."""
        assert self.staging is not None
        staged = sorted(self.staging.iterdir(), key=lambda p: p.name == "report.json")
        if not self.final.exists():
            os.replace(self.staging, self.final)  # a new folder appears whole, in one rename
        else:
            self._remove_products(keep={p.name for p in staged})
            for p in staged:
                target = self.final / p.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(p, target)
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        self._unlock()
        return [self.final / p.name for p in staged]

    def fail(self, log: str) -> Path | None:
        """An implementation failed: `--out` holds parity-error.log and no report (a stale one would contradict
        the exit status). Returns the log's path, or None where even that could not be written."""
        self._drop_staging()
        try:
            self.final.mkdir(parents=True, exist_ok=True)
            self._remove_products(keep=set())
            target = self.final / "parity-error.log"
            tmp = self.final / ".parity-error.log.part"
            tmp.write_text(log)
            os.replace(tmp, target)
            return target
        except OSError:
            (self.final / ".parity-error.log.part").unlink(missing_ok=True)
            return None
        finally:
            self._unlock()

    def discard(self) -> None:
        """Bad input or an interrupt: nothing this run made stays (staging, the lock, parent folders it made)."""
        self._drop_staging()
        self._unlock()
        for d in self._created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break  # not empty (or not ours): keep it and its parents
        self._created = []

    def _drop_staging(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _remove_products(self, keep: set[str]) -> None:
        for name in PRODUCTS:
            if name in keep:
                continue
            p = self.final / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            if self._lock_path is not None:
                Path(self._lock_path).unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def check_out_dir(out: str) -> Path:
    """A folder the suite writes its report into: made if missing, checked writable before any work."""
    import tempfile

    if not str(out).strip():
        raise ParityInputError("{option} is empty; give a directory, e.g. reports/latest", option="out")
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".parity-probe-"):
            pass
    except OSError as e:
        raise ParityInputError(f"{{option}} {out!r} cannot be written ({e.strerror}); choose a writable directory",
                               option="out") from None
    return p


def write_report(report, out, taps: str | None = None) -> list[Path]:
    """Render every report into `out` (an OutDir's staging folder, or any folder), each file whole or not at all."""
    data = to_json(report)
    if taps:
        from parity.model.taps import select_taps

        keep = set(select_taps([t["tap"] for t in data["taps"]], taps))
        data["taps"] = [t for t in data["taps"] if t["tap"] in keep]
    files = {"report.json": json.dumps(data, indent=2) + "\n", "report.md": to_markdown(report),
             "report.html": to_html(report)}
    written = []
    for name, text in files.items():
        tmp = Path(out) / f".{name}.part"
        try:
            tmp.write_text(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append((tmp, Path(out) / name))
    for tmp, final in written:
        tmp.replace(final)
    return [f for _, f in written]



def no_space(e: BaseException) -> str | None:
    """The path of a full disk, if `e` (or what it was raised from) says the disk is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or "the output or cache directory")
        e = e.__cause__ or e.__context__
    return None
