"""The few-shot bank as an artifact (adjax.workdir.banks): stored, checked on
load, and the one bank evaluation, the Detector and the export score with."""

import json

import numpy as np
import pytest

from adjax import neighbors
from adjax.workdir import banks
from demo_run import small_config


def _tokens(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _bank(tmp_path, coreset=0.0):
  refs = _tokens(1, 2, 3, 4, 4, 8)
  bank = banks.build(refs, names=["a.png", "b.png", "c.png"], image_digests=["x", "y", "z"],
                     backbone="vits16@abc", layers=(2, 5), image_size=64, r_list=(1, 3),
                     coreset=coreset, coreset_seed=2)
  return refs, bank, banks.save(bank, tmp_path / ("b" + banks.SUFFIX))


def test_bank_round_trip_scores_identically(tmp_path):
  """Saved and loaded, the bank is bit-identical and scores as
  `reference_maps` on the raw references (with and without a coreset)."""
  queries = _tokens(3, 2, 5, 4, 4, 8)
  for coreset in (0.0, 0.3):
    refs, bank, path = _bank(tmp_path, coreset)
    loaded = banks.load(path)
    np.testing.assert_array_equal(loaded.features, bank.features)
    np.testing.assert_array_equal(loaded.origin, bank.origin)
    assert loaded.identity == bank.identity and loaded.count == 3
    assert loaded.identity["coreset"] == (None if not coreset else
                                          {"coreset": 0.3, "seed": 2,
                                           "method": "greedy_k_center",
                                           "projection_dim": 128})
    got = neighbors.bank_maps(queries, loaded.features, (1, 3))
    want = neighbors.reference_maps(queries, refs, (1, 3), coreset=coreset, coreset_seed=2)
    np.testing.assert_array_equal(got, want)


def test_bank_without_a_reference_scores_as_the_others_alone(tmp_path):
  """Leave-one-out: the bank less reference 1 scores as a bank of 0 and 2.
  Fails if a dropped reference's patches stay reachable."""
  refs, bank, _ = _bank(tmp_path)
  queries = _tokens(4, 2, 3, 4, 4, 8)
  got = neighbors.bank_maps(queries, bank.without([1]).features, (1, 3))
  want = neighbors.reference_maps(queries, refs[:, [0, 2]], (1, 3))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got, neighbors.bank_maps(queries, bank.features, (1, 3)))


def test_damaged_or_foreign_bank_refused_in_one_line(tmp_path):
  _, bank, path = _bank(tmp_path)
  raw = bytearray(path.read_bytes())
  for name, data in (("flipped", raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1])
                      + raw[len(raw) // 2 + 1:]),
                     ("short", raw[:len(raw) // 3]), ("empty", b"")):
    bad = tmp_path / (name + banks.SUFFIX)
    bad.write_bytes(bytes(data))
    with pytest.raises(banks.BankError) as e:
      banks.load(bad)
    assert "damaged bank file" in str(e.value) and str(bad) in str(e.value)
    assert "\n" not in str(e.value)
  # A well-formed file whose arrays changed after its digest was taken (the
  # zip's own CRCs pass): refused by the content digest.
  with np.load(path) as f:
    parts = {k: f[k] for k in f.files}
  parts["features"] = parts["features"].copy()
  parts["features"][0, 0, 0, 0] += 1e-3
  edited = tmp_path / ("edited" + banks.SUFFIX)
  np.savez(edited, **parts)
  with pytest.raises(banks.BankError, match="differs from the digest"):
    banks.load(edited)
  model = dict(backbone="vits16@abc", layers=(2, 5), image_size=64, r_list=(1, 3))
  bank.check(**model, where="here")
  for change, needle in (({"backbone": "vitl16@def"}, "backbone 'vits16@abc'"),
                         ({"image_size": 128}, "image_size 64 (expected 128)"),
                         ({"r_list": (1,)}, "r_list [1, 3] (expected [1])")):
    with pytest.raises(banks.BankError) as e:
      bank.check(**dict(model, **change), where="here")
    assert needle in str(e.value) and "another model" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_build_bank_then_evaluate_scores_with_the_stored_bank(tmp_path, monkeypatch):
  """mode=build_bank stores each category's bank (all of <category>/train/good,
  eval.references_split=train, a coreset); evaluate then loads it (no bank
  built) and scores exactly as an evaluation that builds it afresh; the
  Detector's bank of the same images has the same identity and features.
  Fails if evaluate rebuilds a stored bank, or the stored bank differs."""
  import contextlib
  import io
  from adjax import experiment
  from adjax.data import synthetic
  from adjax.detector import Detector
  gen = tmp_path / "gen"
  synthetic.generate(gen, image_size=64, per_category=6, seed=1, families=["b"],
                     train_per_category=5)
  c = small_config(gen, tmp_path, **{
      "mode": "build_bank", "eval.scoring": "few_shot", "eval.references_split": "train",
      "eval.references": 0, "eval.coreset": 0.5, "eval.r_list": (1, 3),
      "text.random_init": False, "text.checkpoint": "/nonexistent/text"})
  work = tmp_path / "work"
  with contextlib.redirect_stdout(io.StringIO()) as said:
    experiment.run(c, str(work))
  stored = sorted((work / "banks" / "family_b").glob("*" + banks.SUFFIX))
  cats = sorted(p.name for p in (gen / "family_b").iterdir())
  assert [p.name for p in stored] == [f"{cat}{banks.SUFFIX}" for cat in cats]
  assert said.getvalue().count("bank of 5 references") == len(cats)
  first = banks.load(stored[0])
  assert first.references == sorted(str(p) for p in
                                     (gen / "family_b" / cats[0] / "train" / "good").glob("*"))
  patches = 5 * (64 // 16) ** 2
  assert first.features.shape[2] == round(0.5 * patches)

  scored = []
  real = neighbors.bank_maps

  def recording(*a, **k):
    scored.append(real(*a, **k))
    return scored[-1]
  monkeypatch.setattr(neighbors, "bank_maps", recording)

  def no_build(*a, **k):
    raise AssertionError("a stored bank was built again")
  c.mode = "evaluate"
  with monkeypatch.context() as m:
    m.setattr(banks, "build", no_build)
    with contextlib.redirect_stdout(io.StringIO()):
      experiment.run(c, str(work))
  from_store, scored[:] = list(scored), []
  for p in stored:
    p.unlink()
  with contextlib.redirect_stdout(io.StringIO()):
    experiment.run(c, str(work))
  assert len(from_store) == len(scored) == len(cats)
  for a, b in zip(from_store, scored):
    np.testing.assert_array_equal(a, b)
  rebuilt = banks.load(stored[0])
  np.testing.assert_array_equal(rebuilt.features, first.features)
  results = json.loads((work / "results" / "family_b.few_shot.json").read_text())
  assert results["identity"]["eval"]["references_split"] == "train"

  c.mode, c.predict.scoring, c.predict.references = "predict", "few_shot", str(stored[0])
  det = Detector.from_config(c, work)
  det.use_references(str(gen / "family_b" / cats[0] / "train" / "good"), store=False)
  assert det.bank == first.bank
  np.testing.assert_allclose(det.references.features, first.features, rtol=0, atol=1e-5)
