"""Foreground colours for the semi-transparent border, so that cut-outs have no halo.

Where the mask is soft (hair, fur, motion blur, anti-aliased edges) a pixel of the photo is a
mix, I = a*F + (1 - a)*B, of the subject's colour F and the old background's colour B. Written
as it is with alpha a and shown over a new background N, it gives a*I + (1 - a)*N, which
still holds a*(1 - a)*B of the old backdrop: a fringe of its colour around the subject, the
"halo" users complain about. What should be written there is F.

`estimate_foreground` solves for F and B with multi-level foreground estimation (Germer,
Uelwer, Conrad, Harmeling 2020, "Fast Multi-Level Foreground Estimation"): per pixel and
colour channel it minimises

    (a_i*F_i + (1 - a_i)*B_i - I_i)^2
        + sum over the 4 neighbours j of (eps + |a_i - a_j|) * ((F_i - F_j)^2 + (B_i - B_j)^2)

i.e. F and B must explain the photo and be smooth, except across edges of the matte. Each
pixel's own F and B follow from a 2x2 linear system given its neighbours' values. The image is
solved on a pyramid of sizes from 1x1 up to the full size, each level starting from the
coarser level's answer, so that a few sweeps per level are enough: colours travel across
whole regions on the small levels and only need local corrections on the large ones.

What this implementation does differently from the paper's (sequential, Gauss-Seidel) solver:

- Jacobi sweeps: every pixel is updated from the previous sweep's values at once, which is a
  dozen whole-tensor torch operations per sweep, the same code on CPU and GPU. Gauss-Seidel
  converges about twice as fast per sweep, so the large levels get 4 sweeps instead of the
  paper's 2, and the finest level, which starts from one of half its size, gets 2. Measured
  on a 1.5 MP scene like the one below: colour error 5.6 with 2 sweeps everywhere, 5.0 with
  4 and 2 (+15% time), 4.6 with 6 and 3 (+40%), 3.0 with 50 everywhere (100x the time).
- Only near the border: on the large levels only 32x32 tiles holding a pixel with
  0 < alpha < 255 are solved, each with a margin of as many pixels as there are sweeps (a
  sweep moves information one pixel). The margin makes a tile's inside what sweeps over the
  whole level give (to float rounding); pixels of unsolved tiles keep the coarser level's
  values, which only the next level's starting guess sees. Tiles are solved in batches, to
  bound memory, and without any per-pixel Python loop.

Cost on the development VM (2 vCPUs, AMD EPYC, AVX2), float32, bench/refine.py: a textured
subject on a saturated green backdrop with a soft edge 1% of the short side wide and 60
hair-like strands; "colour error" is the mean distance to the true foreground, in 8-bit
levels, where alpha > 10%; CPU ms of one thread with torch on one thread | wall ms with
torch's 2 threads; extra peak memory at 12 MP about 110 MiB (border) and 180 MiB (all soft):

    1.5 MP (1086x1448), 2.1% soft pixels:     91 ms |   63 ms   colour error 57.2 -> 4.2
    12 MP (3000x4000), 1.7% soft pixels:     351 ms |  241 ms   colour error 54.9 -> 5.3
    1.5 MP, every pixel soft (worst case):   390 ms |  258 ms
    12 MP, every pixel soft (worst case):   3080 ms | 2170 ms

On a machine whose cores are busy with other processes, torch's multi-threaded operations
(libgomp's spinning worker threads) were at times 10-30x slower in wall time than the same
work on one thread (1.5 MP: 1.4-6 s instead of ~0.1 s); OMP_WAIT_POLICY=PASSIVE in the
environment, or one torch thread, avoided it. That is true of all of torch on such a machine,
not of this module.

Pixels with alpha == 255 keep their exact input colour and pixels with alpha == 0 keep theirs
too (they are invisible; keeping them costs nothing and is deterministic): only pixels with
0 < alpha < 255 get the estimate. torch is imported at the top because this module is only
imported when the option is on. On the CPU several threads may call `estimate_foreground` at
once (nothing is shared). On a GPU, which the model shares, the calls take turns (a 12 MP
image needs a few hundred MiB there, and the encode pool would otherwise add that up per
thread), and one that runs out of GPU memory is done again on the CPU: the same answer,
slower, instead of blaming the image for the state of the GPU.
"""

from __future__ import annotations

import threading

import numpy as np
import structlog
import torch

from rmbgd.errors import describe
from rmbgd.imaging.pixels import check_uint8
from rmbgd.model.device import is_out_of_memory
from rmbgd.model.solver import Settings, multilevel, partial_pixels

__all__ = ["estimate_foreground"]


_DEFAULT = Settings()


# One GPU refinement at a time, process-wide: the encode pool's threads would otherwise
# each hold their temporaries on the device at once, next to the model's.
_GPU_TURN = threading.Lock()


def estimate_foreground(rgb: np.ndarray, alpha: np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """rgb (h, w, 3) uint8, alpha (h, w) uint8 -> estimated foreground (h, w, 3) uint8.

    Pixels with 0 < alpha < 255 get the estimated foreground colour; all others keep the
    input colour exactly. `device` is a torch device ("cpu", "cuda", "cuda:1", ...); off
    the CPU, calls take turns, and one that runs out of device memory runs on the CPU.
    """
    if torch.device(device).type == "cpu":
        return _estimate(rgb, alpha, device, _DEFAULT)
    with _GPU_TURN:
        try:
            return _estimate(rgb, alpha, device, _DEFAULT)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            error = describe(exc)
        # Hand what the failed attempt cached back to the model before going on.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    # structlog directly, under rmbgd's logger name (what ops.logs.get_logger() returns): the
    # model layer does not import ops.
    structlog.get_logger("rmbgd").warning(
        "refine_on_cpu",
        device=device,
        error=error,
        reason="out of GPU memory; this image's foreground is estimated on the CPU instead",
    )
    return _estimate(rgb, alpha, "cpu", _DEFAULT)


def _estimate(rgb: np.ndarray, alpha: np.ndarray, device: str, settings: Settings) -> np.ndarray:
    rgb, alpha = _check_inputs(rgb, alpha)
    partial = partial_pixels(alpha)
    if not partial.any():
        return rgb.copy()
    with torch.inference_mode():
        image = _as_tensor(rgb, device)
        matte = _as_tensor(alpha, device)
        out = multilevel(image, matte, _as_tensor(partial, device), settings)
        return out.cpu().numpy()


def _check_inputs(rgb: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rgb = _require_uint8(rgb, "rgb", ndim=3)
    alpha = _require_uint8(alpha, "alpha", ndim=2)
    if rgb.shape[2] != 3:
        raise ValueError(f"rgb must have 3 channels, got shape {rgb.shape}")
    if rgb.shape[:2] != alpha.shape:
        raise ValueError(f"alpha shape {alpha.shape} differs from rgb size {rgb.shape[:2]}")
    if alpha.size == 0:
        raise ValueError(f"cannot estimate the foreground of an empty image (shape {alpha.shape})")
    return rgb, alpha


def _require_uint8(array: np.ndarray, name: str, *, ndim: int) -> np.ndarray:
    check_uint8(array, name, ndim=ndim)
    return np.ascontiguousarray(array)


def _as_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    # torch warns (once per process) about read-only arrays, e.g. np.asarray of a Pillow
    # image; nothing here writes to its inputs, but a copy keeps the warning away.
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).to(device)
