"""Cost of the prompt-ensemble text embeddings: once per run vs once per image.

  python -m adjax.bench text [--variant vit-l-14] [--activation gelu]
                             [--epoch-images 1725] [--merges 2000]

Random weights of the chosen CLIP text architecture (ViT-L/14 by default;
the cost does not depend on the values) and a byte-level BPE vocabulary
learned on the prompt sentences (so sentences have word-level token counts,
~10-15 tokens, as with the real vocabulary). Measured:

1. `prompts.text_embeddings` for the 15 MVTec object names in a fresh
   process: tokenising 15 x 420 sentences, compiling, one batched pass. This
   is what a run pays once (then once more never: the result is cached).
2. The same call again: a cache hit.
3. The release's way: one object's 420-sentence ensemble encoded at the full
   77-token context, timed once after an ahead-of-time compile. Re-encoding
   it for every image of a 1725-image epoch costs 1725 times that; the epoch
   figure is extrapolated from the one measured ensemble, not measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from adjax.models import prompts
from adjax.models import clip_text

MVTEC = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
         "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m adjax.bench text", description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="vit-l-14", choices=sorted(clip_text.VARIANTS))
  parser.add_argument("--activation", default="gelu", choices=("gelu", "quick_gelu"))
  parser.add_argument("--epoch-images", type=int, default=1725)
  parser.add_argument("--merges", type=int, default=2000,
                      help="BPE merges learned on the prompt sentences")
  args = parser.parse_args(argv)

  config = dataclasses.replace(clip_text.VARIANTS[args.variant], activation=args.activation)
  print(f"devices: {jax.devices()}")
  start = time.perf_counter()
  model = clip_text.init_random(config, seed=0)
  print(f"{args.variant} text tower ({config.layers} layers, width {config.width}), "
        f"activation {config.activation}: random init {time.perf_counter() - start:.1f} s")

  corpus = [s for o in MVTEC for g in prompts.prompt_sentences(o) for s in g]
  with tempfile.TemporaryDirectory() as tok_dir:
    clip_text.write_byte_level_tokenizer(tok_dir, corpus, num_merges=args.merges)
    tokenizer = clip_text.load_tokenizer(tok_dir)
  lengths = [len(x) for x in tokenizer(corpus)["input_ids"]]
  print(f"prompt sentences: {len(corpus)} for {len(MVTEC)} objects, "
        f"{min(lengths)}-{max(lengths)} tokens with SOT/EOT")

  model_id = prompts.model_id_of(model)
  start = time.perf_counter()
  table = prompts.text_embeddings(model, tokenizer, MVTEC, model_id=model_id)
  once = time.perf_counter() - start
  start = time.perf_counter()
  prompts.text_embeddings(model, tokenizer, MVTEC, model_id=model_id)
  hit = time.perf_counter() - start
  print(f"once per run, 15 objects -> {table.shape}: {once:.1f} s "
        f"(tokenise + compile + one batched pass); cache hit: {hit * 1e3:.2f} ms")

  # The release: the 420 sentences of one object, full 77-token context.
  normal, abnormal = prompts.prompt_sentences("metal_nut")
  ids = jnp.asarray(clip_text.tokenize(tokenizer, normal + abnormal, config.context_length))
  graphdef, state = nnx.split(model)
  encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode_text(x))
  start = time.perf_counter()
  compiled = encode.lower(state, ids).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(compiled(state, ids))
  per_ensemble = time.perf_counter() - start
  epoch = per_ensemble * args.epoch_images
  print(f"release-style, one ensemble of {ids.shape[0]} sentences x {ids.shape[1]} tokens: "
        f"{per_ensemble:.1f} s (measured once; compile {compile_s:.1f} s not included)")
  print(f"re-encoding it for every image of a {args.epoch_images}-image epoch: "
        f"{epoch:.0f} s = {epoch / 3600:.1f} h (extrapolated: {args.epoch_images} x "
        f"{per_ensemble:.1f} s)")
  print(f"ratio epoch re-encoding / once per run: {epoch / once:.0f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
