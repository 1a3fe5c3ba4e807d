"""The machinery of real sizes, exercised on tiny specs: layer streaming, one process per
implementation with traces on disk, truncated depth. Real shapes are in bench/, not here."""

import json

import numpy as np
import pytest

from parity.adapters.hf import HFAdapter
from parity.adapters.litgpt_style import LitgptStyleAdapter
from parity.capture.runner import capture
from parity.model.presets import PRESETS

SPEC = PRESETS["tiny-gemma2"]  # sandwich norms, softcaps, local and global layers
PROMPTS = {"long": list(range(2, 50))}  # 48 tokens, past the window of 16


@pytest.fixture(scope="module")
def weights():
    from parity.model.weights import random_weights

    return random_weights(SPEC, seed=0)


def _both(adapter, weights, dtype, monkeypatch, mode="cumulative", refs=None):
    out = {}
    for how in ("never", "always"):
        monkeypatch.setenv("PARITY_STREAM", how)
        out[how] = capture(adapter, SPEC, weights, dtype, PROMPTS, mode=mode, references=refs)[0]
    return out["never"], out["always"]


@pytest.mark.parametrize("adapter,dtype", [(LitgptStyleAdapter(), "float64"), (HFAdapter(), "bfloat16")])
def test_streamed_layers_compute_exactly_what_the_whole_model_does(adapter, dtype, weights, monkeypatch):
    whole, streamed = _both(adapter, weights, dtype, monkeypatch)
    assert list(whole.taps) == list(streamed.taps)
    for k in whole.taps:
        assert np.array_equal(whole.taps[k], streamed.taps[k]), k
    refs = {"long": capture(LitgptStyleAdapter(), SPEC, weights, "float64", PROMPTS)[0]}
    whole, streamed = _both(adapter, weights, dtype, monkeypatch, "isolated", refs)
    for k in whole.taps:
        assert np.array_equal(whole.taps[k], streamed.taps[k]), k


def test_a_streamed_layer_holds_its_weights_only_while_it_runs(weights, monkeypatch):
    import torch

    monkeypatch.setenv("PARITY_STREAM", "always")
    adapter = LitgptStyleAdapter()
    model = adapter.build(SPEC, weights, "float32")
    resident = []
    for block in model.h:  # the MLP runs inside its block: the block's weights are there then
        block.mlp.register_forward_hook(lambda m, a, o: resident.append(
            [j for j, b in enumerate(model.h) if not b.norm_1.weight.is_meta]))
    with torch.no_grad():
        model(torch.tensor([PROMPTS["long"]]))
    assert resident == [[i] for i in range(SPEC.num_layers)]  # while layer i ran, only layer i was real
    assert all(p.is_meta for b in model.h for p in b.parameters())  # and none after the forward
    assert not model.wte.weight.is_meta  # the embedding (and tied head) stay


def test_streaming_that_loads_the_wrong_layer_is_caught(weights, monkeypatch):
    """The check above can fail: a streamer that fills every layer from layer 0's plan differs."""
    from parity.adapters import torch_load

    real = torch_load.fill_parameters

    def wrong(model, plan, w, prefix=""):
        return real(model, plan, w, "h.0." if prefix.startswith("h.") else prefix)

    whole, _ = _both(LitgptStyleAdapter(), weights, "float32", monkeypatch)
    monkeypatch.setattr(torch_load, "fill_parameters", wrong)
    monkeypatch.setenv("PARITY_STREAM", "always")
    broken = capture(LitgptStyleAdapter(), SPEC, weights, "float32", PROMPTS)[0]
    assert np.array_equal(broken.taps["layers.0.out"], whole.taps["layers.0.out"])
    assert not np.array_equal(broken.taps["layers.1.out"], whole.taps["layers.1.out"])


def test_separate_processes_report_what_one_process_does(tmp_path, monkeypatch):
    """The real-size path (stored weights, one process per run, lazy traces) on a tiny spec."""
    from parity.harness import Request, run

    monkeypatch.setenv("PARITY_CACHE", str(tmp_path / "cache"))
    req = dict(spec=SPEC, impls=["litgpt-style", "hf"], dtypes=["bfloat16"], prompts=PROMPTS)
    here = run(Request(**req))
    monkeypatch.setenv("PARITY_LARGE_OVER", "0")  # every spec is "real size" now
    there = run(Request(**req, trace_dir=str(tmp_path / "traces"), reduce_over=1000, full_taps="layers.1.*"))
    assert there.weights.stored and there.weights_hash == here.weights_hash
    assert (tmp_path / "traces" / "hf@bfloat16.cumulative.long.safetensors").is_file()
    assert there.passed and here.passed
    a = {(r.impl, r.tap): r for r in here.results}
    b = {(r.impl, r.tap): r for r in there.results}
    assert a.keys() == b.keys()
    for k in a:
        if b[k].sampled:  # over 1000 elements and not kept whole: 16 of 48 rows compared
            assert not k[1].startswith("layers.1.") and b[k].max_abs <= a[k].max_abs and b[k].numel == a[k].numel
        else:
            assert b[k].max_abs == a[k].max_abs, k
    assert any(r.sampled for r in there.results)
    ref = there.trace("litgpt-style", "float64", "long")
    assert type(ref.taps).__name__ == "LazyTaps"


def test_first_layers_runs_the_first_layers_of_the_same_model(weights):
    from parity.harness import Request, run

    full = run(Request(spec=SPEC, impls=["hf"], dtypes=["float32"], prompts=PROMPTS, weights=weights))
    first = run(Request(spec=SPEC, impls=["hf"], dtypes=["float32"], prompts=PROMPTS, weights=weights,
                        first_layers=2))
    assert first.spec.num_layers == 2 and first.spec.layer_types == SPEC.layer_types[:2]
    a, b = (r.trace("hf", "float32", "long").taps for r in (full, first))
    layer_taps = [k for k in b if k.startswith(("embed", "layers.0.", "layers.1."))]
    assert len(layer_taps) > 20 and all(np.array_equal(a[k], b[k]) for k in layer_taps)
    assert "layers.2.out" in a and "layers.2.out" not in b
    # without weights given, only the first layers' random weights are made: the same values
    gen = run(Request(spec=SPEC, impls=["hf"], dtypes=["float32"], prompts=PROMPTS, first_layers=2))
    c = gen.trace("hf", "float32", "long").taps
    assert all(np.array_equal(a[k], c[k]) for k in layer_taps)


def test_first_layers_outside_the_spec_is_bad_input(tmp_path, capsys):
    from parity.report.cli import main

    assert main(["--spec", "tiny-gemma", "--first-layers", "9", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--first-layers 9 is outside 1..4" in err and not (tmp_path / "report.json").exists()


def test_stream_setting_is_checked(monkeypatch):
    from parity.adapters.torch_setup import stream_layers
    from parity.errors import ParityInputError

    monkeypatch.setenv("PARITY_STREAM", "sometimes")
    with pytest.raises(ParityInputError, match="auto, always or never"):
        stream_layers(1)
    monkeypatch.setenv("PARITY_STREAM", "auto")
    assert not stream_layers(1) and stream_layers(1 << 62)


def test_real_widths_get_a_128_token_long_prompt():
    from parity.model.prompts import default_prompts

    assert len(default_prompts(PRESETS["gemma-2b"])["long"]) == 128
    assert len(default_prompts(SPEC)["long"]) == 48
    json.dumps(default_prompts(PRESETS["gemma-2b"]))


@pytest.mark.parametrize("separate", [True, False])
def test_with_separate_processes_the_report_process_imports_no_framework(tmp_path, separate):
    """The frameworks live in the capture processes only: the report process stays small."""
    import subprocess
    import sys

    code = ("import sys, json\n"
            "from parity.harness import Request, run\n"
            "from parity.model.presets import PRESETS\n"
            "r = run(Request(spec=PRESETS['tiny-gemma'], impls=['litgpt-style', 'hf'], dtypes=['float32'],"
            " prompts={'p': [2, 5, 9]}, separate_processes=%s))\n" % separate +
            "print(json.dumps([r.passed, r.runs[0].version, [m for m in ('torch', 'transformers', 'tensorflow',"
            " 'jax', 'keras') if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    passed, version, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert passed and version.startswith("parity")
    assert (imported == []) if separate else ("torch" in imported)  # the check tells the two apart


def test_honest_rounding_beyond_tolerance_is_said_so_without_running_every_candidate(weights, monkeypatch):
    """A tolerance too tight for the shape (as bf16 attention probabilities at 128 tokens and 18 layers
    were for the tiny-calibrated table): the honest runs reproduce it, so it passes, said to be honest
    rounding; without honest runs (table only) the unchanged port reproduces it and no candidate is run."""
    from parity.diagnose import counterfactuals
    from parity.harness import Request, run
    from parity.numerics.tolerances import TOLERANCES, Tolerance

    tight = {**TOLERANCES, "bfloat16": Tolerance(1e-4, 1e-4, "too tight on purpose")}
    monkeypatch.setattr(counterfactuals, "candidates", lambda spec: pytest.fail("candidates were run"))
    r = run(Request(spec=SPEC, impls=["hf"], dtypes=["bfloat16"], prompts=PROMPTS, weights=weights,
                    tolerances=tight))
    assert r.passed and r.verdict.runs[0].honest_taps > 0 and "honest rounding" in r.verdict.headline
    r = run(Request(spec=SPEC, impls=["hf"], dtypes=["bfloat16"], prompts=PROMPTS, weights=weights,
                    tolerances=tight, noise_members=0))
    assert not r.passed
    (d,) = r.divergent_causes
    assert d.cause == "unexplained" and "the correct port run in bfloat16 reproduces it" in d.evidence


@pytest.mark.parametrize("args,env,needle", [
    (["--reduce-over", "-3"], {}, "--reduce-over -3 is negative"),
    ([], {"PARITY_LARGE_OVER": "lots"}, "PARITY_LARGE_OVER='lots' is not a byte count"),
    ([], {"PARITY_STREAM": "sometimes"}, "PARITY_STREAM='sometimes'"),
])
def test_bad_real_size_settings_are_one_line_bad_input(tmp_path, capsys, monkeypatch, args, env, needle):
    from parity.report.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    code = main(["--impls", "litgpt-style", "--dtypes", "float32", "--tokens", "2,3", "--quiet", "--out", str(out)]
                + args)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (out / "report.json").exists()
