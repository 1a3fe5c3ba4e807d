"""`config-value-dropped`: a spec value the built model does not hold, read off its effective configuration.

Each adapter reads back what the model it built computes (parity.model.effective); a property whose value
differs from the reference's is a value of the spec the implementation did not take (a config key its loader
never read, a flag left at its default, a constant it rounded). Each becomes one finding naming the property,
the spec's value and the implementation's:

* the run's traces agree (a dropped window on a prompt inside it): a note, the value was not taken but these
  tokens cannot show it;
* the first divergence is at or after the first tap the property acts on and nothing else names it (an
  `unexplained` entry): the dropped value explains it, a divergence;
* a probe or counterfactual names the first divergence (a dropped final softcap is `final-softcap-missing`):
  that entry stays the one explaining it, the more specific id, and its evidence gains the property, both
  values and `config-value-dropped`, so one divergence keeps one entry.
"""

from __future__ import annotations

import dataclasses

from parity.compare.pairs import used as used_
from parity.diagnose.finding import Finding
from parity.model.effective import BY_NAME, Difference
from parity.model.taps import tap_order
from parity.numerics.display import share_text

CAUSE = "config-value-dropped"

# the first tap each property's value acts on ("{}": the first layer whose value differs)
CONTROLS = {
    "vocab_size": "embed", "hidden_size": "embed", "embed_scale": "embed", "embed_scale_dtype": "embed",
    "intermediate_size": "layers.0.mlp.gate",
    "num_layers": "final_norm",
    "num_heads": "layers.0.attn.scores", "num_kv_heads": "layers.0.attn.scores", "head_dim": "layers.0.attn.scores",
    "qk_norm": "layers.0.attn.scores",
    "norm_unit_offset": "layers.0.attn_norm", "norm_eps": "layers.0.attn_norm",
    "norm_placement": "layers.0.post_attn_norm",
    "final_norm": "final_norm",
    "gelu_approximate": "layers.0.mlp.act", "geglu": "layers.0.mlp.act",
    "tied_head": "logits", "final_softcap": "logits",
    "query_scale": "layers.{}.attn.scores", "rope_base": "layers.{}.attn.scores",
    "rope_scaling_factor": "layers.{}.attn.scores", "attn_softcap": "layers.{}.attn.scores",
    "sliding_window": "layers.{}.attn.scores",
}


def _text(v) -> str:
    """A property's value for the evidence sentence: a per-layer value once when every layer has it."""
    if isinstance(v, (list, tuple)):
        return f"{_text(v[0])} on every layer" if v and len(set(map(repr, v))) == 1 else \
            "[" + ", ".join(_text(x) for x in v) + "] per layer"
    return "none" if v is None else f"{v:.7g}" if isinstance(v, float) else str(v)


def controlled_tap(d: Difference) -> str:
    """The first tap `d`'s property acts on: for a per-layer property, at the first layer whose value differs."""
    tap = CONTROLS.get(d.property, "embed")
    if "{}" not in tap:
        return tap
    ref, got = d.reference, d.value
    layer = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), 0) \
        if isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)) else 0
    return tap.format(layer)


def config_findings(report) -> list[Finding]:
    """The new entries for each (cumulative run, property) whose effective value differs from the reference's
    (a note, or the entry explaining an `unexplained` first divergence); the entries of report.diagnosis that
    already name a first divergence are updated in place (their evidence, or `explains` moved off an
    unexplained one)."""
    order = {t: i for i, t in enumerate(tap_order(report.spec))}
    runs = {f"{r.impl}@{r.dtype}": r for r in report.runs if r.mode == "cumulative"}
    by_run: dict[str, list[Difference]] = {}
    for d in report.effective_differences:
        if d.run in runs:
            by_run.setdefault(d.run, []).append(d)
    out: list[Finding] = []
    for key, diffs in by_run.items():
        run = runs[key]
        results = report.run_results(run.impl, run.dtype, "cumulative")
        failed = [r for r in results if not r.passed]
        first = min(failed, key=lambda r: order.get(r.tap, 10**6)) if failed else None
        said = {d.property: (f"the spec's {d.property} ({BY_NAME[d.property].doc}) is {_text(d.reference)}; "
                             f"{d.run} holds {_text(d.value)} (its effective configuration, read back)") for d in diffs}
        if first is None:  # the traces agree (a probe may still have named something else): notes
            out += [Finding(impl=run.impl, dtype=run.dtype, tap=controlled_tap(d), cause=CAUSE, source="comparison",
                            severity="note", evidence=said[d.property] + f"; it acts from {controlled_tap(d)}, and "
                                                                          "the traces agree on these tokens: not shown")
                    for d in diffs]
            continue
        explaining = next((i for i, e in enumerate(report.diagnosis) if e.run == (run.impl, run.dtype, "cumulative")
                           and e.explains == first.tap), None)
        named = report.diagnosis[explaining] if explaining is not None else None
        # a value can explain the first divergence only where it acts at or before it, on a tap that does not
        # agree (a dropped value whose own tap passed does not show on these tokens: a bf16 constant that is exact)
        passing = {r.tap for r in results if r.passed}
        cands = [d for d in diffs if order.get(controlled_tap(d), 0) <= order.get(first.tap, 10**6)
                 and controlled_tap(d) not in passing]
        takes = max(cands, key=lambda d: order.get(controlled_tap(d), 0)) \
            if cands and (named is None or named.cause == "unexplained") else None
        if takes is not None:
            if named is not None:  # the unexplained entry stays, with its closest candidates, no longer explaining
                report.diagnosis[explaining] = named = dataclasses.replace(named, explains=None)
            tap = controlled_tap(takes)
            out.append(Finding(impl=run.impl, dtype=run.dtype, tap=tap, cause=CAUSE, source="comparison",
                               severity="divergence", explains=first.tap,
                               evidence=said[takes.property] + f"; it acts from {tap}, at or before the first "
                               f"divergence at {first.tap} ({share_text(used_(first))} of its bound), which nothing "
                               "else explains: the value not taken does"))
            explaining = None  # the rest join the entry that now explains it
            named = out[-1]
        for d in diffs:
            if d is takes:
                continue
            tap = controlled_tap(d)
            after = order.get(tap, 0) > order.get(first.tap, 10**6)
            how = (f"{CAUSE}: {said[d.property]}, acting from {tap}"
                   + (", after this divergence (not what shows here)" if after else
                      ", where the traces still agree" if tap in passing else ""))
            if named is None:  # no entry explains the first divergence (none is made without one): stand alone
                out.append(Finding(impl=run.impl, dtype=run.dtype, tap=tap, cause=CAUSE, source="comparison",
                                   severity="divergence", evidence=how))
            elif explaining is None:  # the config entry made here
                out[-1] = named = dataclasses.replace(named, evidence=f"{named.evidence}; {how}")
            else:
                # the entry that names the first divergence says where its cause came from (one entry per
                # divergence: the named cause is the more specific id)
                report.diagnosis[explaining] = named = dataclasses.replace(named, evidence=f"{named.evidence}; {how}")
    return out
