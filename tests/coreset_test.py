"""Coreset selection (adjax.coreset) against a brute-force greedy k-center."""
import jax
import numpy as np
import pytest

from adjax import coreset
from adjax.common import sharding


def brute_force(features, count, start, proj=None):
  """Greedy k-center written out in numpy: from `start`, repeatedly the point
  farthest (squared Euclidean, after `proj`) from the chosen ones."""
  z = np.asarray(features, np.float32)
  if proj is not None:
    z = (z @ proj).astype(np.float32)
  chosen = [int(start)]
  for _ in range(count - 1):
    d = np.array([min(float(np.sum(np.square(z[i] - z[c]))) for c in chosen)
                  for i in range(len(z))], np.float32)
    chosen.append(int(np.argmax(d)))
  return np.asarray(chosen)


def _features(n, d, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("n,d,count,seed", [(57, 16, 9, 0), (200, 300, 25, 3), (64, 200, 64, 1)])
def test_select_equals_brute_force(n, d, count, seed):
  x = _features(n, d, seed)
  proj = coreset.projection(d, seed)
  assert (proj is None) == (d <= coreset.PROJECTION_DIM)
  got = coreset.select(x, count, seed=seed, block=23)
  want = brute_force(x, count, coreset.start_index(n, seed), proj)
  np.testing.assert_array_equal(got, want)
  assert len(set(got.tolist())) == count      # k-center never picks a point twice


def test_select_sharded_equals_single_device():
  x = _features(203, 40, 5)                   # 203: not a multiple of the 4 devices
  mesh = sharding.make_mesh(4, 1, jax.devices()[:4])
  one = coreset.select(x, 30, seed=2)
  np.testing.assert_array_equal(coreset.select(x, 30, seed=2, mesh=mesh), one)
  np.testing.assert_array_equal(one, brute_force(x, 30, coreset.start_index(203, 2)))


def test_select_ties_go_to_the_lowest_index_on_every_device_count():
  # Points in duplicated pairs: each farthest distance is held twice.
  base = _features(20, 8, 7)
  x = np.concatenate([base, base])
  want = brute_force(x, 12, coreset.start_index(40, 0))
  mesh = sharding.make_mesh(4, 1, jax.devices()[:4])
  np.testing.assert_array_equal(coreset.select(x, 12, seed=0), want)
  np.testing.assert_array_equal(coreset.select(x, 12, seed=0, mesh=mesh), want)


def test_seed_decides_and_repeats():
  x = _features(300, 64, 0)
  a = coreset.select(x, 20, seed=0)
  np.testing.assert_array_equal(coreset.select(x, 20, seed=0), a)
  assert not np.array_equal(coreset.select(x, 20, seed=1), a)


def test_coreset_size():
  assert coreset.coreset_size(1000, 0) == 1000
  assert coreset.coreset_size(1000, 0.1) == 100
  assert coreset.coreset_size(1000, 1.0) == 1000
  assert coreset.coreset_size(10, 0.01) == 1
  assert coreset.coreset_size(1000, 250) == 250
  assert coreset.coreset_size(100, 250) == 100
  for bad in (-0.5, 2.5, float("nan")):
    with pytest.raises(ValueError, match="coreset"):
      coreset.coreset_size(10, bad)
