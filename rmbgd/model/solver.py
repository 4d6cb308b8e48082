"""The multi-level foreground solver behind rmbgd.model.refine (whose docstring explains the
method): a pyramid of levels, Jacobi sweeps, and only the border's tiles on the large levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf


@dataclass(frozen=True)
class Settings:
    """The solver's knobs; `refine._DEFAULT` is what `estimate_foreground` uses (tests vary them)."""

    # Levels whose smaller side is at most `coarse_side` cost next to nothing, and there the
    # colours have to travel across the whole image: many sweeps.
    coarse_side: int = 32
    coarse_iterations: int = 10
    fine_iterations: int = 4
    finest_iterations: int = 2
    # Levels up to this many pixels are solved whole; larger ones only in border tiles.
    dense_pixels: int = 256 * 256
    tile: int = 32
    # About 40 MB of temporaries per batch of 32x32 tiles.
    chunk_tiles: int = 128
    regularization: float = 1e-5
    gradient_weight: float = 1.0

    def iterations(self, height: int, width: int, finest: bool) -> int:
        if min(height, width) <= self.coarse_side:
            return self.coarse_iterations
        return self.finest_iterations if finest else self.fine_iterations


def _level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """From 1x1 to (height, width), each side growing about 2x per level."""
    levels = max(1, math.ceil(math.log2(max(height, width))))
    return [(round(height ** (i / levels)), round(width ** (i / levels))) for i in range(levels + 1)]


def _nearest(n_dst: int, n_src: int, device: torch.device) -> torch.Tensor:
    """For each of n_dst positions, the source position nearest to its centre."""
    positions = torch.arange(n_dst, device=device, dtype=torch.int64)
    return ((2 * positions + 1) * n_src) // (2 * n_dst)


def _fold(index: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror positions outside [0, n) back in, repeating the edge pixel (..., 1, 0 | 0, 1, ...).

    A tile's margin beyond the image's edge then holds the mirror image of what is inside,
    and a sweep keeps it so: the edge pixels see their own values as outside neighbours,
    just as with the replicated border that a sweep over the whole level uses.
    """
    m = torch.remainder(index, 2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


class _Dense:
    """A whole level's solution: F and B as (h * w, 6) channels-last rows."""

    def __init__(self, values: torch.Tensor, width: int) -> None:
        self.values = values
        self.width = width

    def grid(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(n, sr) rows x (n, sc) columns -> (n, sr, sc, 6)."""
        flat = (rows * self.width)[:, :, None] + cols[:, None, :]
        return self.values.index_select(0, flat.view(-1)).view(*flat.shape, 6)

    def points(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.values.index_select(0, rows * self.width + cols)


class _Tiled:
    """A level solved in tiles only; elsewhere its values are the coarser level's."""

    def __init__(self, tile_ids, tiles, tile, tiles_across, parent, up_rows, up_cols) -> None:
        self.tile_ids = tile_ids  # (tiles down * tiles across,), -1 for tiles not solved
        self.tiles = tiles  # (solved tiles * tile * tile, 6), rows of each tile in turn
        self.tile = tile
        self.tiles_across = tiles_across
        self.parent = parent
        self.up_rows = up_rows  # this level's rows -> the parent's
        self.up_cols = up_cols

    def grid(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """(n, sr) rows x (n, sc) columns -> (n, sr, sc, 6)."""
        t = self.tile
        # Row and column parts are computed on the small (n, s) arrays and broadcast once.
        where = (rows // t * self.tiles_across)[:, :, None] + (cols // t)[:, None, :]
        ids = self.tile_ids.index_select(0, where.view(-1)).view(where.shape)
        offsets = ((rows % t) * t)[:, :, None] + (cols % t)[:, None, :]
        return self._lookup(
            ids, offsets, lambda: (rows[:, :, None].expand_as(ids), cols[:, None, :].expand_as(ids))
        )

    def points(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        t = self.tile
        ids = self.tile_ids.index_select(0, rows // t * self.tiles_across + cols // t)
        return self._lookup(ids, (rows % t) * t + cols % t, lambda: (rows, cols))

    def _lookup(self, ids: torch.Tensor, offsets: torch.Tensor, coords: Callable) -> torch.Tensor:
        t = self.tile
        missing = ids < 0
        if self.tiles.shape[0] == 0:
            # The level's nearest-neighbour samples missed every soft pixel (thin strands).
            values = torch.empty((*ids.shape, 6), dtype=self.tiles.dtype, device=self.tiles.device)
        else:
            flat = ids.clamp(min=0) * (t * t) + offsets
            values = self.tiles.index_select(0, flat.view(-1)).view(*ids.shape, 6)
        # Usually every pixel asked for lies in a solved tile: the finer level's tiles are
        # near the border too.
        if bool(missing.any()):
            rows, cols = coords()
            values[missing] = self.parent.points(self.up_rows[rows[missing]], self.up_cols[cols[missing]])
        return values


class _Level:
    """One pyramid level: what its solver reads, and the sweeps themselves."""

    def __init__(self, image, matte, size, state, prev_size, iterations, settings) -> None:
        height, width = matte.shape
        device = image.device
        self.image = image.view(-1, 3)
        self.matte = matte.view(-1)
        self.width = width
        self.size = size
        # Nearest-neighbour sampling, as in the paper: cheap, and a level only has to be good
        # enough to start the next one.
        self.rows = _nearest(size[0], height, device)
        self.cols = _nearest(size[1], width, device)
        self.up_rows = _nearest(size[0], prev_size[0], device)
        self.up_cols = _nearest(size[1], prev_size[1], device)
        self.state = state
        self.iterations = iterations
        self.settings = settings

    def alpha(self) -> torch.Tensor:
        return self.matte.view(-1, self.width).index_select(0, self.rows).index_select(1, self.cols)

    def solve(self, rr: torch.Tensor, cc: torch.Tensor):
        """Sweeps over the (n, sr) x (n, sc) blocks of level pixels whose rows and columns are given.

        The blocks' outermost ring of pixels is their fixed boundary. Returns the input colour
        (n, sr, sc, 3) and alpha (n, sr, sc) as uint8, and F and B (n, 6, sr - 2, sc - 2).
        """
        flat = ((self.rows[rr] * self.width)[:, :, None] + self.cols[cc][:, None, :]).view(-1)
        shape = (rr.shape[0], rr.shape[1], cc.shape[1])
        colour = self.image.index_select(0, flat).view(*shape, 3)
        alpha = self.matte.index_select(0, flat).view(shape)
        colour_f = _to_float(colour.permute(0, 3, 1, 2))
        if self.state is None:
            # The 1x1 level: F and B both start as the photo's colour.
            init = colour_f.repeat(1, 2, 1, 1)
        else:
            init = self.state.grid(self.up_rows[rr], self.up_cols[cc]).permute(0, 3, 1, 2).contiguous()
        fb = _relax(colour_f, _to_float(alpha[:, None]), init, self.iterations, self.settings)
        return colour, alpha, fb


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def multilevel(image: torch.Tensor, matte: torch.Tensor, partial: torch.Tensor, s: Settings) -> torch.Tensor:
    sizes = _level_sizes(*matte.shape)
    state = None
    prev_size = (1, 1)
    for size in sizes[:-1]:
        level = _Level(image, matte, size, state, prev_size, s.iterations(*size, False), s)
        state = _dense_level(level) if size[0] * size[1] <= s.dense_pixels else _tiled_level(level)
        prev_size = size
    level = _Level(image, matte, sizes[-1], state, prev_size, s.iterations(*sizes[-1], True), s)
    return _finest_level(level, partial)


def _dense_level(level: _Level) -> _Dense:
    h, w = level.size
    device = level.image.device
    rr = _fold(torch.arange(-1, h + 1, device=device), h)[None]
    cc = _fold(torch.arange(-1, w + 1, device=device), w)[None]
    _, _, fb = level.solve(rr, cc)
    return _Dense(fb[0].reshape(6, -1).T.contiguous(), w)


def _select_tiles(partial: torch.Tensor, t: int):
    """Tiles holding a pixel with 0 < alpha < 255: (rows, columns) of the tiles, tile ids, tiles across."""
    h, w = partial.shape
    down, across = -(-h // t), -(-w // t)
    padded = nnf.pad(partial[None].to(torch.uint8), (0, across * t - w, 0, down * t - h))[0]
    chosen = padded.view(down, t, across, t).amax(dim=(1, 3)).nonzero()
    ids = torch.full((down * across,), -1, dtype=torch.int64, device=partial.device)
    ids[chosen[:, 0] * across + chosen[:, 1]] = torch.arange(chosen.shape[0], device=partial.device)
    return chosen[:, 0], chosen[:, 1], ids, across


def _chunks(
    level: _Level, ty: torch.Tensor, tx: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Batches of tiles: (which tiles, rows, columns), with margins, for `_Level.solve`."""
    h, w = level.size
    t = level.settings.tile
    # One pixel per sweep keeps the inside exact; one more is the fixed boundary ring.
    margin = level.iterations + 1
    span = torch.arange(-margin, t + margin, device=ty.device)
    for start in range(0, ty.numel(), level.settings.chunk_tiles):
        part = slice(start, start + level.settings.chunk_tiles)
        yield part, _fold(ty[part, None] * t + span, h), _fold(tx[part, None] * t + span, w)


def _tiled_level(level: _Level) -> _Tiled:
    t = level.settings.tile
    ty, tx, ids, across = _select_tiles(partial_pixels(level.alpha()), t)
    halo = level.iterations
    tiles = torch.empty((ty.numel(), t, t, 6), dtype=torch.float32, device=ty.device)
    for part, rr, cc in _chunks(level, ty, tx):
        _, _, fb = level.solve(rr, cc)
        tiles[part] = fb[..., halo : halo + t, halo : halo + t].permute(0, 2, 3, 1)
    return _Tiled(ids, tiles.view(-1, 6), t, across, level.state, level.up_rows, level.up_cols)


def _finest_level(level: _Level, partial: torch.Tensor) -> torch.Tensor:
    height, width = level.size
    device = level.image.device
    t = level.settings.tile
    ty, tx, _, _ = _select_tiles(partial, t)
    halo = level.iterations
    m = halo + 1
    # One spare pixel at the end takes the writes of tile pixels beyond the image's edge.
    out = torch.empty((height * width + 1, 3), dtype=torch.uint8, device=device)
    out[:-1] = level.image
    inner = torch.arange(t, device=device)
    for part, rr, cc in _chunks(level, ty, tx):
        colour, alpha, fb = level.solve(rr, cc)
        estimate = fb[:, :3, halo : halo + t, halo : halo + t].permute(0, 2, 3, 1).mul(255).round_()
        estimate = estimate.to(torch.uint8)
        keep = partial_pixels(alpha[:, m : m + t, m : m + t])[..., None]
        values = torch.where(keep, estimate, colour[:, m : m + t, m : m + t])
        y = ty[part, None] * t + inner
        x = tx[part, None] * t + inner
        positions = (y * width)[:, :, None] + x[:, None, :]
        beyond = (y >= height)[:, :, None] | (x >= width)[:, None, :]
        positions.masked_fill_(beyond, height * width)
        out.index_copy_(0, positions.view(-1), values.reshape(-1, 3))
    return out[:-1].view(height, width, 3)


def _relax(
    colour: torch.Tensor, alpha: torch.Tensor, state: torch.Tensor, iterations: int, s: Settings
) -> torch.Tensor:
    """Jacobi sweeps on (n, c, h, w) blocks whose outermost ring of pixels is the boundary.

    colour (n, 3, h, w) and alpha (n, 1, h, w) in [0, 1], state (n, 6, h, w): F then B, the
    starting guess, which is then used as scratch space. Returns F and B inside the ring,
    (n, 6, h - 2, w - 2).

    Each plane is handled as one flat row so that a neighbour is a fixed offset away (1 for
    left/right, w for up/down) and every operation runs over long contiguous stretches:
    slicing 34-pixel tile rows made the elementwise work several times slower. The flat
    stretch also covers the ring's left and right columns, whose results are garbage (their
    "neighbours" wrap to the next row) until the ring is restored after each sweep.
    """
    n, _, height, width = state.shape
    plane = height * width
    first = width + 1
    length = plane - 2 * first
    eps, omega = s.regularization, s.gradient_weight

    def core(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return t[..., first + offset : first + offset + length]

    flat_alpha = alpha.reshape(n, 1, plane)
    a = core(flat_alpha)
    weights = [core(flat_alpha, d).sub(a).abs_().mul_(omega).add_(eps) for d in (-1, 1, -width, width)]
    total = weights[0] + weights[1] + weights[2] + weights[3]
    # Per pixel, with W the sum of the weights and S_F, S_B the weighted sums of the
    # neighbours' F and B, the minimum is where
    #   [a^2 + W, a(1-a); a(1-a), (1-a)^2 + W] [F; B] = [a*I + S_F; (1-a)*I + S_B].
    # Solved with the inverse written out so that the O(1) terms cancel on paper, not in
    # float32: det = W * (a^2 + (1-a)^2 + W) > 0, and
    #   F = (W*a*I + ((1-a)^2 + W)*S_F - a*(1-a)*S_B) / det, B likewise.
    # (Computing det as a product minus a product lost a level of 8-bit colour where W is tiny.)
    b = 1 - a
    det = (a * a).addcmul_(b, b).add_(total).mul_(total)
    inverse = det.reciprocal_()
    mixed = (a * b).mul_(inverse)
    keep_f = (b * b).add_(total).mul_(inverse)
    keep_b = (a * a).add_(total).mul_(inverse)
    data = torch.empty((n, 6, length), dtype=torch.float32, device=state.device)
    rgb = core(colour.reshape(n, 3, plane))
    w_over_det = total * inverse
    torch.mul(rgb, a * w_over_det, out=data[:, :3])
    torch.mul(rgb, b * w_over_det, out=data[:, 3:])

    x = state.reshape(n, 6, plane)
    # Every element of `new` is written before it is read: the core by the update, the ring after it.
    new = torch.empty_like(x)
    acc = torch.empty_like(data)
    sum_f, sum_b = acc[:, :3], acc[:, 3:]
    for _ in range(iterations):
        torch.mul(weights[0], core(x, -1), out=acc)
        acc.addcmul_(weights[1], core(x, 1))
        acc.addcmul_(weights[2], core(x, -width))
        acc.addcmul_(weights[3], core(x, width))
        inside = core(new)
        f, g = inside[:, :3], inside[:, 3:]
        torch.addcmul(data[:, :3], keep_f, sum_f, out=f)
        f.addcmul_(mixed, sum_b, value=-1)
        torch.addcmul(data[:, 3:], keep_b, sum_b, out=g)
        g.addcmul_(mixed, sum_f, value=-1)
        inside.clamp_(0, 1)
        grid = new.view(n, 6, height, width)
        grid[..., 0, :] = grid[..., 1, :]
        grid[..., -1, :] = grid[..., -2, :]
        grid[..., :, 0] = grid[..., :, 1]
        grid[..., :, -1] = grid[..., :, -2]
        x, new = new, x
    return x.view(n, 6, height, width)[..., 1:-1, 1:-1]


def partial_pixels(alpha):
    """0 < alpha < 255, for numpy arrays and torch tensors alike."""
    # uint8 subtraction wraps 0 around to 255: one subtraction and one comparison.
    return (alpha - 1) < 254
