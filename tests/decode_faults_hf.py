"""Decode-path faults patched into transformers' own code, for the fault suite.

Each context manager patches one piece of transformers for its duration (a
method of one of its cache layer classes, its eager mask builder, or
generate()'s step-input preparation) and reproduces one real class of decode
bug that a full forward never shows. `cause` on each is the catalogue's cause
id the diagnosis should name it by; FAULTS maps the cause to the patch.

What each one does, on the decode steps only (a one-token query after a prefill):

* cache-window `sliding_window_short_on_decode`: the sliding mask is built with
  window - 1, so a local layer sees one key too few once the window is full
  (the `window` vs `window - 1` convention mixed up on the decode path).
* cache-position `position_ids_off_by_one_on_decode`: generate's step gives the
  new token position p + 1 (a cumsum of the attention mask without its - 1):
  it is rotated one position late while the cache and masks keep p.
* cache-stale `sliding_slot_stale`: once a sliding layer is full, the new entry
  is not written where it belongs (the dynamic layer keeps its old entries; the
  static layer's roll puts the new key one slot early, over a live one, and
  leaves the evicted oldest key in the newest slot).
* decode-mask `global_layers_windowed_on_decode`: the decode-step mask of the
  full-attention layers gets the sliding window too, which prefill never does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def _replaced(owner, name: str, value) -> Iterator[None]:
    """owner.name = value for the duration; owner's own attribute restored (never a copy of an inherited one)."""
    had = name in vars(owner)
    old = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, old)
        else:
            delattr(owner, name)


def _decoding(q_length: int, q_offset) -> bool:
    return q_length == 1 and int(q_offset) > 0


@contextmanager
def _eager_mask(wrap: Callable) -> Iterator[None]:
    """The eager mask builder every create_*_mask call looks up at call time, replaced by wrap(original)."""
    from transformers import masking_utils

    mapping = masking_utils.AttentionMaskInterface._global_mapping
    with _replaced_item(mapping, "eager", wrap(mapping["eager"])):
        yield


@contextmanager
def _replaced_item(mapping: dict, key: str, value) -> Iterator[None]:
    old = mapping[key]
    mapping[key] = value
    try:
        yield
    finally:
        mapping[key] = old


@contextmanager
def sliding_window_short_on_decode() -> Iterator[None]:
    """cache-window: on decode steps a local layer's mask admits window - 1 keys, not window."""
    from transformers.masking_utils import and_masks, sliding_window_overlay

    def wrap(eager):
        def mask(*args, q_length, q_offset=0, mask_function, local_size=None, **kwargs):
            # local_size is passed by create_sliding_window_causal_mask only: this is a local layer's mask
            if local_size is not None and _decoding(q_length, q_offset):
                mask_function = and_masks(mask_function, sliding_window_overlay(local_size - 1))
            return eager(*args, q_length=q_length, q_offset=q_offset, mask_function=mask_function,
                         local_size=local_size, **kwargs)
        return mask

    with _eager_mask(wrap):
        yield


sliding_window_short_on_decode.cause = "cache-window"


@contextmanager
def global_layers_windowed_on_decode() -> Iterator[None]:
    """decode-mask: on decode steps the full-attention layers' mask is windowed like the local layers'."""
    from transformers.masking_utils import and_masks, sliding_window_overlay

    def wrap(eager):
        def mask(*args, q_length, q_offset=0, mask_function, config=None, local_size=None, **kwargs):
            window = getattr(config, "sliding_window", None)
            if local_size is None and window is not None and _decoding(q_length, q_offset):
                mask_function = and_masks(mask_function, sliding_window_overlay(window))
            return eager(*args, q_length=q_length, q_offset=q_offset, mask_function=mask_function,
                         config=config, local_size=local_size, **kwargs)
        return mask

    with _eager_mask(wrap):
        yield


global_layers_windowed_on_decode.cause = "decode-mask"


@contextmanager
def position_ids_off_by_one_on_decode() -> Iterator[None]:
    """cache-position: generate's decode-step inputs give the new token position p + 1."""
    from transformers.generation.utils import GenerationMixin

    prepare = vars(GenerationMixin)["prepare_inputs_for_generation"]

    def shifted(self, input_ids, next_sequence_length=None, **kwargs):
        if next_sequence_length == 1 and kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + 1
        return prepare(self, input_ids, next_sequence_length=next_sequence_length, **kwargs)

    with _replaced(GenerationMixin, "prepare_inputs_for_generation", shifted):
        yield


position_ids_off_by_one_on_decode.cause = "cache-position"


@contextmanager
def sliding_slot_stale() -> Iterator[None]:
    """cache-stale: a full sliding layer's decode step does not write its new entry where it belongs."""
    import torch
    from transformers.cache_utils import DynamicSlidingWindowLayer, StaticSlidingWindowLayer

    dynamic_update = vars(DynamicSlidingWindowLayer)["update"]
    static_update = vars(StaticSlidingWindowLayer)["update"]

    def dynamic(self, key_states, value_states, *args, **kwargs):
        full = self.is_initialized and self.keys.shape[-2] >= self.sliding_window - 1
        kept = (self.keys, self.values)
        out = dynamic_update(self, key_states, value_states, *args, **kwargs)  # the count still advances
        if full and key_states.shape[-2] == 1:
            self.keys, self.values = kept
        return out

    def static(self, key_states, value_states, *args, **kwargs):
        full = self.is_initialized and self.cumulative_length_int >= self.max_cache_len
        oldest = (self.keys[:, :, :1].clone(), self.values[:, :, :1].clone()) if full else None
        out = static_update(self, key_states, value_states, *args, **kwargs)
        if full and key_states.shape[-2] == 1:
            for buf, old in zip((self.keys, self.values), oldest):
                buf[:, :, -2:] = torch.cat([buf[:, :, -1:], old], dim=-2)  # new one slot early, the evicted one kept last
        return out

    with _replaced(DynamicSlidingWindowLayer, "update", dynamic), \
            _replaced(StaticSlidingWindowLayer, "update", static):
        yield


sliding_slot_stale.cause = "cache-stale"


FAULTS: dict[str, Callable] = {f.cause: f for f in (
    sliding_window_short_on_decode, position_ids_off_by_one_on_decode, sliding_slot_stale,
    global_layers_windowed_on_decode,
)}


def decoding_under(cause: str, cache: str = "dynamic"):
    """An adapter factory: HF whose `decode` runs under the fault for `cause` (for --impls module:factory)."""
    from parity.adapters.hf import HFAdapter

    class FaultyDecodeHF(HFAdapter):
        def decode(self, model, prompt, continuation):
            with FAULTS[cause]():
                return super().decode(model, prompt, continuation)

    adapter = FaultyDecodeHF(cache=cache)
    adapter.name = f"hf-{cause}" + ("" if cache == "dynamic" else f"-{cache}")
    return adapter
