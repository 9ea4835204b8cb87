"""converters.head: a release `.pth` becomes a workdir that evaluate/predict restore.

The release file is built with torch from random weights in the release's
layout (`ClipAdapter` state dicts with `fc1.0` and the unused `fc2.0`); the
imported workdir is restored through `loading.trained_params` (the path
evaluate and predict take) and must give the same maps and logits as the
same weights placed directly in the head.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from adjax.config import schema
from adjax import experiment, loading
from adjax.common import sharding
from adjax.config import defaults as config_defaults
from adjax.ad_model import ADModel
from adjax.models import backbones, dinov3
from adjax.models import head as head_lib
from converters import head as head_converter

D, E, L = 384, 256, 4     # ViT-S/16 width, the tiny text tower's width, 4 taps


def tiny_config():
  c = config_defaults.base_config()
  c.backbone.variant = "vits16"
  c.backbone.random_init = True
  c.backbone.layers = (2, 5, 8, 11)
  c.text.variant = "tiny"
  c.text.random_init = True
  return c


def release_state(num_layers=L, feature_dim=D, text_dim=E, seed=0):
  """The release's `{'cls_token_adapter': sd, ...}` with random weights."""
  g = torch.Generator().manual_seed(seed)

  def adapters(n, c_in):
    sd = {}
    for i in range(n):
      sd[f"{i}.fc1.0.weight"] = torch.randn(text_dim, c_in, generator=g) / c_in ** 0.5
      sd[f"{i}.fc2.0.weight"] = torch.randn(c_in, text_dim, generator=g)
    return sd
  return {"cls_token_adapter": adapters(num_layers, feature_dim),
          "patch_token_adapter": adapters(num_layers, feature_dim),
          "prompt_adapter": adapters(2, text_dim)}


def direct_head(state):
  """The same weights placed in the head by hand (no converter involved)."""
  head = head_lib.ADHead(D, E, L, rngs=nnx.Rngs(0))
  for group, mods in (("cls_token_adapter", head.cls_adapters),
                      ("patch_token_adapter", head.patch_adapters),
                      ("prompt_adapter", head.text_adapters)):
    for i, mod in enumerate(mods):
      mod.kernel.set_value(jnp.asarray(state[group][f"{i}.fc1.0.weight"].numpy().T))
  return head


def head_outputs(head, quirk):
  rng = np.random.default_rng(1)
  grid = (4, 4)
  patches = head_lib.standardize_patches(jnp.asarray(rng.normal(size=(L, 2, 16, D)), jnp.float32))
  cls = jnp.asarray(rng.normal(size=(L, 2, D)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(3, 2, E)), jnp.float32)
  tmat = head.text_features(text, quirk)[jnp.array([2, 0])]
  return head(patches, cls, tmat, grid, (32, 32))


@pytest.mark.parametrize("short_names", [False, True])
def test_imported_workdir_matches_direct_placement(tmp_path, short_names):
  state = release_state()
  if short_names:   # `N.fc1.weight` spelling
    state = {g: {k.replace(".0.weight", ".weight"): v for k, v in sd.items()}
             for g, sd in state.items()}
  src = tmp_path / "99.pth"
  torch.save(state, src)
  cfg = tiny_config()
  summary = head_converter.convert(str(src), str(tmp_path / "run"), cfg)
  assert len(summary["ignored_keys"]) == 2 * L + 2      # every fc2, reported
  assert (tmp_path / "run" / "config.json").is_file()

  # trained_params needs only the model the towers describe (no weights).
  info = backbones.describe("dinov3", dinov3.VARIANTS["vits16"])
  towers = types.SimpleNamespace(model=lambda spec: ADModel.create(spec, info, E))
  cfg = schema.from_configdict(cfg)
  mesh = sharding.make_mesh(-1, 1)
  params, _, _ = loading.trained_params(cfg, tmp_path / "run", towers, mesh)
  head_def, _ = nnx.split(head_lib.ADHead(D, E, L, rngs=nnx.Rngs(0)))
  imported = nnx.merge(head_def, jax.device_get(params))
  if short_names:
    state = {g: {k.replace(".weight", ".0.weight"): v for k, v in sd.items()}
             for g, sd in state.items()}
  for quirk in (True, False):
    got, want = head_outputs(imported, quirk), head_outputs(direct_head(state), quirk)
    for key in ("cross", "aacm", "logits"):
      np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5,
                                 rtol=0, err_msg=key)


def test_cli_imports_and_serves_as_init_from(tmp_path, capsys):
  src = tmp_path / "5.pth"
  torch.save(release_state(), src)
  rc = head_converter.main([
      "--src", str(src), "--dst", str(tmp_path / "run"), "--config", "configs/demo.py"])
  assert rc == 0, capsys.readouterr().err
  assert "ignored 10 unused fc2 weights" in capsys.readouterr().out
  # A second import onto the same workdir is refused without --overwrite.
  rc = head_converter.main(["--src", str(src), "--dst", str(tmp_path / "run"),
                            "--config", "configs/demo.py"])
  assert rc == 2 and "already exists" in capsys.readouterr().err


def _refused(tmp_path, state, match, cfg=None):
  src = tmp_path / "bad.pth"
  torch.save(state, src)
  with pytest.raises(head_converter.ConversionError, match=match) as e:
    head_converter.convert(str(src), str(tmp_path / "out"), cfg or tiny_config())
  assert "\n" not in str(e.value)                   # one line
  assert not (tmp_path / "out").exists()            # nothing written
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
  return str(e.value)


def test_missing_key_refused(tmp_path):
  state = release_state()
  del state["patch_token_adapter"]["2.fc1.0.weight"]
  _refused(tmp_path, state, r"missing source keys: \['patch_token_adapter\.2\.fc1\.0\.weight'\]")


def test_wrong_shape_refused(tmp_path):
  state = release_state(feature_dim=1024)      # a ViT-L head against a ViT-S config
  msg = _refused(tmp_path, state, r"mis-shaped parameters: cls_adapters/0/kernel")
  assert "got (1024, 256), expected (384, 256)" in msg
  assert "feature width 384" in msg


def test_wrong_text_width_refused(tmp_path):
  _refused(tmp_path, release_state(text_dim=768), r"text_adapters/0/kernel")


def test_wrong_layer_count_refused(tmp_path):
  _refused(tmp_path, release_state(num_layers=3), r"adapters for 3 tapped layers, the config "
           r"taps 4.*missing source keys")
  _refused(tmp_path, release_state(num_layers=5), r"adapters for 5 tapped layers.*unexpected "
           r"source keys: \['cls_token_adapter\.4\.fc1\.0\.weight'")


def test_not_a_release_file_refused(tmp_path):
  _refused(tmp_path, {"model": {"w": torch.zeros(2)}}, r"no AD-DINOv3 adapter weights")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(head_converter.ConversionError, match="not a readable"):
    head_converter.convert(str(tmp_path / "junk.pth"), str(tmp_path / "o2"), tiny_config())
  assert not (tmp_path / "o2").exists()
