"""The cause catalogue: every cause id the harness may name, in one table.

Reports, the diagnosis, the probes, the counterfactuals, waivers and the
fault-injection suite all name a divergence with one of these ids, so a
finding anywhere can be looked up here. Add a row when a new way of diverging
is found; never rename an id (reports, baselines and waiver files hold them).

Each cause has a kind:

* "formula": a divergence. The implementation computes something other than
  Gemma does (a wrong formula, or a rounding step the reference fixes), and a
  run that shows it fails.
* "precision": a rounding-order or precision choice, not a wrong function:
  named and reported as a note; the run fails only if the tolerance fails too.
* "note": a difference that leaves what the model predicts unchanged (e.g. a
  per-position constant added to the logits): reported as a note.
* "verdict": not a cause of its own but an answer of the diagnosis
  ("unexplained", "honest-rounding").

docs/causes.md is generated from this table (`python -m parity.diagnose.causes >
docs/causes.md`); tests/test_causes.py fails when the two differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from parity.errors import ParityInputError

KINDS = ("formula", "precision", "note", "verdict")
DOC_PATH = "docs/causes.md"
REGENERATE = f"python -m parity.diagnose.causes > {DOC_PATH}"


@dataclass(frozen=True)
class Cause:
    id: str  # never renamed
    title: str  # a few words
    what: str  # what goes wrong
    who: str = ""  # which implementations do what, where known
    size: str = ""  # how big the effect is, where known
    kind: str = "formula"  # one of KINDS


CAUSES: tuple[Cause, ...] = (
    # ------------------------------------------------------------------ MLP
    Cause(
        "gelu-tanh", "tanh GELU where the exact one is asked for",
        "The spec asks for the exact (erf) GELU (`hidden_activation: gelu` kept as such), and the GeGLU gate "
        "goes through the tanh approximation instead.",
        "Every released Gemma uses tanh, so this shows only on a spec that asks for the exact form; llama.cpp's "
        "ggml_geglu is the tanh form whatever the spec says.",
        "The mirror of gelu-exact: at most 4.73e-4 per element, near x = ±2.7.",
    ),
    Cause(
        "gelu-exact", "exact GELU",
        "The GeGLU gate goes through the exact (erf) GELU, while Gemma is defined with the tanh approximation.",
        "Gemma's JAX/Flax reference, keras-hub and litgpt all use the tanh form. The first HF Gemma release took "
        "`hidden_act=\"gelu\"` at its word and ran the exact GELU; later releases force `gelu_pytorch_tanh`. "
        "A Keras trap: `keras.activations.gelu` is exact by default, `keras.ops.gelu` is tanh by default.",
        "The two GELUs differ by at most 4.73e-4, near x = ±2.7 where gelu is about 2.69 (1.8e-4 relative); "
        "at x = 1 the exact value is 0.8413447 and the tanh one 0.841192. Plain in fp32; in bf16 it is under one "
        "ulp per element, so only agreement statistics over many elements reveal it.",
    ),
    Cause(
        "geglu-swapped", "GELU on the wrong projection",
        "The GELU is taken of the up projection instead of the gate projection.",
        "Every implementation computes `gelu(gate_proj(x)) * up_proj(x)`. In litgpt `fc_1` is the gate and "
        "`fc_2` the up projection; in keras-hub `ffw_gating` is the gate and `ffw_gating_2` the up projection.",
        "large",
    ),
    Cause(
        "geglu-width", "MLP width convention",
        "The MLP's hidden width is read under the wrong convention.",
        "keras-hub's `intermediate_dim` counts both half-width projections, so it is twice HF's "
        "`intermediate_size`.",
        "a shape error, or a model of the wrong size",
    ),
    # ------------------------------------------------------------------ RMSNorm
    Cause(
        "norm-unit-offset-missing", "RMSNorm without (1 + w)",
        "RMSNorm scales by `w` where Gemma scales by `(1 + w)`.",
        "Gemma stores its norm weights centred on 0. HF initialises them to zeros, so a random-init test that "
        "leaves the norm weights alone cannot tell the two apart.",
        "large, unless `w` is 0",
    ),
    Cause(
        "norm-unit-offset-lowp", "(1 + w) in low precision",
        "The sum `(1 + w)` is formed in bf16 or fp16.",
        "litgpt adds 1 to the weight in the parameter's dtype; HF and keras-hub add it in fp32.",
        "In bf16, 1 + 0.0039 comes out as 1.0, and 3.1406 + 1 as 4.125.",
    ),
    Cause(
        "norm-cast-order", "norm cast order",
        "The normalised activation is rounded to the low-precision dtype before it is multiplied by `(1 + w)` "
        "(the Llama order), where Gemma multiplies first and rounds after.",
        "HF Gemma computes in fp32, multiplies, then casts; HF Llama casts first.",
        "only in bf16/fp16",
    ),
    Cause(
        "norm-placement", "norm placement",
        "The set of norms around the sub-layers is the wrong one.",
        "Gemma 1 normalises only before each sub-layer (before attention, before the MLP), whatever the paper's "
        "wording suggests. Gemma 2 and 3 put a norm both before and after each sub-layer (the \"sandwich\"). "
        "A naming trap: in HF Gemma 1 `post_attention_layernorm` is the norm *before the MLP*; in Gemma 2/3 it "
        "really follows attention, and `pre_feedforward_layernorm` is the one before the MLP.",
        "large",
    ),
    # ------------------------------------------------------------------ embedding
    Cause(
        "embed-scale-missing", "no embedding scale",
        "The embeddings are not multiplied by sqrt(hidden_size).",
        "Every implementation applies the scale.",
        "large",
    ),
    Cause(
        "embed-scale-dtype", "embedding scale in fp32",
        "The sqrt(hidden_size) factor stays in fp32 instead of being cast to the activation dtype first.",
        "The reference, HF, keras-hub and current litgpt cast it; litgpt kept it in fp32 until mid-2024.",
        "In bf16, sqrt(3072) = 55.4256 becomes 55.5 and sqrt(2048) = 45.2548 becomes 45.25.",
    ),
    Cause(
        "embed-scale-rounded", "embedding scale rounded to a low-precision constant",
        "sqrt(hidden_size) is rounded to a bf16 constant (or another narrower type than the activations) in every "
        "dtype, so a float32 run multiplies by 9.8125 where sqrt(96) = 9.79796.",
        "mlx-lm 0.32's Gemma 3 (and Google's JAX reference) round the normaliser to bf16; transformers #38702.",
        "Only a float32 or float16 run shows it; in bf16 it is the correct rounding.",
    ),
    # ------------------------------------------------------------------ rotary embedding
    Cause(
        "rope-layout", "rotary pair layout",
        "The rotary embedding pairs interleaved dimensions instead of the two halves of each head.",
        "The reference, HF and litgpt pair the halves. keras-hub rotates half-split and then permutes q and k "
        "into interleaved order: the attention scores are the same, but its q/k after RoPE must be permuted back "
        "before they are compared.",
        "large",
    ),
    Cause(
        "rope-precision", "rotary precision",
        "The rotary angles, or their cos/sin, are computed in bf16/fp16.",
        "HF computes them in fp32 with autocast off and casts cos/sin afterwards; keras-hub casts cos/sin to the "
        "compute dtype. The reference divides positions by the timescale, where HF multiplies them by the "
        "inverse frequency.",
        "Grows with position; elsewhere a bf16 inverse frequency gave a max abs error of 0.8 at position 4095.",
    ),
    Cause(
        "rope-base", "rotary base",
        "The rotary base is wrong on every layer (a base neither of Gemma's layer types uses), the local and "
        "global bases are swapped, or the linear scaling is missing (Gemma 3: 1e4 for local layers, 1e6 for "
        "global ones, with linear scaling by 8 from 4B up).",
        "",
        "grows with position",
    ),
    Cause(
        "rope-wrong-layer-type", "RoPE of the wrong layer type",
        "One layer type's RoPE also applied to the other type: Gemma 3's global base (1e6) or its linear "
        "scaling also applied on the local layers, or the local base (1e4) on the global layers (both types "
        "exchanged is `rope-base`'s swap).",
        "A recurring runtime bug: one rotary table built for the whole model from the global config keys, or the "
        "per-layer-type keys (`rope_local_base_freq`, `rope_scaling`) read for the wrong layers.",
        "grows with position; only the layers of the wrong type move",
    ),
    # ------------------------------------------------------------------ translation into a runtime
    Cause(
        "config-value-dropped", "spec value not taken",
        "A value of the spec that the built model does not hold: a config key its loader never reads, a flag "
        "left at its default, a constant it rounded. Read back from the runtime's own view of the model "
        "(its effective configuration) and named with the property, the spec's value and the runtime's.",
        "mlx-lm 0.32's ModelArgs keeps only the keys its dataclass declares (Gemma 2 drops `sliding_window`, "
        "Gemma 1 the activation); Gemma 2 HF configs once carried the softcaps under keys runtimes did not read.",
        "whatever the property controls; a note while the traces still agree on the tokens run",
    ),
    Cause(
        "fp16-overflow", "float16 overflow",
        "An activation exceeds float16's range (65504) in a float16 run: it turns infinite (or NaN), or is "
        "clipped to +-65504, where the reference's values are larger than float16 can hold.",
        "Gemma's residual stream grows past 65504 in trained checkpoints, so float16 runs of Gemma overflow "
        "unless they clip (mlx-lm's Gemma 3 clips its residual adds) or compute in bf16/fp32.",
        "infinite or saturated from the first overflowing tap on; probes at or after the first non-finite "
        "tap are named in its evidence, not as causes (their inputs are already infinite), and on a decode step "
        "it is decided before the mask and cache probes",
    ),
    # ------------------------------------------------------------------ attention
    Cause(
        "query-scale", "attention query scale",
        "Attention is scaled by the wrong factor: 1/sqrt(head_dim) against 1/sqrt(query_pre_attn_scalar) "
        "(Gemma 2: 256 for 2B and 9B, 144 for 27B).",
        "HF applies the scale after q·k; the reference and keras-hub scale q before.",
        "The 9B model briefly shipped with 224 instead of 256.",
    ),
    Cause(
        "attn-softcap-missing", "no attention softcap",
        "Gemma 2's attention logits are not soft-capped with `tanh(x / 50) * 50`.",
        "HF's SDPA attention path drops the cap without a word; its eager path keeps it.",
        "large when the logits are large",
    ),
    Cause(
        "final-softcap-missing", "no final softcap",
        "Gemma 2's output logits are not soft-capped (cap 30).",
        "",
        "large when the logits are large",
    ),
    Cause(
        "sliding-window", "sliding window",
        "The window has the wrong size, or the wrong layers are local (Gemma 2: the even layers, window 4096; "
        "Gemma 3: five local layers to each global one, window 512 or 1024).",
        "HF, litgpt and keras-hub agree that the even layers are local; one third-party write-up says the odd "
        "ones.",
        "shows only on prompts longer than the window",
    ),
    Cause(
        "qk-norm-missing", "QK-norm",
        "Gemma 3's RMSNorm over head_dim on q and k is missing, or applied after RoPE.",
        "The reference applies it before RoPE.",
        "large",
    ),
    # ------------------------------------------------------------------ Gemma 4 mixture of experts
    Cause(
        "topk-not-renormalised", "top-k weights not renormalised",
        "The chosen experts' router probabilities are used as their weights as they are, without dividing by "
        "their sum (Gemma 4 renormalises: a softmax over the chosen k).",
        "HF's `Gemma4TextRouter`, keras-hub's `Gemma4Router`, the JAX reference and llama.cpp (`norm_w=true`) "
        "all renormalise.",
        "Each token's expert branch shrinks by the chosen probabilities' sum (below 1): large, though the "
        "post-MoE norm hides part of it.",
    ),
    Cause(
        "per-expert-scale-misplaced", "per-expert scale misplaced",
        "`router.per_expert_scale` is not applied to each chosen expert's weight: left out, or applied to the "
        "expert's input instead of its output (the GeGLU is not linear, so the two differ).",
        "HF multiplies the renormalised weights by it (`Gemma4TextRouter`); keras-hub multiplies the expert "
        "outputs (the same product); llama.cpp has it as `ffn_down_exps_s`. HF initialises it to 1, so a "
        "model built from HF's init cannot show this fault.",
        "large unless the scales are near 1",
    ),
    Cause(
        "expert-gate-up-swapped", "expert gate and up swapped",
        "An expert's fused `gate_up_proj` is split with its halves the wrong way round (or loaded transposed "
        "per expert), so the GELU is taken of the up projection.",
        "HF stores `experts.gate_up_proj` [E, 2I, D] with the gate rows first; keras-hub's converter splits "
        "rows [:I] into `gate_proj` and [I:] into `up_proj`; JAX stores `gating_einsum` [E, 2, I, D] (0 gate, "
        "1 up).",
        "large",
    ),
    # ------------------------------------------------------------------ precision choices (notes)
    Cause(
        "act-lowp", "GELU op by op in low precision",
        "A bf16/fp16 model evaluates the GELU one operation at a time in that dtype, rounding after each, "
        "instead of computing it in fp32 and rounding once.",
        "PyTorch's bf16 GELU computes in fp32 and rounds once. JAX rounds after every op on bf16 inputs, so in "
        "bf16 keras-hub on the JAX backend leaves HF at the GELU, while on the torch backend it stays "
        "bit-identical.",
        "Roughly half of the bf16 elements differ, by up to a few ulps. A precision choice, not a wrong formula: "
        "reports say so.",
        kind="precision",
    ),
    Cause(
        "gelu-fp16-table", "GELU from a float16 table",
        "The GELU rounds its input to float16 and reads a table of tanh-GELU values stored in float16, in float32 "
        "runs too, so its error is float16's, not the run's dtype's.",
        "ggml's CPU backend (llama.cpp and everything built on it) with GGML_GELU_FP16, on by default: "
        "`ggml_vec_gelu_f32` and the fused `ggml_vec_geglu_f32` index `ggml_table_gelu_f16` by the input's float16 "
        "bits (0 at or below -10, the input at or above 10).",
        "About 5e-4 relative per element: 38-51x the float32 bound at the first layer's mlp.hidden of the tiny "
        "presets, within the honest noise of f16 and quantized weights (which round the MLP's inputs more).",
        kind="precision",
    ),
    Cause(
        "softmax-precision", "softmax precision",
        "The attention softmax runs in bf16/fp16 instead of fp32.",
        "HF eager and keras-hub upcast; the JAX reference does not.",
        "only in bf16/fp16",
        kind="precision",
    ),
    Cause(
        "router-precision", "router probabilities rounded before the top k",
        "The router's softmax (or its logits) is rounded to a low-precision dtype before the top k and the "
        "renormalisation, instead of choosing and renormalising on the fp32 probabilities.",
        "keras-hub 0.32's `Gemma4Router` casts the fp32 softmax to the compute dtype before `ops.top_k` and "
        "renormalises in it (bf16 in a bf16 model); HF keeps the probabilities, the top k and the "
        "renormalisation in fp32.",
        "In bf16 the weights move by up to one bf16 ulp (2^-8 relative) and a choice can flip only where two "
        "probabilities lie within one ulp, well inside the gap bf16 rounding of the logits can close: a "
        "precision choice, reported as a note. Rounded to bf16 in an fp32 run it is far beyond fp32 noise.",
        kind="precision",
    ),
    # ------------------------------------------------------------------ output
    Cause(
        "final-norm-missing", "no final norm",
        "The final RMSNorm is skipped.",
        "",
        "large",
    ),
    Cause(
        "lm-head-untied", "untied output head",
        "The output projection is not tied to the embedding, though Gemma ties them.",
        "",
        "large",
    ),
    # ------------------------------------------------------------------ named for upcoming work
    Cause(
        "weights-swapped", "weights swapped",
        "Two weight tensors are loaded into each other's places, so the right formulas run on the wrong numbers.",
    ),
    Cause(
        "weights-transposed", "weights transposed",
        "A projection's weight matrix is loaded transposed, which a square matrix lets through without a shape "
        "error.",
    ),
    Cause(
        "qkv-order", "fused q/k/v order",
        "A fused q/k/v weight is built or split with its groups in the wrong order (for litgpt's fused `attn`, "
        "each kv group's query heads, then its key head, then its value head; not a plain [Q; K; V] stack).",
    ),
    Cause(
        "softcap-misplaced", "softcap misplaced",
        "A softcap is applied to something other than what Gemma caps (the attention scores before the softmax, "
        "and the final logits), e.g. to the attention probabilities.",
    ),
    Cause(
        "logit-shift", "logits shifted per position",
        "The logits differ from the reference by one constant per position, which the softmax cancels: the "
        "predicted distribution is the same, so it is reported as a note.",
        kind="note",
    ),
    # ------------------------------------------------------------------ the decode path (the KV cache)
    Cause(
        "cache-window", "decode window",
        "While decoding, a local (sliding-window) layer sees one key too many or too few: the cache keeps the "
        "wrong number of positions, or the decode step's window is off by one, though the prefill is right.",
        "transformers 4.42.0-4.42.3's Gemma 2 cache ignored the window past 4096 tokens (#31848); keras-hub's "
        "Gemma broke past 4096 on JAX and torch (fixed in keras-nlp 0.14.4 / 0.15.0, PR #1738).",
        "shows only once the decode passes the window; then every later step",
    ),
    Cause(
        "cache-position", "decode position",
        "The new token (or a cached key) is rotated at the wrong position while decoding: position ids or the "
        "cache position are off, or read from a cache layer that holds fewer entries than were seen.",
        "transformers' Gemma 3 `get_seq_length` read a sliding layer, so positions stopped at the window and "
        "output went incoherent once the cache passed it (#38156).",
        "large from the first step it happens",
    ),
    Cause(
        "cache-stale", "stale cache slot",
        "A cache slot is not written, or the new key and value are written over the wrong slot (a live "
        "position evicted, an old one kept), or a wrapped ring buffer is read in the wrong order.",
        "litgpt's Gemma 3 went to gibberish after about 800-1000 tokens (#2145); serving engines' ring buffers "
        "have shipped the same.",
        "shows once a ring buffer wraps",
    ),
    Cause(
        "decode-mask", "decode-step mask",
        "The mask of a decode step differs from the prefill's mask at the same position (e.g. global layers "
        "masked with the sliding window, or a mask that ignores the cache offset), though the cache holds the "
        "right keys.",
        "keras-hub's Gemma on TensorFlow could only look one token behind while decoding (PR #1738); litgpt's "
        "window fix broke causality for prefills longer than the window (#2182, refused since 0.5.13); litgpt's "
        "Gemma 2 softcap path adds its boolean cache mask as 0/1 rather than 0/-inf (#1672), so a cached prefill "
        "is not causal.",
        "from the step it first differs",
    ),
    Cause(
        "kv-cache-precision", "KV cache rounding",
        "The decode reads its keys and values from a cache that rounds them (a float16/bfloat16 cache in a "
        "wider run, or a quantized cache: int8 or 4-bit blocks), so every decode step attends to rounded K/V "
        "while the prefill did not.",
        "llama.cpp's `--cache-type-k/-v` (f16 by default, q8_0, q4_0, q5_0), mlx-lm's QuantizedKVCache "
        "(`--kv-bits`), ORT GenAI's float16 KV cache.",
        "the cache type's rounding of K and V: a note when that is what the run declared (its KV-cache type), "
        "a divergence when a cache rounds that the run did not declare, or rounds as another kind than it "
        "declares (a q4_0 cache declared q8_0; decided per run, by its declared `kv_cache_type`; a failing "
        "tolerance fails the run either way)",
    ),
    # ------------------------------------------------------------------ Gemma 4 (dense)
    Cause(
        "norm-unit-offset-extra", "(1 + w) on Gemma 4",
        "An RMSNorm of a Gemma 4 model scales by `(1 + w)`, Gemma 1-3's convention, where Gemma 4 multiplies by "
        "`w` as is.",
        "HF `Gemma4RMSNorm`, keras-hub's Gemma 4 and the JAX reference use `w` with no offset (HF initialises it to "
        "ones). A port that reuses its Gemma 3 norm keeps the offset.",
        "large: every normalised activation doubled, roughly, for weights near 1",
    ),
    Cause(
        "attn-scale-not-one", "Gemma 4 attention scale",
        "Gemma 4's attention scores are scaled by 1/sqrt(head_dim) (or 1/sqrt(query_pre_attn_scalar)) where "
        "Gemma 4 scales by 1.0 (its q and k are RMS-normed per head instead).",
        "HF `Gemma4TextAttention.scaling = 1.0`, keras-hub `query_normalization = 1.0`, JAX "
        "`QueryPreAttentionNormalisation.NONE`. The usual default of an attention function (`head_dim**-0.5` when "
        "no scaling is passed) is the trap.",
        "large: the softmax flattens by sqrt(head_dim)",
    ),
    Cause(
        "v-norm-missing", "no v norm",
        "Gemma 4's scale-less RMSNorm over each head of the values is skipped.",
        "HF `v_norm` (`Gemma4RMSNorm(with_scale=False)`), keras-hub `Gemma4VNorm`, JAX `RMSNorm(with_scale=False)` "
        "on the values.",
        "large unless v_proj's rows already have unit RMS",
    ),
    Cause(
        "k-eq-v-misapplied", "K=V misapplied",
        "The values come from the wrong projection: `k_proj`'s output used as the values where the layer has its "
        "own `v_proj` (K=V on a model or layer type that does not use it), or a separate value projection where "
        "K=V is on.",
        "K=V is on for the global layers of 26B-A4B and 31B only (`attention_k_eq_v`); local layers and the E "
        "models have `v_proj`. mlx-swift-lm PR #245: `v = k` copied the already-transposed key.",
        "large from the first layer it applies to",
    ),
    Cause(
        "rope-proportional-as-partial", "proportional RoPE as partial RoPE",
        "Gemma 4's global layers use proportional RoPE (the first `p * hd / 2` frequencies over the full head "
        "dim, the rest 0, half-split across the whole head); the implementation rotates only the first `p * hd` "
        "dims with frequencies over that width and pairs `(i, i + p*hd/2)`: ordinary partial RoPE.",
        "HF `_compute_proportional_rope_parameters`, keras-hub `RotaryEmbedding(denominator_dim=head_dim)`, JAX "
        "`apply_rope(rope_proportion=...)`. Megatron-Bridge PR #4196 built it as `rotary_percent 0.25`; pie PR "
        "#603 and apple/coreai-models #66 chose other pairings.",
        "large on global layers; local layers are unaffected",
    ),
    Cause(
        "kv-share-source", "wrong KV-sharing source",
        "A KV-shared layer reads the keys and values of the wrong producer layer (e.g. the first layer of its "
        "type, or the positional JAX rule where it differs from the last-of-type rule).",
        "HF and keras-hub read the last non-shared layer of the same type; JAX's "
        "`create_kv_cache_sharing_patterns` is positional (global: layer n-1, local: n-2). transformers #45242: "
        "with `use_cache=False` shared layers recomputed K/V from unused weights.",
        "large on the shared layers only",
    ),
    Cause(
        "ple-scale", "PLE scale",
        "A constant of the per-layer-embedding input is missing: the `2^-0.5` that averages the projection and "
        "the table, or the `sqrt(P)` that scales the per-layer table (or `D^-0.5` on the projection).",
        "HF `per_layer_input_scale = 2**-0.5` and `embed_tokens_per_layer` scaled by sqrt(P); keras-hub and JAX "
        "likewise.",
        "large: every layer's per-layer input",
    ),
    Cause(
        "ple-placement", "PLE branch misplaced",
        "The per-layer-embedding branch is added at the wrong point of the block (e.g. after attention, before "
        "the MLP, instead of after the MLP).",
        "HF, keras-hub and JAX add it after the MLP's residual and before the layer scalar.",
        "large",
    ),
    Cause(
        "layer-scalar-missing", "no layer scalar",
        "The learned per-layer scalar of Gemma 4 is not applied to the block output.",
        "HF keeps it in a buffer (`layer_scalar`, initialised to 1: a random-init test that leaves it alone "
        "cannot see it dropped); keras-hub a non-trainable scalar; JAX `skip_scale`.",
        "the block output off by the scalar's factor",
    ),
    Cause(
        "layer-scalar-misplaced", "layer scalar misplaced",
        "The layer scalar multiplies something other than the block output, e.g. the residual entering the "
        "block, before the block's additions.",
        "HF: `hidden_states *= self.layer_scalar` as the block's last step.",
        "large",
    ),
    # ------------------------------------------------------------------ verdicts
    Cause(
        "unexplained", "unexplained",
        "A divergence that no probe and no single-change counterfactual explains: the diagnosis says so instead "
        "of guessing.",
        kind="verdict",
    ),
    Cause(
        "honest-rounding", "honest rounding",
        "An error that the honest-noise model reproduces (the correct computation, rounded as the dtype rounds): "
        "rounding, not a wrong formula, and not a failure.",
        kind="verdict",
    ),
)

CAUSE_IDS = frozenset(c.id for c in CAUSES)
# reported as notes, not failures: the run fails on them only if the tolerance fails too
NOTE_CAUSES = frozenset(c.id for c in CAUSES if c.kind in ("precision", "note"))
_BY_ID = {c.id: c for c in CAUSES}

CALIBRATION = (
    "For calibration, agreement that others have reported: an independent port matched HF Gemma-2B's logits "
    "within 5e-4 and its residual streams within 1e-4 in fp32; keras-hub checks its Gemma 3 conversion's logits "
    "at 1e-4 in fp32; MaxText accepts a Gemma-2B conversion when the per-token KL is below 0.015. The defaults of "
    "`torch.testing.assert_close`, as (rtol, atol): fp16 (1e-3, 1e-5), bf16 (1.6e-2, 1e-5), fp32 (1.3e-6, 1e-5), "
    "fp64 (1e-7, 1e-7)."
)

LESSONS = (
    "Random initialisation leaves RMSNorm weights at zero: move them away from zero, or no `(1 + w)` bug can show.",
    "At the usual init (std 0.02) activations stay so small that the GELU is nearly linear, and exact against "
    "tanh GELU moves the logits by about 1e-6, inside fp32 noise; at a std near 0.1 (or 1/sqrt(fan_in)) the gap "
    "is about 5e-4. Random weights need a scale that drives every non-linearity.",
    "Pick tiny sizes whose sqrt(hidden_size) is not exact in bf16 (not 64, 256 or 1024), or `embed-scale-dtype` "
    "has nothing to show.",
    "HF's RMSNorm calls `.float()`, which turns a float64 input *down* into float32, so no HF run is a float64 "
    "reference: the reference has to be code in which every op runs in float64.",
    "`.to(torch.bfloat16)` on an HF model also casts its RoPE `inv_freq` buffer (a cos error of 0.7 at position "
    "4000), while `from_pretrained(dtype=...)` keeps it in fp32: how an adapter builds a low-precision model can "
    "itself cause `rope-precision`.",
    "litgpt 0.4.x turns the `(1 + w)` offset on only when the config's name contains \"Gemma\", and its Gemma "
    "presets use `norm_eps` 1e-5 where HF uses 1e-6 (a 2.7e-4 logit difference in fp32): write every such number "
    "into the spec explicitly.",
    "Fusing HF's q/k/v into litgpt's `attn` weight goes kv group by kv group: the group's query heads, then its "
    "key head, then its value head. A plain [Q; K; V] stack is wrong (`qkv-order`).",
    "Build a fresh model for each dtype: casting one model in place from bf16 to fp16 to fp64 keeps the earlier "
    "rounding.",
    "Short prompts hide position bugs: use prompts longer than the sliding window.",
    "In bf16, generated text agrees for only 30–50 tokens: compare logits, KL and top-k, not generations.",
    "Keep reference logits in fp32: a 16-bit reference quietly corrupted one project's KL figures.",
    "Resolve and print the *effective* activation, softcap, scaling and window of every implementation: config "
    "keys drift (`hidden_act` against `hidden_activation`) and change the math without a word.",
)

_SECTIONS = (
    ("formula", "Divergences",
     "A wrong formula, or a rounding step that Gemma's reference fixes: a run that shows one fails."),
    ("precision", "Precision choices",
     "A different rounding order, not a different function: named and reported as a note; the run fails only "
     "if the tolerance fails too."),
    ("note", "Notes",
     "A difference that leaves the model's predictions unchanged: reported as a note."),
    ("verdict", "Verdicts",
     "Not causes of their own: what the diagnosis answers when no cause, or only rounding, explains an error."),
)


def check_cause(cause: str, where: str = "cause") -> str:
    """`cause` when it is a catalogue id; otherwise a one-line ParityInputError naming it and the valid ids."""
    if isinstance(cause, str) and cause in CAUSE_IDS:
        return cause
    raise ParityInputError(f"{where}: cause {cause!r} is not in the catalogue ({DOC_PATH}); "
                           f"use one of {', '.join(sorted(CAUSE_IDS))}")


def get(cause: str, where: str = "cause") -> Cause:
    """The catalogue row of a cause id (ParityInputError for an unknown one)."""
    return _BY_ID[check_cause(cause, where)]


def describe(cause: str) -> str:
    """One line for a cause id: `<id> (<title>): <what goes wrong>`."""
    c = get(cause)
    return f"{c.id} ({c.title}): {c.what}"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def to_markdown() -> str:
    """docs/causes.md: the catalogue for people, generated from CAUSES, CALIBRATION and LESSONS."""
    out = [
        "# Cause catalogue",
        "",
        "*This file is generated from the table in `parity/diagnose/causes.py`; edit the table there and regenerate it "
        f"with `{REGENERATE}`. `tests/test_causes.py` fails when the two differ.*",
        "",
        "The ways Gemma implementations are known to diverge, which the harness must detect, locate and name. "
        "Every row has a **cause id**: reports, the diagnosis, waivers and the fault-injection suite use exactly "
        "these ids, so a divergence found anywhere can be looked up here. Rows are added as new causes are "
        "found; an id is never renamed.",
        "",
        "The facts come from the public source of transformers, keras-hub, litgpt and google-deepmind/gemma, and "
        "from their issue trackers. Versions move: check a fact against the installed version before relying on "
        "it.",
    ]
    for kind, heading, blurb in _SECTIONS:
        rows = [c for c in CAUSES if c.kind == kind]
        if not rows:
            continue
        out += ["", f"## {heading}", "", blurb, "",
                "| cause id | what goes wrong | who has done what | how big |", "|---|---|---|---|"]
        out += [f"| `{c.id}` | **{_cell(c.title)}**: {_cell(c.what)} | {_cell(c.who)} | {_cell(c.size)} |"
                for c in rows]
    out += ["", "## Calibration", "", CALIBRATION, "", "## Lessons that others learned the hard way", ""]
    out += [f"- {lesson}" for lesson in LESSONS]
    return "\n".join(out) + "\n"


def markdown_drift(text: str) -> str | None:
    """None when `text` is what `to_markdown()` gives; otherwise one line saying where it first differs."""
    want = to_markdown()
    if text == want:
        return None
    have_lines, want_lines = text.splitlines(), want.splitlines()
    for n, (h, w) in enumerate(zip(have_lines, want_lines), 1):
        if h != w:
            return (f"{DOC_PATH} differs from parity/diagnose/causes.py at line {n}: has {h[:80]!r}, the table gives "
                    f"{w[:80]!r}; regenerate with `{REGENERATE}`")
    if len(have_lines) != len(want_lines):
        return (f"{DOC_PATH} has {len(have_lines)} lines, parity/diagnose/causes.py gives {len(want_lines)}; "
                f"regenerate with `{REGENERATE}`")
    return f"{DOC_PATH} differs from parity/diagnose/causes.py in line endings or whitespace; regenerate with `{REGENERATE}`"


if __name__ == "__main__":
    print(to_markdown(), end="")
