"""Mask-aware averaging: every coordinate over the clients that kept it, nothing else touched."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregation import masked_average

SHAPE = (3, 4)
floats = arrays(np.float32, SHAPE, elements=st.floats(-100, 100, width=32))
masks = arrays(np.bool_, SHAPE)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(floats, masks, st.integers(1, 1000)), min_size=1, max_size=5), floats)
def test_each_coordinate_is_the_weighted_mean_of_the_clients_that_kept_it(clients, previous):
    out = masked_average([{"w": a} for a, _, _ in clients], [{"w": m} for _, m, _ in clients],
                         [n for _, _, n in clients], {"w": previous})["w"]
    assert out.dtype == np.float32
    for idx in np.ndindex(SHAPE):
        kept = [(a[idx], n) for a, m, n in clients if m[idx]]
        if not kept:
            assert out[idx] == previous[idx]
        else:
            expected = sum(float(v) * n for v, n in kept) / sum(n for _, n in kept)
            assert np.isclose(out[idx], expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(floats, st.integers(1, 50)), min_size=1, max_size=4), floats)
def test_without_masks_it_is_fedavg(clients, previous):
    out = masked_average([{"w": a} for a, _ in clients], [{} for _ in clients], [n for _, n in clients],
                         {"w": previous})["w"]
    expected = sum(a.astype(np.float64) * n for a, n in clients) / sum(n for _, n in clients)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(floats, st.booleans(), st.integers(1, 9)), min_size=1, max_size=4), floats)
def test_a_key_nobody_sent_keeps_its_value_and_partial_senders_average(clients, previous):
    sent = [({"w": a} if has else {}, n) for a, has, n in clients]
    out = masked_average([s for s, _ in sent], [{} for _ in sent], [n for _, n in sent],
                         {"w": previous, "other": previous})
    np.testing.assert_array_equal(out["other"], previous)
    senders = [(a, n) for a, has, n in clients if has]
    if not senders:
        np.testing.assert_array_equal(out["w"], previous)
    else:
        expected = sum(a.astype(np.float64) * n for a, n in senders) / sum(n for _, n in senders)
        np.testing.assert_allclose(out["w"], expected, rtol=1e-5, atol=1e-4)


def test_integer_buffers_keep_their_dtype():
    out = masked_average([{"n": np.array(3, np.int64)}, {"n": np.array(6, np.int64)}], [{}, {}], [1, 2],
                         {"n": np.array(0, np.int64)})
    assert out["n"].dtype == np.int64 and int(out["n"]) == 5
