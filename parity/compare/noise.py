"""The honest-noise model: what a correct implementation errs, measured in this run.

The question a verdict answers is not "is the error below a number" but "is
this implementation's error beyond what a correct implementation in the same
dtype makes here, on these weights and tokens". The project's port is correct
and its every rounding is known, so it is run in each dtype and mode, in a
small ensemble of equally correct variants that round as other correct
libraries do (`MEMBERS`): q scaled before q.k (the reference JAX code and
keras-hub) or after (HF), the GELU rounded once (PyTorch) or op by op (JAX on
16-bit inputs), projections accumulated in one pass or in two rounded halves
(another library's blocking), and the scaled embedding moved by one ulp (how
this model amplifies a rounding-sized change of its input). Each member is
compared with the float64 reference exactly as an implementation is
(`parity.compare.pairs`), and its per-tap statistic (`TapResult.stat`, the atol the
tap needs in units of each row's RMS) is kept; the largest over the members is
the tap's honest noise. An implementation's tap is beyond noise when its own
statistic exceeds `NOISE_MARGIN` times that and the fixed table too (the
floor: errors far below any fault never count).

This is torch._dynamo's accuracy rule (`same(ref, res, fp64_ref, multiplier)`:
the candidate's error against float64 within a multiple of a trusted run's
own error against float64), per tap, per mode (isolated runs get isolated
members), with an ensemble rather than one trusted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.compare.pairs import compare_all
from parity.model.taps import family_of

HONEST_IMPL = "honest"  # traces of the ensemble are labelled honest:<member>


@dataclass(frozen=True)
class Member:
    label: str
    options: tuple = ()  # parity.adapters.port_model.PortOptions fields

    @property
    def impl(self) -> str:
        return f"{HONEST_IMPL}:{self.label}"

    def adapter(self):
        from parity.adapters.port_model import PortOptions

        return LitgptStyleAdapter(PortOptions(**dict(self.options)), name=self.impl)

    def rounding_activations(self, kind: str | None, kv: str | None = None) -> "Member":
        """This member as a runtime's kernels round: every projection's input rounded to `kind`
        (parity.numerics.act_quant) before the matmul, and attention's operands as a KV cache of kind `kv`
        holds them (PortOptions.kv_round); itself when both are None."""
        out = self
        if kind:
            out = Member(f"{out.label}+act-{kind}", out.options + (("act_quant", kind),))
        if kv:
            out = Member(f"{out.label}+kv-{kv}", out.options + (("kv_round", kv),))
        return out


_ALT = (("scale_q_first", True), ("gelu_lowp", True))
MEMBERS = (
    Member("port"),
    Member("q-scaled-first+gelu-op-by-op", _ALT),
    Member("split-accumulation+embed-ulp", (("accum_split", True), ("perturb_seed", 1))),
    Member("all-alternatives+embed-ulp", _ALT + (("accum_split", True), ("perturb_seed", 2))),
)
SMALL_MEMBERS = 4  # at tiny sizes every member (a port run costs a fraction of a second)
LARGE_MEMBERS = 2  # at real sizes the port and one alternative order: each member is a model run


def members(count: int) -> tuple[Member, ...]:
    return MEMBERS[:max(1, min(count, len(MEMBERS)))]


def _factory_name(m: Member) -> str:
    return "member_" + m.label.replace("-", "_").replace("+", "__").replace("/", "_per_")


def _act_members() -> list[Member]:
    from parity.numerics.act_quant import KINDS

    kinds = (None, *KINDS)
    return [m.rounding_activations(a, kv) for m in MEMBERS for a in kinds for kv in kinds if a or kv]


def factory_spec(m: Member) -> str:
    """`module:factory` for one member, which a separate capture process resolves like any plug-in."""
    return f"parity.compare.noise:{_factory_name(m)}"


def __getattr__(name: str):
    for m in (*MEMBERS, *_act_members()):  # the factories factory_spec names
        if name == _factory_name(m):
            return m.adapter
    raise AttributeError(name)


@dataclass
class NoiseModel:
    """(dtype, mode, prompt, tap) -> the largest honest statistic, and which member made it."""
    members: tuple[str, ...] = ()
    stats: dict[tuple[str, str, str, str], tuple[float, str]] = field(default_factory=dict)

    def at(self, dtype: str, mode: str, prompt: str, tap: str) -> float | None:
        got = self.stats.get((dtype, mode, prompt, tap))
        return None if got is None else got[0]

    def who(self, dtype: str, mode: str, prompt: str, tap: str) -> str | None:
        got = self.stats.get((dtype, mode, prompt, tap))
        return None if got is None else got[1]

    def covers(self, dtype: str, mode: str) -> bool:
        return any(k[0] == dtype and k[1] == mode for k in self.stats)

    def add(self, results) -> None:
        import math

        for r in results:
            if not math.isfinite(r.stat):
                continue  # a member that cannot be compared here leaves the tap to the others
            key = (r.dtype, r.mode, r.prompt, r.tap)
            if key not in self.stats or r.stat > self.stats[key][0]:
                self.stats[key] = (r.stat, r.impl.removeprefix(HONEST_IMPL + ":"))

    def summary(self) -> dict:
        """Per dtype and mode, per tap family: the largest honest statistic (for report.json and the README)."""
        out: dict = {}
        for (dtype, mode, _prompt, tap), (v, _who) in self.stats.items():
            fam = family_of(tap)
            slot = out.setdefault(f"{dtype}/{mode}", {})
            slot[fam] = max(slot.get(fam, 0.0), v)
        return out


def measure(refs: dict, traces: list, table, ref_full: dict | None = None, replay=None) -> NoiseModel:
    """The noise model from the members' traces (compared with the reference as any run is: decode traces
    with the reference's full forward and with their own, parity.compare.pairs.compare_all). A member that
    flips a MoE routing near-tie is compared with the reference replaying its choice (parity.compare.routing),
    as any run is: one flipped token must not widen every later tap's noise; its routing is no noise figure."""
    from parity.compare.routing import EXPERTS, account

    model = NoiseModel(members=tuple(dict.fromkeys(t.impl for t in traces)))
    results = compare_all(refs, ref_full or {}, traces, table)
    results, _ = account(results, refs, traces, table, None, replay, ref_full=ref_full)
    model.add(r for r in results if not r.tap.endswith("." + EXPERTS))
    return model
