"""Fused CPU kernels for the ABFT output check and the KV-cache bit checksums, compiled with numba.

The check of a linear layer needs four sums per output row: ``x @ w_c``, ``|x| @ |W|_c``,
``sum_j y_j`` and ``sum_j |y_j|``. As separate PyTorch operators these read ``x`` three times,
``y`` three times and write ``|x|`` and ``|y|`` once, and each pass finds the activations in
L3 or memory. The kernels read every element once. Timed inside ``generate`` on SmolLM2-135M
(batch 8, 100-token prompts, the ``o_proj`` and ``down_proj`` layers of 30 blocks, 2-core AMD
EPYC, numba 0.68), the prompt-pass check took 38-40 ms with the operators and 15-24 ms with the
kernels. A further kernel compares the sums against the tolerance in one call instead of about
ten small operators.

Two call patterns get their own entry points:

- A decode step calls the kernel once per checked layer, with a few rows, right after the
  layer, when numba's argument checks cost as much as the sums. ``call_terms_at`` takes the
  operands' addresses as integers: on a 2-core Intel Xeon, between streamed 3.5 MB weights,
  a call took 8.5 µs against 14.5 µs with NumPy views, timed in one run. It takes the sizes
  and the checksums' addresses from one int64 block per layer, so a call passes three
  integers, and it marks the block so that it rejects a second call of the layer in one step.
- A prompt pass has hundreds of rows per layer, and the sums are bound by memory bandwidth.
  ``parallel_terms`` splits the rows across numba's threads, where a thread-safe threading
  layer exists. Inside ``generate`` on the same Xeon, the prompt-pass kernels took 14-16 ms
  on two threads against 24-25 ms on one, both with float64 accumulators.

Products round in the input format and sums accumulate in it too (float32 or float64). That
is the rounding the check's tolerance assumes, for any order of summation, so the compiler may
reorder and vectorize the sums. Accumulating float32 operands in float64 made an 800-row
prompt-pass check take about twice as long, because converting each value cost as much as
reading it. NaN and Inf propagate as in the operators. Each row is summed by one thread, so
the parallel kernel returns the serial kernel's sums bit for bit.

Dual first-token compares KV caches through :func:`bit_checksums`: two sums per row of its
elements' bit patterns, read as integers, one plain and one weighted by position. Integer
sums are exact, so they do not depend on the order of summation or the memory layout. Any
change to one element changes the plain sum. A change of two elements that cancels in it, as
a flip before the position encoding (RoPE) can cause, still changes the weighted sum. The
kernel reads each tensor once. On the Xeon above, 60 tensors shaped as a SmolLM2-135M cache (batch 8, 100
tokens, 37 MB), read from memory, took 1.9 ms on two threads and 8.4 ms as PyTorch's float64
row sums.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
# A one-layer check with at least this many rows (a prompt pass) splits them across threads.
# Decode steps have a few rows per layer, where waking threads would cost more than it saves.
PARALLEL_MIN_ROWS = 64
# numba threading layers that allow parallel kernels launched from several threads at once.
_THREAD_SAFE_LAYERS = ("tbb", "omp")
# int64 fields of a decode-step call's block: rows, in, out, the addresses of column,
# abs_column and out, and the slot's fill flag.
CALL_FIELDS = 7
_kernels: SimpleNamespace | None = None
_loaded = False
_threads: "_ThreadPolicy | None" = None


def _compile() -> SimpleNamespace | None:
    """Return the jit-compiled kernels, or None when numba cannot be imported."""
    try:
        import numba
    except ImportError as error:
        logger.info("abft uses PyTorch operators for its check because numba is not available (%s)", error)
        return None
    try:
        return _build(numba, cache=True)
    except RuntimeError as error:
        # numba raises this when neither the package folder nor the user cache folder is writable.
        logger.info("abft compiles its check kernels without an on-disk cache (%s)", error)
        return _build(numba, cache=False)


def _build(numba, cache: bool) -> SimpleNamespace:
    """Define the kernels; numba compiles each on its first call for the argument types given."""
    # reassoc and contract only: the sums must keep NaN and Inf semantics, so no nnan/ninf.
    jit_sums = numba.njit(fastmath={"reassoc", "contract"}, cache=cache)

    @jit_sums
    def row_terms(x, y, column, abs_column, out, row):
        # The four sums of one row: x [rows, in], y [rows, out], column [in], out [4, rows].
        dot = np.float32(0.0)
        magnitude = np.float32(0.0)
        for i in range(x.shape[1]):
            value = x[row, i]
            dot += value * column[i]
            magnitude += abs(value) * abs_column[i]
        total = np.float32(0.0)
        abs_total = np.float32(0.0)
        for j in range(y.shape[1]):
            value = y[row, j]
            total += value
            abs_total += abs(value)
        out[0, row] = dot
        out[1, row] = magnitude
        out[2, row] = total
        out[3, row] = abs_total

    @jit_sums
    def terms(x, y, column, abs_column, out):
        for row in range(x.shape[0]):
            row_terms(x, y, column, abs_column, out, row)

    @numba.njit(fastmath={"reassoc", "contract"}, cache=cache, parallel=True)
    def parallel_terms(x, y, column, abs_column, out):
        # Rows are split across numba's threads, and each row's sums stay in one thread.
        for row in numba.prange(x.shape[0]):
            row_terms(x, y, column, abs_column, out, row)

    @jit_sums
    def stack_terms(x, y, column, abs_column, out):
        # x [L, rows, in], y [L, rows, out], column [L, in], out [L, 4, rows].
        for layer in range(x.shape[0]):
            terms(x[layer], y[layer], column[layer], abs_column[layer], out[layer])

    def call_terms_at(element):
        """Return a kernel that reads one layer call's operands through integer addresses of ``element`` arrays.

        A decode step calls it once per checked layer with a few rows, right after the layer.
        It takes three integers, because Python objects are out of cache there and each argument
        passed is one more memory read. The call's sizes and the other operands' addresses sit in a block of
        :data:`CALL_FIELDS` int64 values, made once per layer.
        """
        as_element = _pointer_cast(numba, numba.types.CPointer(element))
        as_int64 = _pointer_cast(numba, numba.types.CPointer(numba.types.int64))
        as_float64 = _pointer_cast(numba, numba.types.CPointer(numba.types.float64))

        @jit_sums
        def kernel(x_address, y_address, block_address):
            # The caller guarantees C-contiguous x [rows, in] and y [rows, out]. The block gives
            # rows, in, out, the addresses of column [in], abs_column [in] and out [4, rows],
            # and a flag that is set once the slot contains a call.
            block = numba.carray(as_int64(block_address), (CALL_FIELDS,))
            if block[CALL_FIELDS - 1]:
                return False
            rows, n_in, n_out = block[0], block[1], block[2]
            x = numba.carray(as_element(x_address), (rows, n_in))
            y = numba.carray(as_element(y_address), (rows, n_out))
            column = numba.carray(as_element(block[3]), (n_in,))
            abs_column = numba.carray(as_element(block[4]), (n_in,))
            out = numba.carray(as_float64(block[5]), (4, rows))
            terms(x, y, column, abs_column, out)
            block[CALL_FIELDS - 1] = 1
            return True

        return kernel

    # Without fastmath: the comparison keeps the operators' order of rounding.
    @numba.njit(cache=cache)
    def compare(terms, bias, bias_tolerance, magnitude_factor, output_factor, difference, passed):
        # terms [L, 4, rows], bias and bias_tolerance [L], difference and passed [L, rows].
        failing = 0
        for layer in range(terms.shape[0]):
            for row in range(terms.shape[2]):
                gap = abs(terms[layer, 2, row] - terms[layer, 0, row] - bias[layer])
                tolerance = terms[layer, 3, row] * output_factor
                tolerance += terms[layer, 1, row] * magnitude_factor
                tolerance += bias_tolerance[layer]
                # NaN compares false, so a non-finite row fails, as does an overflowed tolerance.
                ok = gap <= tolerance and tolerance < math.inf
                difference[layer, row] = gap
                passed[layer, row] = ok
                failing += not ok
        return failing

    def bit_checksums_of(element, parallel):
        """Return a kernel that sums the bit patterns of ``element``-sized integers, row by row."""
        as_element = _pointer_cast(numba, numba.types.CPointer(element))
        item_bytes = element.bitwidth // 8

        @numba.njit(cache=cache, parallel=parallel)
        def kernel(addresses, row_elements, out):
            # Tensor t holds out.shape[0] rows of row_elements[t] contiguous elements at
            # addresses[t]. out [rows, tensors, 2] gets each row's plain and weighted sums.
            rows, tensors = out.shape[0], out.shape[1]
            for job in numba.prange(rows * tensors):
                row = job // tensors
                tensor = job - row * tensors
                count = row_elements[tensor]
                data = numba.carray(as_element(addresses[tensor] + row * count * item_bytes), (count,))
                total = np.int64(0)
                weighted = np.int64(0)
                for i in range(count):
                    value = np.int64(data[i])
                    total += value
                    # Both factors widen from 32 bits, which lets the compiler vectorize the
                    # product. Serial, it took 2.3 ms for 60 cache tensors against 4.6 ms in uint64.
                    weighted += value * np.int64(np.int32(i + 1))
                out[row, tensor, 0] = total
                out[row, tensor, 1] = weighted

        return kernel

    bit_types = {1: numba.types.int8, 2: numba.types.int16, 4: numba.types.int32}
    return SimpleNamespace(
        bit_checksums={
            (size, parallel): bit_checksums_of(element, parallel)
            for size, element in bit_types.items()
            for parallel in (False, True)
        },
        stack_terms=stack_terms,
        parallel_terms=parallel_terms,
        call_terms_at={
            torch.float32: call_terms_at(numba.types.float32),
            torch.float64: call_terms_at(numba.types.float64),
        },
        compare=compare,
    )


def _pointer_cast(numba, pointer_type):
    """Return a numba intrinsic that reinterprets an integer address as ``pointer_type``."""
    from numba.extending import intrinsic

    @intrinsic
    def cast(typingctx, address):
        if not isinstance(address, numba.types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer_type))

        return pointer_type(address), codegen

    return cast


@dataclass
class _ThreadPolicy:
    """The decision whether one process may run the row-parallel kernel."""

    pid: int
    allowed: bool
    # True once numba's chosen layer was checked after the first parallel launch.
    confirmed: bool = False


def _threads_allowed() -> bool:
    """Return whether this process may run the row-parallel kernel.

    Only on a thread-safe numba threading layer: the fallback layer, workqueue, aborts the
    process when two threads launch parallel kernels at once, as a server running protected
    models in several threads would. A forked child of a process that made the decision
    stays serial, because OpenMP thread pools do not survive a fork.
    """
    global _threads
    pid = os.getpid()
    if _threads is None:
        _threads = _ThreadPolicy(pid, _thread_safe_layer_loads())
    elif _threads.pid != pid:
        _threads = _ThreadPolicy(pid, False)
    if not _threads.allowed:
        return False
    import numba

    # As many threads as PyTorch uses, so a user's thread limit holds for the check too.
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return True


def _confirm_layer() -> None:
    """After the first parallel launch, stay serial unless numba really chose a thread-safe layer.

    numba skips a TBB older than it supports and tries the next layer, which loading the
    module in :func:`_thread_safe_layer_loads` does not reveal.
    """
    if not _threads.confirmed:
        import numba

        _threads.confirmed = True
        _threads.allowed = numba.threading_layer() in _THREAD_SAFE_LAYERS


def _thread_safe_layer_loads() -> bool:
    """Return whether the threading layer numba will choose is thread-safe, by loading the candidates in its order."""
    import numba

    configured = numba.config.THREADING_LAYER
    order = {
        "default": list(numba.config.THREADING_LAYER_PRIORITY),
        "threadsafe": list(_THREAD_SAFE_LAYERS),
        "safe": ["tbb"],
    }.get(configured, [configured])
    for layer in order:
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}pool")
        except (ImportError, OSError):
            continue
        return layer in _THREAD_SAFE_LAYERS
    return False


def kernels() -> SimpleNamespace | None:
    """Return the compiled kernels, importing numba on the first call; None without numba."""
    global _kernels, _loaded
    if not _loaded:
        _kernels = _compile()
        _loaded = True
    return _kernels


def supports(x: torch.Tensor, y: torch.Tensor, column: torch.Tensor) -> bool:
    """Return whether the kernels can check these operands: contiguous CPU tensors of one float32/float64 dtype."""
    return (
        x.device.type == "cpu"
        and y.device.type == "cpu"
        and x.dtype in _SUPPORTED_DTYPES
        and x.dtype == y.dtype == column.dtype
        and x.is_contiguous()
        and y.is_contiguous()
        and kernels() is not None
    )


def stack_terms(x: torch.Tensor, y: torch.Tensor, column: torch.Tensor, abs_column: torch.Tensor) -> np.ndarray:
    """Return ``x @ w_c``, ``|x| @ |W|_c``, ``sum_j y_j`` and ``sum_j |y_j|`` as one ``[L, 4, rows]`` float64 array.

    ``x`` is ``[L, rows, in]``, ``y`` is ``[L, rows, out]``, and ``column`` and ``abs_column``
    are ``[L, in]``. Call :func:`supports` first.
    """
    out = np.empty((x.shape[0], 4, x.shape[1]))
    # detach(): NumPy views of tensors that require grad are not allowed; no copy is made.
    operands = (x.detach().numpy(), y.detach().numpy(), column.numpy(), abs_column.numpy())
    if x.shape[0] == 1 and x.shape[1] >= PARALLEL_MIN_ROWS and _threads_allowed():
        kernels().parallel_terms(*(operand[0] for operand in operands), out[0])
        _confirm_layer()
    else:
        kernels().stack_terms(*operands, out)
    return out


def compare(
    terms: np.ndarray, bias: np.ndarray, bias_tolerance: np.ndarray, magnitude_factor: float, output_factor: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return ``passed [L, rows]`` and the absolute checksum differences ``[L, rows]``, or None if every row passed.

    Computes what the operator check computes, from ``terms [L, 4, rows]`` and the per-layer
    ``bias`` and ``bias_tolerance`` ``[L]``. Most checks pass, and then no tensors are made.
    """
    shape = (terms.shape[0], terms.shape[2])
    difference = np.empty(shape)
    passed = np.empty(shape, dtype=np.bool_)
    failing = kernels().compare(terms, bias, bias_tolerance, magnitude_factor, output_factor, difference, passed)
    if not failing:
        return None
    return torch.from_numpy(passed), torch.from_numpy(difference)


# Signed integers of each element width in bytes, for reading floating-point bits.
INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Integer views for bit checksums by element size. Eight-byte elements are summed as two
# four-byte halves, because the kernel reads integers of at most 32 bits.
_BIT_VIEWS = {**INT_OF_WIDTH, 8: torch.int32}


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """View a floating-point tensor as signed integers of the same width (shares storage)."""
    return tensor.view(INT_OF_WIDTH[tensor.element_size()])


def bit_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Return ``[rows, 2 * len(tensors)]`` int64 checksums of each row's bit patterns, read as integers.

    Every tensor is ``[rows, ...]`` with the same number of rows. Columns ``2t`` and ``2t + 1``
    are tensor t's plain sum and its sum weighted by the element's position in the row (from
    1), both modulo 2**64. A change to one or two elements of a row changes at least one of
    them. Contiguous CPU tensors go through one kernel call, and PyTorch sums the others to
    the same values.

    NOTE: changes to three or more elements can cancel in both sums. After a flip in a key
    projection's output, a normalization of each key head (Gemma 3's k_norm) moved several
    float16 elements by one unit, and 1 of 505 such flips went unnoticed.
    """
    if not tensors:
        raise ValueError("bit_checksums needs at least one tensor")
    rows = tensors[0].shape[0]
    row_counts = {tensor.shape[0] for tensor in tensors}
    if len(row_counts) > 1:
        raise ValueError(f"bit_checksums needs tensors with one row count, got row counts {sorted(row_counts)}")
    out = torch.empty((rows, len(tensors), 2), dtype=torch.int64)
    fused: list[tuple[int, torch.Tensor]] = []
    for index, tensor in enumerate(tensors):
        bits = _bit_view(tensor)
        if bits.device.type == "cpu" and bits.is_contiguous() and bits.numel() and kernels() is not None:
            fused.append((index, bits))
        else:
            out[:, index] = _torch_bit_checksums(bits)
    # One call per element size. A cache contains one dtype, so this is one call in practice.
    for size in sorted({bits.element_size() for _, bits in fused}):
        group = [(index, bits) for index, bits in fused if bits.element_size() == size]
        addresses = np.array([bits.data_ptr() for _, bits in group], dtype=np.int64)
        row_elements = np.array([bits.numel() // rows for _, bits in group], dtype=np.int64)
        sums = np.empty((rows, len(group), 2), dtype=np.int64)
        parallel = rows * len(group) > 1 and _threads_allowed()
        # The arrays hold addresses only: ``group`` keeps the tensors alive through the call.
        kernels().bit_checksums[size, parallel](addresses, row_elements, sums)
        if parallel:
            _confirm_layer()
        out[:, [index for index, _ in group]] = torch.from_numpy(sums)
    return out.flatten(1)


def _torch_bit_checksums(bits: torch.Tensor) -> torch.Tensor:
    """Return ``[rows, 2]``: the plain and position-weighted int64 sums of each row of integer ``bits``."""
    # flatten(1) keeps the row count where reshape(rows, -1) could not infer a width (0 rows).
    values = (bits.flatten(1) if bits.dim() > 1 else bits.unsqueeze(1)).to(torch.int64)
    positions = torch.arange(1, values.shape[1] + 1, dtype=torch.int64, device=values.device)
    # NOTE: the kernel and PyTorch both rely on int64 sums wrapping modulo 2**64, as they do on
    # two's complement hardware. A row needs about 2**16 elements before the weighted sum wraps.
    return torch.stack([values.sum(1), (values * positions).sum(1)], 1).cpu()


def _bit_view(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor``'s elements reinterpreted as integers of :data:`_BIT_VIEWS`."""
    if tensor.element_size() == 8 and tensor.stride(-1) != 1:
        # The view to four-byte halves splits the last dimension, which must be dense.
        tensor = tensor.contiguous()
    return tensor.view(_BIT_VIEWS[tensor.element_size()])
