"""Reading llama.cpp's graph nodes as it computes them: the `cb_eval` scheduler callback and a ctypes mirror of
`struct ggml_tensor` (vendored ggml/include/ggml.h, ggml 0.25.3).

`ggml_backend_sched_eval_callback(t, ask, user_data)` is called with ask=true for every graph node (return true
to have it computed and shown) and with ask=false once it is computed, while its buffer still holds it (the
allocator may reuse the memory for a later node: a node is copied out right then). CPU buffers are host memory,
so `t->data` is read directly, through the `nb` byte strides (views included), as examples/eval-callback does.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC, GGML_MAX_NAME = 4, 64, 10, 64
# what a node or KV cache holds here
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 26: "I32", 30: "BF16"}


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def op_name(t: GgmlTensor) -> str:
    import llama_cpp._ggml as g

    lib = g.libggml
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    return lib.ggml_op_name(t.op).decode()


def read(t: GgmlTensor) -> np.ndarray:
    """A node's values as float32, numpy shape = ggml's ne reversed ([ne3, ne2, ne1, ne0])."""
    import gguf

    kind = TYPES.get(t.type)
    if kind is None:
        raise RuntimeError(f"llama-cpp: node {t.name.decode()!r} has ggml type {t.type}, which parity does not "
                           "read; extend parity/adapters/llama_cpp/capture.py TYPES")
    ne = [int(x) for x in t.ne]
    nb = [int(x) for x in t.nb]
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = ne[0] // block * size
    # one row (ne0 elements) is contiguous in every ggml type; rows are read at their strides
    rows = np.empty((ne[3], ne[2], ne[1], row_bytes), np.uint8)
    for i3 in range(ne[3]):
        for i2 in range(ne[2]):
            base = t.data + i3 * nb[3] + i2 * nb[2]
            if nb[1] == row_bytes:  # rows back to back: one copy
                rows[i3, i2] = np.frombuffer(ctypes.string_at(base, row_bytes * ne[1]), np.uint8).reshape(ne[1], -1)
                continue
            for i1 in range(ne[1]):
                rows[i3, i2, i1] = np.frombuffer(ctypes.string_at(base + i1 * nb[1], row_bytes), np.uint8)
    if kind == "I32":  # ids (Gemma 4's chosen experts): exact in float32 below 2^24
        return rows.view(np.int32).reshape(ne[3], ne[2], ne[1], ne[0]).astype(np.float32)
    if kind == "F32":
        return rows.view(np.float32).reshape(ne[3], ne[2], ne[1], ne[0]).copy()
    flat = gguf.quants.dequantize(rows.reshape(-1, row_bytes), qtype)  # [rows, ne0] float32
    return np.asarray(flat, np.float32).reshape(ne[3], ne[2], ne[1], ne[0])


@dataclass
class Recorder:
    """What one `llama_decode` computed: each wanted node (by name, in compute order), and the KV cache tensors.

    `want(name, t)` decides in the ask phase which nodes to stop at (every other node runs unseen, in one
    stretch); `keep(name, t)` copies what is needed at the answer phase (it may follow `src`/`view_src`)."""

    want: Callable[[str, GgmlTensor], bool]
    keep: Callable[["Recorder", str, GgmlTensor], None]
    nodes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    error: BaseException | None = None

    def add(self, name: str, value: np.ndarray) -> None:
        self.nodes.setdefault(name, []).append(value)

    def clear(self) -> None:
        self.nodes, self.extra, self.error = {}, {}, None

    def callback(self):
        """The ctypes callback (keep a reference to it as long as the context lives)."""
        import llama_cpp

        def cb(ptr, ask, _user):
            try:
                t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
                name = t.name.decode(errors="replace")
                if ask:
                    return bool(self.want(name, t))
                self.keep(self, name, t)
            except BaseException as e:  # noqa: BLE001 -- an exception must not unwind through C
                if self.error is None:
                    self.error = e
            return True

        return llama_cpp.ggml_backend_sched_eval_callback(cb)


_LOG_CB = None


def quiet() -> None:
    """llama.cpp's loader and quantizer log every key and tensor to stderr: kept out of parity's output (the
    callback object is kept for the process's life, as llama.cpp holds its pointer)."""
    import llama_cpp

    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
