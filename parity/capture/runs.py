"""One run: an implementation in a dtype and a mode, as captured (report.json's `runs` entry)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Run:
    impl: str
    version: str
    dtype: str
    mode: str
    resources: dict = field(default_factory=dict, compare=False)  # wall time, peak RSS, process (in-run only)
    # choices beyond the dtype that change its numbers (Adapter.settings; a quantized run's weight type and
    # activation rounding): shown with the run everywhere
    settings: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.impl, self.dtype, self.mode

    def to_json(self) -> dict:
        out = {"impl": self.impl, "version": self.version, "dtype": self.dtype, "mode": self.mode, **self.resources}
        return {**out, "settings": dict(self.settings)} if self.settings else out
