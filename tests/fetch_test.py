"""Fetching weights and data (adjax.fetch), tested without the internet.

A loopback HTTP server (127.0.0.1, this process's threads only) serves small
archives in the published layouts, and can cut a response short or answer as
the Hugging Face hub answers for a gated repository. Weights come from a
local Hugging Face cache layout holding tiny random transformers models under
the real hub ids, read in the hub client's offline mode.
"""

import contextlib
import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adjax import fetch
from adjax.data import DatasetNotFoundError
from adjax.fetch import archives, http as fetch_http
from adjax.fetch import hub as fetch_weights

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ the server

class _Server:
  """Files by URL path; `cut[path]` bytes sent (then the connection closed)
  on the first request of `path`; /api/* answers 403 GatedRepo."""

  def __init__(self):
    self.files: dict[str, bytes] = {}
    self.cut: dict[str, int] = {}
    self.requests: list[tuple[str, str | None]] = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_GET(self):
        outer.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/api/"):
          self.send_response(403)
          self.send_header("X-Error-Code", "GatedRepo")
          self.send_header("X-Error-Message", "Access to this model is restricted.")
          self.send_header("Content-Length", "0")
          self.end_headers()
          return
        body = outer.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
          start = int(rng[6:].split("-")[0])
          if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
          self.send_response(206)
          self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
          self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        n = outer.cut.pop(self.path, None)
        self.wfile.write(body[start:start + n] if n is not None else body[start:])
        if n is not None:
          self.close_connection = True

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def url(self, path: str) -> str:
    return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _png(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def mvtec_archive(categories=("tile",), wrap: str = "") -> bytes:
  """A tar.xz in MVTec AD's layout: per category 2 good and 2 defective test
  images with masks, 2 training images, and the licence file at the top."""
  rng = np.random.default_rng(0)
  files = {"license.txt": b"CC BY-NC-SA 4.0"}
  for c in categories:
    for i in range(2):
      files[f"{c}/train/good/{i:03d}.png"] = _png(rng.integers(0, 255, (32, 32, 3)))
      files[f"{c}/test/good/{i:03d}.png"] = _png(rng.integers(0, 255, (32, 32, 3)))
      files[f"{c}/test/crack/{i:03d}.png"] = _png(rng.integers(0, 255, (32, 32, 3)))
      mask = np.zeros((32, 32), np.uint8)
      mask[8:16, 8:16] = 255
      files[f"{c}/ground_truth/crack/{i:03d}_mask.png"] = _png(mask)
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:xz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"{wrap}{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


# ------------------------------------------------------- one file, HTTP

def test_download_verified_atomic_umask_and_progress(server, tmp_path, capsys):
  data = os.urandom(3 << 20)
  server.files["/a.bin"] = data
  dst = tmp_path / "d" / "a.bin"
  old = os.umask(0o027)
  try:
    fetch_http.download(server.url("/a.bin"), dst, _sha(data), size=len(data), what="a")
  finally:
    os.umask(old)
  assert dst.read_bytes() == data
  assert dst.stat().st_mode & 0o777 == 0o640
  assert sorted(p.name for p in dst.parent.iterdir()) == ["a.bin"]
  assert "a: 3.1 MB / 3.1 MB (100%)" in capsys.readouterr().err
  # A present file is trusted (only a verified one ever gets the name).
  n = len(server.requests)
  fetch_http.download(server.url("/a.bin"), dst, _sha(data))
  assert len(server.requests) == n


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
  data = os.urandom(5 << 20)
  server.files["/big.tar"] = data
  server.cut["/big.tar"] = 2 << 20
  dst = tmp_path / "big.tar"
  with pytest.raises(fetch_http.DownloadError) as err:
    fetch_http.download(server.url("/big.tar"), dst, _sha(data), size=len(data),
                        what="big")
  assert "\n" not in str(err.value) and "resumes" in str(err.value)
  assert not dst.exists()
  part = fetch_http.partial_path(dst)
  assert part.stat().st_size == 2 << 20
  fetch_http.download(server.url("/big.tar"), dst, _sha(data), size=len(data), what="big")
  assert server.requests[-1] == ("/big.tar", f"bytes={2 << 20}-")
  assert dst.read_bytes() == data and not part.exists()


def test_wrong_checksum_and_no_network_leave_nothing(server, tmp_path):
  data = b"x" * 5000
  server.files["/f"] = data
  dst = tmp_path / "f"
  with pytest.raises(fetch_http.DownloadError, match="differs from the published") as err:
    fetch_http.download(server.url("/f"), dst, _sha(b"other"), what="f")
  assert "\n" not in str(err.value)
  assert list(tmp_path.iterdir()) == []
  url = f"http://127.0.0.1:{_closed_port()}/f"
  with pytest.raises(fetch_http.DownloadError, match="cannot download") as err:
    fetch_http.download(url, dst, _sha(data), what="f")
  assert "\n" not in str(err.value)
  assert list(tmp_path.iterdir()) == []
  with pytest.raises(fetch_http.DownloadError, match="HTTP 404"):
    fetch_http.download(server.url("/missing"), dst, _sha(data), what="f")
  assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------- archives

def test_extract_strips_one_wrapping_folder_and_refuses_escapes(tmp_path):
  (tmp_path / "a.tar.xz").write_bytes(mvtec_archive(wrap="mvtec/"))
  archives.extract(tmp_path / "a.tar.xz", tmp_path / "out", "mvtec_ad")
  assert (tmp_path / "out" / "tile" / "test" / "crack" / "001.png").is_file()
  assert (tmp_path / "out" / "license.txt").is_file()
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name in ("ok.txt", "../escape.txt"):
      info = tarfile.TarInfo(name)
      info.size = 1
      tar.addfile(info, io.BytesIO(b"x"))
  (tmp_path / "bad.tar").write_bytes(buf.getvalue())
  with pytest.raises(archives.ArchiveError, match="cannot unpack"):
    archives.extract(tmp_path / "bad.tar", tmp_path / "bad", "x")
  assert not (tmp_path / "bad").exists() and not (tmp_path / "escape.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.xz", "bad.tar", "out"]


# ----------------------------------------------------- data sets, licence

def _data_cfg(tmp_path, url="", download=False):
  from adjax.config import defaults
  c = defaults.base_config()
  c.data.manual_dirs.mvtec_ad = str(tmp_path / "data" / "mvtec_anomaly_detection")
  c.data.data_dir = str(tmp_path / "data" / "tfds")
  c.data.sources.mvtec_ad = url
  c.data.download = download
  return c


def test_dataset_downloaded_with_consent_and_prepared(server, tmp_path, capsys):
  from adjax.data import targets as datasets
  blob = mvtec_archive(("tile", "nut"))
  server.files["/mvtec.tar.xz"] = blob
  cfg = _data_cfg(tmp_path, server.url("/mvtec.tar.xz") + f"#sha256={_sha(blob)}", True)
  handle = datasets.prepare(cfg, "mvtec_ad")
  assert handle.categories == ["nut", "tile"] and handle.num_examples == 8
  err = capsys.readouterr().err
  assert "CC BY-NC-SA 4.0" in err and "sha256 verified" in err
  root = tmp_path / "data"
  assert sorted(p.name for p in root.iterdir()) == ["downloads", "mvtec_anomaly_detection",
                                                    "tfds"]
  assert list((root / "downloads").iterdir()) == []    # the archive, once unpacked


def test_dataset_without_consent_is_not_downloaded(server, tmp_path, monkeypatch, capsys):
  from adjax.data import targets as datasets
  blob = mvtec_archive()
  server.files["/m.tar.xz"] = blob
  cfg = _data_cfg(tmp_path, server.url("/m.tar.xz") + f"#sha256={_sha(blob)}", False)
  # No terminal: the not-found error, naming the switch and the licence.
  monkeypatch.setattr(sys, "stdin", io.StringIO(""))
  with pytest.raises(DatasetNotFoundError, match=r"data.download=True downloads it: .*"
                     r"CC BY-NC-SA 4.0") as err:
    datasets.prepare(cfg, "mvtec_ad")
  assert "data.download=True" in str(err.value).splitlines()[0]
  # A terminal: asked; "n" refuses in one line.
  tty = io.StringIO("n\n")
  tty.isatty = lambda: True
  monkeypatch.setattr(sys, "stdin", tty)
  with pytest.raises(fetch.LicenceRefused, match="licence not accepted") as err:
    datasets.prepare(cfg, "mvtec_ad")
  assert "\n" not in str(err.value)
  # At a run's start: a refused evaluation target is left to be listed as
  # absent (no error, not asked again); a refused training set stops the run.
  cfg.mode, cfg.data.train, cfg.data.targets = "train", str(tmp_path), "mvtec_ad"
  fetch.ensure_datasets(cfg)
  with pytest.raises(DatasetNotFoundError, match="licence not accepted"):   # what
    datasets.prepare(cfg, "mvtec_ad")     # evaluate_targets lists as an absent target
  cfg.data.train = "mvtec_ad"
  with pytest.raises(fetch.LicenceRefused):
    fetch.ensure_datasets(cfg)
  assert capsys.readouterr().out.count("accept its licence? [y/N]") == 1   # asked once
  assert server.requests == [] and not (tmp_path / "data").exists()


def test_bad_source_override_is_one_line(tmp_path):
  from adjax.fetch import sources
  with pytest.raises(fetch.UserError, match=r"data.sources.mvtec_ad=.*expected"):
    sources.data_source("mvtec_ad", "ftp://x/y.tar")
  assert sources.data_source("mvtec_ad").sha256 == (
      "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d")


# ------------------------------------------------------------- weights

DINO_ID = "facebook/dinov3-vits16-pretrain-lvd1689m"
CLIP_ID = "openai/clip-vit-large-patch14-336"


def _cache_entry(cache: Path, repo_id: str, save) -> Path:
  """A Hugging Face cache entry for `repo_id` (refs/main -> one snapshot),
  its files written by `save(folder)`."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  save(snap)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  return snap


def hub_cache(cache: Path, *, depth: int = 4) -> Path:
  """Tiny random DINOv3 and CLIP text models under the real hub ids."""
  import torch
  import transformers

  from adjax.models import clip_tokenizer
  torch.manual_seed(0)
  dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
      num_register_tokens=4, layerscale_value=0.5, hidden_size=64, intermediate_size=128,
      num_hidden_layers=depth, num_attention_heads=4)).eval()
  with torch.no_grad():               # non-trivial norms and biases
    for p in dino.parameters():
      p.add_(0.02 * torch.randn_like(p))
  _cache_entry(cache, DINO_ID, dino.save_pretrained)

  def save_clip(folder):
    # As the OpenAI repository: a whole CLIPModel (vision tower too), its
    # weights as pytorch_model.bin, the tokenizer's vocab.json + merges.txt.
    v = clip_tokenizer.write_byte_level_tokenizer(folder, ["a photo of a bottle"],
                                                  num_merges=20)
    text = dict(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77,
                bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=16))
    clip.config.save_pretrained(folder)
    torch.save(clip.state_dict(), folder / "pytorch_model.bin")
  _cache_entry(cache, CLIP_ID, save_clip)
  return cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  import huggingface_hub.constants as c
  cache = hub_cache(tmp_path / "hf")
  monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
  return cache


def test_weights_fetched_converted_and_verified(offline_hub, tmp_path, capsys):
  from adjax.models import clip_text, dinov3
  dst = tmp_path / "checkpoints" / "dinov3_vits16"
  fetch_weights.ensure("dinov3", DINO_ID, dst, "backbone")
  assert dinov3.load(dst).config.depth == 4
  text = tmp_path / "checkpoints" / "clip"
  fetch_weights.ensure("clip_text", CLIP_ID, text, "text")
  assert clip_text.load(text).config.embed_dim == 16
  err = capsys.readouterr().err
  assert err.count("verified: max difference") == 2
  assert sorted(p.name for p in dst.parent.iterdir()) == ["clip", "dinov3_vits16"]


def test_dinov2_fetched_and_verified_at_another_size(tmp_path, monkeypatch):
  """`:dinov2`'s repository (registers, position embeddings for 518 px): the
  check runs at 56 px, through the resized position embeddings."""
  import huggingface_hub.constants as c
  import torch
  import transformers

  from adjax.models import dinov2
  torch.manual_seed(1)
  model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_register_tokens=4, image_size=518, patch_size=14)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  hub_id = "facebook/dinov2-with-registers-large"
  _cache_entry(tmp_path / "hf", hub_id, model.save_pretrained)
  monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
  monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
  fetch_weights.ensure("dinov2", hub_id, tmp_path / "ck", "backbone")
  assert dinov2.load(tmp_path / "ck").config.num_registers == 4


def test_weights_that_do_not_reproduce_are_not_written(offline_hub, tmp_path, monkeypatch):
  """A conversion bug (the final norm's bias shifted by 0.01) is caught by the
  check against transformers, and nothing appears under the final name."""
  import shutil

  from adjax.models import dinov3, weights
  real = fetch_weights.convert

  def buggy(kind, src, dst):
    real(kind, src, dst)
    flat, meta = weights.load(dst, dinov3.KIND)
    flat["norm/bias"] = flat["norm/bias"] + 0.01
    shutil.rmtree(dst)
    weights.save(dst, flat, meta)
  monkeypatch.setattr(fetch_weights, "convert", buggy)
  dst = tmp_path / "ck"
  with pytest.raises(fetch_weights.FetchError, match="do not reproduce") as err:
    fetch_weights.ensure("dinov3", DINO_ID, dst, "backbone")
  assert "\n" not in str(err.value)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".ck", "ck"))] == []


def test_gated_and_unreachable_hub_are_one_line(server, tmp_path, monkeypatch):
  import huggingface_hub.constants as c
  monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(c, "ENDPOINT", server.url(""))
  monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE",
                      server.url("") + "/{repo_id}/resolve/{revision}/{filename}")
  dst = tmp_path / "ck"
  with pytest.raises(fetch_weights.FetchError, match="gated behind their licence") as err:
    fetch_weights.ensure("dinov3", DINO_ID, dst, "backbone")
  assert "hf auth login" in str(err.value) and "\n" not in str(err.value)
  monkeypatch.setattr(c, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
  with pytest.raises(fetch_weights.FetchError, match="cannot be reached|failed") as err:
    fetch_weights.ensure("dinov3", DINO_ID, dst, "backbone")
  assert "\n" not in str(err.value)
  assert not dst.exists()


# ------------------------------------- the paper's command, from nothing

@pytest.mark.slow
def test_mvtec_cpu_from_an_empty_checkout(server, tmp_path):
  """configs/mvtec.py:cpu in an empty folder: weights from the (offline) hub
  cache, MVTec AD from the loopback server, then training starts."""
  cache = hub_cache(tmp_path / "hf")
  blob = mvtec_archive(("tile", "nut"))
  server.files["/mvtec_anomaly_detection.tar.xz"] = blob
  work = tmp_path / "checkout"
  work.mkdir()
  (work / "configs").mkdir()
  (work / "configs" / "mvtec.py").write_text((ROOT / "configs" / "mvtec.py").read_text())
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache),
             PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "adjax.main", "--config=configs/mvtec.py:cpu",
          "--config.data.download=True",
          "--config.data.sources.mvtec_ad=" + server.url("/mvtec_anomaly_detection.tar.xz")
          + f"#sha256={_sha(blob)}",
          "--config.backbone.variant=", "--config.backbone.layers=(0,1,2,3)",
          "--config.image_size=32", "--config.batch_size=8", "--config.epochs=1",
          "--config.eval.enabled=False"]
  proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (work / "checkpoints" / "dinov3_vits16" / "config.json").is_file()
  assert (work / "checkpoints" / "clip_vitl14_336_text" / "vocab.json").is_file()
  assert (work / "data" / "mvtec_anomaly_detection" / "tile" / "test").is_dir()
  assert any((work / "runs" / "mvtec_cpu").rglob("*_CHECKPOINT_METADATA")) or any(
      (work / "runs" / "mvtec_cpu" / "checkpoints").iterdir())
  # A second run finds everything in place: nothing fetched again.
  n = len(server.requests)
  again = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(server.requests) == n and "fetching" not in again.stderr
  # The data set is fetched (and its licence shown) before the weights.
  err = proc.stderr
  assert err.index("mvtec_ad: licence CC BY-NC-SA 4.0") < err.index("backbone: ")
  assert "Loading weights" not in err and "Metadata file" not in err


def test_paper_command_with_no_network_is_one_line(tmp_path):
  """The run's command, its data set unreachable: one `error:` line, exit 2,
  before any weights are fetched, nothing written under data/ or checkpoints/."""
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mvtec.py").write_text((ROOT / "configs" / "mvtec.py").read_text())
  url = f"http://127.0.0.1:{_closed_port()}/m.tar.xz#sha256={'0' * 64}"
  env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
             HF_HUB_CACHE=str(tmp_path / "hf"))
  proc = subprocess.run(
      [sys.executable, "-m", "adjax.main", "--config=configs/mvtec.py:cpu",
       "--config.data.download=True", f"--config.data.sources.mvtec_ad={url}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "mvtec_ad: cannot download" in errors[0], proc.stderr
  assert "Traceback" not in proc.stderr and "backbone:" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
  assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []


def test_a_complete_partial_file_is_checked_not_fetched_again(server, tmp_path):
  """A run stopped after the last byte but before the rename: the next call
  checks the digest (asking the server at most for the empty rest)."""
  data = os.urandom(70_000)
  server.files["/c.tar"] = data
  dst = tmp_path / "c.tar"
  fetch_http.partial_path(dst).write_bytes(data)
  fetch_http.download(server.url("/c.tar"), dst, _sha(data), size=len(data), what="c")
  assert dst.read_bytes() == data and server.requests == []
  # Size unknown: the server's 416 for the empty rest is not an error.
  server.files["/d.tar"] = data
  dst2 = tmp_path / "d.tar"
  fetch_http.partial_path(dst2).write_bytes(data)
  fetch_http.download(server.url("/d.tar"), dst2, _sha(data), what="d")
  assert dst2.read_bytes() == data
  assert server.requests == [("/d.tar", f"bytes={len(data)}-")]
