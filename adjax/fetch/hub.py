"""Converted weights fetched by hub id: download, convert, verify, in one step.

A run whose `backbone.checkpoint` or `text.checkpoint` folder is missing and
whose `backbone.hub_id` / `text.hub_id` names a Hugging Face repository gets
it here: the repository's json, safetensors and tokenizer files are fetched
with huggingface_hub (its own cache, resumable downloads and progress bars,
its offline mode and endpoint settings), converted by the matching
converter, and the converted tower is checked against transformers' own
model on the same input before the folder appears under its final name.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from adjax.common import atomic
from adjax.common.errors import UserError
import json

# A converted tower's output against transformers' on one input, float32:
# max |ours - theirs| <= VERIFY_RTOL * max(1, max |theirs|).
VERIFY_RTOL = 1e-3

# What a Hugging Face model folder holds its weights in (converters.common).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

CONVERTERS = {"dinov3": "converters.dinov3", "dinov2": "converters.dinov2",
              "clip_text": "converters.clip_text"}


class FetchError(UserError):
  """Weights that could not be fetched, converted or verified: one line."""


def _gated_message(hub_id: str) -> str:
  return (f"{hub_id}: the weights are gated behind their licence on the Hugging Face hub; "
          f"accept it (logged in) at https://huggingface.co/{hub_id}, then run "
          "`hf auth login` or export HF_TOKEN=<a read token>, and run this command again")


def snapshot(hub_id: str, field: str) -> Path:
  """The hub repository's files in the local Hugging Face cache (fetched when
  missing); FetchError naming what to do otherwise."""
  from huggingface_hub import errors as hf_errors  # deferred: optional, only to fetch
  from huggingface_hub import snapshot_download  # deferred: optional, only to fetch
  manual = (f"or convert by hand (python -m {CONVERTERS.get(field, 'converters')} --src "
            "<downloaded files> --dst <checkpoint>)")
  try:
    folder = Path(snapshot_download(
        hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
      # A repository without safetensors weights: its PyTorch ones instead.
      folder = Path(snapshot_download(
          hub_id, allow_patterns=["pytorch_model*.bin", "*.json", "*.txt"]))
    return folder
  except hf_errors.GatedRepoError:
    raise FetchError(_gated_message(hub_id)) from None
  except hf_errors.RepositoryNotFoundError:
    raise FetchError(
        f"{hub_id}: no such repository on the Hugging Face hub, or a gated one and no "
        f"token was given (accept its licence at https://huggingface.co/{hub_id}, then "
        "`hf auth login` or export HF_TOKEN); check the hub_id, " + manual) from None
  except hf_errors.LocalEntryNotFoundError as e:
    raise FetchError(
        f"{hub_id}: the Hugging Face hub cannot be reached and the files are not in the "
        f"local cache ({' '.join(str(e).split())[:160]}); connect and run again, "
        + manual) from None
  except (hf_errors.HfHubHTTPError, OSError) as e:
    raise FetchError(f"{hub_id}: fetching from the Hugging Face hub failed "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                     + manual) from None


def convert(kind: str, src: Path, dst: Path) -> None:
  if kind == "dinov3":
    from converters import dinov3  # deferred: optional, only to fetch
    dinov3.convert(os.fspath(src), os.fspath(dst))
  elif kind == "dinov2":
    from converters import dinov2  # deferred: optional, only to fetch
    dinov2.convert(os.fspath(src), os.fspath(dst))
  elif kind == "clip_text":
    from converters import clip_text  # deferred: optional, only to fetch
    clip_text.convert(src, dst)
  else:
    raise FetchError(f"no converter for {kind!r}; expected one of {sorted(CONVERTERS)}")


def _check(what: str, ours: np.ndarray, ref: np.ndarray) -> float:
  err = float(np.abs(ours - ref).max())
  scale = max(1.0, float(np.abs(ref).max()))
  if ours.shape != ref.shape or not err <= VERIFY_RTOL * scale:
    raise FetchError(
        f"{what}: the converted weights do not reproduce transformers' output (max abs "
        f"difference {err:.3g}, allowed {VERIFY_RTOL * scale:.3g}); nothing was written")
  return err / scale


def verify(kind: str, src: Path, converted: Path, what: str) -> float:
  """Runs the converted tower and transformers' model from `src` on one fixed
  input; returns the relative max difference (FetchError above VERIFY_RTOL)."""
  import jax.numpy as jnp  # deferred: optional, only to fetch
  import torch  # deferred: optional, only to fetch
  import transformers  # deferred: optional, only to fetch
  transformers.utils.logging.disable_progress_bar()   # a bar per load says nothing here
  rng = np.random.default_rng(0)
  with torch.no_grad():
    if kind in ("dinov3", "dinov2"):
      from adjax.models import backbones  # deferred: optional, only to fetch
      module = backbones.family_module(kind)
      model = module.load(converted)
      ref_model = transformers.AutoModel.from_pretrained(src, dtype=torch.float32).eval()
      side = 4 * model.config.patch_size
      images = rng.standard_normal((1, side, side, 3)).astype(np.float32)
      res = ref_model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
      ref = res.last_hidden_state.numpy()
      ours = np.asarray(model.get_intermediate_layers(jnp.asarray(images), [-1])[0])
      return _check(what, ours, ref)
    from adjax.models import clip_text, clip_tokenizer  # deferred: optional, only to fetch
    model = clip_text.load(converted)
    tokenizer = clip_text.load_tokenizer(converted)
    ids = clip_tokenizer.tokenize(tokenizer, ["a photo of a flawless bottle.",
                                              "a photo of a damaged bottle."],
                                  model.config.context_length)
    t = torch.from_numpy(np.asarray(ids)).long()
    if json.loads((src / "config.json").read_text()).get("model_type") == "clip":
      # A whole CLIPModel (the OpenAI repositories): its text path, as it
      # embeds text (the pooled EOT token through text_projection).
      clip = transformers.CLIPModel.from_pretrained(src, dtype=torch.float32).eval()
      ref = clip.text_projection(clip.text_model(input_ids=t).pooler_output).numpy()
    else:
      ref_model = transformers.CLIPTextModelWithProjection.from_pretrained(
          src, dtype=torch.float32).eval()
      ref = ref_model(input_ids=t).text_embeds.numpy()
    ours = np.asarray(model.encode_text(jnp.asarray(ids)))
    return _check(what, ours, ref)


def ensure(kind: str, hub_id: str, dst: str | os.PathLike, field: str) -> Path:
  """`dst` (a converted checkpoint folder), fetched from `hub_id`, converted
  and verified when it is missing. Written atomically: an error or Ctrl-C
  leaves no `dst`."""
  dst = Path(dst)
  if dst.is_dir():
    return dst
  if not hub_id:
    raise FetchError(
        f"{field}.checkpoint={os.fspath(dst)!r} does not exist and {field}.hub_id is empty; "
        f"convert the weights (python -m {CONVERTERS.get(kind, 'converters')} --src ... "
        f"--dst {dst}), set {field}.hub_id, or set {field}.random_init=True")
  try:
    import torch  # noqa: F401  deferred: the check runs transformers' PyTorch model
  except ImportError:
    raise FetchError(
        f"{field}.checkpoint={os.fspath(dst)!r} is missing and fetching it from {hub_id} "
        "checks the conversion against transformers' PyTorch model, which needs PyTorch: "
        "pip install -e '.[convert]'") from None
  print(f"{field}: {dst} is missing; fetching {hub_id} from the Hugging Face hub "
        "(resumable), then converting and verifying it", file=sys.stderr, flush=True)
  src = snapshot(hub_id, kind)
  with atomic.atomic_dir(dst) as tmp:
    print(f"{field}: converting {hub_id}", file=sys.stderr, flush=True)
    convert(kind, src, tmp / "converted")
    print(f"{field}: verifying against transformers' {kind} model", file=sys.stderr,
          flush=True)
    rel = verify(kind, src, tmp / "converted", f"{field} {hub_id}")
    for child in list((tmp / "converted").iterdir()):
      os.replace(child, tmp / child.name)
    (tmp / "converted").rmdir()
  print(f"{field}: wrote {dst} from {hub_id} (verified: max difference {rel:.1e} of "
        "the output's scale)", file=sys.stderr, flush=True)
  return dst
