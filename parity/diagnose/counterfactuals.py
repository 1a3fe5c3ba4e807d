"""Counterfactuals: re-run the reference port with one numeric choice changed.

When no probe names a divergence (attention faults leave no single-op
fingerprint in the canonical taps), each candidate cause is reproduced by the
lit-gpt-style port with exactly one field of the spec or of `PortOptions`
changed, run in the implementation's own dtype on the same tokens, and
compared with the implementation's trace. The candidate whose trace the
implementation matches (within tolerance, through the end of the first
divergent layer) explains it; the report gives its score and how much better
it is than the runner-up. When none matches, the answer is "unexplained".
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.model.spec import GemmaSpec, truncate
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.capture.cache import active, spec_key
from parity.capture.runner import capture
from parity.compare.pairs import compare_trace, used
from parity.diagnose.probes.norms import layer_norms
from parity.model.taps import layer_of
from parity.model.weights import canonical_shapes
from parity.diagnose.search import Ranking, Wording, rank


# the KV-cache types a decode is re-run with (parity.numerics.act_quant kinds, along head_dim)
KV_CACHE_KINDS = ("f16", "bf16", "q8_0", "q4_0")  # float formats, then int8 and 4-bit blocks of 32


@dataclass(frozen=True)
class Counterfactual:
    cause: str
    label: str
    spec_changes: tuple = ()
    options: tuple = ()
    swaps: tuple = ()  # (canonical name, canonical name): two tensors loaded into each other's place
    transposes: tuple = ()  # canonical names of square projections loaded transposed
    adapter_kw: tuple = ()  # how the port loads its weights (qkv_stacked)

    def weights(self, weights):
        """The weights this variant is built from: the same, or with tensors exchanged or transposed."""
        if not self.swaps and not self.transposes:
            return weights
        import dataclasses

        t = dict(weights.tensors)
        for a, b in self.swaps:
            t[a], t[b] = t[b], t[a]
        for a in self.transposes:
            t[a] = t[a].T.copy()
        return dataclasses.replace(weights, tensors=t, _hash=None)

    def adapter(self):
        from parity.adapters.port_model import PortOptions

        return LitgptStyleAdapter(PortOptions(**dict(self.options)), dict(self.spec_changes), name=f"cf:{self.label}",
                                  **dict(self.adapter_kw))


def candidates(spec: GemmaSpec) -> list[Counterfactual]:
    """One-change variants of the correct port, each tagged with the cause it would be."""
    c = [
        Counterfactual("rope-layout", "rope pairs interleaved", options=(("rope_layout", "interleaved"),)),
        Counterfactual("rope-precision", "rope angles in the activation dtype", options=(("rope_lowp", True),)),
        Counterfactual("softmax-precision", "softmax in the activation dtype", options=(("softmax_lowp", True),)),
        Counterfactual("gelu-exact", "exact GELU", (("gelu_approximate", "none"),)),
        Counterfactual("act-lowp", "GELU op by op", options=(("gelu_lowp", True),)),
        Counterfactual("geglu-swapped", "GELU on up", options=(("geglu_swapped", True),)),
        Counterfactual("norm-unit-offset-missing", "norm without (1 + w)", (("norm_unit_offset", False),)),
        Counterfactual("norm-unit-offset-lowp", "(1 + w) in param dtype", options=(("offset_lowp", True),)),
        Counterfactual("norm-cast-order", "cast before multiply", options=(("norm_cast", "before"),)),
        Counterfactual("embed-scale-missing", "no embedding scale", (("embed_scale", False),)),
        Counterfactual("embed-scale-dtype", "embedding scale in fp32", (("embed_scale_dtype", "float32"),)),
        Counterfactual("embed-scale-rounded", "embedding scale a bf16 constant", (("embed_scale_dtype", "bfloat16"),)),
        Counterfactual("final-norm-missing", "no final norm", options=(("final_norm", False),)),
    ]
    if not spec.norm_unit_offset:  # Gemma 4 has none to drop: that variant would be the unchanged port
        c = [cf for cf in c if cf.cause != "norm-unit-offset-missing"]
    if spec.norm_placement == "pre":
        c.append(Counterfactual("norm-placement", "norms after sub-layers too", options=(("extra_post_norms", True),)))
    # query scale: the usual wrong choices, where they differ from the spec's
    d = spec.head_dim
    scalars = {d, spec.hidden_size // spec.num_heads, 2 * d, max(d // 2, 1), 1, 224, 256, 144}
    scale_cause = "attn-scale-not-one" if spec.family == 4 else "query-scale"  # Gemma 4 scales by 1.0
    for q in sorted(scalars):
        if abs(1.0 / q**0.5 - spec.query_scale) > 1e-9:
            c.append(Counterfactual(scale_cause, f"query scale 1/sqrt({q})", (("query_pre_attn_scalar", float(q)),)))
    c += rope_candidates(spec)
    if spec.attn_softcap is not None:
        c.append(Counterfactual("attn-softcap-missing", "no attention softcap", (("attn_softcap", None),)))
    if spec.final_softcap is not None:
        c.append(Counterfactual("final-softcap-missing", "no final softcap", (("final_softcap", None),)))
        c.append(Counterfactual("softcap-misplaced", "final softcap on the final norm's output",
                                options=(("softcap_on_norm", True),)))
    if spec.sliding_window:
        w = spec.sliding_window
        for lab, ch in ((f"window {w - 1}", w - 1), (f"window {w + 1}", w + 1)):
            c.append(Counterfactual("sliding-window", lab, (("sliding_window", ch),)))
        flipped = tuple("global" if t == "local" else "local" for t in spec.layer_types)
        if "local" in flipped:
            c.append(Counterfactual("sliding-window", "local and global layers swapped", (("layer_types", flipped),)))
        c.append(Counterfactual("sliding-window", "no sliding window",
                                (("layer_types", ("global",) * spec.num_layers), ("sliding_window", None),
                                 ("rope_local_base", None), ("rope_base", spec.rope_base))))
    if spec.qk_norm:
        c.append(Counterfactual("qk-norm-missing", "QK-norm after RoPE", options=(("qk_norm_after_rope", True),)))
        c.append(Counterfactual("qk-norm-missing", "no QK-norm", options=(("skip_qk_norm", True),)))
    if spec.family == 4:
        c += gemma4_candidates(spec)
    return c


def rope_candidates(spec: GemmaSpec) -> list[Counterfactual]:
    """`rope-base`: a wrong base on every layer (one neither layer type uses), the two bases swapped, or the
    scaling dropped; `rope-wrong-layer-type`: one layer type's base or scaling applied to the other type too. A
    base the spec gives one layer type is left out of the first kind: set everywhere, it is the second kind.
    On a first divergence at a local layer 0 the swap and the global base on local layers tie: explain's
    whole-model re-run (`_break_tie`) tells them apart."""
    c = []
    b, lb = spec.rope_base, spec.rope_local_base
    for base in sorted({10_000.0, 1_000_000.0, 500_000.0, 2 * b, b / 2} - {b, lb}):
        everywhere = (("rope_base", base),) + ((("rope_local_base", base),) if lb is not None else ())
        c.append(Counterfactual("rope-base", f"rope base {base:g} (spec {b:g})", everywhere))
    if lb is not None:
        c.append(Counterfactual("rope-base", "local and global bases swapped",
                                (("rope_base", lb), ("rope_local_base", b))))
    if spec.rope_scaling_factor != 1.0:
        c.append(Counterfactual("rope-base", "no rope scaling", (("rope_scaling_factor", 1.0),)))
    if lb is not None and lb != b:  # a truncated spec may hold one layer type only: a no-op variant scores as such
        c += [Counterfactual("rope-wrong-layer-type", f"global base {b:g} on the local layers too",
                             (("rope_local_base", b),)),
              Counterfactual("rope-wrong-layer-type", f"local base {lb:g} on the global layers too",
                             (("rope_base", lb),))]
    if spec.rope_scaling_factor != 1.0 and "local" in spec.layer_types:
        c.append(Counterfactual("rope-wrong-layer-type",
                                f"linear scaling by {spec.rope_scaling_factor:g} on the local layers too",
                                options=(("rope_scaling_local", True),)))
    return c


def gemma4_candidates(spec: GemmaSpec) -> list[Counterfactual]:
    """Gemma 4's dense choices, each changed alone (the MoE ones are listed apart)."""
    c = []
    if not spec.norm_unit_offset:
        c.append(Counterfactual("norm-unit-offset-extra", "norm with (1 + w)", (("norm_unit_offset", True),)))
    c.append(Counterfactual("attn-scale-not-one", "scores scaled by 1/sqrt(each layer's head dim)",
                            options=(("attn_scale_head_dim", True),)))
    if spec.v_norm:
        c.append(Counterfactual("v-norm-missing", "no v norm", (("v_norm", False),)))
    if not spec.attention_k_eq_v:
        c.append(Counterfactual("k-eq-v-misapplied", "K=V on the global layers", options=(("k_eq_v_layers", "global"),)))
    c.append(Counterfactual("k-eq-v-misapplied", "K=V on every layer", options=(("k_eq_v_layers", "all"),)))
    if any(spec.rope_proportion_for(i) < 1 for i in range(spec.num_layers)):
        c.append(Counterfactual("rope-proportional-as-partial", "ordinary partial RoPE on the global layers",
                                options=(("rope_ordinary_partial", True),)))
    if spec.num_kv_shared_layers:
        c.append(Counterfactual("kv-share-source", "shared layers read the first producer of their type",
                                options=(("kv_share_first_of_type", True),)))
    if spec.ple_dim:
        c += [Counterfactual("ple-scale", "PLE sum not scaled by 2^-0.5", options=(("ple_scale_missing", "combine"),)),
              Counterfactual("ple-scale", "PLE table not scaled by sqrt(P)", options=(("ple_scale_missing", "table"),)),
              Counterfactual("ple-placement", "PLE branch before the MLP", options=(("ple_before_mlp", True),))]
    if spec.layer_scalar:
        c += [Counterfactual("layer-scalar-missing", "no layer scalar", options=(("layer_scalar_mode", "missing"),)),
              Counterfactual("layer-scalar-misplaced", "layer scalar on the residual entering the block",
                             options=(("layer_scalar_mode", "start"),))]
    return c


def decode_candidates(spec: GemmaSpec) -> list[Counterfactual]:
    """The decode-path faults (parity.adapters.port_model.PortOptions decode_*), each a cause of the catalogue."""
    c = [Counterfactual("cache-position", f"new token rotated at position p{d:+d}", options=(("decode_pos_offset", d),))
         for d in (1, -1)]
    # a cache that rounds K/V: the float formats, then the int8 and 4-bit blocks of llama.cpp's q8_0/q4_0 caches
    c += [Counterfactual("kv-cache-precision", f"K/V rounded by a {kind} cache", options=(("decode_kv_quant", kind),))
          for kind in KV_CACHE_KINDS]
    if spec.attn_softcap is not None:  # litgpt #1672: only its softcap path adds the boolean mask
        c.append(Counterfactual("decode-mask", "the cached prefill's mask added as 0/1, not 0/-inf",
                                options=(("prefill_mask_added_as_bool", True),)))
    if "local" in spec.layer_types:
        c += [Counterfactual("cache-window", f"local layers see window{d:+d} keys while decoding",
                             options=(("decode_window", d),)) for d in (1, -1)]
        c.append(Counterfactual("cache-stale", "ring buffer written one slot late", options=(("decode_stale", True),)))
        if "global" in spec.layer_types:
            c.append(Counterfactual("decode-mask", "global layers masked with the window while decoding",
                                    options=(("decode_mask_global_window", True),)))
    return c


def swap_candidates(spec: GemmaSpec, layer: int, weights) -> list[Counterfactual]:
    """Two tensors of the same shape loaded into each other's place, the first of them in `layer`.

    Within the layer: any two of its norms (pre and post norms exchanged), gate and up, q and k, k and v;
    across layers: each of its tensors with the same tensor of another layer. Only for weights in memory
    (stored real-size weights would need a copy to exchange two tensors).
    """

    if getattr(weights, "stored", True):
        return [Counterfactual("qkv-order", "fused q/k/v stacked [Q; K; V] instead of per kv group",
                               adapter_kw=(("qkv_stacked", True),))] if spec.num_kv_heads > 1 else []
    shapes = canonical_shapes(spec)
    p = f"model.layers.{layer}."
    norms = [p + "input_layernorm.weight"] + [w for _, _, w in layer_norms(spec, layer)]
    pairs = [(a, b) for i, a in enumerate(norms) for b in norms[i + 1:]]
    pairs += [(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
              (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight"),
              (p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight")]
    mine = [k for k in shapes if k.startswith(p)]
    pairs += [(k, k.replace(p, f"model.layers.{j}.", 1)) for k in mine for j in range(spec.num_layers) if j != layer]
    short = lambda n: n.removeprefix("model.").removesuffix(".weight")  # noqa: E731
    out = [Counterfactual("weights-swapped", f"{short(a)} and {short(b)} swapped", swaps=((a, b),))
           for a, b in pairs if a in shapes and b in shapes and shapes[a] == shapes[b]]
    # a square projection loaded transposed keeps its shape (Gemma-2B's q_proj and o_proj are 2048 x 2048)
    out += [Counterfactual("weights-transposed", f"{short(k)} transposed", transposes=(k,))
            for k in mine if len(shapes[k]) == 2 and shapes[k][0] == shapes[k][1]]
    if spec.num_kv_heads > 1:  # with one kv group the grouped and stacked layouts coincide
        out.append(Counterfactual("qkv-order", "fused q/k/v stacked [Q; K; V] instead of per kv group",
                                  adapter_kw=(("qkv_stacked", True),)))
    return out


def _valid(cf: Counterfactual, spec: GemmaSpec) -> bool:
    try:
        spec.replace(**dict(cf.spec_changes))
        return True
    except ValueError:
        return False


PREFILL = Wording(rerun="the reference re-run with", through="the layer's end",
                  nothing="no probe and no single-change counterfactual brings it into honest noise",
                  correct="the correct port run in {dtype}")


def explain(trace, spec: GemmaSpec, weights, table, until_tap: str, order: dict[str, int],
            noise=None) -> Ranking:
    """Rank counterfactuals by how well they reproduce `trace` up to `until_tap`'s layer.

    Score: the worst share of its bound used over the compared taps, the
    implementation's trace judged against the counterfactual's with the same
    bounds as the verdict (the honest noise where there is a noise model): <= 1
    means re-running the port with that change brings the error into honest noise.
    """
    import dataclasses

    layer = layer_of(until_tap)
    last = order.get(f"layers.{layer}.out", order.get(until_tap, 0)) if layer is not None else order.get(until_tap, 0)
    # only the layers up to the divergence matter: run a model that deep (at real sizes, the difference
    # between re-running 18 layers twenty times and re-running one), and read the trace's taps once
    run_spec = truncate(spec, layer + 1) if layer is not None else spec
    whole = trace
    trace = dataclasses.replace(trace, taps={k: trace.taps[k] for k in trace.taps if order.get(k, 10**6) <= last})
    reproduce = _scorer(run_spec, weights, trace, table, noise, order, last)

    def variants():  # a generator: nothing is listed (the swaps read the weights) unless the baseline fails
        swaps = swap_candidates(spec, layer, weights) if layer is not None else []
        yield from (cf for cf in candidates(run_spec) + swaps if _valid(cf, run_spec))

    ranking = rank(variants(), reproduce)
    return _break_tie(ranking, lambda: _scorer(spec, weights, whole, table, noise, order, 10**6))


def _break_tie(ranking: Ranking, whole) -> Ranking:
    """Two candidates of different causes that both reproduce the first divergent layer (the global RoPE base
    on the local layers, against the two bases swapped, on a local layer 0) are told apart by the layers after
    it: both re-run through the whole model, and the closer one named. `whole()` makes that scorer."""
    import dataclasses

    best, runner = ranking.best, ranking.runner_up
    if not ranking.explains or runner is None or ranking.runner_up_score is None or ranking.runner_up_score > 1 \
            or runner.cause == best.cause:
        return ranking
    score = whole()
    try:
        a, b = score(best), score(runner)
    except Exception:  # noqa: BLE001 -- a whole-model re-run that fails leaves the first ranking as it was
        return ranking
    if b is None or (a is not None and a <= b):
        return ranking
    return dataclasses.replace(ranking, best=runner, score=ranking.runner_up_score, runner_up=best,
                               runner_up_score=ranking.score)


def _scorer(run_spec: GemmaSpec, weights, trace, table, noise, order, last):
    """reproduce(candidate) -> the worst share of its bound over `trace`'s taps up to `last`, the port with that
    change run on `run_spec` (the model up to the divergent layer, or the whole one)."""
    run_weights = weights.truncated(run_spec) if run_spec.num_layers != weights.spec.num_layers else weights
    # a capture depends on the candidate, the model run and its weights, the dtype and the tokens, never on the
    # implementation explained: a run given a cache (parity.capture.cache) shares them with the other runs (the
    # candidate keyed by its repr, every field: a tuple of options may hold a list)
    cache = active()
    shared = (spec_key(run_spec), weights.hash, trace.dtype, trace.prompt, tuple(trace.tokens)) if cache else ()

    def reproduce(cf: Counterfactual | None) -> float | None:
        def make():
            adapter = cf.adapter() if cf is not None else LitgptStyleAdapter(name="cf:unchanged")
            # a swap is made in the whole model's weights, then truncated: its partner may be a deeper layer
            w = cf.weights(weights).truncated(run_spec) if cf is not None and (cf.swaps or cf.transposes) \
                else run_weights
            return capture(adapter, run_spec, w, trace.dtype, {trace.prompt: trace.tokens})

        got = (cache.traces(("counterfactual", repr(cf), *shared), make) if cache else make())[0]
        got.spec, got.weights_hash = trace.spec, trace.weights_hash  # the first layers of the same model
        rs = [r for r in compare_trace(got, trace, table, "cumulative", noise, metrics=False)
              if order.get(r.tap, 10**6) <= last]
        return max(used(r) for r in rs) if rs else None

    return reproduce
