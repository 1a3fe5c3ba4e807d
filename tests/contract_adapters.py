"""Adapters that break the contract of parity.adapters.base, each in one way (loadable with --impls)."""

from parity.adapters.base import RunResult
from parity.adapters.litgpt_style import LitgptStyleAdapter


class _Port(LitgptStyleAdapter):
    label = "port"

    def __init__(self) -> None:
        super().__init__(name=self.label)

    def change(self, result: RunResult) -> RunResult:
        return result

    def run(self, model, tokens, feed=None):
        return self.change(super().run(model, tokens, feed))


class DropsTaps(_Port):
    label = "drops-taps"

    def change(self, result):
        return RunResult({k: v for k, v in result.taps.items() if ".mlp." not in k})


class OnlyLogits(_Port):
    label = "only-logits"

    def change(self, result):
        return RunResult({"logits": result.taps["logits"]})


class Misspelt(_Port):
    label = "misspelt"

    def change(self, result):
        taps = dict(result.taps)
        taps["layers.0.mlp_act"] = taps["layers.0.mlp.act"]
        return RunResult(taps)


class Declares(_Port):
    label = "declares"

    def change(self, result):
        gone = [k for k in result.taps if k.endswith(".mlp.hidden")]
        return RunResult({k: v for k, v in result.taps.items() if k not in gone},
                         {k: "fused into the down projection" for k in gone})


class TorchTensors(_Port):
    label = "torch-tensors"

    def change(self, result):
        import torch

        return RunResult({k: torch.from_numpy(v.astype("float32")) for k, v in result.taps.items()})


class IgnoresFeed(_Port):
    """The README's first example did this: `run` never looks at `feed`."""

    label = "ignores-feed"

    def run(self, model, tokens, feed=None):
        return super().run(model, tokens, None)


class NamedHF(_Port):
    label = "hf"


class NoDecode(LitgptStyleAdapter):
    """A prefill-only implementation: it declares no decode path."""

    decodes = False

    def __init__(self) -> None:
        super().__init__(name="prefill-only")


class DecodesTooFew(LitgptStyleAdapter):
    """Drops the last decode step."""

    def __init__(self) -> None:
        super().__init__(name="decodes-too-few")

    def decode(self, model, prompt, continuation):
        result = super().decode(model, prompt, continuation)
        result.steps = result.steps[:-1]
        return result


def no_decode():
    return NoDecode()


def decodes_too_few():
    return DecodesTooFew()
