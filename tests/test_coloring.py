"""Colourings for compressed Jacobians and Hessians, checked by independent checkers.

The checkers below work from the definitions (no library code): bipartite
(no two same-coloured columns share a row), star (distance-1, and every path on
four vertices uses at least three colours) and acyclic (distance-1, and every
two-coloured subgraph is a forest).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jacobians import _compat
from jacobians._sparse import coloring as _coloring

color_columns, color_rows, color_symmetric = _coloring.color_columns, _coloring.color_rows, _coloring.color_symmetric
SymmetricDecompression = _coloring.SymmetricDecompression

# ---------------------------------------------------------------- patterns


def banded(n, b):
    """``|i - j| <= b``."""
    i, j = np.nonzero(np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= b)
    return i, j


def stencil_2d(k):
    """The 5-point Laplacian on a k x k grid (row i couples grid neighbours of i)."""
    idx = np.arange(k * k).reshape(k, k)
    rows, cols = [idx.ravel()], [idx.ravel()]
    for a, b in ((idx[1:], idx[:-1]), (idx[:-1], idx[1:]), (idx[:, 1:], idx[:, :-1]), (idx[:, :-1], idx[:, 1:])):
        rows.append(a.ravel())
        cols.append(b.ravel())
    return np.concatenate(rows), np.concatenate(cols)


def arrowhead(n):
    """Dense first row and column plus the diagonal."""
    i = np.arange(n)
    return np.concatenate([i, np.zeros(n - 1, int), i[1:]]), np.concatenate([i, i[1:], np.zeros(n - 1, int)])


def random_pattern(rng, m, n, density):
    mask = rng.random((m, n)) < density
    return np.nonzero(mask)


def random_symmetric(rng, n, density, diagonal=True):
    mask = rng.random((n, n)) < density
    mask = mask | mask.T
    np.fill_diagonal(mask, diagonal)
    return np.nonzero(mask)


# ---------------------------------------------------------------- independent checkers


def check_bipartite(rows, cols, colors):
    """No row holds two distinct columns of one colour."""
    pairs = set(zip(rows.tolist(), cols.tolist()))
    seen = {}
    for r, c in pairs:
        key = (r, int(colors[c]))
        assert seen.setdefault(key, c) == c, f"row {r}: columns {seen[key]} and {c} share colour {key[1]}"


def _neighbours(rows, cols, n):
    nbr = [set() for _ in range(n)]
    for r, c in zip(rows.tolist(), cols.tolist()):
        if r != c:
            nbr[r].add(c)
            nbr[c].add(r)
    return nbr


def check_distance1(nbr, colors):
    for v, ws in enumerate(nbr):
        for w in ws:
            assert colors[v] != colors[w], f"neighbours {v}, {w} share colour {colors[v]}"


def check_star(rows, cols, n, colors):
    """Distance-1, and no path v-w-x-y on four vertices with two colours."""
    nbr = _neighbours(rows, cols, n)
    check_distance1(nbr, colors)
    for w in range(n):
        for x in nbr[w]:
            for v in nbr[w] - {x}:
                if colors[v] != colors[x]:
                    continue
                for y in nbr[x] - {w, v}:
                    assert colors[y] != colors[w], f"two-coloured path {v}-{w}-{x}-{y}"


def check_acyclic(rows, cols, n, colors):
    """Distance-1, and every two-coloured subgraph is a forest (union-find per colour pair)."""
    nbr = _neighbours(rows, cols, n)
    check_distance1(nbr, colors)
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for v in range(n):
        for w in nbr[v]:
            if v < w:
                pair = (min(colors[v], colors[w]), max(colors[v], colors[w]))
                a, b = find((pair, v)), find((pair, w))
                assert a != b, f"two-coloured cycle through edge {v}-{w} (colours {pair})"
                parent[a] = b


def n_colors(colors):
    return int(colors.max()) + 1 if colors.size else 0


# ---------------------------------------------------------------- bipartite (Jacobian) colourings

STRUCTURED = {
    "stencil_1d": (*banded(40, 1), 40, 40),
    "banded_3": (*banded(60, 3), 60, 60),
    "stencil_2d": (*stencil_2d(12), 144, 144),
    "arrowhead": (*arrowhead(30), 30, 30),
    "dense": (*np.nonzero(np.ones((17, 23))), 17, 23),
    "diagonal": (np.arange(25), np.arange(25), 25, 25),
    "one_entry": (np.array([3]), np.array([5]), 4, 7),
    "dense_column": (
        np.concatenate([np.arange(50), np.arange(50)]),
        np.concatenate([np.zeros(50, int), np.arange(50)]),
        50,
        50,
    ),
    "dense_row": (
        np.concatenate([np.zeros(50, int), np.arange(50)]),
        np.concatenate([np.arange(50), np.arange(50)]),
        50,
        50,
    ),
}


@pytest.mark.parametrize("name", STRUCTURED)
def test_structured_column_and_row_colourings_are_valid(name):
    rows, cols, m, n = STRUCTURED[name]
    col_colors = color_columns(rows, cols, n)
    assert col_colors.shape == (n,) and col_colors.dtype == np.int64
    check_bipartite(rows, cols, col_colors)
    row_colors = color_rows(rows, cols, m)
    assert row_colors.shape == (m,)
    check_bipartite(cols, rows, row_colors)
    # Colours are 0 .. c - 1 and the longest row is a lower bound.
    assert set(np.unique(col_colors[np.unique(cols)])) == set(range(n_colors(col_colors)))
    distinct_rows = np.unique(np.stack([rows, cols]), axis=1)[0]
    assert n_colors(col_colors) >= np.bincount(distinct_rows).max()


@pytest.mark.parametrize(
    "name, expected_cols, expected_rows",
    [
        ("stencil_1d", 3, 3),
        ("banded_3", 7, 7),
        ("arrowhead", 30, 30),
        ("dense", 23, 17),
        ("diagonal", 1, 1),
        ("one_entry", 1, 1),
        ("dense_column", 2, 50),
        ("dense_row", 50, 2),
    ],
)
def test_colour_counts_on_structured_patterns(name, expected_cols, expected_rows):
    rows, cols, m, n = STRUCTURED[name]
    assert n_colors(color_columns(rows, cols, n)) == expected_cols
    assert n_colors(color_rows(rows, cols, m)) == expected_rows


@pytest.mark.parametrize("k", [5, 10, 23])
def test_2d_stencil_needs_at_most_five_colours(k):
    rows, cols = stencil_2d(k)
    colors = color_columns(rows, cols, k * k)
    check_bipartite(rows, cols, colors)
    assert n_colors(colors) <= 5  # the optimum (greedy orders get 7)


def test_banded_reaches_the_bound():
    for b in (1, 2, 5):
        rows, cols = banded(300, b)
        assert n_colors(color_columns(rows, cols, 300)) == 2 * b + 1


def test_empty_pattern_and_empty_columns():
    assert np.array_equal(color_columns(np.zeros(0, int), np.zeros(0, int), 6), np.zeros(6))
    assert color_columns(np.zeros(0, int), np.zeros(0, int), 0).shape == (0,)
    colors = color_columns(np.array([0, 0, 1]), np.array([1, 3, 3]), 6)  # columns 0, 2, 4, 5 empty
    assert colors[[0, 2, 4, 5]].tolist() == [0, 0, 0, 0]
    check_bipartite(np.array([0, 0, 1]), np.array([1, 3, 3]), colors)


def test_repeated_entries_are_harmless():
    rows, cols = banded(20, 1)
    colors = color_columns(np.concatenate([rows, rows]), np.concatenate([cols, cols]), 20)
    assert n_colors(colors) == 3


def test_out_of_range_entry_is_rejected():
    with pytest.raises(ValueError):
        color_columns(np.array([0]), np.array([5]), 3)


def test_many_colours_need_more_mask_words():
    # A 70-column dense block (70 colours: more than one 32-bit word) beside a sparse part.
    rows, cols = np.nonzero(np.ones((3, 70)))
    rows2, cols2 = banded(100, 2)
    rows = np.concatenate([rows, rows2 + 3])
    cols = np.concatenate([cols, cols2])
    colors = color_columns(rows, cols, 100)
    check_bipartite(rows, cols, colors)
    assert n_colors(colors) == 70


def test_colour_count_past_the_first_mask_word():
    # Rows of length 2 joining every pair of 40 columns: the longest row says 2, the answer is 40,
    # so the greedy pass outgrows its first 32-colour mask and DSATUR cannot do better.
    i, j = np.triu_indices(40, 1)
    rows = np.repeat(np.arange(i.size), 2)
    cols = np.stack([i, j], axis=1).ravel()
    colors = color_columns(rows, cols, 40)
    check_bipartite(rows, cols, colors)
    assert n_colors(colors) == 40


def test_too_many_colours_to_track_falls_back_to_one_colour_each(monkeypatch):

    monkeypatch.setattr(_coloring, "_MASK_WORDS_MAX", 0)
    rows, cols = banded(30, 2)
    colors = color_columns(rows, np.where(cols == 7, 9, cols), 30)  # column 7 left empty
    check_bipartite(rows, np.where(cols == 7, 9, cols), colors)
    assert colors[7] == 0 and n_colors(colors) == 29


def test_dsatur_across_blocks(monkeypatch):
    # Big patterns are coloured block by block; shrink the block so that a small grid spans three.
    from jacobians._sparse.coloring import dsatur as _coloring_dsatur

    monkeypatch.setattr(_coloring_dsatur, "BLOCK", 1024)
    rows, cols = stencil_2d(50)
    colors = color_columns(rows, cols, 2500)
    check_bipartite(rows, cols, colors)
    assert n_colors(colors) <= 5


def test_host_and_compiled_greedy_passes_agree(monkeypatch):
    # Few columns are coloured on the host, many by the compiled loop: the same greedy pass, the same colours.
    from jacobians._sparse.coloring import greedy

    rows, cols = stencil_2d(12)
    on_host = color_columns(rows, cols, 144)
    monkeypatch.setattr(greedy, "HOST_MAX", 0)
    compiled = color_columns(rows, cols, 144)
    np.testing.assert_array_equal(on_host, compiled)
    check_bipartite(rows, cols, compiled)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_and_compiled_dsatur_agree(monkeypatch, seed):
    # Small patterns run DSATUR on the host, large ones in the compiled loop: the same choices, the same colours.
    from jacobians._sparse.coloring import _conflict_degree, dsatur
    from jacobians._sparse.coloring.graph import structure

    rng = np.random.default_rng(seed)
    patterns = [stencil_2d(9 + seed), random_pattern(rng, 60, 45, 0.06)]
    for rows, cols in patterns:
        n = int(np.max(cols)) + 1
        s = structure(rows, cols, int(np.max(rows)) + 1, n)
        degree = _conflict_degree(s)
        on_host = dsatur.dsatur_columns(s, degree, 64)
        used = int(on_host.max()) + 1
        # Fewer than limit colours: at limit = the colours it uses, and below, both give up.
        for tight in (used, used - 1):
            assert dsatur.dsatur_columns(s, degree, tight) is None
        monkeypatch.setattr(dsatur, "HOST_MAX", 0)
        compiled = dsatur.dsatur_columns(s, degree, 64)
        for tight in (used, used - 1):
            assert dsatur.dsatur_columns(s, degree, tight) is None
        np.testing.assert_array_equal(dsatur.dsatur_columns(s, degree, used + 1), compiled)
        monkeypatch.undo()
        np.testing.assert_array_equal(dsatur.dsatur_columns(s, degree, used + 1), on_host)
        np.testing.assert_array_equal(on_host, compiled)
        check_bipartite(rows, cols, on_host)


@pytest.mark.parametrize("host_max", [0, None])
def test_colouring_inside_a_jit_trace(monkeypatch, host_max):
    # sparse_jacobian plans while the user's function is traced: the loops must still run eagerly.
    from jacobians._sparse.coloring import dsatur, greedy

    if host_max is not None:
        monkeypatch.setattr(greedy, "HOST_MAX", host_max)
        monkeypatch.setattr(dsatur, "HOST_MAX", host_max)
    rows, cols = stencil_2d(6)

    @jax.jit
    def f(x):
        colors = color_columns(rows, cols, 36)
        return x + n_colors(colors)

    assert float(f(jnp.zeros(()))) <= 5


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), density=st.floats(0.0, 0.6), seed=st.integers(0, 2**32 - 1))
def test_random_bipartite_colourings_are_valid(m, n, density, seed):
    rows, cols = random_pattern(np.random.default_rng(seed), m, n, density)
    colors = color_columns(rows, cols, n)
    assert colors.shape == (n,)
    check_bipartite(rows, cols, colors)
    check_bipartite(cols, rows, color_rows(rows, cols, m))


# ---------------------------------------------------------------- symmetric (Hessian) colourings

SYMMETRIC = {
    "tridiagonal": (*banded(50, 1), 50),
    "banded_2": (*banded(60, 2), 60),
    "banded_3": (*banded(60, 3), 60),
    "banded_4": (*banded(60, 4), 60),
    "banded_5": (*banded(60, 5), 60),
    "laplacian_2d": (*stencil_2d(10), 100),
    "arrowhead": (*arrowhead(40), 40),
    "dense": (*np.nonzero(np.ones((9, 9))), 9),
    "diagonal": (np.arange(12), np.arange(12), 12),
    "one_edge": (np.array([1, 4]), np.array([4, 1]), 6),
    "empty": (np.zeros(0, int), np.zeros(0, int), 5),
    "no_diagonal_path": (np.arange(1, 30), np.arange(29), 30),  # one triangle only, no diagonal
}

# Most colours allowed: asdex's star colouring uses 2b+1 on bandwidth b, 5 on the 2-D Laplacian, 2 on the arrowhead.
STAR_MAX = {
    "tridiagonal": 3,
    "banded_2": 5,
    "banded_3": 7,
    "banded_4": 9,
    "banded_5": 11,
    "laplacian_2d": 5,
    "arrowhead": 2,
    "dense": 9,
    "diagonal": 1,
    "one_edge": 2,
    "empty": 1,
    "no_diagonal_path": 3,
}
ACYCLIC_MAX = {
    "tridiagonal": 2,
    "banded_2": 3,
    "banded_3": 4,
    "banded_4": 5,
    "banded_5": 6,
    "laplacian_2d": 4,
    "arrowhead": 2,
    "dense": 9,
    "diagonal": 1,
    "one_edge": 2,
    "empty": 1,
    "no_diagonal_path": 2,
}


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_colourings_are_valid_and_small(name):
    rows, cols, n = SYMMETRIC[name]
    star = color_symmetric(rows, cols, n, "star")
    acyclic = color_symmetric(rows, cols, n, method="acyclic")
    assert star.shape == acyclic.shape == (n,)
    check_star(rows, cols, n, star)
    check_acyclic(rows, cols, n, acyclic)
    assert n_colors(star) <= STAR_MAX[name]
    assert n_colors(acyclic) <= ACYCLIC_MAX[name]


def test_exact_counts_on_the_classic_cases():
    rows, cols = banded(30, 1)
    assert n_colors(color_symmetric(rows, cols, 30, "star")) == 3
    assert n_colors(color_symmetric(rows, cols, 30, "acyclic")) == 2
    rows, cols = arrowhead(30)
    assert n_colors(color_symmetric(rows, cols, 30, "star")) == 2


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError):
        color_symmetric(np.array([0]), np.array([1]), 2, method="distance-2")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 30), density=st.floats(0.0, 0.5), seed=st.integers(0, 2**32 - 1))
def test_random_symmetric_colourings_are_valid(n, density, seed):
    rows, cols = random_symmetric(np.random.default_rng(seed), n, density)
    check_star(rows, cols, n, color_symmetric(rows, cols, n, "star"))
    check_acyclic(rows, cols, n, color_symmetric(rows, cols, n, "acyclic"))


# ---------------------------------------------------------------- decompression round trips


def random_hessian(rng, rows, cols, n):
    """A dense symmetric matrix whose nonzeros are the pattern's (mirrored)."""
    H = np.zeros((n, n))
    H[rows, cols] = rng.standard_normal(rows.size)
    return H + H.T


def round_trip(rng, rows, cols, n, method, jit):
    H = random_hessian(rng, rows, cols, n)
    colors = color_symmetric(rows, cols, n, method)
    dec = _coloring.symmetric_decompression(rows, cols, colors, method)
    assert dec.n_colors == n_colors(colors) and dec.n == n
    S = dec.seeds()  # (c, n)
    assert np.array_equal(S.sum(axis=0), np.ones(n))
    compressed = (H @ S.T).T  # compressed[k] = H @ s_k
    fn = jax.jit(dec) if jit else dec
    values = np.asarray(fn(jnp.asarray(compressed)))
    assert values.shape == rows.shape
    np.testing.assert_allclose(values, H[rows, cols], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["star", "acyclic"])
@pytest.mark.parametrize("name", SYMMETRIC)
def test_decompression_recovers_every_entry(rng, name, method):
    rows, cols, n = SYMMETRIC[name]
    round_trip(rng, rows, cols, n, method, jit=False)


@pytest.mark.parametrize("method", ["star", "acyclic"])
@pytest.mark.parametrize("name", ["tridiagonal", "laplacian_2d", "arrowhead", "banded_4"])
def test_decompression_under_jit(rng, name, method):
    rows, cols, n = SYMMETRIC[name]
    round_trip(rng, rows, cols, n, method, jit=True)


@settings(max_examples=20, deadline=None)  # each new shape compiles the decompression: keep it short
@given(n=st.integers(1, 25), density=st.floats(0.0, 0.5), diagonal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_round_trips(n, density, diagonal, seed):
    rng = np.random.default_rng(seed)
    rows, cols = random_symmetric(rng, n, density, diagonal)
    for method in ("star", "acyclic"):
        round_trip(rng, rows, cols, n, method, jit=False)


def test_decompression_of_some_entries_in_any_order(rng):
    rows, cols = banded(40, 2)
    H = random_hessian(rng, rows, cols, 40)
    colors = color_symmetric(rows, cols, 40, "acyclic")
    lower = rows >= cols
    pick = rng.permutation(np.flatnonzero(lower))
    dec = SymmetricDecompression(rows[pick], cols[pick], colors, "acyclic")  # one triangle, shuffled
    compressed = (H @ dec.seeds().T).T
    np.testing.assert_allclose(np.asarray(dec(compressed)), H[rows[pick], cols[pick]], rtol=0, atol=1e-12)


def primitives(jaxpr):
    """Primitive names of a jaxpr, nested jaxprs included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in _compat.jaxprs_in_params(eqn.params):
            names += primitives(sub)
    return names


def count_eqns(jaxpr):
    return len(primitives(jaxpr))


def test_substitution_does_not_unroll_long_trees():
    # Tridiagonal, 2 colours: one two-coloured path through all 3000 vertices.
    n = 3000
    rows, cols = banded(n, 1)
    dec = SymmetricDecompression(rows, cols, color_symmetric(rows, cols, n, "acyclic"), "acyclic")
    assert dec.n_colors == 2
    assert count_eqns(jax.make_jaxpr(dec)(jnp.zeros((2, n))).jaxpr) < 60


def test_star_decompression_is_one_gather():
    rows, cols = stencil_2d(8)
    dec = SymmetricDecompression(rows, cols, color_symmetric(rows, cols, 64, "star"), "star")
    assert primitives(jax.make_jaxpr(dec)(jnp.zeros((dec.n_colors, 64))).jaxpr).count("gather") == 1


def test_wrong_colourings_are_rejected():
    rows, cols = banded(10, 1)
    with pytest.raises(ValueError, match="distance-1"):
        SymmetricDecompression(rows, cols, np.zeros(10, int), "star")
    two = np.arange(10) % 2  # a proper acyclic colouring of the path, but not a star colouring
    with pytest.raises(ValueError, match="star"):
        SymmetricDecompression(rows, cols, two, "star")
    SymmetricDecompression(rows, cols, two, "acyclic")
    ring_r = np.arange(6)
    ring_c = (ring_r + 1) % 6  # a 6-cycle coloured 0,1,0,1,0,1: a two-coloured cycle
    with pytest.raises(ValueError, match="acyclic"):
        SymmetricDecompression(ring_r, ring_c, np.arange(6) % 2, "acyclic")


def test_compressed_shape_is_checked():
    rows, cols = banded(5, 1)
    dec = SymmetricDecompression(rows, cols, color_symmetric(rows, cols, 5), "star")
    with pytest.raises(ValueError, match="shape"):
        dec(jnp.zeros((dec.n_colors + 1, 5)))


def test_complex_and_float32_values(rng):
    rows, cols = banded(20, 2)
    colors = color_symmetric(rows, cols, 20, "acyclic")
    dec = SymmetricDecompression(rows, cols, colors, "acyclic")
    H = random_hessian(rng, rows, cols, 20)
    H = H + 1j * random_hessian(rng, rows, cols, 20)
    compressed = (H @ dec.seeds().T).T
    np.testing.assert_allclose(np.asarray(dec(jnp.asarray(compressed))), H[rows, cols], atol=1e-12)
    out32 = dec(jnp.asarray(compressed.real, jnp.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), H.real[rows, cols], atol=1e-4)


def test_all_pairs_checker_agrees_with_definition():
    # The star checker's P4 test against a brute-force search on a tiny graph.
    rows, cols = stencil_2d(3)
    nbr = _neighbours(rows, cols, 9)
    colors = color_symmetric(rows, cols, 9, "star")
    for v, w, x, y in itertools.permutations(range(9), 4):
        if w in nbr[v] and x in nbr[w] and y in nbr[x]:
            assert len({colors[v], colors[w], colors[x], colors[y]}) >= 3
