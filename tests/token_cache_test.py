"""The raw-token cache (adjax.workdir.token_cache): filled once, published,
checked on open, read by rows; the neighbour modes read it instead of
running the backbone again."""

import json

import numpy as np
import pytest

from adjax.workdir import token_cache
from demo_run import small_config


def _fill(tmp_path, n=6, layers=2, p=4, d=3, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(layers, n, p, d)).astype(np.float32)
  glob = rng.normal(size=(n, d)).astype(np.float32)
  cache = token_cache.TokenCache(tmp_path, "k", n, layers, p, d)
  assert not cache.complete
  for s in (0, 4):
    idx = np.arange(s, s + 4)
    idx[idx >= n] = -1                       # padding rows
    cache.put(idx, tokens[:, np.clip(idx, 0, n - 1)], glob[np.clip(idx, 0, n - 1)])
  return cache, tokens, glob


def test_published_cache_reads_back_by_rows(tmp_path):
  cache, tokens, glob = _fill(tmp_path)
  assert cache.publish() and (tmp_path / "k" / "meta.json").is_file()
  again = token_cache.TokenCache(tmp_path, "k", 6, 2, 4, 3)
  assert again.complete and again.has(np.arange(6))
  views, g = again.rows(np.array([5, 1, 3]), (2, 2))
  np.testing.assert_array_equal(g, glob[[5, 1, 3]])
  for l, view in enumerate(views):
    assert view.shape == (3, 2, 2, 3) and len(view) == 3
    np.testing.assert_array_equal(view[np.array([0, 2])],          # rows 5, 3: unsorted
                                  tokens[l, [5, 3]].reshape(2, 2, 2, 3))
    np.testing.assert_array_equal(view.take(np.array([False, True, True]))[0:2],
                                  tokens[l, [1, 3]].reshape(2, 2, 2, 3))


def test_incomplete_cache_is_not_published_and_damage_is_recomputed(tmp_path, capsys):
  """A cache with an example missing stays unpublished; a published one whose
  file changed is said to be damaged (one line) and filled again, never read.
  Fails if a partial or damaged cache is trusted."""
  rng = np.random.default_rng(1)
  cache = token_cache.TokenCache(tmp_path, "k", 3, 1, 2, 2)
  cache.put(np.array([0, 1]), rng.normal(size=(1, 2, 2, 2)), rng.normal(size=(2, 2)))
  assert not cache.publish() and not (tmp_path / "k" / "meta.json").exists()
  cache, _, _ = _fill(tmp_path, seed=2)
  assert cache.publish()
  layer = tmp_path / "k" / "layer1.npy"
  data = bytearray(layer.read_bytes())
  data[-5] ^= 0xFF
  layer.write_bytes(bytes(data))
  lines = []
  again = token_cache.TokenCache(tmp_path, "k", 6, 2, 4, 3, say=lines.append)
  assert not again.complete and not again.has(np.arange(6))
  assert len(lines) == 1 and "damaged" in lines[0] and "fail their checksum" in lines[0]
  assert not (tmp_path / "k" / "meta.json").exists()


@pytest.mark.slow
def test_neighbour_modes_share_one_backbone_pass(tmp_path, monkeypatch):
  """A batch evaluation fills the data set's raw-token cache; the next batch
  evaluation and a few_shot one read it without running the backbone, and
  score exactly as without the cache (eval.token_cache=none).
  Fails if a later run recomputes the tokens or the cache changes a score."""
  import contextlib
  import io
  from adjax import experiment, neighbors, scoring_modes
  from adjax.data import synthetic
  gen = tmp_path / "gen"
  synthetic.generate(gen, image_size=64, per_category=6, seed=1, families=["b"])
  c = small_config(gen, tmp_path, **{
      "mode": "evaluate", "eval.scoring": "batch", "eval.rscin_k": (0,),
      "text.random_init": False, "text.checkpoint": "/nonexistent/text"})
  scored = []
  for name in ("mutual_maps", "bank_maps"):
    real = getattr(neighbors, name)

    def recording(*a, _real=real, **k):
      scored.append(_real(*a, **k))
      return scored[-1]
    monkeypatch.setattr(neighbors, name, recording)

  def run(workdir, **changes):
    for k, v in changes.items():
      section, field = k.split(".")
      c[section][field] = v
    scored.clear()
    with contextlib.redirect_stdout(io.StringIO()) as said:
      experiment.run(c, str(tmp_path / workdir))
    return list(scored), said.getvalue()

  fresh, said = run("w1")
  assert "raw-token cache" in said and "filled by this evaluation" in said
  assert "complete (later neighbour-mode runs read it)" in said
  real_build = scoring_modes.NeighbourScorer._build_step

  def no_backbone(self):
    step = real_build(self)

    def refuse(*a, **k):
      raise AssertionError("the backbone ran although the tokens are cached")
    return refuse if not self.with_head else step
  monkeypatch.setattr(scoring_modes.NeighbourScorer, "_build_step", no_backbone)
  cached, said = run("w2")
  assert "complete: the backbone is not run" in said
  for a, b in zip(fresh, cached, strict=True):
    np.testing.assert_array_equal(a, b)
  few_cached, _ = run("w3", **{"eval.scoring": "few_shot", "eval.references": 1})
  monkeypatch.setattr(scoring_modes.NeighbourScorer, "_build_step", real_build)
  few_fresh, _ = run("w4", **{"eval.token_cache": "none"})
  for a, b in zip(few_fresh, few_cached, strict=True):
    np.testing.assert_array_equal(a, b)
  results = json.loads((tmp_path / "w3" / "results" / "family_b.few_shot.json").read_text())
  assert results["mean"]["pixel_auroc"] > 0.5
